"""Starting and stopping a QEMU guest on a host over SSH, and talking QMP to it.

Each VM gets a run directory on its host, ``<run_dir>/<vm>/``, holding ``qmp.sock``,
``serial.sock``, ``serial.log`` and ``qemu.pid``. The controller never reads those files
directly: sockets are reached through SSH forwarding, files through commands on the host.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from qemu.qmp import QMPClient

from ..errors import GuestError, HostError
from ..hosts.ssh import SSHHost, join, quote

_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class VMSpec:
    """A VM, described once: what to boot and how big it is."""

    name: str
    mem_mib: int = 128
    vcpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    append: str = "console=ttyS0 quiet panic=-1"
    accel: str = "tcg"
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    qemu: str = "qemu-system-x86_64"
    """The QEMU binary on the host (e.g. /usr/libexec/qemu-kvm on RHEL-like hosts)."""
    disk: str | None = None
    """A qcow2 image on shared storage (the same path on every host), as a virtio-blk disk
    with cache=none, so the destination reads what the source wrote. Booted from when no
    kernel is given."""

    def __post_init__(self) -> None:
        if not _VM_NAME.match(self.name):
            raise ValueError(f"bad VM name {self.name!r}")
        if self.mem_mib < 32 or self.vcpus < 1:
            raise ValueError(f"{self.name}: at least 32 MiB and 1 vCPU")
        if self.accel not in ("tcg", "kvm"):
            raise ValueError(f"{self.name}: accel must be tcg or kvm")
        if not self.kernel and not self.disk:
            raise ValueError(f"{self.name}: a kernel or a disk image is required")


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


def qemu_argv(spec: VMSpec, paths: VMPaths, *, incoming: bool = False,
              paused: bool = False) -> list[str]:
    """The QEMU command line for ``spec`` (TCG: ``-cpu qemu64``; KVM: ``-cpu host``)."""
    accel = (["-accel", "tcg", "-cpu", "qemu64"] if spec.accel == "tcg"
             else ["-accel", "kvm", "-cpu", "host"])
    argv = [spec.qemu, "-name", spec.name, "-msg", "timestamp=on", *accel,
            "-smp", str(spec.vcpus), "-m", str(spec.mem_mib), "-machine", "pc",
            # no -no-reboot: it turns every reset, QMP system_reset included, into an exit
            "-nodefaults", "-no-user-config", "-display", "none"]
    if spec.kernel:
        argv += ["-kernel", spec.kernel, "-append", spec.append]
        if spec.initrd:
            argv += ["-initrd", spec.initrd]
    if spec.disk:
        drive = spec.disk.replace(",", ",,")          # QEMU option syntax escapes commas
        argv += ["-drive", f"file={drive},if=none,id=disk0,format=qcow2,cache=none",
                 "-device", "virtio-blk-pci,drive=disk0" + ("" if spec.kernel else ",bootindex=0")]
    argv += ["-chardev", f"socket,id=ser0,path={paths.serial},server=on,wait=off,"
                         f"logfile={paths.serial_log}",
             "-serial", "chardev:ser0",
             "-chardev", f"file,id=ser1,path={paths.status_log}", "-serial", "chardev:ser1",
             "-qmp", f"unix:{paths.qmp},server=on,wait=off",
             "-pidfile", paths.pidfile, "-daemonize", *spec.extra_args]
    if paused:
        argv.append("-S")
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


async def start_vm(host: SSHHost, spec: VMSpec, run_dir: str, *, paused: bool = False,
                   incoming: bool = False) -> int:
    """Start ``spec`` on ``host`` (daemonized) and return QEMU's PID.

    When this returns, QEMU's QMP and serial sockets are listening.

    :raise GuestError: when QEMU refuses to start (its error output is in the message).
    """
    paths = vm_paths(run_dir, spec.name)
    cmd = (f"mkdir -p {quote(paths.dir)} && rm -f {quote(paths.qmp)} {quote(paths.serial)} "
           f"{quote(paths.pidfile)} {quote(paths.status_log)} && "
           f"{join(qemu_argv(spec, paths, paused=paused, incoming=incoming))}"
           f" && cat {quote(paths.pidfile)}")
    result = await host.run(cmd)
    if not result.ok:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["?"]
        raise GuestError(host.name, spec.name, f"QEMU did not start: {detail[0]}")
    return int(result.stdout.split()[-1])


async def stop_vm(host: SSHHost, vm: str, run_dir: str, timeout_s: float) -> None:
    """Stop QEMU of ``vm`` on ``host`` by its pidfile and remove its run directory.

    SIGTERM, then SIGKILL after ``timeout_s``; waits until the process is gone. Idempotent.

    :raise HostError: when the host cannot be reached or the process survives SIGKILL.
    """
    paths = vm_paths(run_dir, vm)
    script = f"""
d={quote(paths.dir)}; pidfile={quote(paths.pidfile)}
if [ -s "$pidfile" ]; then
  pid=$(cat "$pidfile")
  if [ "$(cat /proc/$pid/comm 2>/dev/null)" = qemu-system-x86 ]; then
    kill -TERM "$pid" 2>/dev/null
    i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt {int(timeout_s * 100)} ]; do
      grep -q '^State:.*Z' /proc/$pid/status 2>/dev/null && break; sleep 0.01; i=$((i+1)); done
    if kill -0 "$pid" 2>/dev/null && ! grep -q '^State:.*Z' /proc/$pid/status 2>/dev/null; then
      kill -KILL "$pid"; sleep 0.2
      if kill -0 "$pid" 2>/dev/null && ! grep -q '^State:.*Z' /proc/$pid/status; then
        echo "qemu $pid survived SIGKILL" >&2; exit 1
      fi
    fi
  fi
fi
rm -rf "$d"
"""
    result = await host.run(script)
    if not result.ok:
        raise HostError(host.name, f"could not stop {vm}: {result.stderr.strip()}")


@contextlib.asynccontextmanager
async def qmp_session(host: SSHHost, socket_path: str, name: str):
    """A connected ``qemu.qmp.QMPClient`` for a QMP socket on ``host``.

    The remote socket is forwarded to a private local socket over the host's SSH connection,
    so this works the same for lab hosts and real hosts.
    """
    with tempfile.TemporaryDirectory(prefix="migrator-qmp-") as tmp:
        local = os.path.join(tmp, "qmp.sock")
        listener = await host.forward_unix_socket(local, socket_path)
        client = QMPClient(name)
        try:
            await client.connect(local)
            yield client
        finally:
            await client.disconnect()
            listener.close()
            await listener.wait_closed()


class QemuVM:
    """One QEMU process of a VM on one host, driven over SSH and QMP.

    ::

        vm = QemuVM(spec, host, run_dir, config)
        await vm.start()                     # or start(incoming=True) for a destination
        qmp = await vm.qmp()                 # a connected qemu.qmp.QMPClient, owned by vm
        session = await vm.wait_for_login(timeout)
        await vm.stop()                      # idempotent; closes QMP and the console

    :param config: timeouts (``qemu_stop_s``) come from here.
    """

    def __init__(self, spec: VMSpec, host: SSHHost, run_dir: str, config=None):
        from ..config import Config
        self.spec = spec
        self.host = host
        self.run_dir = str(run_dir)
        self.config = config or Config()
        self.paths = vm_paths(run_dir, spec.name)
        self.pid: int | None = None
        self._qmp_cm = None
        self._qmp: QMPClient | None = None
        self._session = None

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"<QemuVM {self.name} on {self.host.name} pid={self.pid}>"

    async def start(self, *, incoming: bool = False, paused: bool = False) -> None:
        """Start QEMU on the host (see :func:`start_vm`). :raise GuestError: QEMU refused."""
        self.pid = await start_vm(self.host, self.spec, self.run_dir, paused=paused,
                                  incoming=incoming)

    async def qmp(self) -> QMPClient:
        """The VM's QMP client, connected on first use through SSH socket forwarding."""
        if self._qmp is None:
            cm = qmp_session(self.host, self.paths.qmp, f"{self.name}@{self.host.name}")
            self._qmp = await cm.__aenter__()
            self._qmp_cm = cm
        return self._qmp

    async def close_qmp(self) -> None:
        cm, self._qmp_cm, self._qmp = self._qmp_cm, None, None
        if cm is not None:
            try:
                await cm.__aexit__(None, None, None)
            except Exception:  # noqa: BLE001 - QEMU may be gone already: nothing to close
                pass

    async def status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``inmigrate``, ``postmigrate`` ...)."""
        return (await (await self.qmp()).execute("query-status"))["status"]

    async def is_alive(self) -> bool:
        """Whether the QEMU process still runs on the host (zombies count as gone)."""
        if self.pid is None:
            return False
        r = await self.host.run(f"test -e /proc/{self.pid} && ! grep -q '^State:.*Z' "
                                f"/proc/{self.pid}/status")
        return r.ok

    async def stop(self) -> None:
        """Stop QEMU and remove its run directory. Idempotent; safe in any state.

        The console session is closed but kept, so a migration's :meth:`adopt` can
        re-attach it to the destination."""
        if self._session is not None:
            self._session.close()
        await self.close_qmp()
        await stop_vm(self.host, self.name, self.run_dir, self.config.timeouts.qemu_stop_s)
        self.pid = None

    async def adopt(self, other: "QemuVM") -> None:
        """Become ``other`` (the same VM, now running elsewhere): take its host, QEMU process,
        QMP client and console. An open session of this object re-attaches to the new
        console, so callers keep using the objects they hold. ``other`` is left empty.
        """
        old_session = self._session
        self.host, self.pid, self.paths = other.host, other.pid, other.paths
        self._qmp, self._qmp_cm = other._qmp, other._qmp_cm
        self._session = other._session
        other._qmp = other._qmp_cm = other._session = None
        other.pid = None
        if old_session is not None:
            if self._session is not None:
                self._session.close()
            reader, writer = await self.host.open_unix_connection(self.paths.serial)
            old_session.reattach(reader, writer, host=self.host.name)
            self._session = old_session

    async def hardreset(self) -> None:
        """Reset the VM like a power button (QMP ``system_reset``)."""
        await (await self.qmp()).execute("system_reset")

    async def console(self):
        """A new :class:`~migrator.guest.session.GuestSession` on the serial console."""
        from ..guest.session import GuestSession
        reader, writer = await self.host.open_unix_connection(self.paths.serial)
        return GuestSession(reader, writer, host=self.host.name, vm=self.name,
                            config=self.config)

    async def wait_for_login(self, timeout: float | None = None):
        """The VM's guest session, once the guest's shell answers on the serial console.

        QEMU's serial socket serves one client at a time, so the VM keeps one session and
        returns it again (reopened if it was closed).

        :raise GuestError: no shell prompt within ``timeout`` (default
            ``config.timeouts.guest_boot_s``).
        """
        if self._session is None or self._session.writer.is_closing():
            self._session = await self.console()
        await self._session.wait_for_shell(timeout or self.config.timeouts.guest_boot_s)
        return self._session

    async def status_lines(self) -> list[str]:
        """The guest's ttyS1 output so far (TICK n / DIRTY ... lines), read on the host."""
        r = await self.host.run(f"cat {quote(self.paths.status_log)} 2>/dev/null")
        return [ln.strip() for ln in r.stdout.replace("\r", "").splitlines() if ln.strip()]

    async def last_tick(self) -> int | None:
        ticks = [int(ln.split()[1]) for ln in await self.status_lines()
                 if ln.startswith("TICK ") and ln.split()[1].isdigit()]
        return ticks[-1] if ticks else None
