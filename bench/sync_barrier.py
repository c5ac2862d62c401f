#!/usr/bin/env python3
"""Benchmark the sync server: 1000 members on loopback.

The server runs as its own process (migrate-syncserver); the members are SyncClients in
--procs client processes. All processes share CLOCK_MONOTONIC, so a round's "last arrival" is
the latest send time over every process, and each member's release latency is its answer
time minus that.

Prints: barrier release latency after the last arrival (p50, p99, max) for 1000 members; an
all-member exchange round (everyone gets everyone's data); and pairwise exchanges per second
(500 pairs, like port exchanges between migration pairs).

usage: bench/sync_barrier.py [--members 1000] [--procs 4] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run_workers(url, token_file, run, members, procs, rounds, mode):
    per = members // procs
    workers = [subprocess.Popen([sys.executable, str(HERE / "_sync_worker.py"), url,
                                 str(token_file), run, str(p * per), str(per), str(members),
                                 str(rounds), mode], stdout=subprocess.PIPE, text=True)
               for p in range(procs)]
    out = [json.loads(w.communicate()[0]) for w in workers]
    if any(w.returncode for w in workers):
        raise SystemExit(f"a worker failed in mode {mode}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp, "token")
        token_file.write_text(secrets.token_urlsafe(32))
        os.chmod(token_file, 0o600)
        server = subprocess.Popen([str(BIN / "migrate-syncserver"), "--bind", "127.0.0.1",
                                   "--port", "0", "--token-file", str(token_file),
                                   "--heartbeat", "30"], stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().split()[-1]
            rows = []
            res = run_workers(url, token_file, "b", a.members, a.procs, a.rounds, "barrier")
            lat = []
            for rnd in range(a.rounds):
                last = max(max(w["sends"][rnd]) for w in res)
                lat += [t - last for w in res for t in w["recvs"][rnd]]
            lat_ms = [x * 1000 for x in lat]
            rows.append(("barrier release after last arrival", a.members, a.rounds,
                         f"p50 {pct(lat_ms, .5):.1f} ms, p99 {pct(lat_ms, .99):.1f} ms, "
                         f"max {max(lat_ms):.1f} ms"))
            per_round = max(w["elapsed"] for w in res) / a.rounds
            rows.append(("barrier round (all arrive, all released)", a.members, a.rounds,
                         f"{per_round * 1000:.1f} ms per round"))
            xr = max(3, a.rounds // 4)
            res = run_workers(url, token_file, "x", a.members, a.procs, xr, "exchange-all")
            el = max(w["elapsed"] for w in res)
            rows.append(("exchange, everyone gets everyone's data", a.members, xr,
                         f"{el / xr * 1000:.0f} ms per round, {a.members * xr / el:,.0f} "
                         "member-exchanges/s"))
            res = run_workers(url, token_file, "p", a.members, a.procs, a.rounds, "pairs")
            el = max(w["elapsed"] for w in res)
            rows.append((f"pairwise exchanges ({a.members // 2} pairs at once)", a.members,
                         a.rounds, f"{a.members // 2 * a.rounds / el:,.0f} pair-exchanges/s"))
        finally:
            server.terminate()
            server.wait(30)
    print(f"\nsync server, {a.members} members in {a.procs} client processes + 1 server "
          "process, loopback, 2 cores\n")
    print(f"{'measure':<44}{'members':>8}{'rounds':>8}  result")
    for what, n, r, text in rows:
        print(f"{what:<44}{n:>8}{r:>8}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
