#!/usr/bin/env python3
"""Benchmark: one short command fanned out to 16 lab hosts, 20 rounds: migrator vs parallel-ssh.

Both keep their connections between rounds; the first ("cold") round includes connecting.
parallel-ssh runs in its own venv (created once under /var/cache/migrator/bench-venv), in a
separate process, against the same lab in the same run. Every round's output is checked
(each host must answer its own hostname).

Caveat printed with the table: migrator verifies every host key against known_hosts;
parallel-ssh's native client does no host-key verification.

usage: bench/ssh_fanout.py [--hosts 16] [--rounds 20] [--command hostname]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrator.config import Config, Inventory  # noqa: E402
from migrator.hosts import SSHHost, run_on  # noqa: E402
from migrator.lab import Lab  # noqa: E402

NAME, SUBNET, DIR = "mbench", "10.77.250.0/24", Path("/srv/migrator-bench/mbench")
BENCH_VENV = Path("/var/cache/migrator/bench-venv")


def pssh_python() -> Path:
    py = BENCH_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", "parallel-ssh"],
                       check=True)
    return py


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


async def migrator_side(inv: Inventory, rounds: int, command: str) -> dict:
    hosts = [SSHHost.from_inventory(n, inv) for n in inv.hosts]
    times, outputs = [], []
    try:
        for _ in range(rounds + 1):
            t0 = time.monotonic()
            results = await run_on(hosts, command, fail_fast=True, check=True)
            times.append(time.monotonic() - t0)
            outputs = [r.stdout.strip() for r in results]
    finally:
        for h in hosts:
            await h.close()
    return {"cold": times[0], "rounds": times[1:], "outputs": outputs}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--command", default="hostname")
    a = ap.parse_args()
    py = pssh_python()
    lab = Lab(NAME, DIR, Config())
    from migrator.lab.lab import default_host_names
    asyncio.run(lab.up(default_host_names(a.hosts), SUBNET, accel="tcg"))
    try:
        inv = Inventory.load(lab.inventory_path)
        names = list(inv.hosts)
        ours = asyncio.run(migrator_side(inv, a.rounds, a.command))
        addresses = ",".join(inv.hosts[n].address for n in names)
        done = subprocess.run([str(py), str(Path(__file__).with_name("_pssh_fanout.py")),
                               addresses, str(inv.ssh.identity_file), str(a.rounds), a.command],
                              capture_output=True, text=True, check=True)
        theirs = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        asyncio.run(lab.down())
    for who, res in (("migrator", ours), ("parallel-ssh", theirs)):
        if a.command == "hostname" and res["outputs"] != names:
            print(f"{who}: wrong outputs {res['outputs']}", file=sys.stderr)
            return 1
    version = subprocess.run(
        [str(py), "-c", "from importlib.metadata import version; "
                        "print(version('parallel-ssh'))"],
        capture_output=True, text=True).stdout.strip()
    print(f"\nfan-out of {a.command!r} to {a.hosts} lab hosts, {a.rounds} warm rounds "
          f"(connections kept), same lab, same run\n")
    print(f"{'tool':<24}{'cold round s':>13}{'median s':>10}{'p95 s':>9}{'min s':>9}")
    for who, res in (("migrator (asyncssh)", ours), (f"parallel-ssh {version}", theirs)):
        r = res["rounds"]
        print(f"{who:<24}{res['cold']:>13.3f}{statistics.median(r):>10.3f}{p95(r):>9.3f}"
              f"{min(r):>9.3f}")
    ratio_med = statistics.median(theirs["rounds"]) / statistics.median(ours["rounds"])
    ratio_p95 = p95(theirs["rounds"]) / p95(ours["rounds"])
    print(f"\nparallel-ssh / migrator: median {ratio_med:.2f}x, p95 {ratio_p95:.2f}x "
          f"(>1 means migrator is faster)")
    print("note: migrator verifies every host key against known_hosts; parallel-ssh's native "
          "client does not verify host keys.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
