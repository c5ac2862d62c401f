"""The lab dirtier in a migrating guest: its own check of the guest's memory after every
completed migration (an oracle: stale pages fail the migration), and its figures during the
migration, stamped with the hosts' clocks (``MigrationResult.dirtier``).

The lab's dirtier (booted with ``lab.dirty=N`` and ``lab.out=ttyS1``) writes a pass counter
into every page of N MiB and, before each write, checks that the page still holds the
previous pass: a write that a migration did not carry over is a *stale page*, counted in its
``DIRTY`` lines (``bad=``, cumulative) and named in ``STALE`` lines. A follower
(:class:`migrator.guest.statusfollow.StatusFollower`) on the source host and one on the
destination read those lines from the VM's status port from the moment the migration starts
copying (MIRRORING or MIGRATING: not while it waits for a slot) until it ends.

**The check** (``checks.dirtier``, on by default). After a completed migration the
destination's lines are followed until the guest has checked every page there: two passes
past its first line on the destination (the pass in progress when it resumed, then a whole
one). The count of stale pages then, less the most the source reported during the migration
(an earlier hop's, reported then), must be 0, and the dirtier must be the same one going
on: its clock and pass count never go back (a dirtier that started over is a guest that
rebooted — the lost pages crashed its kernel: QEMU 7.2 does that too — or a dirtier that
died). Stale pages, a restart, or no such pass within ``checks.dirtier_wait_s`` plus two
passes at the dirtier's ``lab.rate``, fail the migration (:class:`MigrationError`, phase
VERIFIED, naming the destination): its record says ``failed``, with ``dirtier_check``::

    {"host": "hostB", "checked": true, "pass": 7, "stale_pages": 0, "new_stale_pages": 0,
     "after_s": 2.1, "stale": ["STALE page=12 has=3 want=4"], "restarted": false}

The QEMU migration itself completed (the VM runs on the destination); what failed is the
guest's memory. The migration returns after the check (outside its slot): the guest must
stay on the destination until it has checked every page there, so the scenario cannot move
it on before (a check that followed it further could not tell which hop lost a page). That
costs two passes of the dirtier per migration (``lab.dirty`` / ``lab.rate`` seconds each).

**The series** (``report.dirtier_series``, on by default). Each sample::

    {"now": 1796099743.013,   # the host's clock when the line reached the file
     "t": 1.05,               # the same on the migration's progress axis (seconds since
                              # 'migrate', from the controller's clock at 'migrate')
     "host": "hostA",         # which copy of the guest printed it
     "guest_t": 12.25, "pass": 3, "rate_mibs": 80, "stale_pages": 0}

The hosts' clocks and the controller's are taken to agree (one machine in the lab; NTP
elsewhere: a skew shifts ``t``). A gap in the samples where the guest was paused, and the
copy that printed them, show the switchover as the guest lived it. With the check off, the
destination's first line is waited for (up to :data:`LANDED_WAIT_S`): given ``tails`` (the
scenario's task group), by a task of the group, while the scenario goes on (the record is
completed when the line comes; the group, and so the instance, ends after it).
A cancelled or failed migration waits for nothing and checks nothing. What goes wrong in
following (a follower that cannot start) is a warning, never the migration's failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import TYPE_CHECKING, AsyncIterator

from ..aio import cancel_and_wait, shielded
from ..errors import MigrationError
from ..guest.statusfollow import StatusFollower
from ..migration import BaseMigration, Phase
from ..migration.oracles import DIRTY

if TYPE_CHECKING:
    from ..hypervisor.vm import GuestVM
    from .context import RunContext

log = logging.getLogger(__name__)

STALE = re.compile(r"STALE page=\d+ has=\d+ want=\d+")
#: with the check off, how long the destination's first line is waited for after a
#: completed migration (the dirtier prints four times a second)
LANDED_WAIT_S = 1.0
#: the phases in which the copy runs: the followers start at the first
COPYING = (Phase.MIRRORING, Phase.MIGRATING, Phase.POSTCOPY)
_DIRTY_ARG = re.compile(r"(?:^|\s)lab\.dirty=(\d+)")
_RATE_ARG = re.compile(r"(?:^|\s)lab\.rate=(\d+)")
_OUT_ARG = re.compile(r"(?:^|\s)lab\.out=ttyS1(?:\s|$)")


def runs_dirtier(append: str | None) -> bool:
    """Whether a lab guest booted with kernel command line ``append`` runs the dirtier with
    its lines on the status port (``lab.dirty=N``, N > 0, and ``lab.out=ttyS1``)."""
    m = _DIRTY_ARG.search(append or "")
    return bool(m and int(m.group(1)) > 0 and _OUT_ARG.search(append or ""))


def pass_s(append: str | None) -> float:
    """How long one pass of the dirtier takes at its ``lab.rate`` (0: unpaced, as fast as
    the vCPU goes: counted as 0)."""
    size, rate = _DIRTY_ARG.search(append or ""), _RATE_ARG.search(append or "")
    return int(size.group(1)) / int(rate.group(1)) if size and rate and int(rate.group(1)) \
        else 0.0


def on_axis(samples: list[dict], progress: list[dict]) -> list[dict]:
    """``samples`` in time order, each with ``t`` on the progress axis (None without a
    progress history: the migration never started copying)."""
    offset = progress[0]["now"] - progress[0]["t"] if progress else None
    return [{**s, "t": round(s["now"] - offset, 3) if offset is not None else None}
            for s in sorted(samples, key=lambda s: s["now"])]


class _Watch:
    """The followers of one migration and what they collected."""

    def __init__(self, ctx: "RunContext", vm: "GuestVM", mig: BaseMigration, mig_id: str):
        self.ctx, self.vm, self.mig, self.mig_id = ctx, vm, mig, mig_id
        self.samples: list[dict] = []
        self.stale: list[str] = []          # the guest's STALE lines (the first few)
        self.seen = asyncio.Event()         # a line of the destination's copy came
        self.followers: list[StatusFollower] = []
        self.ended_at: float | None = None  # loop time of the completed migration's end

    def _collect(self, host: str):
        def on_line(now: float, line: str) -> None:
            if m := DIRTY.search(line):
                self.samples.append({
                    "now": round(now, 3), "host": host, "guest_t": float(m.group(1)),
                    "pass": int(m.group(2)), "rate_mibs": int(m.group(3)),
                    "stale_pages": int(m.group(4))})
                if host == self.mig.dst_host.name:
                    self.seen.set()
            elif (m := STALE.search(line)) and len(self.stale) < 5:
                self.stale.append(f"{host}: {m.group(0)}")
        return on_line

    def _mine(self, host: str) -> list[dict]:
        return [s for s in self.samples if s["host"] == host]

    async def follow(self) -> None:
        """Start the followers once the copy starts (not at all if the migration ends
        before). Returns once they run; :meth:`finish` ends them."""
        mig = self.mig
        while mig.phase not in COPYING:
            if mig.phase.is_final or mig.phase is Phase.ROLLING_BACK:
                return
            await mig.wait_changed()
        pairs = ((self.vm.host, self.vm.paths.status_log),
                 (mig.dst_host, mig.dst_vm.paths.status_log))
        # known before they start: finish() ends whatever started, even if this is cancelled
        self.followers = [StatusFollower(h, str(p), self._collect(h.name)) for h, p in pairs]
        started = await asyncio.gather(*(f.start() for f in self.followers),
                                       return_exceptions=True)
        for f, outcome in zip(self.followers, started):
            if isinstance(outcome, Exception):
                self.ctx.warn(f"{self.vm.name}: the dirtier cannot be followed on "
                              f"{f.host.name}: {outcome}")

    def dst_following(self) -> bool:
        dst = [f for f in self.followers if f.host is self.mig.dst_host]
        return bool(dst) and dst[0].running

    async def stop_source(self) -> None:
        """Stop the source's follower: the source's copy is gone, and the next migration
        back may start a new QEMU there whose lines, on the same path, are not this
        migration's. Before the migration returns."""
        await asyncio.gather(*(f.stop() for f in self.followers
                               if f.host is not self.mig.dst_host))

    def checked_pass(self) -> dict | None:
        """The destination's first sample that shows every page checked there: two passes
        past its first sample."""
        dst = self._mine(self.mig.dst_host.name)
        return next((s for s in dst if s["pass"] >= dst[0]["pass"] + 2), None) if dst \
            else None

    async def _wait(self, done, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while True:
                    self.seen.clear()         # before the test: a line after it wakes us
                    if done():
                        return
                    await self.seen.wait()

    async def finish(self, completed: bool, check: bool, keep_series: bool) -> None:
        """After a completed migration, wait (bounded) for what the check needs (or, for
        the series alone, the destination's first line); stop every follower; keep the
        series and the check in the result and, when the migration's record is made
        already, in the record.

        :raise MigrationError: the check failed (the result and record say so first).
        """
        following = completed and self.dst_following()
        if check and completed and not following:
            self.ctx.warn(f"{self.vm.name} {self.mig.result.src}->{self.mig.dst_host.name}: "
                          "the dirtier's check could not be made (its lines were not "
                          "followed on the destination)")
        check = check and following
        wait_s = self.ctx.config.checks.dirtier_wait_s + 2 * pass_s(self.vm.spec.append)
        loop = asyncio.get_running_loop()
        try:
            if check:
                await self._wait(lambda: self.checked_pass() is not None, wait_s)
            elif following and keep_series:
                await self._wait(lambda: bool(self._mine(self.mig.dst_host.name)),
                                 LANDED_WAIT_S)
        finally:
            await shielded(asyncio.gather(*(f.stop() for f in self.followers)))
            failure = self._keep(check, keep_series, loop.time() - (self.ended_at or
                                                                    loop.time()), wait_s)
        if failure:
            raise failure

    def _keep(self, check: bool, keep_series: bool, after_s: float, wait_s: float
              ) -> MigrationError | None:
        """Put the series and the check in the result and the record; the check's error."""
        try:
            r = self.mig.result
            updates: dict = {}
            if keep_series:
                updates["dirtier"] = r.dirtier = on_axis(self.samples, r.progress)
            failure = None
            if check:
                verdict, failure = self.verdict(after_s, wait_s)
                updates["dirtier_check"] = r.dirtier_check = verdict
                if failure:
                    r.status, r.error = "failed", str(failure)
                    updates |= {"status": r.status, "error": r.error}
            for rec in self.ctx.migrations:
                if rec.mig_id == self.mig_id and rec.vm == self.vm.name:
                    rec.result.update(updates)
                    if failure:
                        rec.status, rec.error = "failed", str(failure)
            return failure
        except Exception as exc:  # noqa: BLE001 - a bug here is not the migration's failure
            log.exception("dirtier of %s", self.vm.name)
            self.ctx.warn(f"{self.vm.name}: the dirtier's figures are lost: {exc}")
            return None

    def verdict(self, after_s: float, wait_s: float) -> tuple[dict, MigrationError | None]:
        """(the check's figures, the migration's error or None)."""
        src, dst = self.mig.result.src, self.mig.dst_host.name
        theirs = self._mine(src)
        before = max((s["stale_pages"] for s in theirs), default=0)
        checked = self.checked_pass()
        mine = self._mine(dst)
        last = checked or (mine[-1] if mine else None)
        stale = last["stale_pages"] if last else 0
        # the same dirtier goes on: its clock and passes never go back (one that started
        # over is a guest that rebooted, a kernel the lost pages crashed, or a killed process)
        seq = theirs[-1:] + mine
        restart = next(((a, b) for a, b in zip(seq, seq[1:])
                        if b["pass"] < a["pass"] or b["guest_t"] < a["guest_t"]), None)
        verdict = {"host": dst, "checked": checked is not None and restart is None,
                   "pass": last["pass"] if last else None, "stale_pages": stale,
                   "new_stale_pages": max(0, stale - before), "after_s": round(after_s, 2),
                   "stale": list(self.stale), "restarted": restart is not None}
        if restart is not None:
            (a, b) = restart
            why = (f"the guest's dirtier started over on {dst} after the migration (pass "
                   f"{b['pass']} at {b['guest_t']:g} s, after pass {a['pass']} at "
                   f"{a['guest_t']:g} s on {a['host']}): the guest rebooted, or its "
                   "dirtier died, so its memory did not survive")
        elif stale > before:
            why = (f"the guest's dirtier found {stale - before} stale page(s) on {dst} after "
                   f"the migration: writes made on {src} never reached {dst}"
                   + (f" ({self.stale[0]})" if self.stale else ""))
        elif checked is None:
            why = (f"the guest's dirtier did not check all its pages on {dst} within "
                   f"{wait_s:g} s after the migration (" + (
                       f"last report: pass {last['pass']}" if last else "no report") + ")")
        else:
            return verdict, None
        return verdict, MigrationError(src, dst, self.vm.name, Phase.VERIFIED.value, why,
                                       f"{self.vm.name} runs on {dst}")


@contextlib.asynccontextmanager
async def watch_dirtier(ctx: "RunContext", vm: "GuestVM", mig: BaseMigration, mig_id: str,
                        tails: asyncio.TaskGroup | None = None) -> AsyncIterator[None]:
    """Around migration ``mig_id`` of ``vm`` (outside its slot: what follows a completed
    migration holds no slot): the dirtier's check and series (see the module's docstring;
    with the check off, the wait for the series' last line is a task of ``tails`` when
    given).

    :raise MigrationError: (on leaving) the check failed.
    """
    check, keep = ctx.config.checks.dirtier, ctx.config.report.dirtier_series
    if not (check or keep) or not runs_dirtier(vm.spec.append):
        yield
        return
    watch = _Watch(ctx, vm, mig, mig_id)
    starter = asyncio.create_task(watch.follow(), name=f"dirtier {vm.name}")
    completed = False
    try:
        yield
        completed = mig.phase is Phase.CLEANED
    finally:
        watch.ended_at = asyncio.get_running_loop().time()
        try:
            await shielded(cancel_and_wait(starter))
        except Exception as exc:  # noqa: BLE001 - following is a measurement
            ctx.warn(f"{vm.name}: the dirtier cannot be followed: {exc}")
        if completed and watch.dst_following():
            await shielded(watch.stop_source())
            if tails is not None and not check:
                try:    # owned by the scenario's group, which ends only after it
                    tails.create_task(watch.finish(completed, check, keep),
                                      name=f"dirtier {vm.name} {mig_id}")
                    return
                except RuntimeError:        # the group is ending (the scenario failed)
                    pass
        await shielded(watch.finish(completed, check, keep))


__all__ = ["DIRTY", "LANDED_WAIT_S", "STALE", "on_axis", "pass_s", "runs_dirtier",
           "watch_dirtier"]
