"""VMs through libvirt (libvirt-python): one libvirtd per host, reached by URI.

::

    vm = LibvirtVM(spec, host, run_dir, config)      # host: an SSHHost (name, address, keys)
    await vm.start()                                 # defineXML + create
    session = await vm.wait_for_login()              # the same serial console as the qemu driver
    await vm.stop()                                  # destroy + undefine; idempotent

* Connections: ``qemu+libssh://user@address:port/system?keyfile=...&known_hosts=...``:
  libvirt's own SSH client with the inventory's key and known_hosts, host keys verified
  (an unknown key is refused); the user's ~/.ssh/config is never touched. With
  ``libvirt.transport: ssh`` the ``ssh`` binary and the user's own configuration are used.
  Keepalives (``libvirt.keepalive_*``) detect a dead daemon or link.
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

import asyncio
import logging
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable
from urllib.parse import quote as urlquote

import libvirt

from ..errors import GuestError, HostError
from ..hosts.ssh import SSHHost, quote
from .vm import GuestVM, VMPaths, VMSpec

log = logging.getLogger(__name__)
# errors are raised as exceptions (and logged where they matter); libvirt's default handler
# would also print every one of them, expected ones included, on stderr
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

#: libvirt calls run here: a migration holds a thread for its whole length, so the default
#: executor (a handful of threads on a small machine) would let job-stats polls and an
#: abortJob queue behind running migrations
_EXECUTOR = ThreadPoolExecutor(max_workers=64, thread_name_prefix="libvirt")
_proxy: "_LoopProxy | None" = None


class LibvirtError(HostError):
    """A libvirt call failed or did not answer in time. ``code`` is libvirt's error code
    (None for a timeout)."""

    def __init__(self, host: str, message: str, code: int | None = None,
                 unreachable: bool = False):
        super().__init__(host, message)
        self.code = code
        #: libvirtd could not be reached at all (as opposed to answering with an error)
        self.unreachable = unreachable


def ensure_event_loop() -> None:
    """Dispatch libvirt's events (and keepalives) on the running asyncio loop, through
    ``libvirtaio``: registered once per process, before the first connection is opened; a
    later loop (a new ``asyncio.run``) takes over from the previous one."""
    global _proxy
    loop = asyncio.get_running_loop()
    if _proxy is None:
        import libvirtaio
        _proxy = _LoopProxy(loop)
        libvirtaio.virEventAsyncIOImpl(loop=_proxy).register()
    else:
        _proxy.loop = loop


class _LoopProxy:
    """The asyncio loop as libvirtaio sees it.

    libvirt adds and removes its handles and timers from whichever thread runs libvirt code,
    here the executor threads of blocking calls, and libvirtaio passes those straight to the
    loop, whose methods are not thread-safe. Through this proxy every such call is queued to
    the loop's thread with ``call_soon_threadsafe``, in the order made, and never waited for
    (a worker thread waiting for the loop while holding a libvirt lock could deadlock with a
    libvirt callback running on the loop). Once the loop is closed (process exit) the calls
    are dropped instead of raising "Event loop is closed" from libvirt's threads.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def _queue(self, fn: Callable[..., Any], *args: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:                  # the loop is closed
            return False

    def add_reader(self, fd: int, cb, *args) -> None:
        self._queue(self.loop.add_reader, fd, cb, *args)

    def remove_reader(self, fd: int) -> None:
        self._queue(self.loop.remove_reader, fd)

    def add_writer(self, fd: int, cb, *args) -> None:
        self._queue(self.loop.add_writer, fd, cb, *args)

    def remove_writer(self, fd: int) -> None:
        self._queue(self.loop.remove_writer, fd)

    def create_task(self, coro, **_kw) -> "_QueuedTask":
        task = _QueuedTask(self.loop, coro)
        if not self._queue(task.start):
            coro.close()
        return task

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loop, name)


class _QueuedTask:
    """A task created on the loop's thread later; ``cancel()`` is queued behind its start."""

    def __init__(self, loop: asyncio.AbstractEventLoop, coro):
        self._loop, self._coro = loop, coro
        self._task: asyncio.Task | None = None
        self._cancelled = False

    def start(self) -> None:
        if self._cancelled:
            self._coro.close()
        else:
            self._task = self._loop.create_task(self._coro)

    def cancel(self, msg: Any = None) -> bool:
        self._cancelled = True
        try:
            self._loop.call_soon_threadsafe(self._cancel_now)
        except RuntimeError:
            pass
        return True

    def _cancel_now(self) -> None:
        if self._task is not None:
            self._task.cancel()


def host_uri(host: SSHHost, transport: str = "libssh") -> str:
    """The libvirt URI of ``host``'s system daemon, with the host's SSH key and known_hosts."""
    netloc = f"{urlquote(host.user)}@{host.address}:{host.port}"
    if transport == "ssh":
        query = f"?keyfile={urlquote(host.client_keys[0])}" if host.client_keys else ""
        return f"qemu+ssh://{netloc}/system{query}"
    params = []
    if host.known_hosts:
        params.append(f"known_hosts={urlquote(host.known_hosts)}")
    if host.client_keys:
        params += [f"keyfile={urlquote(host.client_keys[0])}", "sshauth=privkey"]
    return f"qemu+libssh://{netloc}/system" + ("?" + "&".join(params) if params else "")


async def call(host: str, what: str, fn: Callable[..., Any], *args: Any,
               timeout: float) -> Any:
    """Run the blocking libvirt call ``fn(*args)`` off the event loop, at most ``timeout``.

    :raise LibvirtError: libvirt's error (code kept) or no answer within ``timeout``.
    """
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(
            loop.run_in_executor(_EXECUTOR, partial(fn, *args)), timeout)
    except libvirt.libvirtError as exc:
        raise LibvirtError(host, f"{what}: {exc.get_error_message() or exc}",
                           exc.get_error_code()) from exc
    except TimeoutError:
        raise LibvirtError(host, f"{what}: no answer from libvirt within {timeout:g} s "
                                 "(daemon hung or link lost?)") from None


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
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    if spec.kernel:
        ET.SubElement(os_, "kernel").text = spec.kernel
        if spec.initrd:
            ET.SubElement(os_, "initrd").text = spec.initrd
        ET.SubElement(os_, "cmdline").text = spec.append
    else:
        ET.SubElement(os_, "boot", dev="hd")
    if spec.accel == "tcg":
        cpu = ET.SubElement(dom, "cpu", mode="custom", match="exact", check="none")
        ET.SubElement(cpu, "model", fallback="forbid").text = "qemu64"
    else:
        ET.SubElement(dom, "cpu", mode="host-passthrough")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    if spec.qemu.startswith("/"):
        ET.SubElement(devices, "emulator").text = spec.qemu
    if spec.disk:
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2", cache="none")
        ET.SubElement(disk, "source", file=spec.disk)
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
    if spec.mac:
        nic = ET.SubElement(devices, "interface", type="user")
        ET.SubElement(nic, "mac", address=spec.mac)
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


class LibvirtVM(GuestVM):
    """One VM as a libvirt domain on one host. See the module docstring."""

    def __init__(self, spec: VMSpec, host: SSHHost, run_dir: str, config=None):
        super().__init__(spec, host, run_dir, config)
        self.uri = host_uri(host, self.config.libvirt.transport)
        self.pid: int | None = None
        self._conn: libvirt.virConnect | None = None
        self._dom: libvirt.virDomain | None = None

    def __repr__(self) -> str:
        return f"<LibvirtVM {self.name} on {self.host.name} pid={self.pid}>"

    async def call(self, what: str, fn: Callable[..., Any], *args: Any,
                   timeout: float | None = None) -> Any:
        """:func:`call` for this VM: errors name its host and the VM."""
        return await call(self.host.name, f"{self.name}: {what}", fn, *args,
                          timeout=timeout or self.config.timeouts.libvirt_call_s)

    async def conn(self) -> libvirt.virConnect:
        """The connection to this host's libvirtd (opened on first use).

        :raise LibvirtError: unreachable host or daemon, refused host key or login.
        """
        if self._conn is not None and not self._conn.isAlive():   # local check, no RPC
            self._conn, self._dom = None, None            # dead (daemon or link gone): reopen
        if self._conn is None:
            ensure_event_loop()
            settings = self.config.libvirt
            try:
                conn = await call(self.host.name, f"connect {self.uri.split('?')[0]}",
                                  libvirt.open, self.uri,
                                  timeout=self.config.timeouts.ssh_connect_s
                                  + self.config.timeouts.libvirt_call_s)
            except LibvirtError as exc:
                exc.unreachable = True
                raise
            try:
                conn.setKeepAlive(settings.keepalive_interval_s, settings.keepalive_count)
            except libvirt.libvirtError as exc:
                log.warning("[host=%s] libvirt keepalive not set: %s", self.host.name, exc)
            self._conn = conn
        return self._conn

    async def close(self) -> None:
        """Close the connection (the domain is left as it is)."""
        conn, self._conn, self._dom = self._conn, None, None
        if conn is not None:
            try:
                await call(self.host.name, "close", conn.close,
                           timeout=self.config.timeouts.libvirt_call_s)
            except LibvirtError as exc:
                log.warning("%s", exc)

    async def domain(self) -> libvirt.virDomain | None:
        """The domain on this host, or None when it is not there."""
        conn = await self.conn()
        try:
            self._dom = await self.call("lookup", conn.lookupByName, self.name)
        except LibvirtError as exc:
            if exc.code != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            self._dom = None
        return self._dom

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
        self._dom = dom
        self.pid = await self.read_pid()

    async def read_pid(self) -> int | None:
        """QEMU's PID as libvirt recorded it on the host (None when not running)."""
        r = await self.host.run(f"cat /run/libvirt/qemu/{quote(self.name)}.pid 2>/dev/null")
        return int(r.stdout) if r.ok and r.stdout.strip().isdigit() else None

    async def status(self) -> str:
        """The domain's state in words (``running``, ``paused``, ``shutoff``, ``absent``)."""
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
                                         and not self._conn.isAlive()):
                    log.warning("[host=%s] %s: QEMU killed by pidfile; libvirtd unreachable "
                                "(%s)", self.host.name, self.name, again.message)
                else:
                    left = again
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
            self._dom = None

    async def _kill_by_pidfile(self) -> None:
        pidfile = quote(f"/run/libvirt/qemu/{self.name}.pid")
        await self.host.run(
            f"p=$(cat {pidfile} 2>/dev/null) && [ -n \"$p\" ] && "
            f"[ \"$(cat /proc/$p/comm 2>/dev/null)\" = qemu-system-x86 ] && kill -KILL $p; "
            "true", check=True)

    async def hardreset(self) -> None:
        """Reset the VM like a power button (``virDomainReset``)."""
        dom = await self.domain()
        await self.call("reset", dom.reset, 0)

    async def adopt(self, other: "LibvirtVM") -> None:
        """Become ``other`` (the same VM, now running on its host): its host, connection,
        domain and console; this object's old connection is closed."""
        await self.close()
        self.host, self.uri, self.paths = other.host, other.uri, other.paths
        self._conn, self._dom, self.pid = other._conn, other._dom, other.pid
        other._conn = other._dom = other.pid = None
        await self._take_session(other)
