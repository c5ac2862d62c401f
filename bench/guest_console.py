#!/usr/bin/env python3
"""Benchmark a guest used as a host (``GuestHost``, over its serial console) side by side with
its peer, the lab host the guest runs on (``SSHHost``, over SSH), in the same run.

Per transport: the latency of a trivial command (``true``; median and p95 of N), and the
rates of ``send_file``/``get_file`` for one file (sha256-checked both ways: SFTP for the host,
base64 over the console for the guest). Lab of its own (mguest, 10.77.254.0/24,
/srv/migrator-bench), torn down afterwards. Numbers depend on the machine (TCG guests here).

usage: bench/guest_console.py [--runs 50] [--mib 1]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrator import GuestHost  # noqa: E402
from migrator.config import Config, Inventory  # noqa: E402
from migrator.hosts import SSHHost  # noqa: E402
from migrator.hypervisor import make_vm  # noqa: E402
from migrator.hypervisor.vm import VMSpec  # noqa: E402
from migrator.lab import Lab  # noqa: E402

NAME, SUBNET, DIR = "mguest", "10.77.254.0/24", Path("/srv/migrator-bench/mguest")


async def measure(target, runs: int, payload: Path, tmp: Path) -> dict:
    lat = []
    for _ in range(runs):
        t0 = time.monotonic()
        r = await target.run("true")
        lat.append(time.monotonic() - t0)
        assert r.exit_status == 0, r
    size = payload.stat().st_size
    t0 = time.monotonic()
    await target.send_file(payload, "/tmp/bench.payload")
    send_s = time.monotonic() - t0
    t0 = time.monotonic()
    await target.get_file("/tmp/bench.payload", tmp / "back")
    get_s = time.monotonic() - t0
    if hashlib.sha256((tmp / "back").read_bytes()).digest() != \
            hashlib.sha256(payload.read_bytes()).digest():
        raise SystemExit(f"{target}: the file came back different")
    await target.run("rm -f /tmp/bench.payload")
    lat.sort()
    return {"median_ms": statistics.median(lat) * 1000,
            "p95_ms": lat[int(0.95 * (len(lat) - 1))] * 1000,
            "send_kib_s": size / 1024 / send_s, "get_kib_s": size / 1024 / get_s}


async def bench(lab: Lab, runs: int, mib: float) -> list[tuple[str, dict]]:
    config = Config()
    inv = Inventory.load(lab.inventory_path)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        payload = tmp / "payload"
        payload.write_bytes(os.urandom(int(mib * 2**20)))
        async with SSHHost.from_inventory("hostA", inv, config) as host:
            spec = VMSpec("g1", kernel=str(inv.guest.kernel), initrd=str(inv.guest.initrd),
                          append=f"{inv.guest.append} lab.out=ttyS1")
            vm = make_vm("qemu", spec, host, str(inv.run_dir), config)
            await vm.start()
            try:
                await vm.wait_for_login()
                rows.append(("SSHHost hostA (SSH, SFTP)", await measure(host, runs, payload,
                                                                         tmp)))
                rows.append(("GuestHost g1 (serial console)",
                             await measure(GuestHost(vm), runs, payload, tmp)))
            finally:
                await vm.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--mib", type=float, default=1.0)
    a = ap.parse_args()
    lab = Lab(NAME, DIR, Config())
    asyncio.run(lab.up(["hostA"], SUBNET, accel="tcg"))
    try:
        rows = asyncio.run(bench(lab, a.runs, a.mib))
    finally:
        asyncio.run(lab.down())
    print(f"\nrun('true') x {a.runs}; one {a.mib:g} MiB file each way, sha256-checked\n")
    print(f"{'transport':32} {'run median':>11} {'run p95':>9} {'send':>12} {'get':>12}")
    for name, m in rows:
        print(f"{name:32} {m['median_ms']:9.1f}ms {m['p95_ms']:7.1f}ms "
              f"{m['send_kib_s']:8.0f}KiB/s {m['get_kib_s']:8.0f}KiB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
