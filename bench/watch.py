#!/usr/bin/env python3
"""What watching a run costs (issue 21), and what its report weighs.

1. Monitoring cost. The same run (``ping_pong``, one round trip of a 128 MiB guest running
   the lab's dirtier, 8 MiB at 8 MiB/s), as whole ``migrate-run`` processes, ``--runs``
   times per condition, the conditions interleaved run by run (A, B, W, A, B, W, ...):

   * ``plain A`` and ``plain B``: ``--display lines`` to a file, no dirtier series
     (``report.dirtier_series: false``): the peer, twice, so that the difference between
     two identical conditions (the A/A noise) is measured in the same run;
   * ``watched``: what the issue's goal names, "the full live view plus time series": the
     live view in a pseudo-terminal (redrawn every 0.25 s, drained by this script) and the
     dirtier series in the records (and so in report.html's plots);
   * ``+metrics``: the same, and ``--metrics`` scraped by this script every second (fifteen
     times Prometheus' usual interval), beyond the goal.

   The dirtier's check (``checks.dirtier``) runs in every condition: it is an oracle, not
   monitoring (its followers and its wait after each hop are the same everywhere). Per
   condition: the median (min–max) of QEMU's total time per migration and of the
   controller's CPU seconds per run (the ``migrate-run`` process, user + system); then each
   against plain A, in percent (plain B against plain A is the noise). Goal: the total-time
   difference of ``watched`` at most 2 % or within the noise; its controller CPU at most 5 %
   more.

2. The report of a long run: one run of ``--migrations`` migrations (``ping_pong`` with
   that many hops, progress sampled every 0.2 s, the dirtier running): ``report.html``'s
   size and the time to make it, and its load in Chromium (navigation start -> load event,
   and the whole DevTools load call). Goal: under 5 MiB, open in under 2 s.

Own lab (mwatch, 10.77.237.0/24, /srv/migrator-bench/mwatch), torn down afterwards.

usage: bench/watch.py [--runs 30] [--migrations 200] [--skip-report] [--skip-cost]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pty
import resource
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from migrator.aio import shielded, wait_for  # noqa: E402
from migrator.config import GUEST_KERNEL_APPEND, Config  # noqa: E402
from migrator.lab import Lab  # noqa: E402

NAME, SUBNET, DIR = "mwatch", "10.77.237.0/24", Path("/srv/migrator-bench/mwatch")
BIN = Path(sys.executable).parent
APPEND = f"{GUEST_KERNEL_APPEND} lab.out=ttyS1 lab.dirty=8 lab.rate=8"
COMMON = ["-m", "hostA,hostB", "ping_pong", "-p", "scenario.rounds=1",
          "-p", f"vms.vm1.append={APPEND}", "-p", "migration.bandwidth_mibs=64"]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


async def scrape_loop(out: Path, stop: asyncio.Event, n: list[int]) -> None:
    """Scrape the run's /metrics every second, once it says where (as Prometheus would)."""
    import re

    import aiohttp
    url = None
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            if url is None and out.exists():
                m = re.search(r"metrics: (http://\S+/metrics)", out.read_text(errors="replace"))
                url = m.group(1) if m else None
            if url:
                try:
                    async with http.get(url) as r:
                        await r.read()
                        n[0] += 1
                except aiohttp.ClientError:
                    pass
            try:
                await wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass


async def until_done(proc) -> None:
    """Wait for a migrate-run process; interrupted, it is interrupted too (SIGINT: it rolls
    back and cleans up) and waited for: no run outlives the benchmark."""
    try:
        await proc.wait()
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            await shielded(proc.wait())
        raise


async def one_run(inv: Path, results: Path, condition: str) -> dict:
    """One migrate-run process; its migrations' total times and its CPU."""
    args = [str(BIN / "migrate-run"), "-i", str(inv), "-o", str(results), *COMMON]
    cpu0 = children_cpu()
    t0 = time.monotonic()
    scrapes = [0]
    if condition in ("watched", "+metrics"):
        master, slave = pty.openpty()
        seen = results / "screen.raw"
        metrics = ["--metrics", "127.0.0.1:0"] if condition == "+metrics" else []
        proc = await asyncio.create_subprocess_exec(
            *args, "--display", "live", *metrics,
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        os.set_blocking(master, False)
        loop = asyncio.get_running_loop()
        screen = open(seen, "wb")

        def drain():
            try:
                screen.write(os.read(master, 65536))
                screen.flush()
            except OSError:
                pass
        loop.add_reader(master, drain)
        stop = asyncio.Event()
        scraper = asyncio.ensure_future(scrape_loop(seen, stop, scrapes))
        try:
            await until_done(proc)
        finally:
            stop.set()
            await scraper
            loop.remove_reader(master)
            os.close(master)
            screen.close()
    else:
        with open(results / "output.log", "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *args, "--display", "lines", "-p", "report.dirtier_series=false",
                stdout=log, stderr=asyncio.subprocess.STDOUT)
            await until_done(proc)
    wall, cpu = time.monotonic() - t0, children_cpu() - cpu0
    (run_dir,) = [d for d in results.iterdir() if (d / "run.json").is_file()]
    run = json.loads((run_dir / "run.json").read_text())
    totals, series = [], 0
    for m in run["migrations"]:
        rec = json.loads((run_dir / "migrations" / f"{m['mig_id']}-{m['vm']}.json").read_text())
        totals.append(rec["total_time_ms"])
        series += len(rec.get("dirtier") or ())
    return {"condition": condition, "exit": proc.returncode, "verdict": run["verdict"],
            "totals": totals, "cpu": cpu, "wall": wall, "scrapes": scrapes[0],
            "dirtier_samples": series}


def med(values: list[float], digits: int = 1) -> str:
    return (f"{statistics.median(values):8.{digits}f} ({min(values):.{digits}f}–"
            f"{max(values):.{digits}f})" if values else "-")


async def cost(inv: Path, work: Path, runs: int) -> None:
    conditions = ("plain A", "plain B", "watched", "+metrics")
    got: dict[str, list[dict]] = {c: [] for c in conditions}
    for i in range(runs):
        for c in conditions:
            d = work / f"cost-{i:02d}-{c.replace(' ', '')}"
            d.mkdir(parents=True)
            r = await one_run(inv, d, c)
            if r["exit"] != 0:
                sys.exit(f"{c} run {i}: exit {r['exit']} ({d})")
            got[c].append(r)
        print(f"  {i + 1}/{runs} rounds done", file=sys.stderr, flush=True)
    print(f"\nmonitoring cost: {runs} interleaved runs per condition, ping_pong (2 "
          "migrations, 128 MiB guest, dirtier 8 MiB at 8 MiB/s, cap 64 MiB/s)")
    print(f"{'condition':10} {'QEMU total ms per migration':>32} {'controller CPU s per run':>28}"
          f" {'run wall s':>24} {'scrapes':>8} {'dirtier samples':>16}")
    figures = {}
    for c in conditions:
        totals = [t for r in got[c] for t in r["totals"]]
        cpu = [r["cpu"] for r in got[c]]
        figures[c] = (statistics.median(totals), statistics.median(cpu))
        print(f"{c:10} {med(totals):>32} {med(cpu, 3):>28} {med([r['wall'] for r in got[c]]):>24}"
              f" {sum(r['scrapes'] for r in got[c]):>8}"
              f" {sum(r['dirtier_samples'] for r in got[c]):>16}")
    base = figures["plain A"]
    print(f"\n{'vs plain A':10} {'total time':>12} {'controller CPU':>16}")
    for c in ("plain B", "watched", "+metrics"):
        print(f"{c:10} {100 * (figures[c][0] / base[0] - 1):+11.1f}% "
              f"{100 * (figures[c][1] / base[1] - 1):+15.1f}%")
    print("(plain B vs plain A is the A/A noise; goal: watched total time within 2 % or "
          "the noise, controller CPU at most +5 %)")
    # paired, round by round (the conditions of a round ran back to back): each condition's
    # CPU against the mean of the round's two plain runs; plain B against plain A is the
    # noise of one plain run against another. Drift over the benchmark (other load, the
    # page cache) cancels out of these, not out of the medians above
    head = "controller CPU vs the round's plain mean: median (IQR)"
    print(f"\n{'paired':10} {head:>56}")
    for c in ("plain B", "watched", "+metrics"):
        diffs = []
        for i in range(runs):
            a, b = got["plain A"][i]["cpu"], got["plain B"][i]["cpu"]
            ref = a if c == "plain B" else (a + b) / 2
            diffs.append(100 * (got[c][i]["cpu"] / ref - 1))
        q = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else [diffs[0]] * 3
        print(f"{c:10} {statistics.median(diffs):+15.1f}% ({q[0]:+.1f}% to {q[2]:+.1f}%)"
              + ("   (against plain A: the A/A noise)" if c == "plain B" else ""))


async def report(inv: Path, work: Path, migrations: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from chromium import Chromium
    from migrator.report.html import write_html
    results = work / "long"
    results.mkdir(parents=True)
    rounds = max(1, migrations // 2)
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "-i", str(inv), "-o", str(results), "-m", "hostA,hostB",
        "ping_pong", "-p", f"scenario.rounds={rounds}", "-p", f"vms.vm1.append={APPEND}",
        "-p", "report.progress_interval_s=0.2", "-p", "migration.bandwidth_mibs=64",
        "--display", "lines", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    t0 = time.monotonic()
    await until_done(proc)
    run_s = time.monotonic() - t0
    (run_dir,) = [d for d in results.iterdir() if (d / "run.json").is_file()]
    n = len(json.loads((run_dir / "run.json").read_text())["migrations"])
    t0 = time.monotonic()
    path = write_html(run_dir)
    make_s = time.monotonic() - t0
    size = path.stat().st_size
    loads = []
    async with Chromium() as browser:
        for _ in range(3):
            t0 = time.monotonic()
            page = await browser.load(path)
            call = time.monotonic() - t0
            nav = await page.evaluate("performance.timing.loadEventEnd - "
                                      "performance.timing.navigationStart")
            plots = await page.evaluate("document.querySelectorAll('figure.plot svg').length")
            loads.append((nav / 1000, call, plots, list(page.errors)))
    print(f"\nreport.html of a run of {n} migrations (exit {proc.returncode}, {run_s:.0f} s; "
          f"progress every 0.2 s, dirtier series)")
    print(f"size {size / 2**20:.2f} MiB (goal < 5), made in {make_s:.1f} s; "
          f"{loads[0][2]} plots")
    for i, (nav, call, _plots, errors) in enumerate(loads, 1):
        print(f"load {i} in Chromium: navigation -> load event {nav:.2f} s, DevTools load "
              f"call {call:.2f} s (goal < 2 s), console errors {len(errors)}")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--migrations", type=int, default=200)
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-report", action="store_true")
    args = p.parse_args()
    main_task = asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):     # also when started with SIGINT ignored
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
    lab = Lab(NAME, DIR, Config())
    await lab.down()
    await lab.up(["hostA", "hostB"], SUBNET, accel="tcg")
    import shutil
    import tempfile
    work = Path(tempfile.mkdtemp(prefix="migrator-bench-watch-"))
    try:
        if not args.skip_cost:
            await cost(lab.inventory_path, work, args.runs)
        if not args.skip_report:
            await report(lab.inventory_path, work, args.migrations)
    finally:
        await shielded(lab.down())
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
