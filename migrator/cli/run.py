"""``migrate-run``: run a scenario over hosts (``migrate-run [run] SCENARIO -m HOSTS``), and
the subcommands of the one command grammar (``migrate-run SUBCOMMAND ...``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
import traceback

from ..config import Config
from ..errors import ConfigError, MigratorError
from .common import Parser, fail, overrides, setup_logging, stamp

log = logging.getLogger(__name__)


#: ``migrate-run SUBCOMMAND ...``: name -> (module of migrator.cli, one-line help). A first
#: argument that is not one of these is a scenario (``run`` is implied), as it always was.
SUBCOMMANDS = {
    "run": ("run", "run a scenario over hosts (the default: migrate-run SCENARIO -m HOSTS)"),
    "recover": ("recover", "resolve runs whose controller died: each VM to one running copy"),
    "vm": ("vm", "VMs that outlive a run: vm start NAME -H HOST | vm list | vm stop NAME"),
    "drain": ("drain", "migrate every VM off a host: drain HOST [--to HOSTS] [--dry-run]"),
    "status": ("control", "what the live runs do now: queued, migrating, policy step"),
    "cancel": ("control", "cancel a migration (MIG-ID) or a whole run (RUN-ID) of a live run"),
    "report": ("report", "(re)make a finished run's report.html: report RUN_DIR..."),
    "sweep": ("sweep", "a scenario for every combination of config values, compared: "
                       "sweep --param KEY=V1,V2 [--repeat N] SCENARIO -m HOSTS"),
    "compare": ("compare", "did it get worse? compare RUN_A RUN_B | --baseline [save] NAME RUN"),
}


def _epilog() -> str:
    width = max(map(len, SUBCOMMANDS))
    return "subcommands (migrate-run SUBCOMMAND --help):\n" + "\n".join(
        f"  {name.ljust(width)}  {text}" for name, (_m, text) in SUBCOMMANDS.items()) + (
        "\ntest plans (migrate-run --plan PLAN.yaml --help):\n"
        "  migrate-run --plan PLAN.yaml --set NAME [--dry-run] [--fail-fast]")


def _run_parser() -> argparse.ArgumentParser:
    p = Parser(prog="migrate-run", description="Run a migration scenario over hosts: pairs in "
                "parallel (-m A,B,C,D: (A,B) and (C,D)), or one run over all hosts (--all).",
               usage="migrate-run [run] SCENARIO -m HOSTS [options]\n"
                     "       migrate-run SUBCOMMAND [options]",
               epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--machines", action="append", required=True, metavar="HOSTS",
                   help="comma-separated host names, in the order meant; repeat to append")
    p.add_argument("--all", action="store_true", dest="all_hosts",
                   help="one scenario instance over all hosts instead of pairs")
    p.add_argument("-a", dest="autoserv_args", action="append", default=[], metavar="all",
                   help="autoserv's spelling: -a all is --all")
    p.add_argument("-i", "--inventory", help="inventory file (default: $MIGRATOR_INVENTORY, "
                   "else the default lab's); an Ansible inventory works too")
    p.add_argument("-c", "--config", help="config file (YAML)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="set one config key, dotted for nested keys "
                        "(-p migration.downtime_limit_ms=100); overrides the config file")
    p.add_argument("-o", "--results", help="results directory (default: report.results_dir)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    p.add_argument("--display", choices=("auto", "live", "lines"),
                   help="live bars per migration, redrawn in place, or timestamped lines "
                        "(default: report.display, auto: live on a terminal)")
    p.add_argument("--metrics", metavar="ADDR:PORT",
                   help="serve Prometheus metrics on http://ADDR:PORT/metrics while the run "
                        "runs (read-only, no token: bind where only your scraper reaches)")
    p.add_argument("scenario", help="a scenario file, or the name of a ready one "
                                    "(ping_pong, concurrent, ring, cancel_then_migrate, "
                                    "dest_block); or a .yaml: a task list (parallel VM "
                                    "tasks over all the hosts) or a VM group job")
    return p


def run_main(argv: list[str] | None = None) -> int:
    """``migrate-run``: exit 0 when every migration and check passed, 1 when one failed, 2 on
    bad input (before anything starts), 130 on Ctrl-C (after cleanup). ``migrate-run
    SUBCOMMAND ...`` goes to that subcommand's module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--plan" or a.startswith("--plan=") for a in argv):
        from .plan import main as plan_main
        return plan_main(argv)
    if argv and argv[0] in SUBCOMMANDS:
        name = argv.pop(0)
        if name != "run":
            import importlib
            module = importlib.import_module(f".{SUBCOMMANDS[name][0]}", __package__)
            return module.main(argv) if hasattr(module, "main") else \
                getattr(module, f"{name}_main")(argv)
    parser = _run_parser()
    args = parser.parse_args(argv)
    for value in args.autoserv_args:
        if value != "all":
            parser.error(f"-a {value}: the only autoserv argument is 'all' (one instance "
                         "over all hosts, as --all)")
        args.all_hosts = True
    setup_logging(args.verbose)
    try:
        plan = _run_plan(args)
    except MigratorError as exc:
        return fail("migrate-run", exc, args.verbose)
    try:
        return asyncio.run(_run(plan, args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("migrate-run: interrupted; every migration was rolled back (or, past its "
              "postcopy switchover, finished) and every VM stopped, see "
              f"{plan['out_dir']}", file=sys.stderr)
        return 130
    except MigratorError as exc:
        return fail("migrate-run", exc, args.verbose)


def _run_plan(args) -> dict:
    """Everything checked before anything starts. :raise ConfigError: with one clear line."""
    from pathlib import Path

    from ..config import load_any_inventory
    from ..framework import RunContext, group_hosts
    from ..framework.scenario import make_instances
    hosts = [h.strip() for group in args.machines for h in group.split(",") if h.strip()]
    params = overrides(args.param)
    if args.display:
        params["report.display"] = args.display
    elif args.verbose:          # debug logs on stderr would tear a live view apart
        params.setdefault("report.display", "lines")
    config = Config.load(args.config, params)
    inventory = load_any_inventory(args.inventory)
    for h in hosts:
        inventory.host(h)
    if args.metrics:
        from ..report.metrics import parse_address
        args.metrics_at = parse_address(args.metrics)
    ctx = RunContext(config, inventory, say=stamp(time.monotonic()))
    out_dir = Path(args.results or config.report.results_dir) / ctx.run_id
    path = Path(args.scenario)
    if path.suffix in (".yaml", ".yml"):
        from ..framework.tasklist import load_task_list, read_yaml_plan
        if args.all_hosts:
            raise ConfigError(f"{path}: --all (-a all) is for scenarios; a task list runs "
                              "over all the hosts of -m already")
        if len(set(hosts)) != len(hosts):
            raise ConfigError(f"a host is named twice in {hosts}")
        data = read_yaml_plan(path)
        if "vm_group" in data:
            from ..framework.vmgroup import load_group_job
            job = load_group_job(path, data, hosts, ctx)
        elif "tasks" in data:
            job = load_task_list(path, hosts, ctx, data)
        else:
            raise ConfigError(f"{path}: a YAML file is a task list (top-level 'tasks') or a "
                              "VM group job ('vm_group'); it has: "
                              f"{', '.join(map(str, data)) or 'nothing'}")
        return {"ctx": ctx, "instances": [job], "runs": [job.execute], "hosts": hosts,
                "cls": type(job), "out_dir": out_dir, "scenario": str(path)}
    groups = group_hosts(hosts, args.all_hosts)
    names = ["all"] if args.all_hosts else [f"pair{i + 1}" for i in range(len(groups))]
    instances = make_instances(args.scenario, groups, names, ctx, out_dir)
    return {"ctx": ctx, "instances": instances, "runs": [i.run for i in instances],
            "hosts": hosts, "cls": type(instances[0]), "out_dir": out_dir,
            "scenario": args.scenario}


async def _run(plan: dict, args) -> int:
    import signal as _signal

    ctx = plan["ctx"]
    # SIGINT (Ctrl-C) and SIGTERM (a CI job's timeout, kill) end the run: rolled back,
    # cleaned up. SIGINT is handled here, not left to asyncio.run: a process started in the
    # background by a non-interactive shell inherits SIGINT *ignored*, and Python then never
    # turns it into a cancellation (found by scripts/flakehunt.sh, run under nohup)
    main_task = asyncio.current_task()
    for sig in (_signal.SIGINT, _signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
    async with contextlib.AsyncExitStack() as stack:
        if args.metrics:        # bound first: an address in use is refused before anything
            from ..report.metrics import serve_metrics      # (prometheus_client only then)
            url = await stack.enter_async_context(serve_metrics(ctx, *args.metrics_at))
            ctx.say(f"metrics: {url}")
        return await _run_started(plan, args)


async def _run_started(plan: dict, args) -> int:
    from ..aio import shielded
    ctx, instances = plan["ctx"], plan["instances"]
    # the sync server's socket bound before anything (a port in use: one line, nothing
    # started, no host asked anything, not even to recover a dead run); served once its
    # aiohttp is imported, in a thread, from when the first guest boots or something
    # waits for it, whichever comes first (RunContext.start_server)
    await ctx.start_server(ctx.sync_bind(instances[0].hosts[0].name),
                           serve_from=ctx.guest_booting)
    try:
        return await _run_bound(plan, args)
    finally:
        await shielded(ctx.stop_server())      # (stopped already once the instances ended)


async def _run_bound(plan: dict, args) -> int:
    from ..aio import shielded
    from ..report import summary_table, write_page, write_results
    from ..report.live import live_view
    ctx, instances, out_dir = plan["ctx"], plan["instances"], plan["out_dir"]
    main_task = asyncio.current_task()
    if ctx.config.journal.recover_on_start and not await _recover_first(ctx, plan["hosts"]):
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    if not args.verbose:       # the terminal shows the run's story (say()); the log all of it
        for h in root.handlers:
            if h is not handler:
                h.setLevel(logging.WARNING)
                h.addFilter(lambda record: not record.name.startswith("migrator"))
    for noisy in ("asyncssh", "qemu.qmp", "aiohttp", "virEventAsyncIOImpl"):
        logging.getLogger(noisy).setLevel(logging.INFO)
    meta = {"scenario": plan["scenario"], "class": plan["cls"].__name__,
            "hosts": plan["hosts"], "all_hosts": args.all_hosts,
            "instances_hosts": {i.name: [h.name for h in i.hosts] for i in instances},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    ctx.say(f"run {ctx.run_id}: {plan['cls'].__name__} on "
            + "; ".join(f"{i.name}=({','.join(h.name for h in i.hosts)})" for i in instances)
            + f"; results in {out_dir}")
    ctx.open_journal(plan["hosts"], out_dir / "journal.jsonl")
    prefetch = None
    try:
        await ctx.start_control(main_task.cancel)   # migrate-run status / cancel
        # the page's template readied (Jinja2 imported, compiled: 0.1 s) in a thread while
        # the first guest boots and the controller waits, not after the last migration.
        # Owned: awaited before the page, or cancelled if no guest booted
        async def ready_page() -> None:
            from ..report.html import prefetch as prefetch_page
            await ctx.guest_booting.wait()
            await asyncio.to_thread(prefetch_page)
        prefetch = asyncio.ensure_future(ready_page())
        try:
            async with live_view(ctx, ctx.config.report.display,
                                 ctx.config.report.live_refresh_s):
                outcomes = await asyncio.gather(*(run() for run in plan["runs"]),
                                                return_exceptions=True)
        finally:
            await shielded(ctx.stop_server())
        for inst, outcome in zip(instances, outcomes):
            if isinstance(outcome, BaseException) and args.verbose:
                traceback.print_exception(outcome)
    finally:
        try:
            ctx.close_journal([p for i in ctx.instances for p in i.cleanup_problems])
            meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_results(ctx, out_dir, meta)
            interrupted = None
            if prefetch is not None:    # never left running: its thread ends, or it never began
                if not ctx.guest_booting.is_set():
                    prefetch.cancel()
                # asyncio.wait: its own end (even cancelled) is not raised here; a
                # cancellation of this task meanwhile is, after it: the page first
                try:
                    await shielded(asyncio.wait([prefetch]))
                except asyncio.CancelledError as exc:
                    interrupted = exc
                if prefetch.done() and not prefetch.cancelled() and prefetch.exception():
                    log.debug("report: readying the page failed", exc_info=prefetch.exception())
            await write_page(ctx, out_dir)
            print(summary_table(ctx), flush=True)
            print(f"results: {out_dir}", flush=True)
            if interrupted is not None:
                raise interrupted
        finally:
            root.removeHandler(handler)
            handler.close()
    return 0 if ctx.verdict else 1


async def _recover_first(ctx, hosts: list[str]) -> bool:
    """Recover the dead runs on these hosts before starting (and say so). False when one
    could not be resolved: the hosts are then in a state no run should start on."""
    from ..framework.recover import recover
    # each VM resolved to one copy, which is then stopped: what the dead run's own cleanup
    # would have done (runs recovered earlier by hand, with copies kept, are left alone)
    report = await recover(ctx.config, hosts=hosts, stop=True, include_recovered=False)
    if not report.runs and not report.notes:
        return True
    ctx.say(f"recovered {len(report.runs)} dead run(s) on these hosts first, their VMs "
            f"stopped (journal.recover_on_start): {', '.join(report.runs) or '-'}")
    print(report.table(), flush=True)
    if not report.ok:
        print("migrate-run: error: a dead run on these hosts could not be resolved (see the "
              "table); resolve it ('migrate-run recover RUN-ID'; a run whose hosts are gone "
              "for good: 'migrate-run recover --forget RUN-ID'), then run again",
              file=sys.stderr)
    return report.ok


if __name__ == "__main__":           # how a plan starts each of its tests
    sys.exit(run_main())
