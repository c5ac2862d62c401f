"""A test plan's step that starts no VM (tests/test_plan.py): it waits ``scenario.sleep_s`` on
its hosts' barrier, then passes, or fails with ``scenario.fail: true``."""

import asyncio

from migrator import MultihostMigration
from migrator.errors import ScenarioError


class PlanStep(MultihostMigration):
    async def migration_scenario(self):
        await asyncio.sleep(float(self.params.scenario.get("sleep_s", 0)))
        if self.params.scenario.get("fail"):
            raise ScenarioError("this plan step fails, as asked (scenario.fail)")
