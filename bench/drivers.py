#!/usr/bin/env python3
"""Benchmark: the same migration through both drivers, same lab, same run (issue 6).

A lab guest (128 MiB, idle; and 128 MiB keeping 32 MiB dirty) migrates hostA -> hostB
--runs times per driver, drivers alternating which goes first. Columns (medians):

* whole s   -- Migration.run(): destination prepared to source cleaned up
* call s    -- 'migrate' (QMP) / migrate3 (libvirt) issued until it returned completed
* total ms  -- QEMU's total time (qemu) / libvirt's time_elapsed (gross); "net": time_elapsed_net
* downtime  -- QEMU's downtime / libvirt's downtime (gross); "net": downtime_net
* Mbit/s    -- QEMU's / libvirt's memory_bps

The libvirt gross-minus-net figures are libvirt's own orchestration cost inside the job
(its Prepare/Finish/Confirm RPCs over the wire).

The libvirt driver's VMs share one connection per host (``shared_connections``, as every
``migrate-run`` instance does with the libvirt driver), opened by the first migration.

The peer a user would otherwise pick: ``virsh migrate --live --p2p --persistent
--undefinesource`` run on hostA, on the same guest, to the same destination URI and migration
address as the libvirt driver's (its wall time on hostA, virsh's start to its exit), in the
same rounds. Then where each driver's whole time goes, per phase (medians, ms): prepare
(PREPARING_DEST -> CONFIGURED: destination, connections, versions, events), start (->
MIGRATING), the migration (-> COMPLETED), verify (-> VERIFIED), clean (-> CLEANED).

usage: bench/drivers.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrator.config import Config, Inventory  # noqa: E402
from migrator.hosts import SSHHost, quote  # noqa: E402
from migrator.hypervisor.libvirt_pool import shared_connections  # noqa: E402
from migrator.hypervisor.libvirt_uri import remote_uri  # noqa: E402
from migrator.hypervisor import make_vm  # noqa: E402
from migrator.hypervisor.vm import VMSpec  # noqa: E402
from migrator.lab import Lab  # noqa: E402
from migrator.migration import make_migration  # noqa: E402
from migrator.migration.oracles import wait_tick_after  # noqa: E402

NAME, SUBNET, DIR = "mdrv", "10.77.253.0/24", Path("/srv/migrator-bench/mdrv")
CASES = [("128 MiB idle", ""), ("128 MiB, 32 MiB dirty", "lab.dirty=32")]


def guest(inv, extra: str, name: str) -> VMSpec:
    """The lab guest, its status on ttyS1, with ``extra`` kernel arguments."""
    return VMSpec(name, kernel=str(inv.guest.kernel), initrd=str(inv.guest.initrd),
                  append=f"{inv.guest.append} lab.out=ttyS1 {extra}".strip())


async def one(driver, inv, a, b, config, extra, name):
    spec = guest(inv, extra, name)
    vm = make_vm(driver, spec, a, str(inv.run_dir), config)
    try:
        await vm.start()
        await wait_tick_after(vm, 1, 120)               # booted and settled
        r = await make_migration(vm, b, inv.hosts["hostB"].address, config=config).run()
    finally:
        await vm.stop()
    return r


async def virsh(inv, a, b, config, extra, name):
    """The peer: the same guest, started by the libvirt driver's VM, migrated by virsh on
    hostA; virsh's wall time as hostA measures it. The destination's domain is stopped and
    undefined afterwards through the driver's VM there."""
    spec = guest(inv, extra, name)
    vm = make_vm("libvirt", spec, a, str(inv.run_dir), config)
    there = make_vm("libvirt", spec, b, str(inv.run_dir), config)
    try:
        await vm.start()
        await wait_tick_after(vm, 1, 120)
        await there.start(incoming=True)               # its run dir, as the driver makes it
        uri = await remote_uri(a, vm.paths.dir, b, config.libvirt.transport,
                               config.timeouts.ssh_connect_s)
        addr = inv.hosts["hostB"].address
        r = await a.run("s=$(date +%s.%N); virsh -q -c qemu:///system migrate --live --p2p "
                        "--persistent --undefinesource --migrateuri "
                        f"{quote('tcp://' + addr)} {quote(name)} {quote(uri)} >&2 && "
                        "e=$(date +%s.%N) && echo \"$e - $s\" | bc", check=True, timeout=300)
        return float(r.stdout)
    finally:
        await vm.stop()
        await there.stop()


PHASES = (("prepare", "PREPARING_DEST", "CONFIGURED"), ("start", "CONFIGURED", "MIGRATING"),
          ("migrate", "MIGRATING", "COMPLETED"), ("verify", "COMPLETED", "VERIFIED"),
          ("clean", "VERIFIED", "CLEANED"))


def phase_ms(r, start: str, end: str) -> float:
    at = {name: rel for name, rel, _wall in r.phases}
    return 1000 * (at[end] - at[start])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    config = Config()
    lab = Lab(NAME, DIR, config)
    asyncio.run(lab.up(["hostA", "hostB"], SUBNET, libvirt=True, accel="tcg"))

    async def measure():
        inv = Inventory.load(lab.inventory_path)
        results = {}
        # as a migrate-run instance does: one libvirt connection per host, shared
        async with SSHHost.from_inventory("hostA", inv, config) as ha, \
                SSHHost.from_inventory("hostB", inv, config) as hb, shared_connections():
            for label, extra in CASES:
                rows = {"qemu": [], "libvirt": [], "virsh": []}
                for i in range(a.runs):
                    order = ["qemu", "libvirt", "virsh"]
                    for driver in order[i % 3:] + order[:i % 3]:
                        if driver == "virsh":
                            rows[driver].append(await virsh(inv, ha, hb, config, extra,
                                                            f"v{i}"))
                        else:
                            rows[driver].append(await one(driver, inv, ha, hb, config, extra,
                                                          f"{driver[0]}{i}"))
                results[label] = rows
        return results

    try:
        results = asyncio.run(measure())
    finally:
        asyncio.run(lab.down())
    med = statistics.median
    print(f"\n{a.runs} migrations per driver and case, hostA -> hostB, TCG (medians; "
          "libvirt: gross / net)")
    print(f"{'case':<24}{'driver':<9}{'whole s':>8}{'call s':>8}{'total ms':>14}"
          f"{'downtime ms':>14}{'Mbit/s':>8}")
    for label, rows in results.items():
        for driver, rs in rows.items():
            if driver == "virsh":
                continue
            total = f"{med(r.total_time_ms for r in rs):.0f}"
            down = f"{med(r.downtime_ms for r in rs):.0f}"
            if driver == "libvirt":
                total += f" / {med(r.total_time_net_ms for r in rs):.0f}"
                down += f" / {med(r.downtime_net_ms for r in rs):.0f}"
            print(f"{label:<24}{driver:<9}{med(r.run_s for r in rs):>8.3f}"
                  f"{med(r.wall_s for r in rs):>8.3f}{total:>14}{down:>14}"
                  f"{med(r.throughput_mbps for r in rs):>8.0f}")
        lv, qm = rows["libvirt"], rows["qemu"]
        print(f"{'':<24}libvirt gross - net: total "
              f"{med(r.total_time_ms - r.total_time_net_ms for r in lv):.0f} ms, downtime "
              f"{med(r.downtime_ms - r.downtime_net_ms for r in lv):.0f} ms; whole-run ratio "
              f"libvirt/qemu {med(r.run_s for r in lv) / med(r.run_s for r in qm):.2f}")
        vs = rows["virsh"]
        print(f"{'':<24}virsh migrate (the peer): wall {med(vs):.3f} s "
              f"({min(vs):.3f}-{max(vs):.3f}); libvirt driver whole / virsh "
              f"{med(r.run_s for r in lv) / med(vs):.2f}")
    print("\nwhere the whole time goes, per phase (medians, ms)")
    print(f"{'case':<24}{'driver':<9}" + "".join(f"{p:>9}" for p, _s, _e in PHASES))
    for label, rows in results.items():
        for driver in ("qemu", "libvirt"):
            print(f"{label:<24}{driver:<9}" + "".join(
                f"{med(phase_ms(r, s_, e) for r in rows[driver]):>9.0f}"
                for _p, s_, e in PHASES))
    print("goals (issue 22): libvirt whole <= 1.5 x qemu whole; libvirt whole <= 1.1 x virsh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
