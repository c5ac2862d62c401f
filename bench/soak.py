#!/usr/bin/env python3
"""Soak: one guest ping-pongs hostA <-> hostB back to back with the dirtier running, per
driver, for precopy, multifd and postcopy (issue 13).

Every hop is checked, not sampled: ``memsum verify`` passes (a 16 MiB pattern written
before the first hop), the dirtier's last report on the new host says 0 stale pages, and the
guest's TICK counter goes on past the last one seen before the hop (monotonic). A hop that
fails any of them stops that soak and is printed.

Printed at the start, every 50 hops and at the end of each soak: this controller's RSS and
open fds, the lab hosts' sshd sessions and this process's libvirt connections (with the
OpenSSH transport each is an ``ssh`` child of this process). "Flat" means fds, sessions and
connections equal at start and end, and RSS growth < 5 MiB over the soak; "start" is after
the first hop, which opens what the VM keeps for its life (its QMP connection) and loads
what the first migration needs. For postcopy, the switch is asked for at the first progress
poll; the "postcopy" column counts the hops whose guest really ran on the destination before
all its pages had arrived (QEMU's postcopy-active event; libvirt's post-copy suspend event):
a hop whose precopy converged first is checked all the same, but did not test postcopy.

usage: bench/soak.py [--hops 200] [--drivers qemu,libvirt] [--modes precopy,multifd,postcopy]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrator.config import Config, Inventory  # noqa: E402
from migrator.hosts import SSHHost  # noqa: E402
from migrator.hypervisor import make_vm  # noqa: E402
from migrator.hypervisor.vm import VMSpec  # noqa: E402
from migrator.lab import Lab  # noqa: E402
from migrator.lab import processes  # noqa: E402
from migrator.migration import MigrationParams, make_migration  # noqa: E402
from migrator.migration.oracles import dirtier_report, wait_tick_after  # noqa: E402

NAME, SUBNET, DIR = "msoak", "10.77.249.0/24", Path("/srv/migrator-bench/msoak")
MODES = {"precopy": dict(), "multifd": dict(multifd_channels=2),
         "postcopy": dict(postcopy_after_s=0)}
EVERY = 50
RSS_FLAT_MIB = 5


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def libvirt_connections() -> int:
    """This process's ssh children: one per open libvirt connection (OpenSSH transport)."""
    me, n = str(os.getpid()), 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == me and b"ssh" in cmdline.split(b"\0")[0]:
            n += 1
    return n


def sshd_sessions(lab: Lab) -> int:
    """sshd session processes in the lab hosts (the listeners excluded)."""
    return len(processes.sshd_sessions(lab))


def sample(lab: Lab, hop: int) -> dict:
    return {"hop": hop, "rss": rss_mib(), "fds": open_fds(), "sessions": sshd_sessions(lab),
            "libvirt": libvirt_connections(), "t": time.monotonic()}


async def soak(driver: str, mode: str, hops: int, lab: Lab, inv: Inventory,
               hosts: dict[str, SSHHost], config: Config) -> dict:
    params = MigrationParams(**MODES[mode])
    spec = VMSpec(f"soak-{driver[0]}{mode[0]}", kernel=str(inv.guest.kernel),
                  initrd=str(inv.guest.initrd),
                  append=f"{inv.guest.append} lab.out=ttyS1 lab.dirty=32".strip())
    vm = make_vm(driver, spec, hosts["hostA"], str(inv.run_dir), config)
    samples, failure, walls, switched = [], None, [], 0
    try:
        await vm.start()
        session = await vm.wait_for_login()
        await session.cmd("memsum write 16 5")
        await wait_tick_after(vm, 1, 120)
        samples.append(sample(lab, 0))
        print(f"  {driver:<8}{mode:<10}{fmt(samples[-1])}", flush=True)
        for hop in range(1, hops + 1):
            dst = "hostB" if vm.host.name == "hostA" else "hostA"
            tick = await vm.last_tick()
            t0 = time.monotonic()
            try:
                r = await make_migration(vm, hosts[dst], inv.hosts[dst].address, params,
                                         config).run()
                walls.append(time.monotonic() - t0)
                switched += bool(r.postcopy_switched)
                # the VM object follows the guest to its new host
                await wait_tick_after(vm, tick, 30)
                session = await vm.wait_for_login()
                verified = await session.cmd("memsum verify")
                if "ok=1" not in verified:
                    raise AssertionError(f"memsum verify: {verified.strip()}")
                async with asyncio.timeout(30):
                    while (report := await dirtier_report(vm)) is None:
                        await asyncio.sleep(0.2)
                if report[1] != 0:
                    raise AssertionError(f"{report[1]} stale pages on {dst}")
                if r.status != "completed":
                    raise AssertionError(f"migration {r.status}")
            except Exception as exc:  # noqa: BLE001 - the soak stops and says why
                failure = f"hop {hop} ({vm.host.name} -> {dst}): {type(exc).__name__}: {exc}"
                break
            if hop == 1 or hop % EVERY == 0 or hop == hops:
                samples.append(sample(lab, hop))
                print(f"  {driver:<8}{mode:<10}{fmt(samples[-1])}", flush=True)
    finally:
        await vm.stop()
    return {"driver": driver, "mode": mode, "samples": samples, "failure": failure,
            "hops": len(walls), "walls": walls, "switched": switched}


def fmt(s: dict) -> str:
    return (f"hop {s['hop']:>4}  rss {s['rss']:7.1f} MiB  fds {s['fds']:>4}  "
            f"sshd sessions {s['sessions']:>3}  libvirt conns {s['libvirt']:>2}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hops", type=int, default=200)
    ap.add_argument("--drivers", default="qemu,libvirt")
    ap.add_argument("--modes", default=",".join(MODES))
    a = ap.parse_args()
    drivers = a.drivers.split(",")
    modes = a.modes.split(",")
    bad = [m for m in modes if m not in MODES] + [d for d in drivers
                                                  if d not in ("qemu", "libvirt")]
    if bad or a.hops < 1:
        print(f"soak.py: error: unknown {bad or 'hop count'}", file=sys.stderr)
        return 2
    config = Config()
    lab = Lab(NAME, DIR, config)
    asyncio.run(lab.up(["hostA", "hostB"], SUBNET, libvirt="libvirt" in drivers, accel="tcg"))

    async def run_all():
        inv = Inventory.load(lab.inventory_path)
        async with SSHHost.from_inventory("hostA", inv, config) as ha, \
                SSHHost.from_inventory("hostB", inv, config) as hb:
            hosts = {"hostA": ha, "hostB": hb}
            return [await soak(d, m, a.hops, lab, inv, hosts, config)
                    for d in drivers for m in modes]

    print(f"soak: {a.hops} hops per driver and mode, guest 128 MiB with 32 MiB kept dirty; "
          f"samples every {EVERY} hops")
    try:
        results = asyncio.run(run_all())
    finally:
        asyncio.run(lab.down())
    print(f"\n{'driver':<8}{'mode':<10}{'hops ok':>8}{'s/hop':>7}{'RSS hop1':>10}"
          f"{'RSS end':>9}{'fds':>9}{'sessions':>10}{'libvirt':>9}{'postcopy':>10}  verdict")
    ok = True
    for r in results:
        # the baseline is taken after the first hop: it opens what a VM keeps for its life
        # (its QMP connection: 3 fds), and the first migration's imports and buffers
        first, last = r["samples"][min(1, len(r["samples"]) - 1)], r["samples"][-1]
        flat = (first["fds"] == last["fds"] and first["sessions"] == last["sessions"]
                and first["libvirt"] == last["libvirt"]
                and last["rss"] - first["rss"] < RSS_FLAT_MIB)
        green = r["failure"] is None and r["hops"] == a.hops and flat
        ok = ok and green
        per_hop = sum(r["walls"]) / len(r["walls"]) if r["walls"] else float("nan")
        print(f"{r['driver']:<8}{r['mode']:<10}{r['hops']:>8}{per_hop:>7.2f}"
              f"{first['rss']:>10.1f}{last['rss']:>9.1f}"
              f"{first['fds']:>4}->{last['fds']:<4}{first['sessions']:>4}->{last['sessions']:<5}"
              f"{first['libvirt']:>3}->{last['libvirt']:<4}"
              f"{r['switched'] if r['mode'] == 'postcopy' else '-':>10}  "
              f"{'green' if green else 'RED'}{'' if flat else ' (not flat)'}")
        if r["failure"]:
            print(f"    {r['failure']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
