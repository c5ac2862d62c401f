"""``migrate-run sweep``: run a scenario for every combination of config values, repeated,
then compare (``migrator.plan.sweep``, ``migrator.report.comparison``)::

    migrate-run sweep --param migration.multifd_channels=1,2,4,8 --repeat 3 ping_pong -m A,B
    migrate-run sweep --sweep multifd -m hostA,hostB          # a ready one (configs/sweeps)

Exit 0 when every run passed, 1 when one did not, 2 on bad input (nothing run), 130 on
Ctrl-C (the running run rolled back and cleaned up; what was done is compared).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from ..errors import ConfigError, MigratorError
from .common import Parser, fail, overrides, setup_logging, stamp


def _parser() -> Parser:
    p = Parser(prog="migrate-run sweep",
               description="Run a scenario for every combination of config values (--param "
                           "KEY=V1,V2,...; several --param: every combination), --repeat "
                           "times, repetition by repetition; then one comparison: a table "
                           "(medians, min-max) and comparison.html with plots.",
               usage="migrate-run sweep (--param KEY=V1,V2,... | --sweep NAME) [--repeat N] "
                     "[SCENARIO] -m HOSTS [options]")
    p.add_argument("--param", action="append", default=[], dest="axes",
                   metavar="KEY=V1,V2,...", help="a config key and the values to sweep")
    p.add_argument("--sweep", metavar="NAME|FILE",
                   help="a ready sweep (configs/sweeps/NAME.yaml) or a sweep file; --param, "
                        "--repeat and SCENARIO given here replace its own")
    p.add_argument("--repeat", type=int, help="runs per setting (default: the sweep's, or 1)")
    p.add_argument("-m", "--machines", action="append", required=True, metavar="HOSTS",
                   help="comma-separated host names, as migrate-run takes them")
    p.add_argument("--all", action="store_true", dest="all_hosts",
                   help="one scenario instance over all hosts instead of pairs")
    p.add_argument("-i", "--inventory", help="inventory file")
    p.add_argument("-c", "--config", help="config file (YAML), for every run")
    p.add_argument("-p", "--set", action="append", default=[], dest="fixed",
                   metavar="KEY=VALUE", help="one fixed config key for every run")
    p.add_argument("-o", "--results", help="results root (default: report.results_dir); "
                                           "the sweep writes sweep-<name>-<time>/ there")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    p.add_argument("scenario", nargs="?", help="the scenario (default: the sweep file's)")
    return p


def _plan(args):
    """Everything checked before anything runs. :raise ConfigError: with one clear line."""
    from ..config import Config, load_any_inventory
    from ..framework.scenario import scenario_path
    from ..plan.sweep import Sweep, parse_axis
    base = Sweep.load(args.sweep) if args.sweep else None
    axes: dict = {}
    for item in args.axes:
        key, values = parse_axis(item)
        if key in axes:
            raise ConfigError(f"--param {key}: swept twice")
        axes[key] = values
    fixed = {**(base.fixed if base else {}), **overrides(args.fixed)}
    scenario = args.scenario or (base.scenario if base else "")
    if not scenario:
        raise ConfigError("no scenario: name one (migrate-run sweep ... SCENARIO), or use a "
                          "sweep file that says 'scenario'")
    if not scenario.endswith((".yaml", ".yml")):
        scenario_path(scenario)                  # a scenario that does not exist: now
    elif not Path(scenario).is_file():
        raise ConfigError(f"no task list or VM group job {scenario!r}")
    else:
        scenario = str(Path(scenario).resolve())   # the runs start elsewhere
    sweep = Sweep.make(scenario, axes or (base.axes if base else {}), fixed,
                       args.repeat if args.repeat is not None else
                       (base.repeat if base else 1),
                       base.description if base else "",
                       base.name if base else "-".join(k.rsplit(".", 1)[-1] for k in axes))
    sweep.check(args.config)
    config = Config.load(args.config, fixed)
    inventory = load_any_inventory(args.inventory)
    hosts = [h.strip() for group in args.machines for h in group.split(",") if h.strip()]
    for h in hosts:
        inventory.host(h)
    base_args = ["-m", ",".join(hosts)] + (["--all"] if args.all_hosts else [])
    if args.inventory:
        base_args += ["-i", str(Path(args.inventory).resolve())]
    if args.config:
        base_args += ["-c", str(Path(args.config).resolve())]
    root = Path(args.results or config.report.results_dir)
    out_dir = root / f"sweep-{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return sweep, base_args, out_dir, config.plan.stop_s


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        sweep, base_args, out_dir, stop_s = _plan(args)
    except MigratorError as exc:
        return fail("migrate-run sweep", exc, args.verbose)
    return asyncio.run(_sweep(sweep, base_args, out_dir, stop_s))


async def _sweep(sweep, base_args: list[str], out_dir: Path, stop_s: float) -> int:
    from ..plan.sweep import run_sweep, write_sweep
    from ..report.comparison import summarize, table, write_comparison
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):      # the running run rolls back first
        loop.add_signal_handler(sig, stop.set)
    say = stamp(time.monotonic())
    n = len(sweep.settings())
    say(f"sweep {sweep.name}: {sweep.scenario}, {n} setting{'s' * (n != 1)} x "
        f"{sweep.repeat} = {n * sweep.repeat} runs; results in {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = await run_sweep(sweep, out_dir, base_args, say, stop, stop_s)
    write_sweep(out_dir, sweep, runs)
    print(table(summarize(sweep, runs)), flush=True)
    print(f"comparison: {write_comparison(out_dir, sweep, runs)}", flush=True)
    if stop.is_set():
        print("migrate-run sweep: interrupted; the running run rolled back and cleaned up",
              file=sys.stderr)
        return 130
    return 0 if runs and all(r.verdict == "passed" for r in runs) else 1
