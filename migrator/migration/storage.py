"""Disks that migrate with their VM, for hosts without shared storage
(``migration.storage: copy-all | copy-incremental``).

The destination's disk is made here, on the destination host, at the same path as the
source's (each host's own storage: the inventory's ``local_dir``) before anything else of the
migration starts: the same format and virtual size; for ``copy-incremental`` an overlay over
the same backing image, which must already be on the destination (its format and virtual size
are compared). A file already there is never overwritten. Neither QEMU nor libvirt makes it:
libvirt pre-creates a disk only inside one of its storage pools, never for incremental.

The qemu driver copies the disk as libvirt does (:class:`NbdMirror`), with QEMU's NBD server
and a mirror job:

1. destination: ``nbd-server-start`` on the migration address, port 0 (TLS credentials when
   the migration uses TLS), and ``block-export-add`` of its disk's node, writable. QEMU binds
   the port itself (the kernel chooses it) and reports none; the driver reads the port QEMU's
   listening socket holds (``ss`` on the destination, by QEMU's PID). Nothing probes for a
   free port that another process could take before QEMU binds it. (Passing QEMU a socket
   the driver made needs SCM_RIGHTS on the QMP socket, which the controller reaches through
   SSH forwarding only.)
2. source: ``blockdev-add`` of an NBD client node for that export, ``blockdev-mirror`` to it
   (``sync`` full or top; ``speed`` the migration's bandwidth cap), waited for until READY
   (phase MIRRORING). The guest keeps running and writing; the mirror keeps copying its
   writes.
3. the memory migration runs with ``pause-before-switchover``: at ``pre-switchover`` the
   guest is stopped, ``block-job-cancel`` ends the ready mirror with a point-in-time copy (no
   pivot: the source keeps its own disk), the NBD node is removed, ``migrate-continue``.
4. the destination's ``nbd-server-stop`` once the migration completed.

Failure at any step (the engine's rollback): the mirror is cancelled (``force``), its node
removed, the destination QEMU stopped (its export with it) and the destination's disk removed;
the source never stopped using its own disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from qemu.qmp import QMPClient, QMPError

from ..hosts.ssh import SSHHost, quote

log = logging.getLogger(__name__)

#: names of what the qemu driver adds to the QEMUs (one disk per VM)
EXPORT = "migrator-disk0"
NBD_NODE = "migrator-nbd-disk0"
MIRROR_JOB = "migrator-mirror-disk0"
_EXISTS = 90        # exit status of the creation command: a file is already there


@dataclass(frozen=True)
class DiskImage:
    """What ``qemu-img info`` says of an image."""

    path: str
    format: str
    virtual_size: int
    backing: str | None = None           #: the backing file, absolute
    backing_format: str | None = None

    @classmethod
    def from_info(cls, path: str, info: dict) -> "DiskImage":
        return cls(path, info.get("format", "raw"), int(info["virtual-size"]),
                   info.get("full-backing-filename") or info.get("backing-filename"),
                   info.get("backing-filename-format"))

    @property
    def mib(self) -> int:
        return max(1, self.virtual_size >> 20)


async def image_info(host: SSHHost, path: str, timeout: float) -> DiskImage | None:
    """``qemu-img info`` of ``path`` on ``host`` (``-U``: the image may be open by a running
    QEMU; only its header is read), or None when there is no such file.

    :raise ValueError: qemu-img cannot read it."""
    r = await host.run(f"test -e {quote(path)} || exit {_EXISTS}; "
                       f"qemu-img info -U --output=json {quote(path)}", timeout=timeout)
    if r.exit_status == _EXISTS:
        return None
    if not r.ok:
        raise ValueError(f"qemu-img info {path} on {host.name}: {r.stderr.strip() or r}")
    return DiskImage.from_info(path, json.loads(r.stdout))


async def make_destination_disk(src: SSHHost, dst: SSHHost, path: str, mode: str,
                                timeout: float, before_create=None) -> DiskImage:
    """Create the destination's disk for a ``mode`` copy (``copy-all``, ``copy-incremental``)
    of the source's disk ``path``, at the same path on ``dst``; return the source's image.
    ``before_create()`` is called once everything is checked, right before the file is made
    (the run's journal records it there: what ``recover`` may remove is only ever a file
    this made).

    :raise ValueError: the message of what prevents it (the caller names VM and phase): no
        disk on the source, a file already at ``path`` on ``dst``, no backing image for an
        incremental copy or a different one on ``dst``, qemu-img failed.
    """
    disk = await image_info(src, path, timeout)
    if disk is None:
        raise ValueError(f"the VM's disk {path} is not on {src.name}")
    backing = ""
    if mode == "copy-incremental":
        if not disk.backing:
            raise ValueError(f"it copies the disk's top overlay only, but {path} "
                             "has no backing image: use copy-all")
        theirs = await image_info(dst, disk.backing, timeout)
        if theirs is None:
            raise ValueError(f"the disk's backing image {disk.backing} is not "
                             f"on {dst.name} (copy it there first, or use copy-all)")
        ours = await image_info(src, disk.backing, timeout)
        if ours is not None and (theirs.format, theirs.virtual_size) != (ours.format,
                                                                         ours.virtual_size):
            raise ValueError(f"the backing image {disk.backing} differs on "
                             f"{dst.name} ({theirs.format}, {theirs.virtual_size} bytes) from "
                             f"{src.name}'s ({ours.format}, {ours.virtual_size} bytes)")
        backing = (f"-F {quote(disk.backing_format or (ours.format if ours else 'qcow2'))} "
                   f"-b {quote(disk.backing)} ")
    if (await dst.run(f"test -e {quote(path)}", timeout=timeout)).ok:
        raise ValueError(f"a file is already at {path} on {dst.name}: not overwritten (remove "
                         f"it, or use storage: shared if both hosts see the same file)")
    if before_create is not None:
        before_create()
    parent = path.rsplit("/", 1)[0] or "/"
    r = await dst.run(f"test -e {quote(path)} && exit {_EXISTS}; mkdir -p {quote(parent)} && "
                      f"qemu-img create -q -f {quote(disk.format)} {backing}{quote(path)} "
                      f"{disk.virtual_size}", timeout=timeout)
    if r.exit_status == _EXISTS:
        raise ValueError(f"a file appeared at {path} on {dst.name} meanwhile: not overwritten")
    if not r.ok:
        raise ValueError(f"cannot create the destination disk {path} on {dst.name}: "
                         f"{r.stderr.strip() or r}")
    return disk


async def remove_disk(host: SSHHost, path: str, timeout: float) -> str:
    """Remove ``path`` on ``host``; say what was done (never raises)."""
    try:
        r = await host.run(f"rm -f {quote(path)}", timeout=timeout)
        if r.ok:
            return f"disk {path} removed from {host.name}"
        return f"DISK {path} NOT REMOVED from {host.name} ({r.stderr.strip()})"
    except Exception as exc:  # noqa: BLE001 - reported
        return f"DISK {path} NOT REMOVED from {host.name} ({exc})"


async def listening_ports(host: SSHHost, address: str, pid: int, timeout: float) -> list[int]:
    """The TCP ports process ``pid`` listens on at ``address`` on ``host`` (``ss``: QEMU's
    own report would need its main thread).

    :raise RuntimeError: the host could not be asked.
    """
    r = await host.run(f"ss -Hltnp src {quote(address)}", timeout=timeout)
    if not r.ok:
        raise RuntimeError(f"cannot list the listening sockets on {host.name}: "
                           f"{r.stderr.strip() or r}")
    ports = []
    for line in r.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and f"pid={pid}," in line:
            ports.append(int(fields[3].rsplit(":", 1)[1]))
    return ports


async def _node_of(qmp: QMPClient, device: str) -> str:
    """The top block node of the ``-drive`` ``device`` (block-export-add takes node names)."""
    for dev in await qmp.execute("query-block"):
        if dev.get("device") == device and dev.get("inserted"):
            return dev["inserted"]["node-name"]
    raise RuntimeError(f"QEMU has no disk {device!r}")


class NbdMirror:
    """The qemu driver's disk copy of one VM (see the module docstring).

    ::

        mirror = NbdMirror(src_qmp, dst_qmp, mode, address)
        port = await mirror.export(dst_host, dst_pid, tls=..., timeout=...)
        await mirror.start(port, speed=..., tls=..., tls_hostname=...)
        await mirror.wait_ready(stall_s, interval_s, check)    # MIRRORING
        ... at pre-switchover: await mirror.complete(timeout)
        await mirror.stop_export()
        failure: await mirror.abort(timeout, interval_s)       # what was done, never raises
    """

    def __init__(self, src: QMPClient, dst: QMPClient, mode: str, address: str,
                 device: str = "disk0"):
        self.src, self.dst, self.mode, self.address = src, dst, mode, address
        self.device = device
        self.exported = False
        self.completed = False
        self.ready_at: float | None = None      #: monotonic time the job became READY
        self.offset = 0                         #: bytes the job copied so far
        self.length = 0                         #: bytes it has to copy in all (grows)

    async def export(self, host: SSHHost, pid: int, *, tls: str | None, timeout: float) -> int:
        """The destination's NBD server on the migration address and the writable export of
        its disk; return its port.

        :raise RuntimeError, QMPError: QEMU refused, or no listening port was found.
        """
        addr = {"type": "inet", "data": {"host": self.address, "port": "0"}}
        await self.dst.execute("nbd-server-start", {"addr": addr, **(
            {"tls-creds": tls} if tls else {})})
        self.exported = True
        await self.dst.execute("block-export-add", {
            "type": "nbd", "id": EXPORT, "node-name": await _node_of(self.dst, self.device),
            "writable": True, "name": EXPORT})
        ports = await listening_ports(host, self.address, pid, timeout)
        if len(ports) != 1:
            raise RuntimeError(f"the destination QEMU listens on {len(ports)} ports at "
                               f"{self.address} after nbd-server-start, not 1: {ports}")
        return ports[0]

    async def start(self, port: int, *, speed: int, tls: str | None,
                    tls_hostname: str | None) -> None:
        """The source's NBD client node and the mirror job (running once this returns).

        :raise QMPError: QEMU refused (e.g. it cannot connect to the export)."""
        node = {"driver": "nbd", "node-name": NBD_NODE, "export": EXPORT,
                "server": {"type": "inet", "host": self.address, "port": str(port)}}
        if tls:
            node["tls-creds"] = tls
            if tls_hostname:
                node["tls-hostname"] = tls_hostname
        await self.src.execute("blockdev-add", node)
        await self.src.execute("blockdev-mirror", {
            "job-id": MIRROR_JOB, "device": await _node_of(self.src, self.device),
            "target": NBD_NODE, "sync": "full" if self.mode == "copy-all" else "top",
            "speed": speed, "auto-dismiss": True})

    async def job(self) -> dict | None:
        """The mirror job as ``query-block-jobs`` reports it (None: no such job)."""
        for job in await self.src.execute("query-block-jobs"):
            if job.get("device") == MIRROR_JOB:
                self.offset, self.length = job.get("offset", 0), job.get("len", 0)
                return job
        return None

    async def wait_ready(self, stall_s: float, interval_s: float, check=None) -> None:
        """Until the job is READY (source and destination in sync; the job goes on copying
        the guest's writes). ``check()`` is called at every poll (it raises to stop).

        :raise RuntimeError: the job ended, failed, or copied nothing for ``stall_s``.
        """
        moved, moved_at = -1, time.monotonic()
        while True:
            if check is not None:
                check()
            job = await self.job()
            if job is None:
                raise RuntimeError("the disk mirror job ended before it was ready")
            if job.get("error"):
                raise RuntimeError(f"the disk mirror failed: {job['error']}")
            if job.get("ready"):
                self.ready_at = time.monotonic()
                return
            if self.offset != moved:
                moved, moved_at = self.offset, time.monotonic()
            elif time.monotonic() - moved_at >= stall_s:
                raise RuntimeError(f"the disk mirror copied nothing for {stall_s:g} s at "
                                   f"{self.offset} of {self.length} bytes (link blocked or "
                                   "destination hung?)")
            await asyncio.sleep(interval_s)

    async def complete(self, timeout: float) -> None:
        """The guest is stopped (pre-switchover): end the ready job with a point-in-time copy
        (``block-job-cancel`` of a ready mirror: it copies what is left, then ends without
        pivoting), then remove the NBD node.

        :raise RuntimeError: the job failed or did not end within ``timeout``.
        """
        with self.src.listener(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
                                "BLOCK_JOB_ERROR")) as ends:
            await self.src.execute("block-job-cancel", {"device": MIRROR_JOB})
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        event = await ends.get()
                        if event["data"].get("device") != MIRROR_JOB:
                            continue
                        if event["event"] != "BLOCK_JOB_COMPLETED" or event["data"].get("error"):
                            raise RuntimeError(f"the disk mirror ended with {event['event']}: "
                                               f"{event['data'].get('error', 'no copy')}")
                        self.offset = event["data"].get("offset", self.offset)
                        break
            except TimeoutError:
                raise RuntimeError(f"the disk mirror did not finish within {timeout:g} s of "
                                   "the guest's stop") from None
        self.completed = True
        await self.src.execute("blockdev-del", {"node-name": NBD_NODE})

    async def stop_export(self) -> None:
        """The destination's NBD server stopped (its export with it). :raise QMPError."""
        if self.exported:
            await self.dst.execute("nbd-server-stop")
            self.exported = False

    async def abort(self, timeout: float, interval_s: float) -> list[str]:
        """Undo the source's side: the job cancelled (``force``: a ready job is not finished
        first) and its node removed, as QEMU reports them (:func:`undo_in_qemu`). Return what
        was done; never raises. The destination's export ends with its QEMU."""
        try:
            return await undo_in_qemu(self.src, timeout, interval_s)
        except (Exception, TimeoutError) as exc:  # noqa: BLE001 - reported
            return [f"DISK MIRROR NOT UNDONE on the source ({type(exc).__name__}: {exc})"]


async def undo_in_qemu(qmp: QMPClient, timeout: float, interval_s: float) -> list[str]:
    """What a disk copy left in a QEMU whose controller died (``recover``): the mirror job
    (cancelled, ``force``), its NBD client node, an NBD server still exporting. Return what
    was done.

    :raise QMPError, TimeoutError: QEMU refused, or the job did not end within ``timeout``.
    """
    done = []
    async with asyncio.timeout(timeout):
        if any(j.get("device") == MIRROR_JOB for j in await qmp.execute("query-block-jobs")):
            try:
                await qmp.execute("block-job-cancel", {"device": MIRROR_JOB, "force": True})
            except QMPError as exc:         # it ended meanwhile
                log.info("block-job-cancel: %s", exc)
            while any(j.get("device") == MIRROR_JOB
                      for j in await qmp.execute("query-block-jobs")):
                await asyncio.sleep(interval_s)
            done.append("disk mirror cancelled")
        nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
        if any(n.get("node-name") == NBD_NODE for n in nodes):
            await qmp.execute("blockdev-del", {"node-name": NBD_NODE})
            done.append("disk mirror's NBD node removed")
        if any(e.get("id") == EXPORT for e in await qmp.execute("query-block-exports")):
            await qmp.execute("nbd-server-stop")
            done.append("NBD export stopped")
    return done


__all__ = ["DiskImage", "EXPORT", "MIRROR_JOB", "NBD_NODE", "NbdMirror", "image_info",
           "listening_ports", "make_destination_disk", "remove_disk", "undo_in_qemu"]
