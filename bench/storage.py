#!/usr/bin/env python3
"""Live migration without shared storage against shared storage, same run (issue 20, both
drivers): how long the disk copy takes, what it adds to the migration, to its downtime and
to the bytes sent.

Per driver and disk size (256 MiB and 1 GiB, every byte of it data: a base image written
through with a pattern, not a sparse file), one guest (256 MiB) whose disk is an overlay over
that base: on the shared directory (``shared``, the peer), or on hostA's own storage
(``copy-all``: the whole disk moves; ``copy-incremental``: the base is on both hosts, only
the overlay moves). It migrates hostA <-> hostB ``--hops`` times idle, then as many times
with the guest's disk oracle writing (64 MiB of the disk rewritten at 8 MiB/s, O_DIRECT),
verified after every hop: every block must hold its last write.

Columns, medians of the hops: ``mirror s`` the disk copy until in sync (qemu: the mirror job
READY; libvirt: the first memory bytes, which libvirt sends once its mirror is in sync: within
one progress poll), ``whole s`` the driver's whole migration (destination prepared to source
removed), QEMU's own ``total ms`` and ``downtime ms``, ``switch ms`` (qemu) the part of the
downtime the driver spends finishing the disk's copy (the guest stopped at pre-switchover,
seen -> the migration continued), ``disk MiB`` the mirror sent (the guest's writes during the
copy included), ``x shared`` whole time over the shared peer's.

usage: bench/storage.py [--hops 3] [--sizes 256,1024] [--drivers qemu,libvirt]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrator.config import Config, Inventory  # noqa: E402
from migrator.hosts import SSHHost  # noqa: E402
from migrator.hypervisor import make_vm  # noqa: E402
from migrator.hypervisor.vm import VMSpec  # noqa: E402
from migrator.lab import Lab  # noqa: E402
from migrator.migration import MigrationParams, make_migration  # noqa: E402

NAME, SUBNET, DIR = "mstor", "10.77.229.0/24", Path("/srv/migrator-bench/mstor")
STORAGES = ("shared", "copy-all", "copy-incremental")
ORACLE = "diskcheck write /dev/vda 64 8"


def base_image(path: Path, mib: int) -> None:
    """A qcow2 of ``mib`` MiB, every byte written (a pattern: data QEMU must copy)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{mib}M"],
                   check=True)
    subprocess.run(["qemu-io", "-c", f"write -P 0x5a 0 {mib}M", str(path)], check=True,
                   stdout=subprocess.DEVNULL)


async def one_config(lab: Lab, inv: Inventory, hosts: dict, driver: str, mib: int,
                     storage: str, hops: int, rows: dict) -> None:
    config = Config()
    name = f"st{driver[0]}{mib}{storage[5] if storage != 'shared' else 's'}"
    base = f"bench-base-{mib}.qcow2"
    if storage == "shared":
        where, a_dir = inv.shared_dir, inv.shared_dir
    else:
        where, a_dir = inv.local_dir, lab.host_dir("hostA") / "local"
    disk = f"{where}/{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-u", "-b",
                    f"{where}/{base}", str(a_dir / f"{name}.qcow2"), f"{mib}M"], check=True)
    spec = VMSpec(name, mem_mib=256, kernel=str(inv.guest.kernel),
                  initrd=str(inv.guest.initrd), append=f"{inv.guest.append} lab.out=ttyS1",
                  disk=disk)
    if driver == "libvirt" and storage == "shared":      # the lab's shared dir: see there
        config = config.model_copy(update={"libvirt": config.libvirt.model_copy(
            update={"unsafe": True})})
    vm = make_vm(driver, spec, hosts["hostA"], str(inv.run_dir), config)
    try:
        await vm.start()
        session = await vm.wait_for_login()
        for workload in ("idle", "writing"):
            if workload == "writing":
                await session.cmd(ORACLE, timeout=120)
            for _ in range(hops):
                dst = "hostB" if vm.host.name == "hostA" else "hostA"
                r = await make_migration(vm, hosts[dst], inv.hosts[dst].address,
                                         MigrationParams(storage=storage), config).run()
                oracle = "-"
                if workload == "writing":
                    out = await session.cmd("diskcheck verify", timeout=120)
                    oracle = "ok" if "ok=1" in out else "BAD"
                    assert oracle == "ok", out
                rows.setdefault((driver, mib, workload, storage), []).append((r, oracle))
    finally:
        for h in hosts.values():
            await make_vm(driver, spec, h, str(inv.run_dir), config).stop()
        await vm.disconnect()
        for d in (lab.host_dir("hostA") / "local", lab.host_dir("hostB") / "local",
                  inv.shared_dir):
            (Path(d) / f"{name}.qcow2").unlink(missing_ok=True)


async def bench(lab: Lab, a, driver: str, rows: dict) -> None:
    inv, config = Inventory.load(lab.inventory_path), Config()
    hosts = {h: SSHHost.from_inventory(h, inv, config) for h in ("hostA", "hostB")}
    try:
        for mib in a.sizes:
            for storage in STORAGES:
                await one_config(lab, inv, hosts, driver, mib, storage, a.hops, rows)
    finally:
        for h in hosts.values():
            await h.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hops", type=int, default=3, help="migrations per row")
    ap.add_argument("--sizes", default="256,1024", help="disk sizes, MiB")
    ap.add_argument("--drivers", default="qemu,libvirt")
    a = ap.parse_args()
    a.sizes = [int(s) for s in a.sizes.split(",")]
    drivers = a.drivers.split(",")
    lab = Lab(NAME, DIR, Config())
    asyncio.run(lab.up(["hostA", "hostB"], SUBNET, libvirt="libvirt" in drivers, accel="tcg"))
    inv = Inventory.load(lab.inventory_path)
    bases = []
    for mib in a.sizes:           # the base everywhere a row needs it
        first = Path(inv.shared_dir) / f"bench-base-{mib}.qcow2"
        base_image(first, mib)
        bases.append(first)
        for h in ("hostA", "hostB"):
            copy = lab.host_dir(h) / "local" / first.name
            shutil.copyfile(first, copy)
            bases.append(copy)
    rows: dict = {}
    try:
        for driver in drivers:
            asyncio.run(bench(lab, a, driver, rows))
    finally:
        for b in bases:
            b.unlink(missing_ok=True)
        asyncio.run(lab.down())
    print(f"storage: guest 256 MiB, disk fully written, hostA <-> hostB, median of {a.hops} "
          f"hops per row; 'writing': {ORACLE!r} in the guest, verified after every hop")
    print(f"{'driver':<8}{'disk':>6} {'workload':<9}{'storage':<17}{'mirror s':>9}"
          f"{'whole s':>8}{'total ms':>9}{'downtime ms':>12}{'switch ms':>10}{'disk MiB':>9}"
          f"{'mem MiB':>8}{'x shared':>9}  oracle")
    med = statistics.median
    for driver in drivers:
        for mib in a.sizes:
            for workload in ("idle", "writing"):
                peer = med(r.run_s for r, _o in rows[(driver, mib, workload, "shared")])
                for storage in STORAGES:
                    rs = rows[(driver, mib, workload, storage)]
                    mirror = [r.mirror_s for r, _o in rs if r.mirror_s is not None]
                    disk = [r.disk_bytes for r, _o in rs if r.disk_bytes is not None]
                    switch = [r.disk_switchover_ms for r, _o in rs
                              if r.disk_switchover_ms is not None]
                    whole = med(r.run_s for r, _o in rs)
                    oracle = ",".join(sorted({o for _r, o in rs}))
                    print(f"{driver:<8}{mib:>5}M {workload:<9}{storage:<17}"
                          f"{(f'{med(mirror):.2f}' if mirror else '-'):>9}{whole:>8.2f}"
                          f"{med(r.total_time_ms for r, _o in rs):>9.0f}"
                          f"{med(r.downtime_ms for r, _o in rs):>12.0f}"
                          f"{(f'{med(switch):.0f}' if switch else '-'):>10}"
                          f"{(f'{med(disk) / 2**20:.0f}' if disk else '-'):>9}"
                          f"{med(r.transferred_bytes for r, _o in rs) / 2**20:>8.0f}"
                          f"{whole / peer:>9.2f}  {oracle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
