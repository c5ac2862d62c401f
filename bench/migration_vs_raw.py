#!/usr/bin/env python3
"""Benchmark: migrator's engine vs a minimal raw QMP script, same lab, same run.

Cases: a 512 MiB idle guest, and a 128 MiB guest keeping 32 MiB dirty. For each, --runs
migrations by each side, alternating which side goes first. Both sides start the destination QEMU the same way
(over SSH, -incoming defer) and reach QMP through the same SSH socket forwarding; the raw
side then does only: events capability, lift the bandwidth cap, migrate-incoming on a fixed
port, migrate, poll query-migrate until completed, quit the source.

Columns: "migrate->done" is from issuing 'migrate' to seeing 'completed' (both sides poll
every 50 ms); "whole" is destination start to source stopped; QEMU's own total time,
downtime and throughput. Context: the lab link's raw TCP throughput (socat, 1 GiB).

usage: bench/migration_vs_raw.py [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrator.config import Config, Inventory  # noqa: E402
from migrator.hosts import SSHHost  # noqa: E402
from migrator.hypervisor.qemu import QemuVM, VMSpec  # noqa: E402
from migrator.lab import Lab  # noqa: E402
from migrator.migration import Migration  # noqa: E402
from migrator.migration.oracles import wait_tick_after  # noqa: E402
from migrator.migration.params import UNCAPPED_BYTES_S  # noqa: E402

NAME, SUBNET, DIR = "mbench", "10.77.250.0/24", Path("/srv/migrator-bench/mbench")
CASES = [("512 MiB idle", 512, ""), ("128 MiB, 32 MiB dirty", 128, "lab.dirty=32")]


def spec_for(inv, mem, extra, name):
    return VMSpec(name, mem_mib=mem, kernel=str(inv.guest.kernel), initrd=str(inv.guest.initrd),
                  append=f"{inv.guest.append} lab.out=ttyS1 {extra}".strip())


async def boot(inv, host, config, mem, extra, name):
    vm = QemuVM(spec_for(inv, mem, extra, name), host, str(inv.run_dir), config)
    await vm.start()
    await wait_tick_after(vm, 1, 120)          # booted and settled
    return vm


async def ours(inv, a, b, config, mem, extra, name):
    vm = await boot(inv, a, config, mem, extra, name)
    m = Migration(vm, b, inv.hosts["hostB"].address, config=config)
    r = await m.run()
    await m.dst_vm.stop()
    return {"done": r.wall_s, "whole": r.run_s, "total": r.total_time_ms,
            "down": r.downtime_ms, "mbps": r.throughput_mbps}


async def raw(inv, a, b, config, mem, extra, name, port=4444):
    vm = await boot(inv, a, config, mem, extra, name)
    dst = QemuVM(vm.spec, b, vm.run_dir, config)
    t0 = time.monotonic()
    await dst.start(incoming=True)
    src_q, dst_q = await vm.qmp(), await dst.qmp()
    for q in (src_q, dst_q):
        await q.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": "events", "state": True}]})
    await src_q.execute("migrate-set-parameters", {"max-bandwidth": UNCAPPED_BYTES_S})
    addr = inv.hosts["hostB"].address
    await dst_q.execute("migrate-incoming", {"uri": f"tcp:{addr}:{port}"})
    t1 = time.monotonic()
    await src_q.execute("migrate", {"uri": f"tcp:{addr}:{port}"})
    while (info := await src_q.execute("query-migrate"))["status"] != "completed":
        if info["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"raw migration {info['status']}")
        await asyncio.sleep(0.05)
    done = time.monotonic() - t1
    while not info.get("total-time"):
        info = await src_q.execute("query-migrate")
    await vm.stop()
    whole = time.monotonic() - t0
    await dst.stop()
    ram = info["ram"]
    return {"done": done, "whole": whole, "total": info["total-time"],
            "down": info.get("downtime"), "mbps": ram["mbps"]}


async def link_throughput(a: SSHHost, b: SSHHost, address: str) -> float:
    listener = asyncio.ensure_future(b.run("socat -u TCP-LISTEN:5001,reuseaddr /dev/null",
                                           timeout=120))
    for _ in range(100):
        if (await b.run("ss -ltn 'sport = :5001' | grep -q LISTEN")).ok:
            break
        await asyncio.sleep(0.05)
    r = await a.run(f"start=$(date +%s.%N); dd if=/dev/zero bs=1M count=1024 2>/dev/null | "
                    f"socat -u - TCP:{address}:5001; end=$(date +%s.%N); "
                    f"echo \"$start $end\"", check=True, timeout=120)
    await listener
    start, end = map(float, r.stdout.split()[-2:])
    return 1024 * 8 * 1.048576 / (end - start)      # Mbit/s (10^6 bit)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    config = Config()
    lab = Lab(NAME, DIR, config)
    asyncio.run(lab.up(["hostA", "hostB"], SUBNET, accel="tcg"))

    async def measure():
        inv = Inventory.load(lab.inventory_path)
        async with SSHHost.from_inventory("hostA", inv) as ha, \
                SSHHost.from_inventory("hostB", inv) as hb:
            link = await link_throughput(ha, hb, inv.hosts["hostB"].address)
            results = {}
            for label, mem, extra in CASES:
                rows = {"migrator": [], "raw QMP": []}
                for i in range(a.runs):        # alternate who goes first: no order bias
                    sides = [("migrator", ours, f"o{i}"), ("raw QMP", raw, f"r{i}")]
                    for side, fn, name in (sides if i % 2 == 0 else sides[::-1]):
                        rows[side].append(await fn(inv, ha, hb, config, mem, extra, name))
                results[label] = rows
            return link, results

    try:
        link, results = asyncio.run(measure())
    finally:
        asyncio.run(lab.down())
    print(f"\nlab link raw TCP throughput (socat, 1 GiB, hostA->hostB): {link:,.0f} Mbit/s\n")
    print(f"{'case':<24}{'side':<10}{'migrate->done s':>16}{'whole s':>9}{'QEMU total ms':>14}"
          f"{'downtime ms':>12}{'Mbit/s':>9}")
    med = statistics.median
    for label, rows in results.items():
        for side, runs in rows.items():
            print(f"{label:<24}{side:<10}{med(r['done'] for r in runs):>16.3f}"
                  f"{med(r['whole'] for r in runs):>9.3f}{med(r['total'] for r in runs):>14.0f}"
                  f"{med(r['down'] for r in runs):>12.0f}{med(r['mbps'] for r in runs):>9.0f}")
        o, r = rows["migrator"], rows["raw QMP"]
        for side, runs in rows.items():
            print(f"{'':<24}{side:<10} QEMU total ms per run: "
                  f"{sorted(x['total'] for x in runs)}")
        overhead = med(x["whole"] - x["total"] / 1000 for x in o)
        print(f"{'':<24}ratio: whole {med(x['whole'] for x in o) / med(x['whole'] for x in r):.2f}"
              f", migrate->done {med(x['done'] for x in o) / med(x['done'] for x in r):.2f}; "
              f"throughput {med(x['mbps'] for x in o) / med(x['mbps'] for x in r):.2f} of raw; "
              f"our overhead (whole - QEMU total) {overhead:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
