"""vm1 hops across every host in the order typed and back to the first (use with --all).

    migrate-run --all -m hostA,hostB,hostC ring
"""

from migrator import MultihostMigration


class Ring(MultihostMigration):
    async def migration_scenario(self):
        ticks = {}

        async def worker(mig_data):
            session = await self.env.get_vm("vm1").wait_for_login(timeout=self.login_timeout)
            if not ticks:
                await session.cmd("memsum write 16 7")
            ticks["src"] = await self.env.get_vm("vm1").last_tick()

        async def check_worker(mig_data):
            vm = self.env.get_vm("vm1")
            session = await vm.wait_for_login(timeout=self.login_timeout)
            await session.cmd("memsum verify")
            assert vm.host.name == mig_data.dst.name, f"vm1 is on {vm.host.name}"

        hops = list(zip(self.hosts, self.hosts[1:] + self.hosts[:1]))
        for src, dst in hops:
            await self.migrate_wait(["vm1"], src, dst, worker, check_worker)
