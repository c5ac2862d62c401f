"""The blackout a guest's peers see during a migration, measured from outside the guest.

::

    async with BlackoutProbe(vm.spec.address, tcp_port=7000) as probe:
        result = await migration.run()
    report = probe.report(switchover=wall time of the switchover)
    report.blackout_ms, report.lost, report.replies_after_switchover, report.tcp

The probing runs in a process of its own (:mod:`migrator.hypervisor.probe_process`): ICMP echo every
``interval_ms`` (answered by the guest's kernel), receive times from the kernel's timestamps,
and optionally a TCP stream through an echo listener in the guest. The orchestrator's event
loop only starts it and reads its one JSON line at the end, so a busy loop here cannot be
mistaken for a network outage.

The **blackout** is the longest time between two consecutive replies (the last reply before
an outage to the first after it), so it includes up to one probe interval of resolution. A
reply received after the switchover came from the destination: the source's vCPUs never run
again after it (a rollback would show as replies continuing without a switchover).

What can go wrong: the prober cannot open a raw socket (not root): :class:`ProbeError` at
``__aenter__``; it dies or hangs: :class:`ProbeError` at the end, the process killed and
reaped either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from dataclasses import asdict, dataclass, field

from ..aio import shielded
from ..errors import MigratorError
from ..hypervisor.vm import PROBE_SCRIPT

#: how long the prober may take to start (raw socket, TCP connect) and to report at the end
PROBE_START_S = 10.0
PROBE_END_S = 10.0


class ProbeError(MigratorError):
    """The prober could not start, or did not report."""


@dataclass
class BlackoutReport:
    """What the prober saw (times in ms; wall-clock instants in s since the epoch)."""

    target: str
    interval_ms: float
    sent: int
    received: int
    lost: int
    blackout_ms: float | None
    """The longest time without a reply: between two consecutive replies, or from the last
    reply to the last probe when replies never resumed (then ``recovered`` is False); None
    without any reply."""
    recovered: bool = True
    """Replies came again after the longest outage (False: the guest stayed unreachable to
    the end of probing)."""
    blackout_from: float | None = None
    """When the reply before the longest gap arrived."""
    lost_in_blackout: int = 0
    replies_after_switchover: int | None = None
    """Replies received after the switchover (from the destination); None: no switchover
    given (the VM did not move)."""
    tcp: dict | None = None
    """The TCP stream: connected, error (None: it survived), sent, echoed, in_order,
    max_stall_ms."""
    gaps_ms: list[float] = field(default_factory=list, repr=False)
    """Every gap between consecutive replies, in order (for percentiles and plots)."""

    @property
    def tcp_survived(self) -> bool | None:
        if self.tcp is None:
            return None
        return bool(self.tcp["connected"] and self.tcp["error"] is None
                    and self.tcp["in_order"] and self.tcp["echoed"] == self.tcp["sent"])

    def to_json(self, with_gaps: bool = False) -> dict:
        d = asdict(self)
        if not with_gaps:
            d.pop("gaps_ms")
        d["tcp_survived"] = self.tcp_survived
        return d


def summarize(raw: dict, switchover: float | None = None) -> BlackoutReport:
    """The report from the prober's JSON (see :mod:`migrator.hypervisor.probe_process`)."""
    sent = {seq: t for seq, t in raw["sent"]}
    replies = sorted((t, seq) for seq, t in raw["replies"] if seq in sent)
    seen = {seq for _t, seq in replies}
    gaps = [(b[0] - a[0]) / 1e6 for a, b in zip(replies, replies[1:])]
    report = BlackoutReport(target=raw["target"], interval_ms=raw["interval_ms"],
                            sent=len(sent), received=len(seen), lost=len(sent) - len(seen),
                            blackout_ms=max(gaps) if gaps else None, tcp=raw.get("tcp"),
                            gaps_ms=[round(g, 3) for g in gaps])
    if replies:
        # an outage that never ended: from the last reply to the last probe (unanswered)
        last_probe = max(sent.values())
        unanswered_tail = [seq for seq, t in sent.items()
                           if t > replies[-1][0] and seq not in seen]
        tail_ms = (last_probe - replies[-1][0]) / 1e6
        if unanswered_tail and tail_ms > (report.blackout_ms or 0):
            report.blackout_ms, report.recovered = tail_ms, False
            report.blackout_from = replies[-1][0] / 1e9
            report.lost_in_blackout = len(unanswered_tail)
        elif gaps:
            i = gaps.index(max(gaps))
            start, end = replies[i][0], replies[i + 1][0]
            report.blackout_from = start / 1e9
            report.lost_in_blackout = sum(1 for seq, t in sent.items()
                                          if start <= t < end and seq not in seen)
    elif sent:
        report.recovered = False
    if switchover is not None:
        report.replies_after_switchover = sum(1 for t, _seq in replies if t / 1e9 > switchover)
    return report


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):     # it ended meanwhile
            proc.kill()


def switchover_time(phases: list, postcopy_switched: bool | None = None) -> float | None:
    """The wall time of a migration's switchover from its phase history (``result.phases``:
    (phase, seconds, wall time)): its POSTCOPY when the guest really switched to the
    destination before the end (``result.postcopy_switched``), else its COMPLETED (or
    LANDED); None when it had none (rolled back)."""
    walls = {phase: wall for phase, _t, wall in phases}
    if postcopy_switched and "POSTCOPY" in walls:
        return walls["POSTCOPY"]
    return walls.get("COMPLETED", walls.get("LANDED"))


class BlackoutProbe:
    """``async with BlackoutProbe(address) as probe:`` probes ``address`` for the block's
    duration from a process of its own on the controller; :meth:`report` afterwards.

    :raise ProbeError: the prober did not start (its reason), or did not report at the end.
    """

    def __init__(self, target: str, interval_ms: float = 5.0, tcp_port: int | None = None):
        self.target, self.interval_ms, self.tcp_port = target, interval_ms, tcp_port
        self._proc: asyncio.subprocess.Process | None = None
        self.raw: dict | None = None

    async def __aenter__(self) -> "BlackoutProbe":
        args = [sys.executable, str(PROBE_SCRIPT), self.target, f"{self.interval_ms:g}"]
        if self.tcp_port is not None:
            args.append(str(self.tcp_port))
        self._proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(PROBE_START_S):
                line = await self._proc.stdout.readline()
                if line.strip() != b"ready":
                    err = (await self._proc.stderr.read()).decode(errors="replace").strip()
                    raise ProbeError(
                        f"the blackout prober for {self.target} did not start: "
                        f"{err or line.decode(errors='replace').strip() or 'no output'}")
        except TimeoutError:
            await shielded(self._end(kill=True))
            raise ProbeError(f"the blackout prober for {self.target} did not start within "
                             f"{PROBE_START_S:g} s") from None
        except BaseException:
            await shielded(self._end(kill=True))
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await shielded(self._end(kill=exc[0] is not None))

    async def _end(self, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if kill:
                _kill(proc)
            elif proc.stdin is not None:
                proc.stdin.close()              # the prober's signal to stop and report
            try:
                async with asyncio.timeout(PROBE_END_S):
                    out, err = await proc.communicate()
            except TimeoutError:
                _kill(proc)
                await proc.wait()
                raise ProbeError(f"the blackout prober for {self.target} did not report "
                                 f"within {PROBE_END_S:g} s (killed)") from None
        finally:
            if proc.returncode is None:
                _kill(proc)
                await proc.wait()
        if kill:
            return
        line = out.decode(errors="replace").strip().splitlines()[-1:] or [""]
        try:
            self.raw = json.loads(line[0])
        except ValueError:
            raise ProbeError(f"the blackout prober for {self.target} ended without a report "
                             f"(exit {proc.returncode}): "
                             f"{err.decode(errors='replace').strip()[-300:]}") from None

    def report(self, switchover: float | None = None) -> BlackoutReport:
        """The blackout over the probed time; ``switchover`` (wall time): count the replies
        after it. :raise ProbeError: the probe has not ended with a report."""
        if self.raw is None:
            raise ProbeError(f"no report from the blackout prober for {self.target}")
        return summarize(self.raw, switchover)


__all__ = ["BlackoutProbe", "BlackoutReport", "ProbeError", "summarize", "switchover_time"]
