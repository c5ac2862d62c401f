"""A multi-host lab on one machine: ``Lab.up()``, ``Lab.health()``, ``Lab.down()``.

What ``up`` makes, every name prefixed by the lab's name so two labs can coexist:

* a bridge ``<name>br0`` in the root namespace holding the first address of the subnet (the
  controller reaches hosts through it), and nothing routed anywhere else;
* the guest network: a bridge ``<name>-gbr`` in the root namespace holding the first address
  of the guest subnet (the controller reaches guests through it), never routed either, with
  the lab's DHCP server on it (a dnsmasq handing out only the runs' static leases: see
  :mod:`.dhcp`);
* per host: a network namespace ``<name>-<host>`` joined to the bridge by a veth
  ``<name>v<i>`` (``eth0`` inside), a bridge ``gbr0`` joined to the guest bridge by a veth
  ``<name>-g<i>`` (its VMs' taps join it), a host init (own hostname, /etc/hosts, private /run,
  own libvirt dirs: see :mod:`.hostproc`), an sshd with its own host key, and with
  ``libvirt=True`` a libvirtd with its own ``host_uuid``;
* the lab directory (default ``/srv/migrator/<name>``): ``ssh/`` (client key, known_hosts,
  ssh config with strict host-key checking), ``hosts/<host>/`` (configs, keys, logs),
  ``shared/`` (shared storage: the same path on every host, with the guest image in
  ``shared/images``), ``inventory.yaml`` and ``lab.json`` (the state).

``down`` removes all of it, also after a crashed ``up`` or a killed test: ``lab.json`` holds the
plan before anything is created. ``up`` on a healthy lab with the same hosts is a no-op; on a
broken or half-built lab it tears the leftovers down and builds again; on a healthy lab with
other hosts it refuses.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import (DEFAULT_LAB_NAME, GUEST_KERNEL_APPEND, INVENTORY_FILE, LAB_BASE_DIR,
                      Config, DhcpServer, GuestImage as
                      InvGuestImage, GuestNetwork, HostEntry, Inventory, LabInfo, SSHSettings,
                      default_guest_subnet, validate_subnet)
from ..errors import ConfigError, LabError
from ..hosts.parallel import parallel
from . import dhcp, hostproc, network, pki
from .accel import choose_accel
from .image import ensure_image
from .state import HostState, LabPhase, LabState, ProcRef
from .system import is_alive, processes_in_netns, run, stop_processes, tcp_port_open

_LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_HOST_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,30}$")
REQUIRED_TOOLS = {"ip": "iproute2", "unshare": "util-linux", "nsenter": "util-linux",
                  "ssh-keygen": "openssh-client", "ssh": "openssh-client",
                  "qemu-system-x86_64": "qemu-system-x86 (from bookworm-backports)",
                  "dnsmasq": "dnsmasq-base"}
MAX_PARALLEL_HOSTS = 8


def default_host_names(n: int) -> list[str]:
    """hostA, hostB, ... hostZ, hostAA, hostAB, ... (spreadsheet-column letters)."""
    names = []
    for i in range(n):
        letters, k = "", i
        while True:
            letters = chr(ord("A") + k % 26) + letters
            k = k // 26 - 1
            if k < 0:
                break
        names.append("host" + letters)
    return names


@dataclass
class HostHealth:
    name: str
    address: str
    netns: bool
    init: bool
    sshd: bool
    ssh_port: bool
    libvirtd: bool | None  # None: the lab has no libvirt

    @property
    def ok(self) -> bool:
        return (self.netns and self.init and self.sshd and self.ssh_port
                and self.libvirtd is not False)


@dataclass
class UpReport:
    state: LabState
    inventory: Path
    seconds: float
    already_up: bool = False
    recovered: bool = False
    image_built: bool = False
    steps: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class DownReport:
    name: str
    existed: bool
    processes_stopped: int = 0
    namespaces_removed: int = 0
    links_removed: int = 0
    seconds: float = 0.0


class Lab:
    """One lab, identified by its name and directory. Cheap to build; nothing runs until up."""

    def __init__(self, name: str = DEFAULT_LAB_NAME, dir: str | os.PathLike | None = None,
                 config: Config | None = None):
        if not _LAB_NAME.match(name):
            raise ConfigError(f"bad lab name {name!r}: 1-8 characters, lowercase letters and "
                              "digits, starting with a letter (it prefixes interface names)")
        self.name = name
        self.dir = Path(dir).absolute() if dir else LAB_BASE_DIR / name
        self.config = config or Config()
        self.bridge = f"{name}br0"
        # a '-' (no lab name has one): never another lab's '<name>br0' ('x' + 'gbr0' would
        # be lab 'xg''s bridge)
        self.guest_bridge = f"{name}-gbr"

    # -- paths ------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / "lab.json"

    @property
    def inventory_path(self) -> Path:
        return self.dir / INVENTORY_FILE

    @property
    def ssh_dir(self) -> Path:
        return self.dir / "ssh"

    @property
    def ssh_config(self) -> Path:
        return self.ssh_dir / "config"

    @property
    def shared_dir(self) -> Path:
        return self.dir / "shared"

    @property
    def local_dir(self) -> Path:
        """Each host's own storage: this path shows ``<lab>/hosts/<name>/local`` on host
        ``name`` (a bind mount in its mount namespace); here, an empty directory."""
        return self.dir / "local"

    def host_dir(self, host: str) -> Path:
        return self.dir / "hosts" / host

    def state(self) -> LabState | None:
        return LabState.load(self.state_file)

    # -- locking ------------------------------------------------------------------------------

    async def _locked(self):
        """Hold an exclusive lock on the lab's parent directory (serialises up/down)."""
        parent = self.dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        return fd

    # -- validation ---------------------------------------------------------------------------

    def _check_dir(self) -> None:
        for anc in [self.dir, *self.dir.parents]:
            if not anc.exists():
                continue
            st = anc.stat()
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise ConfigError(
                    f"lab dir {self.dir}: {anc} is group- or world-writable, so sshd's "
                    "StrictModes would refuse the lab's keys; use a dir outside /tmp "
                    "(default /srv/migrator/<name>)")
        if self.dir.exists():
            if not self.dir.is_dir():
                raise ConfigError(f"lab dir {self.dir} exists and is not a directory")
            if any(self.dir.iterdir()) and not self.state_file.exists():
                raise ConfigError(f"lab dir {self.dir} is not empty and holds no lab "
                                  "(no lab.json): choose another --dir")
        probe = self.dir if self.dir.exists() else next(p for p in self.dir.parents if p.exists())
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(f"lab dir {self.dir}: {probe} is not writable (run as root?)")

    @staticmethod
    def _check_tools(libvirt: bool) -> None:
        tools = dict(REQUIRED_TOOLS)
        missing = [f"{t} ({pkg})" for t, pkg in tools.items() if shutil.which(t) is None]
        if not os.path.exists("/usr/sbin/sshd"):
            missing.append("/usr/sbin/sshd (openssh-server)")
        if libvirt and shutil.which("libvirtd") is None:
            missing.append("libvirtd (libvirt-daemon, libvirt-daemon-driver-qemu)")
        if missing:
            raise ConfigError(f"missing packages: {', '.join(missing)}: run 'make setup'")

    def plan(self, hosts: list[str], subnet: str, libvirt: bool,
             guest_subnet: str | None = None) -> LabState:
        """The full list of names and addresses ``up`` will create (validated, nothing made).

        :raise ConfigError: for bad, duplicate or too many host names, or a bad subnet.
        """
        if not hosts:
            raise ConfigError("a lab needs at least one host (-n N with N >= 1)")
        seen = set()
        for h in hosts:
            if not _HOST_NAME.match(h):
                raise ConfigError(f"bad host name {h!r}: letters, digits and '-', starting "
                                  "with a letter, at most 31 characters")
            if h.lower() in seen:
                raise ConfigError(f"duplicate host name {h!r}")
            seen.add(h.lower())
        net = validate_subnet(subnet)
        try:
            guest_net = validate_subnet(guest_subnet or self.config.lab.guest_subnet
                                        or default_guest_subnet(str(net)))
        except ConfigError as exc:
            raise ConfigError(f"guest network: {exc} (choose it with --guest-subnet)") \
                from None
        if guest_net.overlaps(net):
            raise ConfigError(f"guest subnet {guest_net} overlaps the lab subnet {net}: "
                              "choose another with --guest-subnet")
        offset = self.config.lab.first_host_offset
        usable = net.num_addresses - 2
        if offset + len(hosts) - 1 > usable:
            raise ConfigError(f"subnet {net} holds at most {max(0, usable - offset + 1)} hosts "
                              f"(hosts start at .{offset}); use a larger --subnet")
        if len(hosts) > 999:
            raise ConfigError("at most 999 hosts per lab")
        states = [HostState(name=h, netns=f"{self.name}-{h}", veth=f"{self.name}v{i}",
                            address=str(net.network_address + offset + i),
                            guest_veth=f"{self.name}-g{i}")
                  for i, h in enumerate(hosts)]
        now = time.time()
        return LabState(name=self.name, dir=str(self.dir), subnet=str(net), bridge=self.bridge,
                        bridge_address=f"{net.network_address + 1}/{net.prefixlen}",
                        guest_subnet=str(guest_net), guest_bridge=self.guest_bridge,
                        guest_bridge_address=f"{guest_net.network_address + 1}/"
                                             f"{guest_net.prefixlen}",
                        phase=LabPhase.BUILDING, libvirt=libvirt, hosts=states,
                        created_at=now, updated_at=now)

    # -- up -----------------------------------------------------------------------------------

    async def up(self, hosts: list[str] | None = None, subnet: str | None = None,
                 libvirt: bool = False, accel: str = "auto",
                 progress: Callable[[str], None] | None = None,
                 guest_subnet: str | None = None, shared: bool = True,
                 qemu: dict[str, str] | None = None) -> UpReport:
        """Build the lab (or confirm it is up, or rebuild a broken one).

        Steps: validate everything (no change is made before this passes); tear down the
        leftovers of a crashed lab of this name; check the subnet is free; get the guest image
        and choose the accelerator; write the plan; create the bridge; create the hosts
        (namespaces, host inits, sshds, libvirtds) in parallel; write ssh files and the
        inventory; mark the lab up.

        Every host has its own storage at ``<lab>/local`` (the same path everywhere, a
        different directory behind it on each host); ``shared=False`` leaves ``shared_dir``
        out of the inventory, so runs there must copy their disks
        (``migration.storage``). ``qemu``: host -> a QEMU build the lab installs
        (:mod:`.qemus`, e.g. ``7.2``) or a binary's path, that host's QEMU in the inventory.

        :raise ConfigError: bad input (names, subnet overlap, dir, missing packages).
        :raise LabError: a step failed; everything made so far has been removed again.
        """
        t0 = time.monotonic()
        say = progress or (lambda _msg: None)
        hosts = hosts or default_host_names(self.config.lab.hosts)
        subnet = subnet or self.config.lab.subnet
        if accel not in ("auto", "tcg", "kvm"):
            raise ConfigError(f"--accel must be auto, tcg or kvm, not {accel!r}")
        plan = self.plan(hosts, subnet, libvirt, guest_subnet)
        plan.shared = shared
        plan.qemus = self._qemus(qemu or {}, hosts, libvirt)
        self._check_dir()
        self._check_tools(libvirt)
        base_existed = self.dir.parent.exists()
        lock = await self._locked()
        steps: list[tuple[str, float]] = []

        def step(what: str, since: float) -> float:
            now = time.monotonic()
            steps.append((what, now - since))
            say(f"{what} ({now - since:.2f} s)")
            return now

        try:
            recovered = False
            old = self.state()
            if old is not None:
                # a lab from before the guest network is rebuilt like a broken one
                if old.phase == LabPhase.UP and old.guest_subnet and self.dhcp_ok(old) and \
                        all(h.ok for h in await self.health(old)):
                    same = ([h.name for h in old.hosts] == hosts and old.subnet == plan.subnet
                            and old.libvirt == libvirt and old.shared == shared
                            and old.guest_subnet == plan.guest_subnet
                            and old.qemus == plan.qemus)
                    if not same:
                        raise ConfigError(
                            f"lab {self.name} is already up with hosts "
                            f"{','.join(h.name for h in old.hosts)} on {old.subnet}"
                            f"{' (guests ' + old.guest_subnet + ')' if old.guest_subnet else ''}"
                            f"{' with libvirt' if old.libvirt else ''}"
                            f"{'' if old.shared else ' without shared storage'}"
                            f"{''.join(f' {h}={q}' for h, q in old.qemus.items())}: run "
                            f"'migrate-lab down --name {self.name}' first")
                    say(f"lab {self.name} is already up")
                    return UpReport(old, self.inventory_path, time.monotonic() - t0,
                                    already_up=True)
                say(f"lab {self.name} was left {old.phase.value} or unhealthy: removing "
                    "its leftovers first")
                await self._teardown(old)
                recovered = True
            elif network.link_exists(self.bridge):
                raise LabError(f"bridge {self.bridge} exists but {self.dir} holds no lab state; "
                               f"if it is a leftover, remove it: ip link del {self.bridge}")
            elif network.link_exists(self.guest_bridge):
                raise LabError(f"bridge {self.guest_bridge} exists but {self.dir} holds no lab "
                               f"state; if it is a leftover, remove it: ip link del "
                               f"{self.guest_bridge}")
            await network.check_subnet_free(ipaddress.ip_network(plan.subnet), self.bridge)
            await network.check_subnet_free(ipaddress.ip_network(plan.guest_subnet),
                                            self.guest_bridge, "--guest-subnet")
            t = time.monotonic()
            image = await ensure_image()
            t = step(f"guest image {'built' if image.built else 'cached'}: "
                     f"{image.kernel_package}", t)
            try:
                choice = await choose_accel(accel, image, self.config.timeouts.kvm_probe_s)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            plan.accel, plan.accel_reason = choice.accel, choice.reason
            t = step(f"accelerator {choice.accel}: {choice.reason}"
                     f"{' (cached probe)' if choice.cached else ''}", t)
            plan.made_base_dir = not base_existed
            self.dir.mkdir(parents=True, exist_ok=True)
            plan.save(self.state_file)
            try:
                await self._build(plan, image, say, step)
            except BaseException as exc:
                say(f"up failed ({type(exc).__name__}): removing what was made")
                await self._teardown(plan)
                raise
            return UpReport(plan, self.inventory_path, time.monotonic() - t0,
                            recovered=recovered, image_built=image.built, steps=steps)
        finally:
            os.close(lock)

    async def _build(self, plan: LabState, image, say, step) -> None:
        t = time.monotonic()
        for d in (self.ssh_dir, self.dir / "hosts", self.shared_dir / "images",
                  self.local_dir):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.ssh_dir, 0o700)
        key = self.ssh_dir / "id_ed25519"
        if not key.exists():
            await run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                      f"migrator-lab-{self.name}", "-f", str(key), what="ssh-keygen (client)")
        pub = (self.ssh_dir / "id_ed25519.pub").read_text().strip()
        authorized = self.ssh_dir / "authorized_keys"
        authorized.write_text(f'from="{plan.subnet}" {pub}\n')
        os.chmod(authorized, 0o600)
        for name in ("vmlinux", "initrd.img"):
            dest = self.shared_dir / "images" / name
            dest.unlink(missing_ok=True)
            src = image.kernel if name == "vmlinux" else image.initrd
            try:
                os.link(src, dest)
            except OSError:
                shutil.copy2(src, dest)
        await network.create_bridge(self.bridge, ipaddress.ip_interface(plan.bridge_address))
        await network.create_bridge(self.guest_bridge,
                                    ipaddress.ip_interface(plan.guest_bridge_address))
        t = step(f"bridges {self.bridge} {plan.bridge_address}, {self.guest_bridge} "
                 f"{plan.guest_bridge_address} (guests)", t)

        def dhcp_started(proc) -> None:
            plan.dhcp = ProcRef.of(proc)
            plan.save(self.state_file)

        await dhcp.start_dnsmasq(self.dir, self.guest_bridge, plan.guest_subnet,
                                 self.config.timeouts.dhcp_ready_s, dhcp_started)
        t = step(f"DHCP server (dnsmasq) on {self.guest_bridge}: static leases from "
                 f"{dhcp.hosts_dir(self.dir)}", t)

        limit = asyncio.Semaphore(MAX_PARALLEL_HOSTS)
        etc_hosts = "127.0.0.1 localhost\n" + "".join(
            f"{h.address} {h.name}\n" for h in plan.hosts)

        async def make_host(h: HostState) -> None:
            async with limit:
                await self._make_host(plan, h, etc_hosts)
                say(f"  {h.name} up at {h.address}")

        self._make_pki(plan)            # before libvirtd starts: its qemu.conf names them
        await parallel((make_host(h) for h in plan.hosts), fail_fast=True)
        t = step(f"{len(plan.hosts)} hosts up (namespaces, host inits, sshd"
                 f"{', libvirtd' if plan.libvirt else ''})", t)

        self._write_ssh_files(plan)
        self._write_inventory(plan)
        plan.phase = LabPhase.UP
        plan.save(self.state_file)
        step(f"inventory {self.inventory_path}", t)

    async def _make_host(self, plan: LabState, h: HostState, etc_hosts: str) -> None:
        hdir = self.host_dir(h.name)
        hdir.mkdir(parents=True, exist_ok=True)
        (hdir / "hosts").write_text(etc_hosts.replace(
            "127.0.0.1 localhost\n", f"127.0.0.1 localhost\n127.0.1.1 {h.name}\n"))
        hostkey = hdir / "ssh_host_ed25519_key"
        if not hostkey.exists():
            await run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", h.name,
                      "-f", str(hostkey), what=f"{h.name}: ssh-keygen (host key)")
        (hdir / "sshd_config").write_text(hostproc.sshd_config(
            h.address, hdir, self.ssh_dir / "authorized_keys"))
        net = ipaddress.ip_network(plan.subnet)
        await network.create_host_netns(h.netns, h.veth, plan.bridge,
                                        ipaddress.ip_interface(f"{h.address}/{net.prefixlen}"))
        await network.create_host_guest_link(h.netns, h.guest_veth, plan.guest_bridge)
        if plan.libvirt:
            uuid_file = hdir / "host_uuid"
            if not uuid_file.exists():
                uuid_file.write_text(str(uuid.uuid4()) + "\n")
            hostproc.libvirt_configs(hdir, h.address, uuid_file.read_text().strip())
        timeouts, limits = self.config.timeouts, self.config.lab
        init = await hostproc.start_host_init(
            h.name, h.netns, hdir, h.address, run_mib=limits.run_tmpfs_mib,
            tmp_mib=limits.tmp_tmpfs_mib, libvirt=plan.libvirt,
            ready_timeout_s=max(timeouts.sshd_ready_s, timeouts.libvirtd_ready_s),
            exit_timeout_s=timeouts.process_exit_s, local_dir=self.local_dir)
        h.init = ProcRef.of(init)
        for name in ("sshd", "libvirtd"):
            proc = hostproc.daemon_proc(hdir, name)
            setattr(h, name, ProcRef.of(proc) if proc else None)
        plan.save(self.state_file)

    def _write_ssh_files(self, plan: LabState) -> None:
        known, config = [], [f"# ssh config of lab {self.name}: ssh -F {self.ssh_config} HOST\n"]
        for h in plan.hosts:
            hostkey = (self.host_dir(h.name) / "ssh_host_ed25519_key.pub").read_text().split()
            known.append(f"{h.name},{h.address} {hostkey[0]} {hostkey[1]}\n")
            config.append(
                f"Host {h.name} {h.address}\n  HostName {h.address}\n  User root\n  Port 22\n"
                f"  IdentityFile {self.ssh_dir / 'id_ed25519'}\n  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {self.ssh_dir / 'known_hosts'}\n"
                f"  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n"
                f"  BatchMode yes\n  LogLevel ERROR\n")
        (self.ssh_dir / "known_hosts").write_text("".join(known))
        self.ssh_config.write_text("".join(config))

    def _make_pki(self, plan: LabState) -> None:
        """The lab's CA (``<lab>/pki/ca``) and each host's x509 credentials for migration
        over TLS in a directory of its own (``<lab>/hosts/<name>/pki``: its name and address
        as subject alternative names), keys readable by root only."""
        ca = pki.make_ca(f"migrator lab {self.name} CA")
        pki.write_ca(ca, self.dir / "pki" / "ca")
        for h in plan.hosts:
            pki.host_credentials(ca, self.host_dir(h.name) / "pki", h.name, [h.address])

    def _qemus(self, wanted: dict[str, str], hosts: list[str], libvirt: bool) -> dict[str, str]:
        """Host -> QEMU binary of ``--qemu``: a known build installed (:mod:`.qemus`), or a
        path that exists.

        :raise ConfigError: an unknown host, a binary that is not there, or libvirt (whose
            domains name their emulator themselves).
        :raise LabError: a build could not be installed.
        """
        from . import qemus
        out = {}
        for host, what in wanted.items():
            if host not in hosts:
                raise ConfigError(f"--qemu {host}={what}: no host {host!r} in this lab "
                                  f"({', '.join(hosts)})")
            if what in qemus.BUILDS:
                out[host] = str(qemus.install(what))
            elif what.startswith("/") and os.access(what, os.X_OK):
                out[host] = what
            else:
                raise ConfigError(f"--qemu {host}={what}: neither a QEMU build the lab knows "
                                  f"({', '.join(qemus.BUILDS)}) nor an executable path")
        if out and libvirt:
            raise ConfigError("--qemu: a host's own QEMU is for the qemu driver (libvirt's "
                              "domains name their emulator); leave out --libvirt")
        return out

    def _write_inventory(self, plan: LabState) -> None:
        inv = Inventory(
            hosts={h.name: HostEntry(address=h.address,
                                     tls_dir=self.host_dir(h.name) / "pki",
                                     qemu=plan.qemus.get(h.name))
                   for h in plan.hosts},
            ssh=SSHSettings(user="root", port=22, identity_file=self.ssh_dir / "id_ed25519",
                            known_hosts=self.ssh_dir / "known_hosts",
                            config_file=self.ssh_config),
            shared_dir=self.shared_dir if plan.shared else None,
            local_dir=self.local_dir,
            guest=InvGuestImage(kernel=self.shared_dir / "images" / "vmlinux",
                                initrd=self.shared_dir / "images" / "initrd.img",
                                append=GUEST_KERNEL_APPEND),
            accel=plan.accel,
            drivers=["qemu", "libvirt"] if plan.libvirt else ["qemu"],
            lab=LabInfo(name=self.name, dir=self.dir, subnet=plan.subnet, bridge=plan.bridge,
                        guest_bridge=plan.guest_bridge),
            guest_network=GuestNetwork(
                subnet=plan.guest_subnet, bridge=network.HOST_GUEST_BRIDGE,
                controller_address=plan.guest_bridge_address.split("/")[0],
                dhcp=DhcpServer(hosts_dir=dhcp.hosts_dir(self.dir),
                                pid_file=dhcp.pid_file(self.dir))))
        inv.dump(self.inventory_path, header=(
            f"# migrator inventory of lab {self.name!r}, written by 'migrate-lab up'.\n"
            "# Format: configs/README.md. Hand-written inventories for real hosts use the "
            "same keys.\n"))

    # -- health -------------------------------------------------------------------------------

    def dhcp_ok(self, state: LabState | None = None) -> bool:
        """The lab's DHCP server runs (a lab from before it had none: rebuilt by ``up``)."""
        state = state or self.state()
        return bool(state and state.dhcp and is_alive(state.dhcp.proc()))

    async def health(self, state: LabState | None = None) -> list[HostHealth]:
        """Check every host: namespace, host init, sshd process, sshd port, libvirtd."""
        state = state or self.state()
        if state is None:
            return []

        async def one(h: HostState) -> HostHealth:
            port = await asyncio.to_thread(tcp_port_open, h.address, 22)
            hdir = self.host_dir(h.name)
            return HostHealth(
                name=h.name, address=h.address, netns=network.netns_exists(h.netns),
                init=bool(h.init and is_alive(h.init.proc())),
                sshd=is_alive(hostproc.daemon_proc(hdir, "sshd")), ssh_port=port,
                libvirtd=(is_alive(hostproc.daemon_proc(hdir, "libvirtd"))
                          if state.libvirt else None))

        return list(await asyncio.gather(*(one(h) for h in state.hosts)))

    # -- down ---------------------------------------------------------------------------------

    async def down(self) -> DownReport:
        """Remove everything the lab made: processes, namespaces, links, files.

        Works from any state, including after a crashed ``up`` or ``down``; a lab that does
        not exist is not an error (``existed`` is False).

        :raise LabError: when something could not be removed; it is named, and ``down`` can
            be run again.
        """
        t0 = time.monotonic()
        lock = await self._locked()
        try:
            state = self.state()
            if state is None:
                return DownReport(self.name, existed=False, seconds=time.monotonic() - t0)
            report = await self._teardown(state)
            report.seconds = time.monotonic() - t0
            return report
        finally:
            os.close(lock)

    async def _teardown(self, state: LabState) -> DownReport:
        report = DownReport(state.name, existed=True)
        if self.state_file.exists():
            state.phase = LabPhase.TEARING_DOWN
            state.save(self.state_file)
        timeout_s = self.config.timeouts.process_exit_s

        async def host_down(h: HostState) -> None:
            procs = processes_in_netns(network.netns_path(h.netns))
            hdir = self.host_dir(h.name)
            recorded = [hostproc.daemon_proc(hdir, "sshd"), hostproc.daemon_proc(hdir, "libvirtd")]
            recorded += [ref.proc() for ref in (h.libvirtd, h.sshd, h.init) if ref is not None]
            for proc in recorded:
                if proc is not None and is_alive(proc) and proc not in procs:
                    procs.append(proc)
            left = await stop_processes(procs, timeout_s)
            report.processes_stopped += len(procs) - len(left)
            if left:
                raise LabError(f"{h.name}: processes {[p.pid for p in left]} survived SIGKILL")
            for link in (h.veth, h.guest_veth):
                if link and network.link_exists(link):
                    await network.delete_link(link)
                    report.links_removed += 1
            if network.netns_exists(h.netns):
                await network.delete_netns(h.netns)
                report.namespaces_removed += 1

        await parallel((host_down(h) for h in state.hosts), fail_fast=True)
        if state.dhcp is not None and is_alive(state.dhcp.proc()):
            if await stop_processes([state.dhcp.proc()], timeout_s):
                raise LabError(f"lab {state.name}: its dnsmasq (pid {state.dhcp.pid}) "
                               "survived SIGKILL")
            report.processes_stopped += 1
        for bridge in (state.bridge, state.guest_bridge):
            if bridge and network.link_exists(bridge):
                await network.delete_link(bridge)
                report.links_removed += 1
        leftovers = [h.netns for h in state.hosts if network.netns_exists(h.netns)]
        leftovers += [n for n in [state.bridge, state.guest_bridge,
                                  *(h.veth for h in state.hosts),
                                  *(h.guest_veth for h in state.hosts)]
                      if n and network.link_exists(n)]
        if leftovers:
            raise LabError(f"lab {state.name}: could not remove {', '.join(leftovers)}")
        if Path(state.dir).exists():
            shutil.rmtree(state.dir)
        if state.made_base_dir:
            try:
                Path(state.dir).parent.rmdir()
            except OSError:
                pass  # not empty: another lab lives there
        return report

    # -- helpers for users ----------------------------------------------------------------------

    def control(self, host: str, request: str) -> str:
        """Ask ``host``'s init for ``reboot``, ``sshd stop``, ``sshd start``, ``libvirtd stop``,
        ``libvirtd start`` or ``status``.

        This is the lab's power switch and service manager, as a BMC or systemd would be for
        a real host. :raise ConfigError: unknown host; :raise LabError: the request failed.
        """
        state = self._up_state()
        if host not in [h.name for h in state.hosts]:
            raise ConfigError(f"unknown host {host!r}: lab {self.name} has "
                              f"{', '.join(h.name for h in state.hosts)}")
        return hostproc.control(self.host_dir(host), request)

    def _up_state(self) -> LabState:
        state = self.state()
        if state is None or state.phase != LabPhase.UP:
            raise ConfigError(f"lab {self.name} is not up (migrate-lab up --name {self.name})")
        return state

    def ssh_argv(self, host: str, command: list[str]) -> list[str]:
        """The OpenSSH command line that runs ``command`` on ``host`` (interactive if empty).

        :raise ConfigError: when the lab is not up or has no such host.
        """
        state = self.state()
        if state is None or state.phase != LabPhase.UP:
            raise ConfigError(f"lab {self.name} is not up (migrate-lab up --name {self.name})")
        names = [h.name for h in state.hosts]
        if host not in names:
            raise ConfigError(f"unknown host {host!r}: lab {self.name} has {', '.join(names)}")
        tty = ["-t"] if not command else []
        return ["ssh", "-F", str(self.ssh_config), *tty, host, *command]
