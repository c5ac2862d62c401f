"""``migrate-run drain HOST [--to HOSTS] [--max-parallel N] [--dry-run]``: migrate every VM
running on HOST away (see :mod:`migrator.framework.drain`).

Prints the plan first (all of ``--dry-run``), a line per phase and progress while it runs,
then a table of what happened to each VM. Exit status: 0 when HOST runs no VM any more
(``--dry-run``: when every VM could be placed), 1 when one is still there (each named, with
why), 2 on bad input before anything starts, 130 on Ctrl-C (every migration in flight rolled
back first). An interrupted drain whose controller died is finished by ``migrate-run
recover``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from ..aio import shielded
from ..errors import ConfigError, MigratorError
from .common import (Parser, add_setup_options, fail, load_setup, overrides,
                     setup_logging, stamp)


def _parser() -> Parser:
    p = Parser(prog="migrate-run drain",
               description="Migrate every libvirt domain running on HOST (started by "
                           "migrator or not) to hosts with room by the inventory's "
                           "capacity, within the queue.* limits; the plan is printed first.")
    p.add_argument("host", metavar="HOST")
    p.add_argument("--to", action="append", default=[], metavar="HOSTS",
                   help="comma-separated targets (default: every other inventory host)")
    p.add_argument("--max-parallel", type=int, metavar="N",
                   help="migrations at once (default: queue.per_source); the queue.* limits "
                        "hold too")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan only; exit 0 when every VM could be placed")
    p.add_argument("-o", "--results", help="results directory (default: report.results_dir)")
    add_setup_options(p)
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        config, inventory = load_setup(args)
        if (asked := overrides(args.param).get("driver", "libvirt")) != "libvirt":
            raise ConfigError("drain moves libvirt domains: its driver is libvirt, not "
                              f"{asked}")
        config = config.model_copy(update={"driver": "libvirt"})
        from ..framework.drain import check_drain
        targets = [h.strip() for g in args.to for h in g.split(",") if h.strip()]
        check_drain(config, inventory, args.host, targets, args.max_parallel)
        return asyncio.run(_main(config, inventory, args, targets))
    except KeyboardInterrupt:
        print("migrate-run drain: interrupted", file=sys.stderr)
        return 130
    except MigratorError as exc:
        return fail("migrate-run drain", exc, args.verbose)


async def _main(config, inventory, args, targets) -> int:
    import signal

    from ..framework import RunContext
    from ..framework.drain import drain, plan_drain
    from ..report import write_page, write_results
    plan = await plan_drain(config, inventory, args.host, targets, args.max_parallel)
    print(plan.table(), flush=True)
    if args.dry_run:
        return 1 if plan.unplaced else 0
    if not plan.placements:
        print(f"{args.host} runs no VM: nothing to drain")
        return 0
    if not plan.placed:
        print(f"no VM of {args.host} can be placed: nothing started")
        return 1
    main_task = asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
    ctx = RunContext(config, inventory, say=stamp(time.monotonic()))
    out_dir = Path(args.results or config.report.results_dir) / ctx.run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    hosts = [plan.host, *plan.targets]
    ctx.open_journal(hosts, out_dir / "journal.jsonl")
    report = None
    meta = {"scenario": f"drain {plan.host}", "class": "Drain", "hosts": hosts,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    ctx.say(f"run {ctx.run_id}: drain {plan.host}; results in {out_dir}")
    try:
        try:
            await ctx.start_control(main_task.cancel)
            report = await drain(ctx, plan)
        finally:
            await shielded(ctx.stop_server())
    except asyncio.CancelledError:
        print(f"migrate-run drain: interrupted; every migration in flight was rolled back "
              f"(or, past its postcopy switchover, finished); see {out_dir}", file=sys.stderr)
        return 130
    finally:
        ctx.close_journal([])
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_results(ctx, out_dir, meta)
        await write_page(ctx, out_dir)
        if report is not None:
            print(report.table(), flush=True)
        print(f"results: {out_dir}", flush=True)
    return 0 if report.empty else 1
