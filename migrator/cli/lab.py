"""``migrate-lab``: the one-machine lab (up, down, status, ssh, host, migrate, image, probe,
boot)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from ..config import DEFAULT_LAB_NAME, Config
from ..errors import ConfigError, MigratorError
from .common import Parser, fail, setup_logging, stamp


def _lab_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=DEFAULT_LAB_NAME,
                   help=f"lab name; prefixes its namespaces, links and dir (default "
                        f"{DEFAULT_LAB_NAME})")
    p.add_argument("--dir", help="lab directory (default /srv/migrator/NAME; not under /tmp)")


def _lab_parser() -> argparse.ArgumentParser:
    p = Parser(prog="migrate-lab", description="A multi-host QEMU lab on one machine: "
                "network-namespace hosts with sshd, shared storage and a tiny Linux guest.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    up = sub.add_parser("up", help="create the lab (or confirm it is up, or repair it)")
    _lab_options(up)
    count = up.add_mutually_exclusive_group()
    count.add_argument("-n", type=int, dest="count", metavar="N",
                       help="number of hosts: hostA, hostB, ... (default 2)")
    count.add_argument("--hosts", help="comma-separated host names, in this order")
    up.add_argument("--libvirt", action="store_true", help="run one libvirtd per host")
    up.add_argument("--no-shared", dest="shared", action="store_false",
                    help="no shared storage in the inventory: VM disks live on each host's "
                         "own <lab>/local and migrate with migration.storage copy-all or "
                         "copy-incremental")
    up.add_argument("--subnet", help="lab subnet (default 10.77.0.0/24)")
    up.add_argument("--guest-subnet", help="the guest network's subnet (VM NICs with network: "
                    "bridge; default: the lab subnet + 2^16, e.g. 10.78.0.0/24)")
    up.add_argument("--accel", choices=("auto", "tcg", "kvm"), default="auto",
                    help="guest accelerator; auto probes KVM by booting a guest (default auto)")
    up.add_argument("--qemu", action="append", default=[], metavar="HOST=BUILD|PATH",
                    help="that host's own QEMU (qemu driver), e.g. hostA=7.2 (a build the "
                         "lab installs: migrate-lab qemu list) or a binary's path; "
                         "repeatable")

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

    qemu = sub.add_parser("qemu", help="other QEMU builds next to the system's (Debian's "
                                       "packages extracted into a prefix of their own)")
    qemu.add_argument("action", choices=["install", "list"])
    qemu.add_argument("build", nargs="?", help="the build to install, e.g. 7.2")

    boot = sub.add_parser("boot", help="boot the lab guest on a host over SSH, run a command "
                                       "on its serial console, stop it")
    _lab_options(boot)
    boot.add_argument("host")
    boot.add_argument("--mem", type=int, default=None, help="guest memory in MiB (default 128)")
    boot.add_argument("-c", "--command", dest="guest_command", default="uname -sr; grep MemTotal /proc/meminfo; memsum write 8 "
                      "42 && memsum verify",
                      help="shell command to run on the guest's console")
    return p


def lab_main(argv: list[str] | None = None) -> int:
    args = _lab_parser().parse_args(argv)
    setup_logging(args.verbose)
    if os.geteuid() != 0 and args.cmd not in ("image",):
        print("migrate-lab: error: must run as root (namespaces, bridges, sshd)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_lab_command(args))
    except KeyboardInterrupt:
        print("migrate-lab: interrupted", file=sys.stderr)
        return 130
    except MigratorError as exc:
        return fail("migrate-lab", exc, args.verbose)


async def _lab_command(args: argparse.Namespace) -> int:
    from ..lab import Lab
    from ..lab.accel import probe_kvm
    from ..lab.image import clean_cache, ensure_image

    config = Config()
    t0 = time.monotonic()
    say = stamp(t0)
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
    if args.cmd == "qemu":
        from ..lab import qemus
        if args.action == "list":
            have = qemus.installed()
            for build in qemus.BUILDS:
                print(f"{build:6} {have.get(build) or 'not installed'}")
            return 0
        if not args.build:
            raise ConfigError(f"migrate-lab qemu install: name a build ({', '.join(qemus.BUILDS)})")
        if args.build not in qemus.BUILDS:
            raise ConfigError(f"unknown QEMU build {args.build!r} (known: "
                              f"{', '.join(qemus.BUILDS)})")
        path = await asyncio.to_thread(qemus.install, args.build)
        print(f"QEMU {args.build}: {path}")
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
            from ..lab.lab import default_host_names
            hosts = default_host_names(args.count)
        qemu = {}
        for item in args.qemu:
            host, sep, what = item.partition("=")
            if not sep or not host or not what:
                raise ConfigError(f"--qemu {item}: expected HOST=BUILD or HOST=PATH")
            if host in qemu:
                raise ConfigError(f"--qemu: {host} given twice")
            qemu[host] = what
        report = await lab.up(hosts, args.subnet, args.libvirt, args.accel, progress=say,
                              guest_subnet=args.guest_subnet, shared=args.shared, qemu=qemu)
        st = report.state
        if not report.already_up:
            say(f"lab {st.name} up: {len(st.hosts)} hosts on {st.subnet}, guests on "
                f"{st.guest_subnet}, in "
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
        from ..lab.demo import migrate_demo, summary
        from ..migration import MigrationParams
        params = MigrationParams(bandwidth_mibs=args.bandwidth, downtime_limit_ms=args.downtime,
                                 auto_converge=args.auto_converge,
                                 postcopy_after_s=args.postcopy_after)
        result = await migrate_demo(lab, args.src, args.dst,
                                    mem_mib=args.mem or config.lab.guest_mem_mib,
                                    dirty_mib=args.dirty, params=params, config=config, say=say)
        print(summary(result))
        return 0
    if args.cmd == "boot":
        from ..lab.boot import boot_and_run
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
    dhcp = lab.dhcp_ok(state)
    healthy = state.phase.value == "up" and dhcp and all(h.ok for h in health)
    if as_json:
        print(json.dumps({"name": state.name, "phase": state.phase.value, "healthy": healthy,
                          "dir": state.dir, "subnet": state.subnet, "bridge": state.bridge,
                          "guest_subnet": state.guest_subnet,
                          "guest_bridge": state.guest_bridge, "dhcp": dhcp,
                          "accel": state.accel, "libvirt": state.libvirt,
                          "hosts": [vars(h) | {"ok": h.ok} for h in health]}, indent=2))
        return 0 if healthy else 1
    print(f"lab {state.name}: {state.phase.value}{'' if healthy else ' (UNHEALTHY)'}  "
          f"dir {state.dir}  subnet {state.subnet}  bridge {state.bridge}  guests "
          f"{state.guest_subnet or '-'} on {state.guest_bridge or '-'} (DHCP "
          f"{'up' if dhcp else 'DOWN'})  accel {state.accel}")
    cols = ["host", "address", "netns", "init", "sshd", "port22"] + (
        ["libvirtd"] if state.libvirt else [])
    rows = [[h.name, h.address] + ["yes" if v else "NO" for v in
                                   (h.netns, h.init, h.sshd, h.ssh_port)] +
            (["yes" if h.libvirtd else "NO"] if state.libvirt else []) for h in health]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    for r in [cols] + rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0 if healthy else 1
