"""``migrate-run status`` and ``migrate-run cancel MIG-ID|RUN-ID``: look at and stop the
work of live runs from another terminal (see :mod:`migrator.framework.control`).

Exit status: ``status`` 0 (also when nothing runs); ``cancel`` 0 when the run took the
request, 2 when there is no such live run or migration in flight (the message lists what is),
1 when a run does not answer.
"""

from __future__ import annotations

import asyncio

from ..errors import MigratorError
from .common import Parser, add_setup_options, fail, overrides, setup_logging


def _common(p: Parser) -> Parser:
    add_setup_options(p, inventory=False)
    return p


def status_main(argv: list[str]) -> int:
    p = _common(Parser(prog="migrate-run status",
                       description="What the live runs (of this controller's state dir) do "
                                   "now: each migration in flight, queued ones with what "
                                   "they wait for, progress, and the policy's last step."))
    p.add_argument("--json", action="store_true", help="the runs' answers as JSON")
    args = p.parse_args(argv)
    return _main("migrate-run status", args, _status)


def cancel_main(argv: list[str]) -> int:
    p = _common(Parser(prog="migrate-run cancel",
                       description="Cancel one migration of a live run (MIG-ID, as the run "
                                   "prints it: pair1-2, drain-3; it rolls back, or a queued "
                                   "one ends before it starts) or a whole run (RUN-ID: as "
                                   "Ctrl-C at its terminal)."))
    p.add_argument("target", metavar="MIG-ID|RUN-ID")
    p.add_argument("--run", metavar="RUN-ID", help="the run of MIG-ID, when several live "
                   "runs have a migration of that id")
    p.add_argument("--reason", default="cancelled with migrate-run cancel",
                   help="why (the run's output and records say it)")
    args = p.parse_args(argv)
    return _main("migrate-run cancel", args, _cancel)


def _main(prog: str, args, action) -> int:
    setup_logging(args.verbose)
    try:
        from ..config import Config
        config = Config.load(args.config, overrides(args.param))
        return asyncio.run(action(config, args))
    except KeyboardInterrupt:
        return 130
    except MigratorError as exc:
        return fail(prog, exc, args.verbose)


async def _answers(config) -> list[tuple[object, dict | str]]:
    from ..framework.control import ask, live_runs

    async def one(run):
        try:
            return run, await ask(run, "status")
        except MigratorError as exc:
            return run, str(exc)
    return list(await asyncio.gather(*(one(r) for r in live_runs(config.journal.state_dir))))


async def _status(config, args) -> int:
    import json

    from ..report.live import run_lines
    from ..report.table import text_table
    answers = await _answers(config)
    if args.json:
        print(json.dumps([{"run_id": r.run_id, **(a if isinstance(a, dict) else
                                                    {"error": a})} for r, a in answers],
                         indent=1))
        return 0
    if not answers:
        print(f"no live run in {config.journal.state_dir}/runs")
        return 0
    for run, a in answers:
        if isinstance(a, str):
            print(f"run {run.run_id}: {a}")
            continue
        print(f"run {run.run_id} (pid {a['pid']}, hosts {','.join(run.hosts)}): "
              f"{len(a['migrations'])} in flight, {a['completed']} completed, "
              f"{a['failed']} failed")
        for line in run_lines(a, 0)[1:]:        # the queue, and whom each barrier waits on
            if not line.startswith("queue:"):
                print(f"  {line}")
        rows = []
        for m in a["migrations"]:
            moved = (f"{m['transferred'] / 2**20:.0f}/{(m['transferred'] + m['remaining']) / 2**20:.0f} MiB"
                     if m["transferred"] is not None else "-")
            rows.append((m["mig_id"], m["vm"], f"{m['src']}->{m['dst']}", m["phase"]
                         + (f" ({m['waiting_for']})" if m["waiting_for"] else ""),
                         f"{m['elapsed_s']:.0f} s", moved,
                         f"{m['mbps']:.0f}" if m["mbps"] is not None else "-",
                         str(m["iteration"]) if m["iteration"] is not None else "-",
                         f"{m['cpu_throttle']}%" if m["cpu_throttle"] else "-",
                         m["policy"] or "-"))
        if rows:
            for line in text_table(("migration", "vm", "route", "phase", "for", "sent",
                                    "Mbit/s", "iter", "throttle", "policy"), rows):
                print(f"  {line}")
    return 0


async def _cancel(config, args) -> int:
    from ..framework.control import ControlError, ask, live_runs
    runs = live_runs(config.journal.state_dir)
    if not runs:
        raise ControlError(f"no live run in {config.journal.state_dir}/runs")
    if args.run:
        runs = [r for r in runs if r.run_id == args.run]
        if not runs:
            raise ControlError(f"no live run {args.run}")
    own = [r for r in runs if r.run_id == args.target]
    if own:
        await ask(own[0], "cancel", {"target": args.target, "reason": args.reason})
        print(f"run {args.target}: cancelled (it rolls back and cleans up)")
        return 0
    holders = []
    for run, a in await _answers(config):
        if run.run_id in {r.run_id for r in runs} and isinstance(a, dict) \
                and any(m["mig_id"] == args.target for m in a["migrations"]):
            holders.append(run)
    if not holders:
        raise ControlError(f"no migration {args.target} in flight in "
                           + ", ".join(r.run_id for r in runs))
    if len(holders) > 1:
        raise ControlError(f"migration {args.target} is in flight in runs "
                           f"{', '.join(r.run_id for r in holders)}: say which with --run")
    reply = await ask(holders[0], "cancel", {"target": args.target, "reason": args.reason})
    print(f"run {holders[0].run_id}: {reply['what']} {args.target} cancelled (it rolls back)")
    return 0

