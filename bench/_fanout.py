"""bench/queue_pipelining.py's scenario: ``scenario.vms`` VMs hostA -> hostB in one call (booting them),
then back in one call, the measured one."""

from migrator import MultihostMigration


class Fanout(MultihostMigration):
    async def migration_scenario(self):
        src, dst = self.hosts[0], self.hosts[1]
        names = [f"vm{i}" for i in range(1, int(self.params.scenario.get("vms", 4)) + 1)]
        await self.migrate_wait(names, src, dst)
        await self.migrate_wait(names, dst, src)
