"""A migration's CPU on the hosts: what each side's QEMU spent outside its vCPU threads while
the migration ran (``MigrationResult.qemu_cpu``, ``migration_cpu_s``), the figure a sweep
compares per setting (multifd channels, xbzrle, compression cost CPU here, not in the
controller). See :mod:`migrator.hypervisor.qemu_cpu` for what is read and how.

When each side is read:

- source: at the migration's start and at its end. The qemu driver reads each QEMU during
  the preparation, alongside its next step (the source while the destination starts, the
  destination while it is configured): off the transfer's path; again after the slot if
  the migration was queued for one; and the paused source after completion, exactly.
  Under libvirt (the start read alike) the source QEMU is killed inside
  ``migrate3`` (Confirm), so a :class:`CpuSampler` follows it and its last snapshot (at
  most ``timeouts.progress_interval_s`` before it went) is the end;
- destination: the qemu driver's from the migration's start, libvirt's from its launch
  (libvirt starts it inside ``migrate3``: its start-up, libvirt's CPU checks over QMP
  included, is the migration's).

A side that could not be read leaves its figure None and the sum None (logged): the
migration itself is never failed by its measurement.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, TypeVar

from ..aio import cancel_and_wait
from ..errors import HostError
from ..hypervisor.qemu_cpu import QemuCpu, read_qemu_cpu

log = logging.getLogger(__name__)
T, S = TypeVar("T"), TypeVar("S")


async def read_side(vm, vcpu_tids: tuple[int, ...] | None = None) -> QemuCpu | None:
    """``vm``'s QEMU CPU now (its ``pid`` on its ``host``), or None (no pid, host lost)."""
    if not getattr(vm, "pid", None):
        return None
    try:
        return await read_qemu_cpu(vm.host, vm.pid, vcpu_tids)
    except HostError as exc:
        log.info("[vm=%s host=%s] QEMU's CPU not read: %s", vm.name, vm.host.name, exc)
        return None


async def vcpu_threads(qmp) -> tuple[int, ...] | None:
    """The vCPU thread ids of a QEMU, from QMP's ``query-cpus-fast`` (None: not answered)."""
    try:
        return tuple(int(c["thread-id"]) for c in await qmp.execute("query-cpus-fast"))
    except Exception as exc:  # noqa: BLE001 - a figure's absence, never the migration's end
        log.info("query-cpus-fast: %s", exc)
        return None


async def alongside(main: Awaitable[T], side: Awaitable[S]) -> tuple[T, S]:
    """``main``'s result and ``side``'s, run at once: a reading taken while the migration's
    own step goes on. ``side`` must not raise; if ``main`` does, ``side`` is cancelled and
    waited for before the error goes on."""
    task = asyncio.ensure_future(side)
    try:
        result = await main
    except BaseException:
        await cancel_and_wait(task)
        raise
    return result, await task


def spent(start: QemuCpu | None, end: QemuCpu | None,
          since_launch: bool = False) -> float | None:
    """Seconds outside the vCPUs between two snapshots, or with ``since_launch`` up to
    ``end`` (None: a snapshot is missing)."""
    if end is None or (start is None and not since_launch):
        return None
    return round(end.outside_vcpus_s - (start.outside_vcpus_s if start else 0.0), 3)


def record(result, src_s: float | None, dst_s: float | None, dst_since: str) -> None:
    """Set ``result.qemu_cpu`` (``src_s``, ``dst_s``, ``dst_since``: "migration" or
    "launch") and ``result.migration_cpu_s`` (their sum; None if a side is missing)."""
    result.qemu_cpu = {"src_s": src_s, "dst_s": dst_s, "dst_since": dst_since}
    result.migration_cpu_s = (round(src_s + dst_s, 3)
                              if src_s is not None and dst_s is not None else None)


__all__ = ["alongside", "read_side", "record", "spent", "vcpu_threads"]
