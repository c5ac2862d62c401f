"""``migrate-run vm start|list|stop``: VMs that outlive a run (see
:mod:`migrator.framework.fleet`).

Exit status: 0 done; 1 a VM did not start or stop, or ``list`` found a recorded VM running
nowhere or on several hosts; 2 bad input (an unknown host, a name taken), before anything
starts.
"""

from __future__ import annotations

import asyncio
import sys
import time

from ..errors import MigratorError
from .common import Parser, add_setup_options, fail, load_setup, setup_logging, stamp


def _parser() -> Parser:
    p = Parser(prog="migrate-run vm",
               description="VMs started by migrator that outlive the command: libvirt "
                           "domains that drain, recover and 'vm list' know. 'vm list' shows "
                           "every domain running on the hosts, started by migrator or not "
                           "(drain moves them all).")
    sub = p.add_subparsers(dest="action", required=True, metavar="start|list|stop",
                           parser_class=Parser)
    start = sub.add_parser("start", help="start a VM on a host and leave it running")
    start.add_argument("name", metavar="NAME")
    start.add_argument("-H", "--host", required=True, help="the host to start it on")
    start.add_argument("--mem", type=int, metavar="MiB",
                       help="its memory (default: the config's vms.NAME, else "
                            "lab.guest_mem_mib)")
    start.add_argument("--vcpus", type=int, metavar="N", help="its vCPUs (default 1)")
    listing = sub.add_parser("list", help="every domain running on the hosts, and the "
                                          "records of migrator's own")
    listing.add_argument("-m", "--machines", action="append", default=[], metavar="HOSTS",
                         help="comma-separated hosts to ask (default: every inventory host)")
    stop = sub.add_parser("stop", help="stop VMs started with 'vm start', wherever they run")
    stop.add_argument("names", nargs="+", metavar="NAME")
    for one in (start, listing, stop):
        add_setup_options(one)
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        config, inventory = load_setup(args)
        return asyncio.run(_ACTIONS[args.action](config, inventory, args))
    except KeyboardInterrupt:
        print(f"migrate-run vm {args.action}: interrupted", file=sys.stderr)
        return 130
    except MigratorError as exc:
        return fail(f"migrate-run vm {args.action}", exc, args.verbose)


async def _start(config, inventory, args) -> int:
    from ..config import VMSettings
    from ..errors import ConfigError
    from ..framework.fleet import start_vm
    declared = config.vms.get(args.name)
    fields = declared.model_dump(exclude_unset=True) if declared else {}
    if args.mem is not None:
        fields["mem_mib"] = args.mem
    if args.vcpus is not None:
        fields["vcpus"] = args.vcpus
    try:
        decl = VMSettings(**fields)
    except ValueError as exc:
        raise ConfigError(f"VM {args.name}: {str(exc).splitlines()[-1].strip()}") from None
    vm = await start_vm(config, inventory, args.name, args.host, decl,
                        say=stamp(time.monotonic()))
    print(f"{vm.name} runs on {vm.host} ({vm.mem_mib} MiB, {vm.vcpus} vCPU); "
          f"'migrate-run vm stop {vm.name}' removes it")
    return 0


async def _list(config, inventory, args) -> int:
    from ..framework.fleet import Fleet, find_domains
    hosts = [h.strip() for g in args.machines for h in g.split(",") if h.strip()] \
        or list(inventory.hosts)
    domains = await find_domains(config, inventory, hosts)
    records = Fleet(config).records()
    rows = [[d.host, d.name, d.state, str(d.mem_mib), str(d.vcpus),
             "migrator" if d.name in records else "-"] for d in domains]
    problems = []
    for name, rec in records.items():
        where = [d.host for d in domains if d.name == name]
        if len(where) > 1:
            problems.append(f"{name} runs on {' and '.join(where)} (an interrupted migration: "
                            "migrate-run recover)")
        elif not where and (rec.host in hosts):
            rows.append([rec.host, name, "MISSING", str(rec.mem_mib), str(rec.vcpus),
                         "migrator"])
            problems.append(f"{name}: recorded on {rec.host}, runs on none of "
                            f"{', '.join(hosts)}")
    cols = ["host", "vm", "state", "MiB", "vCPUs", "started by"]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(cols)]
    for r in [cols] + rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    for p in problems:
        print(f"problem: {p}")
    return 1 if problems else 0


async def _stop(config, inventory, args) -> int:
    from ..errors import ConfigError
    from ..framework.fleet import Fleet, stop_vm
    records = Fleet(config).records()
    unknown = [n for n in args.names if n not in records]
    if unknown:
        raise ConfigError(f"no VM {', '.join(unknown)} started by migrator (known: "
                          f"{', '.join(records) or 'none'}); nothing stopped")
    failed = 0
    say = stamp(time.monotonic())
    for name in args.names:
        try:
            await stop_vm(config, inventory, name, say=say)
        except MigratorError as exc:
            print(f"migrate-run vm stop: {name}: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


_ACTIONS = {"start": _start, "list": _list, "stop": _stop}
