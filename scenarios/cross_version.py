"""Cross-version migration: vm1 ping-pongs between the first two hosts, each running its own
QEMU (the inventory's ``hosts.X.qemu``; in the lab ``migrate-lab up --qemu hostA=7.2``), so
every round trip is an old -> new and a new -> old migration. Each hop starts once the
dirtier has made ``scenario.settle_passes`` (30) more passes (a warm guest). The guest's
memory is checked every hop, three ways: a 16 MiB checksum written before the first hop verifies
after each; a counter process keeps counting; and the lab's dirtier, which vm1 must run,
checks every page it keeps dirty on each destination (``checks.dirtier``: a stale page
fails the hop, naming it).

vm1 starts on the first host, as the machine type it is given: pin one both QEMUs have
(``vms.vm1.machine: pc-i440fx-7.2``), or the hop to the older QEMU is refused before
anything moves. configs/cross_version.yaml has both settings:

    migrate-lab up --qemu hostA=7.2
    migrate-run -c configs/cross_version.yaml -m hostA,hostB cross_version   # 7.2 <-> 10
    migrate-run -c configs/cross_version.yaml -m hostB,hostA cross_version   # 10 <-> 7.2

Each run records both QEMU versions (``run.json`` ``versions``, each migration's ``qemu``
and ``machine``, the JUnit properties). Same-version runs (``-m hostB,hostC``) are the
control.
"""

import asyncio

from migrator import MultihostMigration
from migrator.errors import ScenarioError
from migrator.framework.dirtier import runs_dirtier
from migrator.guest.workload import SurvivingWorkload
from migrator.migration.oracles import dirtier_report


class CrossVersion(MultihostMigration):
    async def migration_scenario(self):
        rounds = int(self.params.scenario.get("rounds", 1))
        settle = int(self.params.scenario.get("settle_passes", 30))
        workload = SurvivingWorkload(16, 2026)

        def first_hop(vm, versions: dict) -> None:
            if not runs_dirtier(vm.spec.append) or not self.params.checks.dirtier:
                raise ScenarioError(
                    "cross_version checks every hop with the lab's dirtier: boot vm1 with it "
                    "(vms.vm1.append: '... lab.out=ttyS1 lab.dirty=8 lab.rate=64', "
                    "checks.dirtier on; configs/cross_version.yaml)")
            versions = [versions[h.name].get("qemu", {}).get("version")
                        for h in self.hosts[:2]]
            self.context.say(f"[{self.name}] QEMU {versions[0]} on {self.hosts[0].name} <-> "
                             f"QEMU {versions[1]} on {self.hosts[1].name}, machine "
                             f"{vm.spec.machine}")

        async def worker(mig_data):
            vm = self.env.get_vm("vm1")
            if workload.pid is None:
                first_hop(vm, await self.host_versions())
            # each hop starts with the dirtier well into its work (settle_passes more
            # passes): a warm guest, as a real one is
            async with asyncio.timeout(self.params.timeouts.guest_boot_s):
                start = None
                while True:
                    report = await dirtier_report(vm)
                    if report is not None:
                        start = report[0] if start is None else start
                        if report[0] >= start + settle:
                            break
                    await asyncio.sleep(0.25)
            await workload.before(await vm.wait_for_login(timeout=self.login_timeout))

        async def check_worker(mig_data):
            session = await self.env.get_vm("vm1").wait_for_login(timeout=self.login_timeout)
            await workload.after(session, self.params.timeouts.guest_cmd_s)

        src, dst = self.hosts[0], self.hosts[1]
        for _ in range(2 * rounds):
            await self.migrate_wait(["vm1"], src, dst, worker, check_worker)
            src, dst = dst, src
