#!/usr/bin/env python3
"""Benchmark: the guest-visible blackout of live migrations, next to QEMU's downtime (issue 16).

A bridged lab guest (128 MiB, ``network: bridge``, a static address on the lab's guest
network) migrates hostA <-> hostB --runs times per driver, idle and with the dirtier
(32 MiB), each migration probed from the controller (ICMP every --interval ms from a process
of its own, kernel receive timestamps; a TCP stream through ``nc -e cat`` in the guest).
Before the migrations, the prober's **noise floor**: the longest gap over the same probing
time with no migration, same guest, same load.

Columns, per driver and case (p50 / p95 / p99 / max over the runs):

* blackout      -- the longest outage: a run of lost probes, reply before to reply after
* reply gap     -- the longest gap between replies, lost probes or not (includes the prober
                   not being scheduled: what a gap-only measure would report)
* downtime      -- QEMU's (libvirt's) downtime figure
* STOP->RESUME  -- the source's STOP event to the destination's RESUME (qemu driver)
* excess p95    -- p95 of (blackout - STOP->RESUME, or - downtime where no events): what
                   the network adds to what QEMU stops; the goal is <= 50 ms
* lost, tcp     -- probes lost in total; TCP streams that survived / runs

usage: bench/blackout.py [--runs 50] [--interval 5] [--drivers qemu,libvirt]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrator.config import Config, Inventory  # noqa: E402
from migrator.hosts import SSHHost  # noqa: E402
from migrator.hypervisor import make_vm  # noqa: E402
from migrator.hypervisor.vm import VMSpec  # noqa: E402
from migrator.lab import Lab  # noqa: E402
from migrator.migration import make_migration  # noqa: E402
from migrator.migration.blackout import BlackoutProbe, switchover_time  # noqa: E402
from migrator.migration.oracles import wait_tick_after  # noqa: E402

NAME, SUBNET, DIR = "mblack", "10.77.238.0/24", Path("/srv/migrator-bench/mblack")
CASES = [("idle", ""), ("32 MiB dirty", "lab.dirty=32")]
MAC, PORT = "02:6d:62:6c:00:01", 7000


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    return " / ".join(f"{pct(values, q):.0f}" for q in (50, 95, 99)) + f" / {max(values):.0f}"


async def measure(lab: Lab, runs: int, interval: float, drivers: list[str]) -> list[tuple]:
    config = Config()
    inv = Inventory.load(lab.inventory_path)
    net = ipaddress.ip_network(inv.guest_network.subnet)
    ip = f"{net.network_address + 50}/{net.prefixlen}"
    rows = []
    async with SSHHost.from_inventory("hostA", inv, config) as ha, \
            SSHHost.from_inventory("hostB", inv, config) as hb:
        hosts = {"hostA": ha, "hostB": hb}
        for driver in drivers:
            for label, extra in CASES:
                spec = VMSpec(f"b{driver[0]}", kernel=str(inv.guest.kernel),
                              initrd=str(inv.guest.initrd),
                              append=f"{inv.guest.append} lab.out=ttyS1 {extra}".strip(),
                              mac=MAC, network="bridge", bridge=inv.guest_bridge_of("hostA"),
                              ip=ip)
                vm = make_vm(driver, spec, ha, str(inv.run_dir), config)
                blackout, gap, downtime, events, excess, lost, tcp = [], [], [], [], [], 0, 0
                try:
                    await vm.start()
                    await wait_tick_after(vm, 1, 120)
                    session = await vm.wait_for_login()
                    await session.cmd(f"nc -ll -p {PORT} -e cat </dev/null >/dev/null 2>&1 &")
                    await vm.wait_reachable(30)
                    t_one = []
                    for i in range(runs):
                        dst = "hostB" if vm.host.name == "hostA" else "hostA"
                        t0 = time.monotonic()
                        async with BlackoutProbe(spec.address, interval, PORT) as probe:
                            r = await make_migration(vm, hosts[dst], inv.hosts[dst].address,
                                                     config=config).run()
                        t_one.append(time.monotonic() - t0)
                        rep = probe.report(switchover_time(r.phases))
                        blackout.append(rep.blackout_ms)
                        gap.append(rep.max_reply_gap_ms)
                        downtime.append(float(r.downtime_ms or 0))
                        if r.downtime_events_ms is not None:
                            events.append(r.downtime_events_ms)
                        excess.append(rep.blackout_ms - (r.downtime_events_ms
                                                         if r.downtime_events_ms is not None
                                                         else r.downtime_ms or 0))
                        lost += rep.lost
                        tcp += bool(rep.tcp_survived)
                        print(f"  {driver} {label} #{i + 1}: blackout {rep.blackout_ms:.1f} ms "
                              f"(reply gap {rep.max_reply_gap_ms:.1f}),"
                              f" downtime {r.downtime_ms} ms, events "
                              f"{r.downtime_events_ms} ms, lost {rep.lost}, tcp "
                              f"{rep.tcp_survived}"
                              + ("" if rep.tcp_survived else f" ({rep.tcp})"), flush=True)
                    # the noise floor: as long as a median migration's probing, no migration
                    async with BlackoutProbe(spec.address, interval, PORT) as probe:
                        await asyncio.sleep(statistics.median(t_one))
                    quiet = probe.report()
                    floor = f"{quiet.max_reply_gap_ms:.0f} ({quiet.lost} lost)"
                finally:
                    await vm.stop()
                rows.append((driver, label, runs, cell(blackout), cell(gap), cell(downtime),
                             cell(events), f"{pct(excess, 95):.0f}", floor, str(lost),
                             f"{tcp}/{runs}"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--drivers", default="qemu,libvirt")
    a = ap.parse_args()
    lab = Lab(NAME, DIR, Config())
    asyncio.run(lab.up(["hostA", "hostB"], SUBNET, libvirt=True, accel="tcg"))
    try:
        rows = asyncio.run(measure(lab, a.runs, a.interval, a.drivers.split(",")))
    finally:
        asyncio.run(lab.down())
    head = ("driver", "case", "runs", "blackout ms p50/p95/p99/max", "reply gap ms",
            "downtime ms", "STOP->RESUME ms", "excess p95", "noise floor ms", "lost", "tcp")
    table = [head] + rows
    widths = [max(len(r[i]) if isinstance(r[i], str) else len(str(r[i])) for r in table)
              for i in range(len(head))]
    print()
    print(f"probe interval {a.interval:g} ms; noise floor: the longest reply gap (and the probes "
          "lost) over a median migration's probing time with no migration")
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
