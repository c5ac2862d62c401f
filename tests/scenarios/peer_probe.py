"""A bridged guest migrates once from the first host to the second while a peer guest on the
second host probes it (``-p network.probe_from=vm:peer``): the framework's own probe, from a
peer guest's console (``ping -i``)."""

from migrator import MultihostMigration


class PeerProbe(MultihostMigration):
    async def migration_scenario(self):
        a, b = self.hosts[:2]
        await self.env.ensure_running("peer", b)
        mover = await self.env.ensure_running("mover", a)
        await mover.wait_reachable()
        await self.migrate_wait(["mover"], a, b)
