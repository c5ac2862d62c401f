"""vm1 hops from the first host to the second once its guest's dirtier has run a while
(``scenario.settle_passes`` passes, default 30), then back (``scenario.rounds``, default 1,
round trips). Used by the dirtier check's tests: QEMU 7.2 loses pages once the dirtier's
pages have been written for a while, not in its first passes."""

import asyncio

from migrator import MultihostMigration
from migrator.migration.oracles import dirtier_report


class SettledHop(MultihostMigration):
    async def migration_scenario(self):
        passes = int(self.params.scenario.get("settle_passes", 30))
        rounds = int(self.params.scenario.get("rounds", 1))

        async def settled(mig_data):
            vm = self.env.get_vm("vm1")
            async with asyncio.timeout(self.params.timeouts.guest_boot_s):
                while (report := await dirtier_report(vm)) is None or report[0] < passes:
                    await asyncio.sleep(0.25)

        src, dst = self.hosts[0], self.hosts[1]
        for _ in range(2 * rounds):
            await self.migrate_wait(["vm1"], src, dst, settled)
            src, dst = dst, src
