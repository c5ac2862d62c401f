#!/usr/bin/env python3
"""Migration over TLS against plain TCP: throughput and total time, same guest, same run
(issue 19, both drivers).

Per driver, one lab guest (512 MiB, a 256 MiB memsum pattern: real data, not zero pages) migrated
hostA <-> hostB, alternating plain and TLS hop by hop so the machine's drift hits both; then
the same with multifd (2 channels). Per row, the median of ``--hops`` migrations: QEMU's total
time, its throughput, downtime, and the bytes sent; the ratio TLS / plain. The memory checksum
verifies after every hop.

usage: bench/tls.py [--hops 6] [--mem 512] [--pattern 256] [--drivers qemu,libvirt]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrator.config import Config, Inventory  # noqa: E402
from migrator.hosts import SSHHost  # noqa: E402
from migrator.hypervisor import make_vm  # noqa: E402
from migrator.hypervisor.vm import VMSpec  # noqa: E402
from migrator.lab import Lab  # noqa: E402
from migrator.migration import MigrationParams, make_migration  # noqa: E402

NAME, SUBNET, DIR = "mtls", "10.77.231.0/24", Path("/srv/migrator-bench/mtls")
KINDS = {"precopy": {}, "multifd 2": {"multifd_channels": 2}}


async def bench(lab: Lab, a, driver: str, rows: dict) -> None:
    inv, config = Inventory.load(lab.inventory_path), Config()
    hosts = {h: SSHHost.from_inventory(h, inv, config) for h in ("hostA", "hostB")}
    spec = VMSpec(f"tlsb{driver[0]}", mem_mib=a.mem, kernel=str(inv.guest.kernel),
                  initrd=str(inv.guest.initrd),
                  append=f"{inv.guest.append} lab.out=ttyS1".strip())
    vm = make_vm(driver, spec, hosts["hostA"], str(inv.run_dir), config)
    try:
        await vm.start()
        session = await vm.wait_for_login()
        await session.cmd(f"memsum write {a.pattern} 7", timeout=300)
        for kind, extra in KINDS.items():
            for _ in range(a.hops):
                for tls in (False, True):
                    dst = "hostB" if vm.host.name == "hostA" else "hostA"
                    r = await make_migration(vm, hosts[dst], inv.hosts[dst].address,
                                             MigrationParams(tls=tls, **extra), config).run()
                    out = await (await vm.wait_for_login()).cmd("memsum verify", timeout=300)
                    assert out.split()[-1] == "ok=1", out
                    rows.setdefault((driver, kind, tls), []).append(r)
    finally:
        for h in hosts.values():
            await make_vm(driver, spec, h, str(inv.run_dir), config).stop()
            await h.close()
        await vm.disconnect()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hops", type=int, default=6, help="migrations per row")
    ap.add_argument("--mem", type=int, default=512)
    ap.add_argument("--pattern", type=int, default=256, help="MiB of memsum pattern")
    ap.add_argument("--drivers", default="qemu,libvirt")
    a = ap.parse_args()
    drivers = a.drivers.split(",")
    lab = Lab(NAME, DIR, Config())
    asyncio.run(lab.up(["hostA", "hostB"], SUBNET, libvirt="libvirt" in drivers, accel="tcg"))
    rows: dict = {}
    try:
        for driver in drivers:
            asyncio.run(bench(lab, a, driver, rows))
    finally:
        asyncio.run(lab.down())
    print(f"tls: guest {a.mem} MiB with a {a.pattern} MiB pattern, hostA <-> hostB, median "
          f"of {a.hops} hops each (plain and TLS alternating)")
    print(f"{'driver':<8}{'kind':<11}{'stream':<7}{'total ms':>9}{'Mbit/s':>8}"
          f"{'downtime ms':>12}{'MiB sent':>9}{'total x plain':>14}")
    for driver, kind in ((d, k) for d in drivers for k in KINDS):
        base = statistics.median(r.total_time_ms for r in rows[(driver, kind, False)])
        for tls in (False, True):
            rs = rows[(driver, kind, tls)]
            total = statistics.median(r.total_time_ms for r in rs)
            print(f"{driver:<8}{kind:<11}{'TLS' if tls else 'plain':<7}{total:>9.0f}"
                  f"{statistics.median(r.throughput_mbps for r in rs):>8.0f}"
                  f"{statistics.median(r.downtime_ms for r in rs):>12.0f}"
                  f"{statistics.median(r.transferred_bytes for r in rs) / 2**20:>9.0f}"
                  f"{total / base:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
