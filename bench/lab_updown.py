#!/usr/bin/env python3
"""Benchmark the lab: `migrate-lab up -n N` / `down` wall times, and guest boot-to-shell.

Runs the real CLI (what a user types) in a lab of its own (name mbench, 10.77.250.0/24,
/srv/migrator-bench), checks after every `down` that nothing was left (namespaces, links,
processes, directory), and prints a table. Not a test: numbers depend on the machine.

usage: bench/lab_updown.py [--sizes 2,8,16] [--rounds 3] [--boots 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrator.config import Config  # noqa: E402
from migrator.lab import Lab  # noqa: E402
from migrator.lab import network  # noqa: E402
from migrator.lab.boot import boot_and_run  # noqa: E402
from migrator.lab.system import is_alive  # noqa: E402

BIN = Path(sys.executable).parent
NAME, SUBNET, DIR = "mbench", "10.77.250.0/24", Path("/srv/migrator-bench/mbench")


def cli(*args: str) -> float:
    t0 = time.monotonic()
    subprocess.run([str(BIN / "migrate-lab"), *args, "--name", NAME, "--dir", str(DIR)],
                   check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def leftovers(state) -> list[str]:
    left = [h.netns for h in state.hosts if network.netns_exists(h.netns)]
    left += [n for n in [state.bridge, *(h.veth for h in state.hosts)] if network.link_exists(n)]
    left += [f"pid {r.pid}" for h in state.hosts for r in (h.init, h.sshd) if r and is_alive(r.proc())]
    if DIR.exists():
        left.append(str(DIR))
    return left


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2,8,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--boots", type=int, default=3)
    a = ap.parse_args()
    lab = Lab(NAME, DIR, Config())
    rows = []
    for n in [int(x) for x in a.sizes.split(",")]:
        ups, downs = [], []
        for _ in range(a.rounds):
            ups.append(cli("up", "-n", str(n), "--subnet", SUBNET, "--accel", "tcg"))
            state = lab.state()
            downs.append(cli("down"))
            left = leftovers(state)
            if left:
                print(f"LEFT BEHIND after down of {n} hosts: {left}", file=sys.stderr)
                return 1
        rows.append((f"up -n {n}", ups))
        rows.append((f"down ({n} hosts)", downs))

    boots = []
    cli("up", "-n", "1", "--subnet", SUBNET, "--accel", "tcg")
    try:
        for i in range(a.boots):
            r = asyncio.run(boot_and_run(lab, "hostA", "true", 128, Config(), vm_name=f"b{i}"))
            boots.append((r.start_s, r.boot_to_shell_s, r.ready_uptime_s))
    finally:
        cli("down")

    print(f"\nmigrate-lab (CLI wall time incl. Python start-up; {a.rounds} rounds; "
          "nothing left after every down)\n")
    print(f"{'operation':<18}{'median s':>10}{'min s':>9}{'max s':>9}")
    for what, xs in rows:
        print(f"{what:<18}{statistics.median(xs):>10.2f}{min(xs):>9.2f}{max(xs):>9.2f}")
    print(f"\nguest on a lab host (TCG, 128 MiB, PVH vmlinux; {a.boots} boots over SSH)\n")
    print(f"{'measure':<40}{'median s':>10}{'min s':>9}{'max s':>9}")
    for i, what in enumerate(["QEMU start over SSH (until sockets)",
                              "boot to shell prompt (after 'cont')",
                              "guest uptime at LAB-READY"]):
        xs = [b[i] for b in boots]
        print(f"{what:<40}{statistics.median(xs):>10.2f}{min(xs):>9.2f}{max(xs):>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
