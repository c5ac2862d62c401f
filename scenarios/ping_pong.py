"""N round trips of vm1 between the first two hosts; a guest workload must survive every hop.

Before the first hop the worker writes a 16 MiB memory checksum in the guest and starts a
background counter; after every hop check_worker proves the guest's memory intact (the
checksum verifies), the counter process alive and still counting.

    migrate-run -m hostA,hostB ping_pong [-p scenario.rounds=3]
"""

import asyncio

from migrator import MultihostMigration


class PingPong(MultihostMigration):
    async def migration_scenario(self):
        rounds = int(self.params.scenario.get("rounds", 2))
        state = {}

        async def worker(mig_data):
            session = await self.env.get_vm("vm1").wait_for_login(timeout=self.login_timeout)
            if "pid" not in state:
                await session.cmd("memsum write 16 2026")
                state["pid"] = (await session.cmd(
                    # written then renamed: a reader never sees the file truncated and empty;
                    # the first value is written before the counter starts, so the 'cat'
                    # below never runs ahead of it (with one vCPU the shell may go on before
                    # the background job has run at all: seen in the suite, no /tmp/count)
                    "echo 0 > /tmp/count; "
                    "(i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; "
                    "mv /tmp/count.new /tmp/count; sleep 0.2; done) "
                    "</dev/null >/dev/null 2>&1 & echo $!")).strip()
            await session.cmd(f"kill -0 {state['pid']}")
            state["count"] = int(await session.cmd("cat /tmp/count"))

        async def check_worker(mig_data):
            session = await self.env.get_vm("vm1").wait_for_login(timeout=self.login_timeout)
            await session.cmd("memsum verify")
            await session.cmd(f"kill -0 {state['pid']}")       # the workload survived
            async with asyncio.timeout(self.params.timeouts.guest_cmd_s):
                while int(await session.cmd("cat /tmp/count")) <= state["count"]:
                    await asyncio.sleep(0.2)                 # and it keeps counting here

        src, dst = self.hosts[0], self.hosts[1]
        for _ in range(2 * rounds):
            await self.migrate_wait(["vm1"], src, dst, worker, check_worker)
            src, dst = dst, src
