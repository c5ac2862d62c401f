"""What every driver's VM shares: the spec, the run directory layout, and the guest side
(serial console sessions, the lab guest's status lines).

A VM object of any driver (:class:`~migrator.hypervisor.qemu.QemuVM`,
:class:`~migrator.hypervisor.libvirt.LibvirtVM`) offers::

    await vm.start(incoming=False, paused=False)   # GuestError when it does not start
    await vm.stop()                                # idempotent, safe in any state
    await vm.status()                              # 'running', 'paused', 'postmigrate', ...
    await vm.is_alive(); await vm.hardreset()
    session = await vm.wait_for_login(timeout)     # GuestSession on the serial console
    await vm.status_lines(); await vm.last_tick()  # the lab guest's ttyS1 (TICK, DIRTY)
    await vm.adopt(other)                          # after a migration: become the destination

Every driver gives a VM a run directory ``<run_dir>/<vm>/`` on its host with the console
socket ``serial.sock`` and the status file ``status.log``, so guest sessions work the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Iterator

from ..blocking import BlockingInWorkers
from ..config import GUEST_KERNEL_APPEND, MAC_PATTERN, check_interface_address
from ..errors import GuestError
from ..hosts.ssh import SSHHost, quote

log = logging.getLogger(__name__)
#: the prober (a process of its own: see its module)
PROBE_SCRIPT = PurePosixPath(__file__).with_name("probe_process.py")

_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CPU_LIST = re.compile(r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$")


#: the QEMU binary when neither the VM nor its host names one
DEFAULT_QEMU = "qemu-system-x86_64"


def qemu_binary(spec: "VMSpec", host) -> str:
    """The QEMU binary ``spec`` runs with on ``host``: the VM's own, else the host's, else
    :data:`DEFAULT_QEMU`."""
    return spec.qemu or getattr(host, "qemu", None) or DEFAULT_QEMU


@dataclass(frozen=True)
class VMSpec:
    """A VM, described once: what to boot and how big it is."""

    name: str
    mem_mib: int = 128
    vcpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    append: str = GUEST_KERNEL_APPEND
    accel: str = "tcg"
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    qemu: str | None = None
    """The QEMU binary (e.g. /usr/libexec/qemu-kvm on RHEL-like hosts); None: the host's
    (:attr:`SSHHost.qemu`), else ``qemu-system-x86_64`` from PATH (:func:`qemu_binary`)."""
    machine: str = "pc"
    """QEMU's machine type; an alias (``pc``) names the newest of its kind of the QEMU it
    starts on: a migration starts the destination with the source's resolved type."""
    disk: str | None = None
    """A qcow2 image on shared storage (the same path on every host), as a virtio-blk disk
    with cache=none, so the destination reads what the source wrote. Booted from when no
    kernel is given."""
    mac: str | None = None
    """Give the VM a virtio NIC with this MAC (``02:...``: locally administered), on
    ``network``."""
    network: str | None = None
    """What the NIC is attached to: ``none`` (no NIC), ``user`` (QEMU's user-mode networking,
    restricted: the guest reaches nothing and nothing reaches it; the NIC still carries its
    MAC across migrations) or ``bridge`` (a tap on the host's ``bridge``: a real L2 segment,
    see :attr:`ip`). Default: ``user`` when a MAC is given, else ``none``: a VM gets a path
    to a network only when asked, and a NIC only when it has a MAC of its own."""
    bridge: str | None = None
    """The host bridge of ``network: bridge`` (every host of the VM's migrations has one of
    this name: the lab's ``gbr0``, on real hosts e.g. ``br0``)."""
    ip: str | None = None
    """The guest's address on the bridge, ``ADDRESS/PREFIX``; the lab guest configures it
    from ``lab.ip=`` on its kernel command line (added to ``append`` when a kernel is
    booted). It keeps it wherever it migrates."""
    dhcp: bool = False
    """The guest asks the network's DHCP server for :attr:`ip` instead of being given it on
    its command line (the lab guest: ``lab.ip=dhcp``, busybox udhcpc); ``ip`` is then the
    address the server is expected to hand out (its static lease for :attr:`mac`)."""
    login_user: str | None = None
    """Who logs in when the serial console asks (``login:``), with ``login_password``."""
    login_password: str | None = None
    prompt: str | None = None
    """The guest shell's prompt, a regular expression (default: a line ending in ``# `` or
    ``$ ``)."""
    cpu_model: str | None = None
    """QEMU's ``-cpu`` model (default: ``qemu64`` under TCG, ``host`` under KVM)."""
    cpu_affinity: str | None = None
    """Host CPUs for QEMU's threads, a ``taskset -c`` list (qemu: QEMU is started under
    ``taskset``; libvirt: ``<vcpu cpuset=...>``)."""
    hugepages: bool = False
    """Guest memory from the host's hugetlbfs (``/dev/hugepages``), preallocated."""

    def __post_init__(self) -> None:
        if not _VM_NAME.match(self.name):
            raise ValueError(f"bad VM name {self.name!r}")
        if self.mem_mib < 32 or self.vcpus < 1:
            raise ValueError(f"{self.name}: at least 32 MiB and 1 vCPU")
        if self.accel not in ("tcg", "kvm"):
            raise ValueError(f"{self.name}: accel must be tcg or kvm")
        if not self.kernel and not self.disk:
            raise ValueError(f"{self.name}: a kernel or a disk image is required")
        if self.mac is not None and not MAC_PATTERN.fullmatch(self.mac):
            raise ValueError(f"{self.name}: bad MAC {self.mac!r} (six lowercase hex pairs, "
                             "unicast: the first octet even)")
        if self.network is None:
            object.__setattr__(self, "network", "user" if self.mac else "none")
        if self.network not in ("none", "user", "bridge"):
            raise ValueError(f"{self.name}: network must be none, user or bridge, not "
                             f"{self.network!r}")
        if self.network != "none" and not self.mac:
            raise ValueError(f"{self.name}: network {self.network} needs a MAC")
        if self.network == "none" and self.mac:
            raise ValueError(f"{self.name}: a MAC without a network (network: user or bridge)")
        if (self.network == "bridge") != (self.bridge is not None):
            raise ValueError(f"{self.name}: a bridge is given with network: bridge, and only "
                             "then")
        if self.ip is not None:
            if self.network != "bridge":
                raise ValueError(f"{self.name}: an IP address needs network: bridge")
            try:
                check_interface_address(self.ip)
            except ValueError as exc:
                raise ValueError(f"{self.name}: {exc}") from None
        if self.dhcp and self.ip is None:
            raise ValueError(f"{self.name}: dhcp needs the address it is expected to give "
                             "(ip)")
        if self.cpu_affinity is not None and not _CPU_LIST.match(self.cpu_affinity):
            raise ValueError(f"{self.name}: bad CPU list {self.cpu_affinity!r} (as taskset "
                             "-c takes: 0-1,3)")
        if self.prompt is not None:
            try:
                re.compile(self.prompt)
            except re.error as exc:
                raise ValueError(f"{self.name}: bad prompt pattern {self.prompt!r}: {exc}") \
                    from None

    @property
    def address(self) -> str | None:
        """The guest's IP address on its bridge (without the prefix), if it has one."""
        return self.ip.split("/")[0] if self.ip else None

    def kernel_append(self) -> str:
        """``append``, plus ``lab.ip=`` for a VM with an address (the lab guest reads it;
        other kernels ignore an unknown parameter): the address, or ``dhcp``."""
        if not self.ip:
            return self.append
        arg = f"lab.ip={'dhcp' if self.dhcp else self.ip}"
        if arg in self.append.split():
            return self.append
        return f"{self.append} {arg}"


@dataclass(frozen=True)
class VMPaths:
    dir: PurePosixPath

    @property
    def qmp(self) -> str:
        return str(self.dir / "qmp.sock")

    @property
    def serial(self) -> str:
        return str(self.dir / "serial.sock")

    @property
    def tap(self) -> str:
        """The name of the VM's tap on its host (qemu driver, ``network: bridge``): derived
        from the run directory and the VM's name, so the same on every host of a migration
        and different for two runs on one host; at most 15 characters."""
        return "mg" + hashlib.sha256(str(self.dir).encode()).hexdigest()[:11]

    @property
    def serial_log(self) -> str:
        return str(self.dir / "serial.log")

    @property
    def pidfile(self) -> str:
        return str(self.dir / "qemu.pid")

    @property
    def status_log(self) -> str:
        """The guest's second serial port (ttyS1): TICK and dirtier lines (``lab.out``)."""
        return str(self.dir / "status.log")


def vm_paths(run_dir: str | os.PathLike, vm: str) -> VMPaths:
    return VMPaths(PurePosixPath(run_dir) / vm)




class GuestVM(BlockingInWorkers):
    """The driver-independent half of a VM: identity, console session, status lines.

    Subclasses implement start/stop/status/is_alive/hardreset and call
    :meth:`_take_session` from their ``adopt``.
    """

    def __init__(self, spec: VMSpec, host: SSHHost, run_dir: str, config=None):
        from ..config import Config
        self.spec = spec
        self.host = host
        self.run_dir = str(run_dir)
        self.config = config or Config()
        self.paths = vm_paths(run_dir, spec.name)
        self._session = None
        self._stopped_while_moving = False
        #: one user of the serial console at a time: shared by every session of this object
        self.console_lock = None
        #: set by the framework that started the VM: what :meth:`migrate` calls
        self.migrate_hook = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def address(self) -> str | None:
        """The guest's IP address on its bridge (``spec.ip`` without the prefix), or None."""
        return self.spec.address

    async def wait_reachable(self, timeout: float | None = None) -> float:
        """Wait until the guest answers ICMP echo from the controller (which must be on its
        network: the lab's guest bridge); return the seconds it took.

        :raise GuestError: the VM has no address, or no answer within ``timeout`` (default
            ``timeouts.guest_boot_s``): naming VM, host, MAC and address.
        """
        if self.address is None:
            raise GuestError(self.host.name, self.name, "has no address (network: bridge "
                             "with an ip)")
        timeout = timeout or self.config.timeouts.guest_boot_s
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(PROBE_SCRIPT), "--first", f"{timeout:g}", self.address,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode == 0:
            return float(out.split()[-1])
        why = err.decode(errors="replace").strip() or f"no ICMP echo reply in {timeout:g} s"
        how = ", by DHCP: did the server get its static lease?" if self.spec.dhcp else ""
        raise GuestError(self.host.name, self.name, f"not reachable at {self.spec.ip} (MAC "
                         f"{self.spec.mac}, bridge {self.spec.bridge}{how}): {why}")

    async def console(self):
        """A new :class:`~migrator.guest.session.GuestSession` on the serial console."""
        from ..guest.console import ConsoleLock
        from ..guest.session import GuestSession
        if self.console_lock is None:
            self.console_lock = ConsoleLock()
        reader, writer = await self.host.open_unix_connection(self.paths.serial)
        return GuestSession(reader, writer, host=self.host.name, vm=self.name,
                            config=self.config, prompt=self.spec.prompt,
                            lock=self.console_lock)

    async def wait_for_login(self, timeout: float | None = None):
        """The VM's guest session, once the guest's shell answers on the serial console.

        The console socket serves one client at a time, so the VM keeps one session and
        returns it again (reopened if it was closed).

        Logs in as the spec's ``login_user`` when the console asks for a login.

        :raise ConsoleTimeout: no shell prompt within ``timeout`` (default
            ``config.timeouts.guest_boot_s``).
        :raise GuestError: a login is asked for and none is configured, or it was refused.
        """
        if self._open_session() is None:
            old = self._session
            self._session = await self.console()
            if old is not None:         # what answers the guest's requests stays (multinode)
                self._session.requests = old.requests
        await self._session.wait_for_shell(timeout or self.config.timeouts.guest_boot_s,
                                           self.spec.login_user, self.spec.login_password)
        return self._session

    def _open_session(self):
        """The VM's console session if it is open, else None."""
        session = self._session
        return None if session is None or session.writer.is_closing() else session

    async def answers(self, login_timeout: float | None = None) -> None:
        """The guest's shell runs a command now (``true``): the check that a VM lives after
        a migration. On the session already open (a migration keeps the guest's console
        session and its shell) that is one exchange; without one, :meth:`wait_for_login`
        comes first.

        The guest's kernel must not have reported a failure of its own on the console since
        the last check (an oops, a BUG, a panic: a guest whose memory a migration damaged
        may crash a moment after it arrived, and answer again once it has rebooted).

        :raise GuestError: no answer within ``guest_cmd_s`` (a login first: within
            ``login_timeout``, default ``guest_boot_s``), or the console closed; or the
            guest's kernel reported a failure (its first lines named).
        :raise ConsoleCommandError: the shell ran it and failed.
        """
        session = self._open_session() or await self.wait_for_login(login_timeout)
        await session.cmd("true")
        faults = session.take_kernel_faults()
        if faults:
            raise GuestError(self.host.name, self.name, "the guest's kernel reported a failure "
                             f"on its console: {faults!r}")

    async def migrate(self, dst, vm_ports=None):
        """Migrate this VM to ``dst``, as one step of the framework's ``migrate()`` call that
        holds it (for a ``migrate_vms_src`` hook that migrates a subset of its VMs; the seed's
        ``vm.migrate(mig_data.dst, mig_data.vm_ports)``). Returns the migration's result.

        ``vm_ports`` is accepted for Autotest's signature; the destination picks its own port
        when it listens (``mig_data.vm_ports`` shows it), so a port given for this VM is
        refused.

        :raise ScenarioError: the VM was not started by a framework run, or is in no
            ``migrate()`` call now, or was migrated in this call already.
        :raise ConfigError: ``dst`` is not the call's destination, or a port was given.
        :raise MigrationError: the migration failed (rolled back).
        """
        if self.migrate_hook is None:
            from ..errors import ScenarioError
            raise ScenarioError(f"vm.migrate(): {self.name} was not started by a "
                                "MultihostMigration run (use migrator.migration."
                                "make_migration for a VM of your own)")
        return await self.migrate_hook(self, dst, vm_ports)

    @contextlib.contextmanager
    def console_moving(self) -> Iterator[None]:
        """Around a migration of this VM (the migration engine): an open console session
        follows the VM to its destination, and a read in flight is not ended by the source's
        console closing (:meth:`SerialConsole.moving
        <migrator.guest.console.SerialConsole.moving>`). A session this VM's ``stop`` left
        open meanwhile is closed at the end when the VM did not move."""
        session = self._session
        if session is None:
            yield
            return
        start_host, self._stopped_while_moving = session.host, False
        try:
            with session.moving():
                yield
        finally:
            if self._stopped_while_moving and session.host == start_host:
                session.close()
            self._stopped_while_moving = False

    async def connect_console_ahead(self, dst: "GuestVM") -> None:
        """Before the switchover: connect ``dst``'s console for this VM's open session, so the
        guest's output on the destination is read from its first byte. Never raises: without
        it the session re-attaches after the migration and may miss what the guest printed
        in between (said in the log)."""
        session = self._open_session()
        if session is None:
            return
        try:
            reader, writer = await dst.host.open_unix_connection(dst.paths.serial)
        except Exception as exc:  # noqa: BLE001 - degraded, not failed: said so
            log.warning("[vm=%s host=%s] console not connected ahead of the switchover (%s: "
                        "%s): output in between may be missed", self.name, dst.host.name,
                        type(exc).__name__, exc)
            return
        session.connect_ahead(reader, writer, host=dst.host.name)
        log.debug("[vm=%s host=%s] console connected ahead of the switchover", self.name,
                  dst.host.name)

    def console_switchover(self) -> None:
        """The VM runs on the destination now: an open session types there from now on."""
        if self._session is not None:
            self._session.switch_ahead()

    def console_switchback(self) -> None:
        """The switchover was not made after all (the source keeps the VM): an open session
        types on the source's console again."""
        if self._session is not None:
            self._session.switch_back()

    def _close_session(self) -> None:
        """Close the console session but keep it, so :meth:`adopt` can re-attach it. While
        the VM migrates, the session stays open: it follows the VM (the source's console
        ends with its QEMU)."""
        if self._session is not None:
            if self._session.moving_now:
                self._stopped_while_moving = True
                return
            self._session.close()

    async def _take_session(self, other: "GuestVM") -> None:
        """Part of ``adopt``: keep this object's open session, re-attached to ``other``'s
        console (now on ``self.host``), so callers keep the session objects they hold."""
        old_session = self._session
        self._session, other._session = other._session, None
        if self._session is not None and old_session is None:
            self.console_lock = self._session.lock
        if old_session is not None:
            if self._session is not None:
                self._session.close()
            old_session.switch_ahead()
            if old_session.host != self.host.name:      # nothing connected ahead
                reader, writer = await self.host.open_unix_connection(self.paths.serial)
                old_session.reattach(reader, writer, host=self.host.name)
            self._session = old_session

    async def status_lines(self) -> list[str]:
        """The guest's ttyS1 output so far (TICK n / DIRTY ... lines), read on the host."""
        r = await self.host.run(f"cat {quote(self.paths.status_log)} 2>/dev/null")
        return [ln.strip() for ln in r.stdout.replace("\r", "").splitlines() if ln.strip()]

    async def last_tick(self) -> int | None:
        ticks = [int(ln.split()[1]) for ln in await self.status_lines()
                 if ln.startswith("TICK ") and ln.split()[1].isdigit()]
        return ticks[-1] if ticks else None
