"""``migrate-run recover [RUN-ID]``: resolve runs whose controller died (see
:mod:`migrator.framework.recover`).

Exit status: 0 when every VM of every dead run was resolved (or there was none), 1 when one
could not be (the table names host, VM and why), 2 on bad input: an unknown run, or a run
whose controller (or another recovery) is alive — refused before anything is touched.
"""

from __future__ import annotations

import asyncio
import sys
import time

from ..config import Config
from ..errors import MigratorError
from .common import Parser, fail, overrides, setup_logging


def _parser() -> Parser:
    p = Parser(prog="migrate-run recover",
               description="Find runs whose controller is gone (its process dead, its lock "
                           "free) and resolve each VM to exactly one running copy: the "
                           "destination when the migration completed, otherwise the source "
                           "(resumed if paused); the other copy stopped, run dirs removed. "
                           "Prints a table of what it found and did.")
    p.add_argument("run_id", nargs="?", metavar="RUN-ID",
                   help="one run (default: every dead run in the index)")
    p.add_argument("--stop", action="store_true",
                   help="also stop the copies kept (what the run's own cleanup would have "
                        "done); includes runs recovered earlier")
    p.add_argument("--from-hosts", action="store_true",
                   help="the controller's journal and index are lost: find the runs on the "
                        "hosts of -m (their RUN-ID.owner.json) and recover those (a controller on "
                        "this machine only: one elsewhere cannot be proven dead)")
    p.add_argument("-m", "--machines", action="append", default=[], metavar="HOSTS",
                   help="with --from-hosts: comma-separated host names to look at")
    p.add_argument("-i", "--inventory", help="with --from-hosts: the inventory (default: "
                   "$MIGRATOR_INVENTORY, else the default lab's)")
    p.add_argument("--forget", action="store_true",
                   help="drop dead run RUN-ID from the index without touching any host: for "
                        "a run whose hosts are gone for good (it would hold back every new "
                        "run on hosts of those names); prints what its journal says may "
                        "still be there")
    p.add_argument("--list", action="store_true",
                   help="only list the runs in the index: live, dead, recovered")
    p.add_argument("-c", "--config", help="config file (YAML)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="set one config key (e.g. -p journal.state_dir=/var/lib/migrator)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        _check_options(args)
        config = Config.load(args.config, overrides(args.param))
        if args.list:
            return _list(config)
        if args.forget:
            return _forget(config, args.run_id)
        from ..framework.recover import recover
        if args.from_hosts:
            report = asyncio.run(_from_hosts(config, args))
        else:
            report = asyncio.run(recover(config, args.run_id, stop=args.stop))
    except KeyboardInterrupt:
        print("migrate-run recover: interrupted", file=sys.stderr)
        return 130
    except MigratorError as exc:
        return fail("migrate-run recover", exc, args.verbose)
    print(report.table(), flush=True)
    return 0 if report.ok else 1


def _check_options(args) -> None:
    """:raise ConfigError: options that do not go together."""
    from ..errors import ConfigError
    chosen = [o for o, on in (("--list", args.list), ("--forget", args.forget),
                              ("--from-hosts", args.from_hosts)) if on]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} do not go together")
    if args.forget and (args.run_id is None or args.stop):
        raise ConfigError("--forget takes one RUN-ID and no --stop")
    if args.list and (args.run_id is not None or args.stop):
        raise ConfigError("--list takes no RUN-ID and no --stop")
    if (args.machines or args.inventory) and not args.from_hosts:
        raise ConfigError("-m and -i go with --from-hosts")


def _forget(config: Config, run_id: str) -> int:
    from ..framework.recover import forget
    left = forget(config, run_id)
    print(f"run {run_id} forgotten: removed from {config.journal.state_dir}/runs, no host "
          "touched" + (". Its journal says these may still be there:" if left else ""))
    for line in left:
        print(f"  {line}")
    return 0


async def _from_hosts(config: Config, args):
    """:raise ConfigError: no -m, an unknown host, or a run that cannot be proven dead."""
    from ..config import load_any_inventory
    from ..errors import ConfigError
    from ..framework.recover import RecoverReport, adopt_from_hosts, recover
    hosts = [h.strip() for group in args.machines for h in group.split(",") if h.strip()]
    if not hosts:
        raise ConfigError("--from-hosts needs the hosts to look at (-m HOSTS)")
    inventory = load_any_inventory(args.inventory)
    for h in hosts:
        inventory.host(h)
    runs = await adopt_from_hosts(config, inventory, hosts)
    if args.run_id is not None:
        runs = [r for r in runs if r == args.run_id]
    report = RecoverReport()
    for run_id in runs:
        one = await recover(config, run_id, stop=args.stop)
        report.runs += one.runs
        report.outcomes += one.outcomes
        report.notes += one.notes
    return report


def _list(config: Config) -> int:
    from ..framework.journal import list_runs
    runs = list_runs(config.journal.state_dir)
    if not runs:
        print(f"no run in {config.journal.state_dir}/runs")
    for e in runs:
        state = ("live" if e.is_alive() else "recovered" if e.recovered
                 else "ended with leftovers" if e.info.get("ended") else "dead")
        ctl = e.info.get("controller", {})
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.info.get("started", 0)))
        print(f"{e.run_id}  {state:<20}  started {started}  controller pid {ctl.get('pid')} "
              f"on {ctl.get('machine')}  hosts {','.join(e.info.get('hosts', []))}  "
              f"journal {e.journal_path}")
    return 0
