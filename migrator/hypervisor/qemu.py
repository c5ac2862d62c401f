"""Starting and stopping a QEMU guest on a host over SSH, and talking QMP to it.

Each VM gets a run directory on its host, ``<run_dir>/<vm>/``, holding ``qmp.sock``,
``serial.sock``, ``serial.log`` and ``qemu.pid``. The controller never reads those files
directly: sockets are reached through SSH forwarding, files through commands on the host.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref

from qemu.qmp import QMPClient

from ..errors import GuestError, HostError
from ..hosts.ssh import SSHHost, join, quote
from .vm import GuestVM, VMPaths, VMSpec, qemu_binary, vm_paths

__all__ = ["QemuVM", "VMSpec", "VMPaths", "vm_paths", "qemu_argv", "start_vm", "stop_vm",
           "qmp_session", "machine_types"]

def qemu_argv(spec: VMSpec, paths: VMPaths, *, incoming: bool = False,
              paused: bool = False, binary: str | None = None) -> list[str]:
    """The QEMU command line for ``spec`` (TCG: ``-cpu qemu64``; KVM: ``-cpu host``), run
    as ``binary`` (default: the VM's, else ``qemu-system-x86_64``)."""
    default_cpu = "qemu64" if spec.accel == "tcg" else "host"
    accel = ["-accel", spec.accel, "-cpu", spec.cpu_model or default_cpu]
    argv = [binary or qemu_binary(spec, None), "-name", spec.name, "-msg", "timestamp=on",
            *accel, "-smp", str(spec.vcpus), "-m", str(spec.mem_mib), "-machine", spec.machine,
            # no -no-reboot: it turns every reset, QMP system_reset included, into an exit
            "-nodefaults", "-no-user-config", "-display", "none"]
    if spec.hugepages:
        argv += ["-object", f"memory-backend-file,id=mem0,size={spec.mem_mib}M,"
                            "mem-path=/dev/hugepages,prealloc=on,share=off",
                 "-machine", "memory-backend=mem0"]
    if spec.kernel:
        argv += ["-kernel", spec.kernel, "-append", spec.kernel_append()]
        if spec.initrd:
            argv += ["-initrd", spec.initrd]
    if spec.disk:
        drive = spec.disk.replace(",", ",,")          # QEMU option syntax escapes commas
        argv += ["-drive", f"file={drive},if=none,id=disk0,format=qcow2,cache=none",
                 "-device", "virtio-blk-pci,drive=disk0" + ("" if spec.kernel else ",bootindex=0")]
    if spec.network == "user":
        argv += ["-netdev", "user,id=net0,restrict=on",
                 "-device", f"virtio-net-pci,netdev=net0,mac={spec.mac}"]
    elif spec.network == "bridge":          # the tap start_vm made on the host's bridge
        argv += ["-netdev", f"tap,id=net0,ifname={paths.tap},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=net0,mac={spec.mac}"]
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

    :raise GuestError: when QEMU refuses to start (its error output is in the message), or
        a VM of that name already runs in that run directory on the host (it is left alone).
    """
    paths = vm_paths(run_dir, spec.name)
    ident = quote(identity_file(paths))
    taskset = f"taskset -c {quote(spec.cpu_affinity)} " if spec.cpu_affinity else ""
    # a live QEMU recorded in the VM's directory is never overwritten (its sockets, pid
    # file and identity would be removed under it): a second VM of one name on one host
    busy = quote(f"a VM named {spec.name} already runs in {paths.dir}")
    # the identity (pid + start time) is written in the same command as the start: a QEMU
    # that runs is always one stop_vm can find and tell from a process that reused its pid
    busy_check = (f"if [ -s {ident} ]; then read p was < {ident}; {_STARTTIME}; "
                  f"if [ -n \"$st\" ] && [ \"$st\" = \"$was\" ]; then echo {busy} >&2; "
                  f"exit 1; fi; fi")
    prepare = (f"mkdir -p {quote(paths.dir)} && rm -f {quote(paths.qmp)} {quote(paths.serial)} "
               f"{quote(paths.pidfile)} {ident} {quote(paths.status_log)}")
    argv = qemu_argv(spec, paths, paused=paused, incoming=incoming,
                     binary=qemu_binary(spec, host))
    launch = (f"{taskset}{join(argv)}"
              f" && p=$(cat {quote(paths.pidfile)}) && {_STARTTIME} && "
              f"echo \"$p $st\" > {ident} && echo $p")
    if spec.network == "bridge":
        # the VM's tap, on the bridge, recorded in the run directory before QEMU opens it
        # (a tap of that name left by a VM that is gone is replaced), removed again when
        # QEMU does not start
        tap, bridge, record = quote(paths.tap), quote(spec.bridge), quote(f"{paths.dir}/tap")
        cmd = (f"{busy_check}; [ -d /sys/class/net/{bridge}/bridge ] || exit {_NO_BRIDGE}; "
               f"{prepare} && {{ ip link del {tap} 2>/dev/null; "
               f"ip tuntap add dev {tap} mode tap && echo {tap} > {record} && "
               f"ip link set {tap} master {bridge} up && {launch}; }} "
               f"|| {{ s=$?; ip link del {tap} 2>/dev/null; rm -f {record}; exit $s; }}")
    else:
        cmd = f"{busy_check}; {prepare} && {launch}"
    result = await host.run(cmd)
    if result.exit_status == _NO_BRIDGE:
        raise GuestError(host.name, spec.name, f"no bridge {spec.bridge} on {host.name} "
                         "(network: bridge needs it on every host the VM runs on)")
    if not result.ok:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["?"]
        raise GuestError(host.name, spec.name, f"QEMU did not start: {detail[0]}")
    return int(result.stdout.split()[-1])


def emulator_version(line: str) -> str | None:
    """The version in the first line ``qemu-system-* --version`` prints
    (``QEMU emulator version 10.0.2 (Debian ...)`` -> ``10.0.2 (Debian ...)``); None for
    an empty line (the binary did not run)."""
    return line.strip().removeprefix("QEMU emulator version ").strip() or None


#: host -> binary -> (version, machine types): what :func:`machine_types` learnt
_PROBED: "weakref.WeakKeyDictionary[object, dict[str, tuple[str, frozenset[str]]]]" = \
    weakref.WeakKeyDictionary()


async def machine_types(host: SSHHost, binary: str, timeout: float) -> tuple[str, frozenset[str]]:
    """(version, machine types and aliases) of QEMU ``binary`` on ``host``, as ``--version``
    and ``-machine help`` print them; asked once per host object and binary.

    :raise HostError: the host cannot be reached, or the binary does not run there.
    """
    known = _PROBED.setdefault(host, {})
    if binary not in known:
        r = await host.run(f"{quote(binary)} --version && {quote(binary)} -machine help",
                           timeout=timeout)
        if not r.ok:
            raise HostError(host.name, f"QEMU {binary} does not run: "
                            f"{(r.stderr.strip() or r.stdout.strip())[-300:]}")
        lines = r.stdout.splitlines()
        version = (emulator_version(lines[0]) if lines else None) or "?"
        known[binary] = (version, frozenset(w for line in lines[1:] for w in line.split()[:1]))
    return known[binary]


#: the start command's exit status for a missing bridge (QEMU itself exits 1)
_NO_BRIDGE = 93


def remove_taps(run_dir: str) -> str:
    """Shell: remove the taps recorded under ``run_dir`` (a run's, or one VM's directory)
    before it is removed: a tap outlives its QEMU (made with ``ip tuntap``)."""
    d = quote(run_dir)
    return (f"for t in {d}/tap {d}/*/tap; do [ -s \"$t\" ] && ip link del \"$(cat \"$t\")\" "
            "2>/dev/null; done; true")


#: shell: ``st`` = the start time (clock ticks after boot) of process ``$p``: field 22 of
#: /proc/PID/stat, counted after the command name (which may hold spaces and parentheses)
_STARTTIME = "st=$(sed 's/.*) //' /proc/$p/stat 2>/dev/null | cut -d' ' -f20)"


def alive_test(pid: str) -> str:
    """Shell: true while process ``pid`` (a number or ``$var``) exists and is no zombie. One
    read of its status: a process that vanishes meanwhile counts as gone (``test -e`` then
    ``grep`` on its status would see it exist, then fail to read it, and call it alive)."""
    return f"awk '/^State:/{{exit $2==\"Z\"}}' /proc/{pid}/status 2>/dev/null"


def identity_file(paths: VMPaths) -> str:
    """Where ``start_vm`` records QEMU's identity: ``PID STARTTIME``."""
    return f"{paths.dir}/qemu.id"


async def stop_vm(host: SSHHost, vm: str, run_dir: str, timeout_s: float) -> None:
    """Stop QEMU of ``vm`` on ``host`` and remove its run directory.

    The process is the one ``start_vm`` recorded: its PID *and* start time must match (so a
    process that reused the PID is never signalled, whatever the QEMU binary is called).
    SIGTERM, then SIGKILL after ``timeout_s``; waits until the process is gone. Idempotent.

    :raise HostError: when the host cannot be reached or the process survives SIGKILL.
    """
    paths = vm_paths(run_dir, vm)
    script = f"""
d={quote(paths.dir)}; ident={quote(identity_file(paths))}
if [ -s "$ident" ]; then
  read pid start < "$ident"
  p=$pid; {_STARTTIME}
  if [ -n "$st" ] && [ "$st" = "$start" ]; then
    kill -TERM "$pid" 2>/dev/null
    i=0; while {alive_test('$pid')} && [ $i -lt {int(timeout_s * 100)} ]; do
      sleep 0.01; i=$((i+1)); done
    if {alive_test('$pid')}; then
      kill -KILL "$pid" 2>/dev/null; sleep 0.2
      if {alive_test('$pid')}; then
        echo "qemu $pid survived SIGKILL" >&2; exit 1
      fi
    fi
  fi
fi
{remove_taps(str(paths.dir))}
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


class QemuVM(GuestVM):
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
        super().__init__(spec, host, run_dir, config)
        self.pid: int | None = None
        self._qmp_cm = None
        self._qmp: QMPClient | None = None

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

    async def disconnect(self) -> None:
        """Close this object's QMP connection (QEMU is left as it is). Idempotent."""
        await self.close_qmp()

    async def status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``inmigrate``, ``postmigrate`` ...)."""
        return (await (await self.qmp()).execute("query-status"))["status"]

    async def is_alive(self) -> bool:
        """Whether the QEMU process still runs on the host (zombies count as gone)."""
        if self.pid is None:
            return False
        r = await self.host.run(alive_test(str(self.pid)))
        return r.ok

    async def stop(self) -> None:
        """Stop QEMU and remove its run directory. Idempotent; safe in any state.

        The console session is closed but kept, so a migration's :meth:`adopt` can
        re-attach it to the destination."""
        self._close_session()
        await self.close_qmp()
        await stop_vm(self.host, self.name, self.run_dir, self.config.timeouts.qemu_stop_s)
        self.pid = None

    async def adopt(self, other: "QemuVM") -> None:
        """Become ``other`` (the same VM, now running elsewhere): take its host, QEMU process,
        QMP client and console. An open session of this object re-attaches to the new
        console, so callers keep using the objects they hold. ``other`` is left empty.
        """
        self.host, self.pid, self.paths = other.host, other.pid, other.paths
        self._qmp, self._qmp_cm = other._qmp, other._qmp_cm
        other._qmp = other._qmp_cm = None
        other.pid = None
        await self._take_session(other)

    async def hardreset(self) -> None:
        """Reset the VM like a power button (QMP ``system_reset``)."""
        await (await self.qmp()).execute("system_reset")
