"""Command-line entry points: ``migrate-lab``, ``migrate-run``, ``migrate-syncserver``.

User mistakes get one line on stderr and exit status 2; failures of the lab or a host get one
line and exit status 1 (``-v`` adds the traceback); Ctrl-C exits 130 after cleanup.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import traceback

from .config import DEFAULT_LAB_NAME, Config
from .errors import ConfigError, MigratorError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _lab_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=DEFAULT_LAB_NAME,
                   help=f"lab name; prefixes its namespaces, links and dir (default "
                        f"{DEFAULT_LAB_NAME})")
    p.add_argument("--dir", help="lab directory (default /srv/migrator/NAME; not under /tmp)")


def _lab_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="migrate-lab", description="A multi-host QEMU lab on one machine: "
                "network-namespace hosts with sshd, shared storage and a tiny Linux guest.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    up = sub.add_parser("up", help="create the lab (or confirm it is up, or repair it)")
    _lab_options(up)
    count = up.add_mutually_exclusive_group()
    count.add_argument("-n", type=int, dest="count", metavar="N",
                       help="number of hosts: hostA, hostB, ... (default 2)")
    count.add_argument("--hosts", help="comma-separated host names, in this order")
    up.add_argument("--libvirt", action="store_true", help="run one libvirtd per host")
    up.add_argument("--subnet", help="lab subnet (default 10.77.0.0/24)")
    up.add_argument("--accel", choices=("auto", "tcg", "kvm"), default="auto",
                    help="guest accelerator; auto probes KVM by booting a guest (default auto)")

    down = sub.add_parser("down", help="remove everything the lab made")
    _lab_options(down)

    status = sub.add_parser("status", help="show the lab's hosts and their health")
    _lab_options(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    ssh = sub.add_parser("ssh", help="ssh into a lab host (strict host-key checking)")
    _lab_options(ssh)
    ssh.add_argument("host")
    ssh.add_argument("command", nargs=argparse.REMAINDER)

    host = sub.add_parser("host", help="a lab host's power and sshd, as a BMC or service "
                                       "manager would (reboot, sshd-stop, sshd-start, "
                                       "libvirtd-stop, libvirtd-start, status)")
    _lab_options(host)
    host.add_argument("host")
    host.add_argument("action", choices=("reboot", "sshd-stop", "sshd-start", "libvirtd-stop",
                                         "libvirtd-start", "status"))

    mig = sub.add_parser("migrate", help="boot a guest on SRC, live-migrate it to DST, check "
                                         "it there (checksum, ticks), print the result record")
    _lab_options(mig)
    mig.add_argument("src")
    mig.add_argument("dst")
    mig.add_argument("--mem", type=int, default=None, help="guest memory in MiB (default 128)")
    mig.add_argument("--dirty", type=int, default=0, metavar="MIB",
                     help="run the checking dirtier on this many MiB during the migration")
    mig.add_argument("--bandwidth", type=float, default=None, metavar="MIB_S",
                     help="bandwidth cap in MiB/s (default: no cap)")
    mig.add_argument("--downtime", type=int, default=None, metavar="MS",
                     help="downtime limit in ms (default: QEMU's 300)")
    mig.add_argument("--auto-converge", action="store_true")
    mig.add_argument("--postcopy-after", type=float, default=None, metavar="S")

    image = sub.add_parser("image", help="build (or show) the cached guest image")
    image.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    image.add_argument("--clean", action="store_true", help="remove the image cache")

    sub.add_parser("probe", help="probe KVM now by booting the guest (ignores the cache)")

    boot = sub.add_parser("boot", help="boot the lab guest on a host over SSH, run a command "
                                       "on its serial console, stop it")
    _lab_options(boot)
    boot.add_argument("host")
    boot.add_argument("--mem", type=int, default=None, help="guest memory in MiB (default 128)")
    boot.add_argument("-c", "--command", dest="guest_command", default="uname -sr; grep MemTotal /proc/meminfo; memsum write 8 "
                      "42 && memsum verify",
                      help="shell command to run on the guest's console")
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _fail(prog: str, exc: BaseException, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(exc)
    code = 2 if isinstance(exc, ConfigError) else 1
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return code


def lab_main(argv: list[str] | None = None) -> int:
    args = _lab_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if os.geteuid() != 0 and args.cmd not in ("image",):
        print("migrate-lab: error: must run as root (namespaces, bridges, sshd)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_lab_command(args))
    except KeyboardInterrupt:
        print("migrate-lab: interrupted", file=sys.stderr)
        return 130
    except MigratorError as exc:
        return _fail("migrate-lab", exc, args.verbose)


def _stamp(t0: float):
    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.2f}s] {msg}", flush=True)
    return say


async def _lab_command(args: argparse.Namespace) -> int:
    from .lab import Lab
    from .lab.accel import probe_kvm
    from .lab.image import clean_cache, ensure_image

    config = Config()
    t0 = time.monotonic()
    say = _stamp(t0)
    if args.cmd == "image":
        if args.clean:
            for path in clean_cache():
                print(f"removed {path}")
            return 0
        img = await ensure_image(refresh=True, rebuild=args.rebuild)
        print(f"guest image {'built' if img.built else 'cached'} in {img.seconds:.2f} s: "
              f"{img.kernel_package}")
        for path in (img.kernel, img.bzimage, img.initrd):
            print(f"  {path}  {path.stat().st_size / 2**20:.1f} MiB")
        return 0
    if args.cmd == "probe":
        img = await ensure_image()
        ok, why = await probe_kvm(img, config.timeouts.kvm_probe_s)
        print(f"KVM {'works' if ok else 'does not work'}: {why} "
              f"({time.monotonic() - t0:.1f} s)")
        return 0 if ok else 1

    lab = Lab(args.name, args.dir, config)
    if args.cmd == "up":
        if args.count is not None and args.count < 1:
            raise ConfigError(f"-n {args.count}: a lab needs at least 1 host")
        hosts = None
        if args.hosts is not None:
            hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
            if not hosts:
                raise ConfigError("--hosts: give at least one host name")
        elif args.count is not None:
            from .lab.lab import default_host_names
            hosts = default_host_names(args.count)
        report = await lab.up(hosts, args.subnet, args.libvirt, args.accel, progress=say)
        st = report.state
        if not report.already_up:
            say(f"lab {st.name} up: {len(st.hosts)} hosts on {st.subnet} in "
                f"{report.seconds:.2f} s{' (recovered from a broken lab)' if report.recovered else ''}")
        print(f"inventory: {report.inventory}")
        print(f"ssh:       migrate-lab ssh{_name_opt(args)} {st.hosts[0].name}")
        return 0
    if args.cmd == "down":
        rep = await lab.down()
        if not rep.existed:
            print(f"lab {lab.name}: nothing to remove")
        else:
            print(f"lab {lab.name} down in {rep.seconds:.2f} s: {rep.processes_stopped} "
                  f"processes stopped, {rep.namespaces_removed} namespaces and "
                  f"{rep.links_removed} links removed, {lab.dir} deleted")
        return 0
    if args.cmd == "status":
        return await _status(lab, args.json)
    if args.cmd == "ssh":
        argv = lab.ssh_argv(args.host, args.command)
        sys.stdout.flush()
        os.execvp(argv[0], argv)
    if args.cmd == "host":
        request = args.action.replace("-", " ", 1)
        print(lab.control(args.host, request))
        return 0
    if args.cmd == "migrate":
        from .lab.demo import migrate_demo, summary
        from .migration import MigrationParams
        params = MigrationParams(bandwidth_mibs=args.bandwidth, downtime_limit_ms=args.downtime,
                                 auto_converge=args.auto_converge,
                                 postcopy_after_s=args.postcopy_after)
        result = await migrate_demo(lab, args.src, args.dst,
                                    mem_mib=args.mem or config.lab.guest_mem_mib,
                                    dirty_mib=args.dirty, params=params, config=config, say=say)
        print(summary(result))
        return 0
    if args.cmd == "boot":
        from .lab.boot import boot_and_run
        mem = args.mem or config.lab.guest_mem_mib
        result = await boot_and_run(lab, args.host, args.guest_command, mem, config,
                                    progress=say)
        print(result.output.rstrip())
        say(f"guest on {args.host}: QEMU started in {result.start_s:.2f} s, shell prompt after "
            f"{result.boot_to_shell_s:.2f} s, command answered in {result.command_s:.2f} s, "
            f"stopped")
        return 0 if result.exit_status == 0 else 1
    raise AssertionError(args.cmd)


def _name_opt(args) -> str:
    return "" if args.name == DEFAULT_LAB_NAME and not args.dir else (
        f" --name {args.name}" + (f" --dir {args.dir}" if args.dir else ""))


async def _status(lab, as_json: bool) -> int:
    state = lab.state()
    if state is None:
        if as_json:
            print(json.dumps({"name": lab.name, "phase": "absent"}))
        else:
            print(f"lab {lab.name}: absent (no {lab.state_file})")
        return 1
    health = await lab.health(state)
    healthy = state.phase.value == "up" and all(h.ok for h in health)
    if as_json:
        print(json.dumps({"name": state.name, "phase": state.phase.value, "healthy": healthy,
                          "dir": state.dir, "subnet": state.subnet, "bridge": state.bridge,
                          "accel": state.accel, "libvirt": state.libvirt,
                          "hosts": [vars(h) | {"ok": h.ok} for h in health]}, indent=2))
        return 0 if healthy else 1
    print(f"lab {state.name}: {state.phase.value}{'' if healthy else ' (UNHEALTHY)'}  "
          f"dir {state.dir}  subnet {state.subnet}  bridge {state.bridge}  accel {state.accel}")
    cols = ["host", "address", "netns", "init", "sshd", "port22"] + (
        ["libvirtd"] if state.libvirt else [])
    rows = [[h.name, h.address] + ["yes" if v else "NO" for v in
                                   (h.netns, h.init, h.sshd, h.ssh_port)] +
            (["yes" if h.libvirtd else "NO"] if state.libvirt else []) for h in health]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    for r in [cols] + rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0 if healthy else 1


def _run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="migrate-run", description="Run a migration scenario over hosts: pairs in "
                "parallel (-m A,B,C,D: (A,B) and (C,D)), or one run over all hosts (--all).")
    p.add_argument("-m", "--machines", action="append", required=True, metavar="HOSTS",
                   help="comma-separated host names, in the order meant; repeat to append")
    p.add_argument("--all", action="store_true", dest="all_hosts",
                   help="one scenario instance over all hosts instead of pairs")
    p.add_argument("-i", "--inventory", help="inventory file (default: $MIGRATOR_INVENTORY, "
                   "else the default lab's); an Ansible inventory works too")
    p.add_argument("-c", "--config", help="config file (YAML)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="set one config key, dotted for nested keys "
                        "(-p migration.downtime_limit_ms=100); overrides the config file")
    p.add_argument("-o", "--results", help="results directory (default: report.results_dir)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    p.add_argument("scenario", help="a scenario file, or the name of a ready one "
                                    "(ping_pong, concurrent, ring, cancel_then_migrate, "
                                    "dest_block)")
    return p


def _overrides(params: list[str]) -> dict:
    """``-p`` values are YAML scalars: ``100`` is a number, ``true`` a boolean."""
    import yaml
    out = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-p {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def run_main(argv: list[str] | None = None) -> int:
    """``migrate-run``: exit 0 when every migration and check passed, 1 when one failed, 2 on
    bad input (before anything starts), 130 on Ctrl-C (after cleanup)."""
    args = _run_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        plan = _run_plan(args)
    except MigratorError as exc:
        return _fail("migrate-run", exc, args.verbose)
    try:
        return asyncio.run(_run(plan, args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("migrate-run: interrupted; every VM was rolled back and stopped, see "
              f"{plan['out_dir']}", file=sys.stderr)
        return 130
    except MigratorError as exc:
        return _fail("migrate-run", exc, args.verbose)


def _run_plan(args) -> dict:
    """Everything checked before anything starts. :raise ConfigError: with one clear line."""
    from pathlib import Path

    from .config import load_any_inventory
    from .framework import RunContext, group_hosts, load_scenario
    hosts = [h.strip() for group in args.machines for h in group.split(",") if h.strip()]
    config = Config.load(args.config, _overrides(args.param))
    inventory = load_any_inventory(args.inventory)
    for h in hosts:
        inventory.host(h)
    groups = group_hosts(hosts, args.all_hosts)
    cls = load_scenario(args.scenario)
    ctx = RunContext(config, inventory, say=_stamp(time.monotonic()))
    instances = [cls(group, context=ctx,
                     name="all" if args.all_hosts else f"pair{i + 1}")
                 for i, group in enumerate(groups)]
    out_dir = Path(args.results or config.report.results_dir) / ctx.run_id
    return {"ctx": ctx, "instances": instances, "hosts": hosts, "cls": cls,
            "out_dir": out_dir, "scenario": args.scenario}


async def _run(plan: dict, args) -> int:
    from .framework.context import local_address_towards
    from .report import summary_table, write_results
    import signal as _signal
    ctx, instances, out_dir = plan["ctx"], plan["instances"], plan["out_dir"]
    # SIGINT (Ctrl-C) and SIGTERM (a CI job's timeout, kill) end the run: rolled back,
    # cleaned up. SIGINT is handled here, not left to asyncio.run: a process started in the
    # background by a non-interactive shell inherits SIGINT *ignored*, and Python then never
    # turns it into a cancellation (found by scripts/flakehunt.sh, run under nohup)
    main_task = asyncio.current_task()
    for sig in (_signal.SIGINT, _signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
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
    try:
        first = ctx.inventory.host(instances[0].hosts[0].name)
        bind = ctx.config.sync.bind or local_address_towards(
            first.address, (first.ssh or ctx.inventory.ssh).port)
        await ctx.start_server(bind)
        try:
            outcomes = await asyncio.gather(*(i.run() for i in instances),
                                            return_exceptions=True)
        finally:
            await ctx.stop_server()
        for inst, outcome in zip(instances, outcomes):
            if isinstance(outcome, BaseException) and args.verbose:
                traceback.print_exception(outcome)
    finally:
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_results(ctx, out_dir, meta)
        print(summary_table(ctx), flush=True)
        print(f"results: {out_dir}", flush=True)
        root.removeHandler(handler)
        handler.close()
    return 0 if ctx.verdict else 1


def syncserver_main(argv: list[str] | None = None) -> int:
    """``migrate-syncserver --bind ADDR --port N --token-file F [--create-token]``."""
    import secrets
    import signal as _signal
    from pathlib import Path

    p = _Parser(prog="migrate-syncserver",
                description="Barrier and data-exchange server for migrator runs.")
    p.add_argument("--bind", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default 0: pick a free one)")
    p.add_argument("--token-file", required=True, help="file holding the shared token")
    p.add_argument("--create-token", action="store_true",
                   help="write a new random token to --token-file (mode 0600) if it is missing")
    p.add_argument("--heartbeat", type=float, default=None,
                   help="WebSocket heartbeat in seconds (default 5)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    _setup_logging(args.verbose)
    from syncserver.server import ServerOptions, serve_forever

    path = Path(args.token_file)
    if not path.exists() and args.create_token:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    try:
        token = path.read_text().strip()
    except OSError as exc:
        print(f"migrate-syncserver: error: cannot read token file {path}: {exc.strerror} "
              "(use --create-token to make one)", file=sys.stderr)
        return 2
    if path.stat().st_mode & 0o077:
        print(f"migrate-syncserver: warning: token file {path} is readable by others",
              file=sys.stderr)
    options = ServerOptions(**({"heartbeat_s": args.heartbeat} if args.heartbeat else {}))
    # every member is a connection, i.e. a file descriptor: allow as many as the hard limit
    import resource
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (_signal.SIGTERM, _signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_forever(args.bind, args.port, token, options, stop)

    try:
        asyncio.run(main())
    except ValueError as exc:
        print(f"migrate-syncserver: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"migrate-syncserver: error: cannot listen on {args.bind}:{args.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(lab_main())
