#!/usr/bin/env python3
"""Benchmark test plans (issue 17): 24 short tests — pair tests and single-host tests mixed —
over 4 hosts x 2 queues, assigned by hand (the seed's way: tests in file order dealt round
the queues, a pair on the same queue number of two neighbouring hosts) and automatically
(longest expected first; the first automatic run knows nothing, the later ones use the
history the earlier ones wrote), each 3 runs, in the same lab.

Per run: the makespan (first start to last end), the packing bound Σ(duration x queues
held) ÷ queues from the run's own durations (no schedule ends sooner), makespan ÷ bound,
what the scheduler predicted, and its own overhead: the time to load and place the plan,
and the launch gap (from the moment a test's queues were all free to its start, mean).
Goal: automatic makespan ÷ bound <= 1.2, and no worse than by hand.

The pair tests are ``tests/scenarios/plan_step.py`` waiting a set time (5..40 s: their
lengths are what the scheduler has to pack); the single-host ones are task lists that boot
a lab guest and run a command in it (real work, on a shared 2-core machine). Lab of its own
(mplan, 10.77.236.0/24, /srv/migrator-bench), torn down afterwards.

usage: bench/plan.py [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from migrator.config import Inventory  # noqa: E402
from migrator.lab import Lab  # noqa: E402
from migrator.plan import History, load_plan, schedule  # noqa: E402

NAME, SUBNET, DIR = "mplan", "10.77.236.0/24", Path("/srv/migrator-bench/mplan")
HOSTS = ["hostA", "hostB", "hostC", "hostD"]
QUEUES = [f"{h}/{q}" for q in (1, 2) for h in HOSTS]
STEP = ROOT / "tests" / "scenarios" / "plan_step.py"
#: the pair tests' waits (s): 18 of them, mixed long and short, in no particular order
PAIR_WAITS = [20, 5, 35, 10, 15, 40, 5, 25, 10, 30, 5, 20, 15, 35, 10, 25, 5, 30]
SINGLES = 6
GOAL = 1.2
RED, END = "\033[31m", "\033[0m"

SINGLE_TASKS = """\
tasks:
  - start: {name: vm0, host: all}
  - cmd: {name: vm0, host: all, commands: ["uname -s"], expects: ["^Linux$"], timeouts: [30]}
"""


def plan_text(by_hand: bool) -> str:
    tests, slot = [], 0
    names = [("pair", i, w) for i, w in enumerate(PAIR_WAITS)] + \
        [("single", i, None) for i in range(SINGLES)]
    # interleave: a single after every third pair (file order = the hand assignment's order)
    order = []
    singles = [n for n in names if n[0] == "single"]
    for k, n in enumerate(n for n in names if n[0] == "pair"):
        order.append(n)
        if k % 3 == 2 and singles:
            order.append(singles.pop(0))
    order += singles
    for kind, i, wait in order:
        q = QUEUES[slot % len(QUEUES)]
        host, num = q.split("/")
        if kind == "pair":
            nxt = HOSTS[(HOSTS.index(host) + 1) % len(HOSTS)]
            where = f", where: [{q}, {nxt}/{num}]" if by_hand else ""
            tests.append(f"  pair{i}: {{scenario: {STEP}, hosts: 2, "
                         f"params: {{scenario.sleep_s: {wait}}}{where}}}")
        else:
            where = f", where: [{q}]" if by_hand else ""
            tests.append(f"  single{i}: {{scenario: single.yaml, hosts: 1{where}}}")
        slot += 1
    return ("hosts: {" + ", ".join(f"{h}: {{queues: 2}}" for h in HOSTS) + "}\n"
            "tests:\n" + "\n".join(tests) + "\nsets: {all: {}}\n")


async def one_run(inv_path: Path, plan: Path, results: Path) -> dict:
    t0 = time.monotonic()
    inv = Inventory.load(inv_path)
    loaded = load_plan(plan, inv, "all")
    schedule(loaded, History.load(results).expected(loaded, 60.0))
    sched_ms = (time.monotonic() - t0) * 1000
    proc = await asyncio.create_subprocess_exec(
        str(ROOT / ".venv" / "bin" / "migrate-run"), "--plan", str(plan), "--set", "all",
        "-i", str(inv_path), "-o", str(results), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"the plan run failed (exit {proc.returncode}):\n"
                         f"{out.decode()[-3000:]}")
    out_dir = sorted(p for p in results.iterdir() if p.is_dir())[-1]
    data = json.loads((out_dir / "plan.json").read_text())
    tests = data["tests"]
    gaps = []
    for t in tests:                                  # when were its queues all free?
        free_at = 0.0
        for q in t["queues"]:
            ends = [u["started_s"] + u["duration_s"] for u in tests
                    if q in u["queues"] and u["started_s"] < t["started_s"]]
            free_at = max([free_at, *ends])
        gaps.append(t["started_s"] - free_at)
    return {"makespan": data["makespan_s"], "bound": data["packing_bound_s"],
            "predicted": data["predicted_makespan_s"], "sum": data["sum_test_s"],
            "sched_ms": sched_ms, "gap": statistics.mean(gaps),
            "passed": data["counts"]["passed"], "n": len(tests)}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    lab = Lab(NAME, DIR)
    await lab.down()
    await lab.up(HOSTS, SUBNET)
    rows = []
    try:
        work = DIR / "bench"
        work.mkdir(parents=True, exist_ok=True)
        (work / "single.yaml").write_text(SINGLE_TASKS)
        for mode in ("hand", "auto"):
            plan = work / f"plan-{mode}.yaml"
            plan.write_text(plan_text(mode == "hand"))
            results = work / f"results-{mode}"
            for run in range(1, args.runs + 1):
                r = await one_run(lab.inventory_path, plan, results)
                rows.append({"mode": mode, "run": run, **r})
                print(f"  {mode} run {run}: makespan {r['makespan']:.1f} s, bound "
                      f"{r['bound']:.1f} s, {r['passed']}/{r['n']} passed", flush=True)
    finally:
        await lab.down()
    cols = ["mode", "run", "tests", "makespan s", "bound s", "makespan/bound", "predicted s",
            "sum of tests s", "sched ms", "launch gap s", "goal"]
    table = []
    for r in rows:
        ratio = r["makespan"] / r["bound"]
        hand = [x["makespan"] for x in rows if x["mode"] == "hand"]
        ok = r["mode"] == "hand" or (ratio <= GOAL and r["makespan"] <= max(hand))
        table.append([r["mode"], str(r["run"]), f"{r['passed']}/{r['n']}",
                      f"{r['makespan']:.1f}", f"{r['bound']:.1f}", f"{ratio:.2f}",
                      f"{r['predicted']:.1f}", f"{r['sum']:.1f}", f"{r['sched_ms']:.1f}",
                      f"{r['gap']:.2f}", "-" if r["mode"] == "hand" else
                      ("ok" if ok else f"{RED}MISSED{END}")])
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    for t in [cols, ["-" * w for w in widths], *table]:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())
    print(f"4 hosts x 2 queues; {len(PAIR_WAITS)} pair tests (waits {min(PAIR_WAITS)}-"
          f"{max(PAIR_WAITS)} s) and {SINGLES} single-host task lists (a guest booted, a "
          f"command run); goal: automatic makespan/bound <= {GOAL} and <= by hand")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
