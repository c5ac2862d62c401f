"""Block the destination's migration port mid-migration (nftables, in the destination host).

* long block: the port stays blocked; the migration must fail cleanly (the engine's stall
  detection, or the scenario cancelling it after ``scenario.long_block_s``, default 5 s),
  with the VM running on its source, memory intact, and nothing left on the destination;
* short block: the port is unblocked after ``scenario.short_block_s`` (default 1 s); the
  migration must still complete.

The migrations are capped (``scenario.bandwidth_mibs``, default 16 MiB/s) so the block lands
while they run.

    migrate-run -m hostA,hostB dest_block
"""

import asyncio

from migrator import MigrationError, MultihostMigration
from migrator.aio import shielded
from migrator.hosts import quote
from migrator.migration import Phase


class DestBlock(MultihostMigration):
    block_s: float | None = None       # None: keep blocked until the migration ended

    async def migrate_vms_dest(self, mig_data):
        await mig_data.wait_phase(Phase.MIGRATING, transferred=2**20)
        port = mig_data.vm_ports["vm1"]
        table = f"migrator_block_{port}"
        rules = (f"add table inet {table}\n"
                 f"add chain inet {table} input {{ type filter hook input priority -10; }}\n"
                 f"add rule inet {table} input tcp dport {port} drop\n")
        await mig_data.dst.run("nft -f -", stdin=rules, check=True)
        self.context.say(f"[{mig_data.mig_id}] port {port} blocked on {mig_data.dst.name}")
        try:
            if self.block_s is not None:
                await asyncio.sleep(self.block_s)
            else:
                limit = float(self.params.scenario.get("long_block_s", 5))
                try:          # the engine's stall detection may fail it first
                    await asyncio.wait_for(mig_data.wait_ended(), limit)
                except TimeoutError:
                    mig_data.cancel(f"port blocked for {limit:g} s")
                    await mig_data.wait_ended()
        finally:       # even when cancelled (the migration failed): never leave it blocked
            await shielded(mig_data.dst.run(f"nft delete table inet {quote(table)}",
                                            check=True))
            self.context.say(f"[{mig_data.mig_id}] port {port} unblocked")

    async def migration_scenario(self):
        src, dst = self.hosts[0], self.hosts[1]
        cap = {"bandwidth_mibs": float(self.params.scenario.get("bandwidth_mibs", 16))}

        async def worker(mig_data):
            session = await self.env.get_vm("vm1").wait_for_login(timeout=self.login_timeout)
            await session.cmd("memsum write 16 5 2>/dev/null || memsum verify")

        async def check_worker(mig_data):
            session = await self.env.get_vm("vm1").wait_for_login(timeout=self.login_timeout)
            await session.cmd("memsum verify")

        self.block_s = None
        try:
            await self.migrate_wait(["vm1"], src, dst, worker, params_append=cap)
        except MigrationError as exc:
            self.context.say(f"[{self.name}] long block failed the migration as expected: "
                             f"{exc}")
        else:
            raise AssertionError("the migration completed through a blocked port")
        vm = self.env.get_vm("vm1")
        assert vm.host.name == src.name and await vm.status() == "running"
        await (await vm.wait_for_login(timeout=self.login_timeout)).cmd("memsum verify")
        leftover = await dst.run(f"ls -A {self.run_dir} 2>/dev/null")
        assert not leftover.stdout.strip(), f"{dst.name} kept {leftover.stdout.split()}"

        self.block_s = float(self.params.scenario.get("short_block_s", 1))
        await self.migrate_wait(["vm1"], src, dst, worker, check_worker, params_append=cap)
