#!/usr/bin/env python3
"""Drain a host of 8 VMs to 3 others: makespan against its lower bound (issue 18).

A 4-host libvirt lab; 8 lab guests (128 MiB, each holding a 32 MiB memsum pattern) started on
hostA with ``migrate-run vm start``'s API, then ``drain(hostA)`` to hostB..hostD with
``--max-parallel`` 1, 2 and 4 (``queue.*`` limits raised so that only ``--max-parallel``
binds), and 2 once more with ``queue.prepare_while_queued`` off (the destination prepared only
after the slot is granted: the pipelining effect). Between rows the VMs are drained back to
hostA (not measured). Every drain must leave hostA empty and every memsum intact.

The lower bound of a drain: the larger of
* Σ bytes sent ÷ the link's throughput (one migration alone: ``--max-parallel 1``'s median),
* the CPU bound of this machine: CPU-seconds the whole machine spent during the drain (guests'
  own vCPUs included: they run on the same 2 cores) ÷ its cores,
plus the fixed cost of one migration measured alone (its run minus its transfer: destination
preparation, verification, cleanup). Goal: makespan ≤ 1.5 × the bound.

usage: bench/drain.py [--vms 8] [--mem 128] [--pattern 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _machine import busy_seconds  # noqa: E402  (bench/, the script's directory)
from migrator.config import Config, HostCapacity, Inventory, VMSettings  # noqa: E402
from migrator.framework import RunContext  # noqa: E402
from migrator.framework.drain import drain, plan_drain  # noqa: E402
from migrator.framework.fleet import fleet_env, fleet_run_dir, start_vm, stop_vm  # noqa: E402
from migrator.hosts import SSHHost  # noqa: E402
from migrator.hypervisor.libvirt import LibvirtVM  # noqa: E402
from migrator.lab import Lab  # noqa: E402

NAME, SUBNET, DIR = "mdrain", "10.77.232.0/24", Path("/srv/migrator-bench/mdrain")
HOSTS = ["hostA", "hostB", "hostC", "hostD"]


async def memsum(config, inventory, name: str, host: str, command: str) -> str:
    async with SSHHost.from_inventory(host, inventory, config) as h:
        vm = LibvirtVM(fleet_env(config, inventory).spec(name, decl=VMSettings()), h,
                       fleet_run_dir(inventory), config)
        try:
            return (await (await vm.wait_for_login(120)).cmd(f"memsum {command}",
                                                            timeout=120)).strip()
        finally:
            vm._close_session()
            await vm.close()


def with_queue(config: Config, prepare: bool) -> Config:
    q = config.queue.model_copy(update={"per_source": 8, "per_destination": 8,
                                        "per_cluster": 16, "prepare_while_queued": prepare})
    return config.model_copy(update={"queue": q})


async def one_drain(config, inventory, host: str, targets, parallel: int,
                    prepare: bool = True) -> dict:
    cfg = with_queue(config, prepare)
    plan = await plan_drain(cfg, inventory, host, targets, parallel)
    assert not plan.unplaced, plan.table()
    ctx = RunContext(cfg, inventory)
    cpu0, t0 = busy_seconds(), time.monotonic()
    report = await drain(ctx, plan)
    cpu = busy_seconds() - cpu0
    assert report.empty, report.table()
    results = [m.result for m in ctx.migrations]
    return {"makespan": report.makespan_s, "wall": time.monotonic() - t0, "cpu": cpu,
            "bytes": sum(r["transferred_bytes"] or 0 for r in results),
            "alone_rate": statistics.median(r["transferred_bytes"] / r["wall_s"]
                                            for r in results),
            # the run less its transfer and its wait for a slot
            "fixed": statistics.median(r["run_s"] - r["wall_s"] - (r["queued_s"] or 0)
                                       for r in results),
            "downtimes": [r["downtime_ms"] or 0 for r in results],
            "where": {m.vm: m.dst for m in ctx.migrations}}


async def back_to_a(config, inventory) -> None:
    for h in HOSTS[1:]:
        plan = await plan_drain(with_queue(config, True), inventory, h, ["hostA"], 4)
        if plan.placements:
            report = await drain(RunContext(with_queue(config, True), inventory), plan)
            assert report.empty, report.table()


async def bench(lab: Lab, a, state: Path) -> list[tuple]:
    inventory = Inventory.load(lab.inventory_path)
    for h in HOSTS:
        inventory.hosts[h] = inventory.hosts[h].model_copy(
            update={"capacity": HostCapacity(cpus=16, mem_mib=a.vms * a.mem)})
    config = Config.load(None, {"journal.state_dir": str(state)})
    names = [f"d{i + 1}" for i in range(a.vms)]
    await asyncio.gather(*(start_vm(config, inventory, n, "hostA", VMSettings(mem_mib=a.mem))
                           for n in names))
    try:
        for n in names:
            out = await memsum(config, inventory, n, "hostA", f"write {a.pattern} {len(n)}")
            assert "MEMSUM wrote" in out, out
        rows = []
        for parallel, prepare in ((1, True), (2, True), (4, True), (2, False)):
            r = await one_drain(config, inventory, "hostA", HOSTS[1:], parallel, prepare)
            for n in names[:2]:
                verified = await memsum(config, inventory, n, r["where"][n], "verify")
                assert "ok=1" in verified and "bad_pages=0" in verified, verified
            rows.append((parallel, prepare, r))
            await back_to_a(config, inventory)
        return rows
    finally:
        for n in names:
            await stop_vm(config, inventory, n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=8)
    ap.add_argument("--mem", type=int, default=128)
    ap.add_argument("--pattern", type=int, default=32, help="MiB of memsum pattern per VM")
    a = ap.parse_args()
    lab = Lab(NAME, DIR, Config())
    asyncio.run(lab.up(HOSTS, SUBNET, libvirt=True, accel="tcg"))
    try:
        with tempfile.TemporaryDirectory() as state:
            rows = asyncio.run(bench(lab, a, Path(state)))
    finally:
        asyncio.run(lab.down())
    alone = rows[0][2]
    link, fixed = alone["alone_rate"], alone["fixed"]
    cores = os.cpu_count()
    print(f"drain: {a.vms} VMs of {a.mem} MiB ({a.pattern} MiB pattern each) hostA -> "
          f"hostB,hostC,hostD; link alone {link / 2**20:.0f} MiB/s, fixed cost alone "
          f"{fixed:.2f} s, {cores} cores")
    print(f"{'max-parallel':<13}{'prepare':>8}{'makespan':>10}{'MiB':>7}{'link bound':>11}"
          f"{'CPU bound':>10}{'bound':>7}{'ratio':>7}{'downtime p50/max':>18}  goal")
    for parallel, prepare, r in rows:
        link_bound = r["bytes"] / link
        cpu_bound = r["cpu"] / cores
        bound = max(link_bound, cpu_bound) + fixed
        ratio = r["makespan"] / bound
        d = sorted(r["downtimes"])
        print(f"{parallel:<13}{'yes' if prepare else 'no':>8}{r['makespan']:>9.2f}s"
              f"{r['bytes'] / 2**20:>7.0f}{link_bound:>10.2f}s{cpu_bound:>9.2f}s"
              f"{bound:>6.2f}s{ratio:>7.2f}{statistics.median(d):>10.0f}/{d[-1]:.0f} ms"
              f"  {'met' if ratio <= 1.5 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
