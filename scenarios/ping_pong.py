"""N round trips of vm1 between the first two hosts; a guest workload must survive every hop.

Before the first hop the worker writes a 16 MiB memory checksum in the guest and starts a
background counter; after every hop check_worker proves the guest's memory intact (the
checksum verifies), the counter process alive and still counting.

    migrate-run -m hostA,hostB ping_pong [-p scenario.rounds=3]
"""

from migrator import MultihostMigration
from migrator.guest.workload import SurvivingWorkload


class PingPong(MultihostMigration):
    async def migration_scenario(self):
        rounds = int(self.params.scenario.get("rounds", 2))
        workload = SurvivingWorkload(16, 2026)

        async def worker(mig_data):
            session = await self.env.get_vm("vm1").wait_for_login(timeout=self.login_timeout)
            await workload.before(session)

        async def check_worker(mig_data):
            session = await self.env.get_vm("vm1").wait_for_login(timeout=self.login_timeout)
            await workload.after(session, self.params.timeouts.guest_cmd_s)

        src, dst = self.hosts[0], self.hosts[1]
        for _ in range(2 * rounds):
            await self.migrate_wait(["vm1"], src, dst, worker, check_worker)
            src, dst = dst, src
