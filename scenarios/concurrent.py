"""The framework's API example: two VMs migrate together, then two migrate() calls overlap.

One line differs from the example: the guest shell returns from "nohup dd ... &" before dd
has been exec'd, so the worker waits for dd to exist (bounded by the console timeout) before
checking it; without that the check races the background start and fails now and then.

    migrate-run -m hostA,hostB concurrent
"""

import asyncio

from migrator import MultihostMigration


class TestMultihostMigration(MultihostMigration):
    async def migration_scenario(self):
        srchost, dsthost = self.hosts[0], self.hosts[1]

        async def worker(mig_data):
            vm = self.env.get_vm("vm1")
            session = await vm.wait_for_login(timeout=self.login_timeout)
            await session.sendline("nohup dd if=/dev/zero of=/dev/null &")
            await session.cmd("until killall -0 dd 2>/dev/null; do sleep 0.1; done")
            await session.cmd("killall -0 dd")

        async def check_worker(mig_data):
            vm = self.env.get_vm("vm1")
            session = await vm.wait_for_login(timeout=self.login_timeout)
            await session.cmd("killall -9 dd")

        # both VMs migrate together; returns when done
        await self.migrate_wait(["vm1", "vm2"], srchost, dsthost, worker, check_worker)
        # migrate() starts at once and returns an awaitable handle
        mig1 = self.migrate(["vm1"], dsthost, srchost, worker, check_worker)
        await asyncio.sleep(2)
        mig2 = self.migrate(["vm2"], dsthost, srchost)
        await mig2
        await mig1
