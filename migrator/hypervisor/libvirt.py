"""VMs through libvirt (libvirt-python): one libvirtd per host, reached by URI.

::

    vm = LibvirtVM(spec, host, run_dir, config)      # host: an SSHHost (name, address, keys)
    await vm.start()                                 # defineXML + create
    session = await vm.wait_for_login()              # the same serial console as the qemu driver
    await vm.stop()                                  # destroy + undefine; idempotent

* Connections (:mod:`.libvirt_uri`): by default libvirt's ``ext`` transport running OpenSSH
  with the inventory's key and known_hosts, host keys verified (an unknown key is refused);
  the user's ~/.ssh/config is never touched. Closing a connection ends its ssh process and
  sshd session. ``libvirt.transport`` also offers ``libssh`` and ``ssh``. Keepalives (``libvirt.keepalive_*``) detect a dead daemon or link.
* libvirt calls block: each one runs in a thread pool of its own, bounded by
  ``timeouts.libvirt_call_s`` (the thread of a hung call is abandoned; the caller goes on).
  libvirt's events are dispatched on the asyncio loop through ``libvirtaio``.
* The domain XML is made from the :class:`VMSpec`: TCG (``type='qemu'``, qemu64) or KVM
  (host-passthrough), direct kernel boot and/or the qcow2 disk (virtio, cache=none), ttyS0 as
  the unix socket ``<run_dir>/<vm>/serial.sock`` (guest sessions), ttyS1 as ``status.log``.

Errors: :class:`LibvirtError` (a :class:`HostError` naming host, VM and call, carrying
libvirt's error code), :class:`GuestError` when a domain does not start.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Callable

import libvirt

from ..errors import GuestError
from ..hosts.ssh import SSHHost, quote
from .libvirt_conn import LibvirtConnection, LibvirtError, open_connections
from .libvirt_pool import current_pool
from .libvirt_uri import host_uri
from .vm import GuestVM, VMPaths, VMSpec

log = logging.getLogger(__name__)


_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff", libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended"}
_PAUSED = {libvirt.VIR_DOMAIN_PAUSED_MIGRATION: "paused-migration",
           libvirt.VIR_DOMAIN_PAUSED_POSTCOPY: "paused-postcopy",
           libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED: "postcopy-failed"}


def state_name(state: int, reason: int) -> str:
    """libvirt's (state, reason) in words: ``running``, ``paused``, ``paused-migration``..."""
    if state == libvirt.VIR_DOMAIN_PAUSED and reason in _PAUSED:
        return _PAUSED[reason]
    return _STATES.get(state, f"state-{state}")


def domain_xml(spec: VMSpec, paths: VMPaths) -> str:
    """libvirt's domain XML for ``spec`` (see the module docstring)."""
    dom = ET.Element("domain", type="qemu" if spec.accel == "tcg" else "kvm")
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.mem_mib)
    vcpu = ET.SubElement(dom, "vcpu")
    vcpu.text = str(spec.vcpus)
    if spec.cpu_affinity:
        vcpu.set("cpuset", spec.cpu_affinity)
    if spec.hugepages:
        backing = ET.SubElement(dom, "memoryBacking")
        ET.SubElement(backing, "hugepages")
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    if spec.kernel:
        ET.SubElement(os_, "kernel").text = spec.kernel
        if spec.initrd:
            ET.SubElement(os_, "initrd").text = spec.initrd
        ET.SubElement(os_, "cmdline").text = spec.kernel_append()
    else:
        ET.SubElement(os_, "boot", dev="hd")
    if spec.accel == "tcg" or spec.cpu_model:
        cpu = ET.SubElement(dom, "cpu", mode="custom", match="exact", check="none")
        ET.SubElement(cpu, "model", fallback="forbid").text = spec.cpu_model or "qemu64"
    else:
        ET.SubElement(dom, "cpu", mode="host-passthrough")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    if spec.qemu and spec.qemu.startswith("/"):
        ET.SubElement(devices, "emulator").text = spec.qemu
    if spec.disk:
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2", cache="none")
        ET.SubElement(disk, "source", file=spec.disk)
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
    if spec.network in ("user", "bridge"):
        nic = ET.SubElement(devices, "interface", type=spec.network)
        ET.SubElement(nic, "mac", address=spec.mac)
        if spec.network == "bridge":        # libvirt makes (and removes) the tap itself
            ET.SubElement(nic, "source", bridge=spec.bridge)
        ET.SubElement(nic, "model", type="virtio")
    console = ET.SubElement(devices, "serial", type="unix")
    ET.SubElement(console, "source", mode="bind", path=paths.serial)
    ET.SubElement(console, "log", file=paths.serial_log, append="on")
    ET.SubElement(console, "target", port="0")
    status = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(status, "source", path=paths.status_log)
    ET.SubElement(status, "target", port="1")
    ET.SubElement(devices, "memballoon", model="none")
    if spec.extra_args:
        raise ValueError(f"{spec.name}: extra QEMU arguments are not supported by the libvirt "
                         "driver (describe the device in the spec instead)")
    return ET.tostring(dom, encoding="unicode")


async def open_host_connection(host: SSHHost, config, uri: str | None = None
                               ) -> LibvirtConnection:
    """A new owned connection to ``host``'s libvirtd (the caller closes it), with the
    config's transport, timeouts and keepalives.

    :raise LibvirtError: unreachable host or daemon, refused host key or login.
    """
    settings, timeouts = config.libvirt, config.timeouts
    uri = uri or host_uri(host, settings.transport, timeouts.ssh_connect_s)
    return await LibvirtConnection.open(
        host.name, uri, timeout=timeouts.ssh_connect_s + timeouts.libvirt_call_s,
        keepalive=(settings.keepalive_interval_s, settings.keepalive_count))


@dataclass(frozen=True)
class DomainInfo:
    """A domain running on a host, as libvirt reports it."""

    host: str
    name: str
    state: str           #: :func:`state_name`: running, paused, paused-migration...
    mem_mib: int         #: its maximum memory
    vcpus: int


def _active_domains(conn: libvirt.virConnect) -> list[tuple[str, int, int, int, int]]:
    """(name, state, reason, max memory KiB, vCPUs) of every active domain. Runs in a worker
    thread: the domain objects are freed there, when this returns, never on the loop."""
    out = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        state, reason = dom.state()
        _s, max_kib, _mem, vcpus, _cpu = dom.info()
        out.append((dom.name(), state, reason, max_kib, vcpus))
    return out


async def running_domains(conn: LibvirtConnection, config) -> list[DomainInfo]:
    """Every active domain on ``conn``'s host, by name.

    :raise LibvirtError: the daemon could not be asked.
    """
    found = await conn.call("list domains", _active_domains, conn.raw,
                            timeout=config.timeouts.libvirt_call_s)
    return sorted((DomainInfo(conn.host, name, state_name(state, reason), max_kib // 1024,
                              vcpus) for name, state, reason, max_kib, vcpus in found),
                  key=lambda d: d.name)


class LibvirtVM(GuestVM):
    """One VM as a libvirt domain on one host. See the module docstring.

    The VM object owns its connection (:class:`LibvirtConnection`): :meth:`stop` and
    :meth:`close` close it, :meth:`adopt` takes over another object's. Inside
    :func:`~migrator.hypervisor.libvirt_pool.shared_connections` it takes its host's
    connection from the pool instead, which owns and closes it; :meth:`close` then lets go
    of it. Domain objects are never kept beyond the call that needs them, other than
    through the connection, which frees them when it closes.
    """

    def __init__(self, spec: VMSpec, host: SSHHost, run_dir: str, config=None):
        super().__init__(spec, host, run_dir, config)
        self.uri = host_uri(host, self.config.libvirt.transport,
                            self.config.timeouts.ssh_connect_s)
        self.pid: int | None = None
        self._conn: LibvirtConnection | None = None
        self._pooled = False        # _conn is a shared_connections() pool's

    def __repr__(self) -> str:
        return f"<LibvirtVM {self.name} on {self.host.name} pid={self.pid}>"

    async def call(self, what: str, fn: Callable[..., Any], *args: Any,
                   timeout: float | None = None) -> Any:
        """A libvirt call on this VM's connection: errors name its host and the VM.

        :raise LibvirtError: see :meth:`LibvirtConnection.call`.
        """
        conn = await self.connection()
        return await conn.call(f"{self.name}: {what}", fn, *args,
                               timeout=timeout or self.config.timeouts.libvirt_call_s)

    async def connection(self) -> LibvirtConnection:
        """The owned connection to this host's libvirtd (opened on first use; a dead one is
        closed and opened again).

        :raise LibvirtError: unreachable host or daemon, refused host key or login.
        """
        if self._conn is not None and not self._conn.is_alive():   # local check, no RPC
            await self.close()                        # dead (daemon or link gone): reopen
        if self._conn is None:
            pool = current_pool()
            if pool is not None:
                self._conn = await pool.get(self.host.name, self.uri, lambda: (
                    open_host_connection(self.host, self.config, self.uri)))
                self._pooled = True
            else:
                self._conn = await open_host_connection(self.host, self.config, self.uri)
        return self._conn

    async def conn(self) -> libvirt.virConnect:
        """The raw ``virConnect`` of :meth:`connection` (for calls through :meth:`call`)."""
        return (await self.connection()).raw

    async def close(self) -> None:
        """Close the connection (the domain is left as it is). Idempotent."""
        conn, self._conn = self._conn, None
        pooled, self._pooled = self._pooled, False
        if conn is not None and not pooled:     # a pool's: the pool closes it
            await conn.close(self.config.timeouts.libvirt_call_s)

    async def disconnect(self) -> None:
        """:meth:`close` (the name every VM class has for it)."""
        await self.close()

    async def domain(self) -> libvirt.virDomain | None:
        """The domain on this host, or None when it is not there."""
        conn = await self.conn()
        try:
            return await self.call("lookup", conn.lookupByName, self.name)
        except LibvirtError as exc:
            if exc.code != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            return None

    async def prepare_run_dir(self) -> None:
        """The VM's run directory on the host (libvirt binds the console socket there)."""
        p = self.paths
        await self.host.run(f"mkdir -p {quote(p.dir)} && rm -f {quote(p.serial)} "
                            f"{quote(p.status_log)}", check=True)

    async def start(self, *, incoming: bool = False, paused: bool = False) -> None:
        """Define and start the domain. With ``incoming`` only the run directory and the
        connection are prepared: libvirt starts the destination itself during a migration.

        :raise GuestError: libvirt refused the domain or it did not start (it is undefined).
        :raise LibvirtError: the daemon could not be reached.
        """
        await self.prepare_run_dir()
        conn = await self.conn()
        if incoming:
            return
        xml = domain_xml(self.spec, self.paths)
        try:
            dom = await self.call("define", conn.defineXML, xml)
        except LibvirtError as exc:
            raise GuestError(self.host.name, self.name, f"libvirt refused the domain: "
                                                        f"{exc.message}") from exc
        try:
            await self.call("start", dom.createWithFlags,
                            libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)
        except LibvirtError as exc:
            await self.call("undefine", dom.undefine)
            raise GuestError(self.host.name, self.name, f"did not start: {exc.message}") \
                from exc
        self.pid = await self.read_pid()

    async def read_pid(self) -> int | None:
        """QEMU's PID as libvirt recorded it on the host (None when not running)."""
        r = await self.host.run(f"cat /run/libvirt/qemu/{quote(self.name)}.pid 2>/dev/null")
        return int(r.stdout) if r.ok and r.stdout.strip().isdigit() else None

    async def status(self) -> str:
        """The domain's state in words (``running``, ``paused``, ``shutoff``, ``absent``).

        :raise LibvirtError: the daemon could not be asked.
        """
        dom = await self.domain()
        if dom is None:
            return "absent"
        state, reason = await self.call("state", dom.state)
        return state_name(state, reason)

    async def is_alive(self) -> bool:
        """Whether the domain runs on the host (its QEMU process exists)."""
        dom = await self.domain()
        return dom is not None and bool(await self.call("isActive", dom.isActive))

    async def stop(self) -> None:
        """Destroy and undefine the domain, remove the run directory, close the connection.
        Idempotent. When libvirt does not answer, QEMU is killed through libvirt's pidfile
        and the undefine is tried again.

        :raise LibvirtError: the domain could not be undefined (everything else was done).
        :raise HostError: the host cannot be reached at all.
        """
        self._close_session()
        left: LibvirtError | None = None
        try:
            try:
                await self._destroy_and_undefine()
            except LibvirtError as exc:
                log.warning("%s; killing QEMU by its pidfile", exc)
                await self._kill_by_pidfile()
                try:
                    await self._destroy_and_undefine()
                except LibvirtError as again:
                    # a daemon that cannot be reached holds nothing we could remove now (the
                    # QEMU it started is killed above); one that answers and refuses does
                    if again.unreachable or (self._conn is not None
                                             and not self._conn.is_alive()):
                        log.warning("[host=%s] %s: QEMU killed by pidfile; libvirtd "
                                    "unreachable (%s)", self.host.name, self.name,
                                    again.message)
                    else:
                        left = again
        finally:
            await self.close()
        await self.host.run(f"rm -rf {quote(self.paths.dir)}", check=True)
        self.pid = None
        if left is not None:
            raise left

    async def _destroy_and_undefine(self) -> None:
        dom = await self.domain()
        if dom is not None:
            if await self.call("isActive", dom.isActive):
                await self.call("destroy", dom.destroy)
            await self.call("undefine", dom.undefine)

    async def _kill_by_pidfile(self) -> None:
        """SIGKILL the QEMU libvirt recorded for this VM, identified by its pidfile *and* its
        command line (``-name guest=<vm>,...``), whatever the emulator binary is called."""
        pidfile = quote(f"/run/libvirt/qemu/{self.name}.pid")
        await self.host.run(
            f"p=$(cat {pidfile} 2>/dev/null) && [ -n \"$p\" ] && "
            f"tr '\\0' '\\n' < /proc/$p/cmdline 2>/dev/null "
            f"| grep -qxF -e {quote('guest=' + self.name)} "
            f"-e {quote('guest=' + self.name + ',debug-threads=on')} && kill -KILL $p; "
            "true", check=True)

    async def hardreset(self) -> None:
        """Reset the VM like a power button (``virDomainReset``)."""
        dom = await self.domain()
        await self.call("reset", dom.reset, 0)

    async def adopt(self, other: "LibvirtVM") -> None:
        """Become ``other`` (the same VM, now running on its host): its host, connection
        and console; this object's old connection is closed."""
        await self.close()
        self.host, self.uri, self.paths = other.host, other.uri, other.paths
        self._conn, self._pooled, self.pid = other._conn, other._pooled, other.pid
        other._conn = other.pid = None
        other._pooled = False
        await self._take_session(other)


__all__ = ["DomainInfo", "LibvirtConnection", "LibvirtError", "LibvirtVM", "domain_xml",
           "host_uri", "open_connections", "open_host_connection", "running_domains",
           "state_name"]
