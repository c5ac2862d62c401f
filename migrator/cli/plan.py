"""``migrate-run --plan PLAN.yaml --set NAME``: run a test plan's set (``migrator.plan``)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

from ..config import Config, load_any_inventory
from ..errors import MigratorError
from .common import Parser, fail, overrides, setup_logging, stamp


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="migrate-run --plan",
               description="Run a test plan's set: its tests over the plan's hosts x queues, "
                           "each queue a pipeline, queues in parallel, placed automatically "
                           "(longest expected first) unless the plan says where.",
               usage="migrate-run --plan PLAN.yaml --set NAME [options]")
    p.add_argument("--plan", required=True, help="the plan file (configs/README.md)")
    p.add_argument("--set", required=True, dest="set_name", metavar="NAME",
                   help="the test set to run")
    p.add_argument("--dry-run", action="store_true",
                   help="print the assignment and the predicted makespan; start nothing")
    p.add_argument("--fail-fast", action="store_true",
                   help="the first test that does not pass stops the plan (the running "
                        "ones are interrupted and clean up; the rest are skipped)")
    p.add_argument("-i", "--inventory", help="inventory file (default: $MIGRATOR_INVENTORY, "
                   "else the default lab's)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="the plan's own settings (plan.default_test_s, "
                        "report.results_dir); a test's config is its own")
    p.add_argument("-o", "--results", help="results root (default: report.results_dir): "
                                           "plan-<set>-<time>/ and plan-history.json there")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    return p


def main(argv: list[str]) -> int:
    """Exit 0 when every test passed, 1 when one did not, 2 on bad input (nothing started),
    130 on Ctrl-C (after every running test cleaned up)."""
    from ..plan import History, load_plan, schedule
    from ..plan.report import dry_run_table
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        config = Config.load(None, overrides(args.param))
        inventory = load_any_inventory(args.inventory)
        plan = load_plan(args.plan, inventory, args.set_name)
    except MigratorError as exc:
        return fail("migrate-run", exc, args.verbose)
    root = Path(args.results or config.report.results_dir)
    history = History.load(root)
    placements = schedule(plan, history.expected(plan, config.plan.default_test_s))
    if args.dry_run:
        print(dry_run_table(plan, placements))
        return 0
    out_dir = root / f"plan-{plan.set_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        return asyncio.run(_run(plan, placements, inventory, history, out_dir, config, args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"migrate-run: plan interrupted; every running test rolled back and cleaned "
              f"up, see {out_dir}", file=sys.stderr)
        return 130


async def _run(plan, placements, inventory, history, out_dir, config, args) -> int:
    from ..plan.report import stamp_now, summary_table, write_plan_results
    from ..plan.runner import PlanRunner
    main_task = asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
    t0 = time.monotonic()
    say = stamp(t0)
    runner = PlanRunner(plan, placements, inventory.source, out_dir, history,
                        fail_fast=args.fail_fast, say=say, stop_timeout_s=config.plan.stop_s)
    say(f"plan {plan.path} set {plan.set_name}: {len(placements)} tests on "
        f"{len(plan.queues)} queues ({', '.join(plan.queues)}); results in {out_dir}")
    meta = {"started": stamp_now()}
    interrupted = False
    try:
        await runner.run()
    except asyncio.CancelledError:
        interrupted = True
    finally:
        meta["finished"] = stamp_now()
        write_plan_results(plan, runner.runs, out_dir, meta)
        print(summary_table(plan, runner.runs, time.monotonic() - t0), flush=True)
        print(f"results: {out_dir}", flush=True)
    if interrupted:
        raise asyncio.CancelledError
    return 0 if all(r.status == "passed" for r in runner.runs) else 1
