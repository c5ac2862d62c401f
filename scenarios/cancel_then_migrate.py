"""Cancel a migration mid-way: the VM must still be fine on its source (memory intact, shell
answering, no destination left); then migrate it again, successfully.

The first migration is capped (``scenario.cancel_bandwidth_mibs``, default 2 MiB/s) so it is
surely still running when it is cancelled after ``scenario.cancel_after_mib`` (default 1 MiB)
has been sent.

    migrate-run -m hostA,hostB cancel_then_migrate
"""

from migrator import MigrationError, MultihostMigration
from migrator.migration import Phase


class CancelThenMigrate(MultihostMigration):
    cancel_next = False

    async def post_migration(self, mig_data):
        if self.cancel_next:
            after = int(float(self.params.scenario.get("cancel_after_mib", 1)) * 2**20)
            await mig_data.wait_phase(Phase.MIGRATING, transferred=after)
            mig_data.cancel("cancelled mid-way by the scenario")

    async def migration_scenario(self):
        src, dst = self.hosts[0], self.hosts[1]

        async def worker(mig_data):
            session = await self.env.get_vm("vm1").wait_for_login(timeout=self.login_timeout)
            if not self.cancel_next:
                return
            await session.cmd("memsum write 16 99")

        self.cancel_next = True
        cap = float(self.params.scenario.get("cancel_bandwidth_mibs", 2))
        try:
            await self.migrate_wait(["vm1"], src, dst, worker,
                                    params_append={"bandwidth_mibs": cap})
        except MigrationError as exc:
            if exc.phase != "MIGRATING" or "cancelled" not in exc.message:
                raise
            self.context.say(f"[{self.name}] cancelled as planned: {exc}")
        else:
            raise AssertionError("the migration completed before it could be cancelled")
        self.cancel_next = False

        vm = self.env.get_vm("vm1")
        assert vm.host.name == src.name, f"vm1 is on {vm.host.name}, not on {src.name}"
        assert await vm.status() == "running"
        session = await vm.wait_for_login(timeout=self.login_timeout)
        await session.cmd("memsum verify")
        leftover = await dst.run(f"ls -A {self.run_dir} 2>/dev/null")
        assert not leftover.stdout.strip(), f"{dst.name} kept {leftover.stdout.split()}"

        async def check_worker(mig_data):
            s = await self.env.get_vm("vm1").wait_for_login(timeout=self.login_timeout)
            await s.cmd("memsum verify")

        await self.migrate_wait(["vm1"], src, dst, worker, check_worker)
