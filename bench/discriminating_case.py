#!/usr/bin/env python3
"""The recipe's discriminating dirty-tracking case against a given QEMU binary.

128 MiB guest, 8 MiB dirtied at 64 MiB/s, downtime-limit 50 ms, max-bandwidth 128 MiB/s
(QEMU's default, set explicitly): >= 4 dirty-bitmap syncs. Prints, per run, the syncs and the
stale pages the in-guest dirtier found on the destination. QEMU 7.2 (Debian 12) loses pages
here; QEMU >= 9.0 must not (QEMU commit 03bfc2188f06).

usage: bench/discriminating_case.py [--qemu /path/to/qemu-system-x86_64] [--runs 5]

QEMU 7.2 next to the installed QEMU 10, for the comparison (shared/lab-recipe.md 10.4):

    mkdir -p /srv/q72/root /srv/q72/bin && cd /srv/q72
    apt-get download qemu-system-x86=1:7.2+dfsg-7+deb12u18+b3 \
        qemu-system-common=1:7.2+dfsg-7+deb12u18+b3 qemu-system-data=1:7.2+dfsg-7+deb12u18 \
        seabios=1.16.2-1
    for d in *.deb; do dpkg-deb -x "$d" root; done
    printf '#!/bin/sh\nR=/srv/q72/root\nexport QEMU_MODULE_DIR=$R/usr/lib/x86_64-linux-gnu/qemu\n'\
'exec $R/usr/bin/qemu-system-x86_64 -L $R/usr/share/qemu -L $R/usr/share/seabios "$@"\n' \
        > bin/qemu-system-x86_64 && chmod +x bin/qemu-system-x86_64
    bench/discriminating_case.py --qemu /srv/q72/bin/qemu-system-x86_64
"""

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrator.config import Config, Inventory  # noqa: E402
from migrator.hosts import SSHHost  # noqa: E402
from migrator.hypervisor.qemu import QemuVM, VMSpec  # noqa: E402
from migrator.lab import Lab  # noqa: E402
from migrator.migration import Migration, MigrationParams  # noqa: E402
from migrator.migration.oracles import dirtier_report, wait_tick_after  # noqa: E402


async def one(inv, a, b, config, qemu, i):
    spec = VMSpec(f"d{i}", kernel=str(inv.guest.kernel), initrd=str(inv.guest.initrd),
                  append=f"{inv.guest.append} lab.out=ttyS1 lab.dirty=8 lab.rate=64", qemu=qemu)
    vm = QemuVM(spec, a, str(inv.run_dir), config)
    await vm.start()
    await wait_tick_after(vm, 2, 120)
    m = Migration(vm, b, inv.hosts["hostB"].address,
                  MigrationParams(bandwidth_mibs=128, downtime_limit_ms=50), config)
    try:
        r = await m.run()
        await wait_tick_after(m.dst_vm, None, 60)
        for _ in range(50):
            report = await dirtier_report(m.dst_vm)
            if report:
                break
            await asyncio.sleep(0.2)
        stale = [ln for ln in await m.dst_vm.status_lines() if ln.startswith("STALE")]
        return r.iterations, report[1] if report else None, stale[:2]
    finally:
        await m.dst_vm.stop()
        await vm.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    config = Config()
    lab = Lab("mdisc", Path("/srv/migrator-bench/mdisc"), config)
    asyncio.run(lab.up(["hostA", "hostB"], "10.77.251.0/24", accel="tcg"))

    async def runs():
        inv = Inventory.load(lab.inventory_path)
        async with SSHHost.from_inventory("hostA", inv) as ha, \
                SSHHost.from_inventory("hostB", inv) as hb:
            version = (await ha.run(f"{a.qemu} --version", check=True)).stdout.splitlines()[0]
            return version, [await one(inv, ha, hb, config, a.qemu, i) for i in range(a.runs)]
    try:
        version, results = asyncio.run(runs())
    finally:
        asyncio.run(lab.down())
    print(f"\n{version}: discriminating case, {a.runs} runs")
    print(f"{'run':<5}{'syncs':>6}{'stale pages':>13}  first STALE lines")
    for i, (syncs, bad, stale) in enumerate(results):
        print(f"{i:<5}{syncs:>6}{str(bad):>13}  {stale}")
    return 0 if all(bad == 0 for _, bad, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
