"""Migrations beyond a limit of one per source (tests/test_slots.py): four VMs hostA -> hostB
in one call (one at a time), then back in four calls at once: vm1, vm2, vm3 with a higher
priority, and vm4, which is cancelled while it waits and stays where it runs (the others go
on: a call stopped on purpose is not a failure that stops its siblings).

    migrate-run -m hostA,hostB -p queue.per_source=1 tests/scenarios/queued.py
"""

from migrator import MigrationError, MultihostMigration
from migrator.migration import Phase


class Queued(MultihostMigration):
    async def migration_scenario(self):
        src, dst = self.hosts[0], self.hosts[1]
        await self.migrate_wait(["vm1", "vm2", "vm3", "vm4"], src, dst)
        first = self.migrate(["vm1"], dst, src)
        second = self.migrate(["vm2"], dst, src)
        urgent = self.migrate(["vm3"], dst, src, priority=5)
        doomed = self.migrate(["vm4"], dst, src)
        await doomed.mig_data.wait_phase(Phase.QUEUED)
        doomed.cancel("not needed after all")
        try:
            await doomed
        except MigrationError as exc:
            self.context.say(f"[{self.name}] vm4 cancelled while queued: {exc}")
        else:
            raise AssertionError("vm4 migrated although it was cancelled while queued")
        for handle in (first, second, urgent):
            await handle
        vm4 = self.env.get_vm("vm4")
        assert vm4.host.name == dst.name and await vm4.status() == "running", vm4
