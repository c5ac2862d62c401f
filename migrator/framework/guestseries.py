"""The guest dirtier's own figures during a migration, stamped with the hosts' clocks
(``MigrationResult.dirtier``): what the guest saw, beside what QEMU reports.

When the lab's dirtier runs in the VM (booted with ``lab.dirty=N`` and ``lab.out=ttyS1``:
its ``DIRTY`` lines on the VM's status port), a follower
(:class:`migrator.guest.statusfollow.StatusFollower`) on the source host and one on the
destination read those lines from the moment the migration starts copying (MIRRORING or
MIGRATING: not while it waits for a slot) until it ends. Each sample::

    {"now": 1796099743.013,   # the host's clock when the line reached the file
     "t": 1.05,               # the same on the migration's progress axis (seconds since
                              # 'migrate', from the controller's clock at 'migrate')
     "host": "hostA",         # which copy of the guest printed it
     "guest_t": 12, "pass": 3, "rate_mibs": 80, "stale_pages": 0}

The hosts' clocks and the controller's are taken to agree (one machine in the lab; NTP
elsewhere: a skew shifts ``t``). A gap in the samples where the guest was paused, and the
copy that printed them, show the switchover as the guest lived it; ``stale_pages`` rising
is a lost write. After a completed migration the destination's first line is waited for
(up to :data:`LANDED_WAIT_S`: the dirtier prints once a second). Given ``tails`` (the
scenario's task group), that wait is a task of the group: the migration returns at once, the
scenario goes on, and the record's ``dirtier`` is completed when the line comes (the group,
and so the instance, ends only after it); without it, the migration returns after the wait.
A cancelled or failed migration waits for nothing. ``report.dirtier_series: false`` turns it
off. Whatever goes wrong here is a warning, never the migration's failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import TYPE_CHECKING, AsyncIterator

from ..aio import cancel_and_wait, shielded, wait_for
from ..guest.statusfollow import StatusFollower
from ..migration import BaseMigration, Phase

if TYPE_CHECKING:
    from ..hypervisor.vm import GuestVM
    from .context import RunContext

log = logging.getLogger(__name__)

DIRTY = re.compile(r"DIRTY t=(\d+) pass=(\d+) rate=(\d+)MB/s bad=(\d+)")
#: after a completed migration, how long the destination's first line is waited for (the
#: dirtier prints once a second)
LANDED_WAIT_S = 1.5
#: the phases in which the copy runs: the followers start at the first
COPYING = (Phase.MIRRORING, Phase.MIGRATING, Phase.POSTCOPY)
_DIRTY_ARG = re.compile(r"(?:^|\s)lab\.dirty=(\d+)")
_OUT_ARG = re.compile(r"(?:^|\s)lab\.out=ttyS1(?:\s|$)")


def runs_dirtier(append: str | None) -> bool:
    """Whether a lab guest booted with kernel command line ``append`` runs the dirtier with
    its lines on the status port (``lab.dirty=N``, N > 0, and ``lab.out=ttyS1``)."""
    m = _DIRTY_ARG.search(append or "")
    return bool(m and int(m.group(1)) > 0 and _OUT_ARG.search(append or ""))


def on_axis(samples: list[dict], progress: list[dict]) -> list[dict]:
    """``samples`` in time order, each with ``t`` on the progress axis (None without a
    progress history: the migration never started copying)."""
    offset = progress[0]["now"] - progress[0]["t"] if progress else None
    return [{**s, "t": round(s["now"] - offset, 3) if offset is not None else None}
            for s in sorted(samples, key=lambda s: s["now"])]


class _Series:
    """The followers of one migration and what they collected."""

    def __init__(self, ctx: "RunContext", vm: "GuestVM", mig: BaseMigration, mig_id: str):
        self.ctx, self.vm, self.mig, self.mig_id = ctx, vm, mig, mig_id
        self.samples: list[dict] = []
        self.landed = asyncio.Event()       # a line from the destination's copy came
        self.followers: list[StatusFollower] = []

    def _collect(self, host: str):
        def on_line(now: float, line: str) -> None:
            m = DIRTY.search(line)
            if m:
                self.samples.append({
                    "now": round(now, 3), "host": host, "guest_t": int(m.group(1)),
                    "pass": int(m.group(2)), "rate_mibs": int(m.group(3)),
                    "stale_pages": int(m.group(4))})
                if host == self.mig.dst_host.name:
                    self.landed.set()
        return on_line

    async def follow(self) -> None:
        """Start the followers once the copy starts (not at all if the migration ends
        before). Returns once they run; :meth:`stop` ends them."""
        mig = self.mig
        while mig.phase not in COPYING:
            if mig.phase.is_final or mig.phase is Phase.ROLLING_BACK:
                return
            await mig.wait_changed()
        pairs = ((self.vm.host, self.vm.paths.status_log),
                 (mig.dst_host, mig.dst_vm.paths.status_log))
        # known before they start: stop() ends whatever started, even if this is cancelled
        self.followers = [StatusFollower(h, str(p), self._collect(h.name)) for h, p in pairs]
        started = await asyncio.gather(*(f.start() for f in self.followers),
                                       return_exceptions=True)
        for f, outcome in zip(self.followers, started):
            if isinstance(outcome, Exception):
                self.ctx.warn(f"{self.vm.name}: no dirtier series from {f.host.name}: "
                              f"{outcome}")

    def waits(self, completed: bool) -> bool:
        """Whether :meth:`stop` would wait for the destination's first line."""
        dst = [f for f in self.followers if f.host is self.mig.dst_host]
        return completed and bool(dst) and dst[0].running and not self.landed.is_set()

    async def stop_source(self) -> None:
        """Stop the source's follower: the source's copy is gone, and the next migration
        back may start a new QEMU there whose lines, on the same path, are not this
        migration's. Before the migration returns."""
        await asyncio.gather(*(f.stop() for f in self.followers
                               if f.host is not self.mig.dst_host))

    async def stop(self, completed: bool) -> None:
        """After a completed migration, wait (bounded) for the destination's first line;
        then stop every follower and keep the series in the result and, when the
        migration's record is made already, in the record."""
        try:
            if self.waits(completed):
                with contextlib.suppress(TimeoutError):
                    await wait_for(self.landed.wait(), LANDED_WAIT_S)
        finally:
            await shielded(asyncio.gather(*(f.stop() for f in self.followers)))
            series = self.mig.result.dirtier = on_axis(self.samples, self.mig.result.progress)
            for rec in self.ctx.migrations:
                if rec.mig_id == self.mig_id and rec.vm == self.vm.name:
                    rec.result["dirtier"] = series


@contextlib.asynccontextmanager
async def dirtier_series(ctx: "RunContext", vm: "GuestVM", mig: BaseMigration, mig_id: str,
                         tails: asyncio.TaskGroup | None = None) -> AsyncIterator[None]:
    """Around migration ``mig_id`` of ``vm`` (outside its slot: the wait for the
    destination's first line holds no slot): its dirtier's lines from both hosts, into
    ``mig.result.dirtier`` and the migration's record (see the module's docstring; the
    wait after a completed migration is a task of ``tails`` when given)."""
    if not ctx.config.report.dirtier_series or not runs_dirtier(vm.spec.append):
        yield
        return
    series = _Series(ctx, vm, mig, mig_id)
    starter = asyncio.create_task(series.follow(), name=f"dirtier series {vm.name}")
    completed = False

    async def stop() -> None:
        try:
            await series.stop(completed)
        except Exception as exc:  # noqa: BLE001 - a measurement, never the migration's
            log.exception("dirtier series of %s", vm.name)
            ctx.warn(f"{vm.name}: dirtier series lost: {exc}")

    try:
        yield
        completed = mig.phase is Phase.CLEANED
    finally:
        async def end() -> None:
            try:
                await cancel_and_wait(starter)
            except Exception as exc:  # noqa: BLE001 - as above
                ctx.warn(f"{vm.name}: no dirtier series: {exc}")
            if tails is not None and series.waits(completed):
                try:
                    await series.stop_source()
                except Exception as exc:  # noqa: BLE001 - as above
                    ctx.warn(f"{vm.name}: dirtier series: {exc}")
                try:    # owned by the scenario's group, which ends only after it
                    tails.create_task(stop(), name=f"dirtier series {vm.name} {mig_id}")
                    return
                except RuntimeError:        # the group is ending (the scenario failed)
                    pass
            await stop()
        await shielded(end())


__all__ = ["DIRTY", "LANDED_WAIT_S", "dirtier_series", "on_axis", "runs_dirtier"]
