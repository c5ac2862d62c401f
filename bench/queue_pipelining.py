#!/usr/bin/env python3
"""Does preparing the destination while a migration waits for its slot help? (issue 18)

N idle lab guests (128 MiB) leave hostA for hostB in one call with ``queue.per_source=1``, so
they go one at a time, then come back the same way; the way back is measured. Side by side in
the same run, ``queue.prepare_while_queued`` true (the destination started and listening
while queued: the transfer starts at the slot) and false (wait for the slot, then prepare).

Per mode, the median of ``--runs``: makespan of the call (first migration asked to last one
done), the sum of the transfers alone (MIGRATING -> COMPLETED: the bound for one at a time),
and the gap between one migration's end and the next one's transfer (what the queue costs).

usage: bench/queue_pipelining.py [--vms 4] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrator.config import Config  # noqa: E402
from migrator.lab import Lab  # noqa: E402

NAME, SUBNET, DIR = "mqueue", "10.77.234.0/24", Path("/srv/migrator-bench/mqueue")
HERE = Path(__file__).resolve().parent


def measure(lab: Lab, vms: int, prepare: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run(
            [str(Path(sys.executable).parent / "migrate-run"), "-i", str(lab.inventory_path),
             "-o", out, "-m", "hostA,hostB", "-p", "queue.per_source=1",
             "-p", f"queue.prepare_while_queued={'true' if prepare else 'false'}",
             "-p", f"scenario.vms={vms}", str(HERE / "_fanout.py")],
            capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"migrate-run failed ({r.returncode}): {r.stdout[-2000:]}"
                               f"{r.stderr[-2000:]}")
        (run_dir,) = list(Path(out).iterdir())
        run = json.loads((run_dir / "run.json").read_text())
        back = [json.loads((run_dir / "migrations" / f"{m['mig_id']}-{m['vm']}.json")
                           .read_text()) for m in run["migrations"]][vms:]

    def at(m, phase):
        return next(w for p, _, w in m["phases"] if p == phase)
    start = min(m["phases"][0][2] for m in back)
    end = max(at(m, "CLEANED") for m in back)
    transfers = sum(at(m, "COMPLETED") - at(m, "MIGRATING") for m in back)
    spans = sorted((at(m, "MIGRATING"), at(m, "CLEANED")) for m in back)
    gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    return {"makespan": end - start, "transfers": transfers,
            "gap": statistics.median(gaps) if gaps else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    lab = Lab(NAME, DIR, Config())
    asyncio.run(lab.up(["hostA", "hostB"], SUBNET, libvirt=False, accel="tcg"))
    rows = {True: [], False: []}
    try:
        for _ in range(a.runs):             # interleaved: the machine's drift hits both
            for prepare in (True, False):
                rows[prepare].append(measure(lab, a.vms, prepare))
    finally:
        asyncio.run(lab.down())
    print(f"queue: {a.vms} VMs of 128 MiB hostA -> hostB one at a time (per_source=1), "
          f"median of {a.runs} runs, seconds")
    print(f"{'prepare_while_queued':<22}{'makespan':>9}{'transfers':>11}{'gap':>7}")
    for prepare in (True, False):
        med = {k: statistics.median(r[k] for r in rows[prepare]) for k in rows[prepare][0]}
        print(f"{str(prepare).lower():<22}{med['makespan']:>9.2f}{med['transfers']:>11.2f}"
              f"{med['gap']:>7.2f}")
    on = statistics.median(r["makespan"] for r in rows[True])
    off = statistics.median(r["makespan"] for r in rows[False])
    print(f"pipelining: makespan {on / off:.2f} x without it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
