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

The **blackout** is the longest outage: from the last reply that showed the guest fine, or
the first probe sent after it if later, to the next reply (lost probes and probes answered
late in a burst alike); so it includes up to one probe interval of resolution. A gap between
replies in which no probe waited (the prober itself not running, on a loaded machine) is no
outage: it is kept apart, as ``max_reply_gap_ms``, the figure the prober's noise floor is
measured in. A
reply received after the switchover came from the destination: the source's vCPUs never run
again after it (a rollback would show as replies continuing without a switchover).

What can go wrong: the prober cannot open a raw socket (not root): :class:`ProbeError` at
``__aenter__``; it dies or hangs: :class:`ProbeError` at the end, the process killed and
reaped either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..aio import shielded
from ..errors import HostError, MigratorError
from ..hosts import quote
from ..hypervisor.vm import PROBE_SCRIPT

if TYPE_CHECKING:
    from ..hosts import SSHHost
    from ..hosts.ssh import RemoteProcess
    from ..hypervisor.vm import GuestVM

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
    """The longest outage (see :func:`summarize`): a probe waiting for its answer from the
    last moment the guest was seen fine to the next reply, or to the last probe when
    replies never resumed (then ``recovered`` is False); None without replies."""
    max_reply_gap_ms: float | None = None
    """The longest gap between consecutive replies, lost probes or not: includes the
    prober's own stalls (its noise floor, measured without a migration)."""
    recovered: bool = True
    """Replies came again after the longest outage (False: the guest stayed unreachable to
    the end of probing)."""
    blackout_from: float | None = None
    """When the reply before the longest outage arrived."""
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
    """The report from the prober's JSON (see :mod:`migrator.hypervisor.probe_process`).

    An outage ends at a reply ``b`` and starts at the moment the guest was last seen fine
    (the reply ``a`` before ``b``) *and* a probe was waiting for an answer: the send time of
    the first probe after ``a``'s that was not answered by then (lost, or answered late),
    if later than ``a``. So a guest that answers queued probes in a burst after a pause
    still shows the pause, and a prober that did not send for a while (its process not
    scheduled on a loaded machine) shows no outage: that gap counts only in
    ``max_reply_gap_ms``. An outage that never ended runs to the last probe sent."""
    send = {seq: t for seq, t in raw["sent"]}
    recv = {seq: t for seq, t in raw["replies"] if seq in send}
    seqs = sorted(send)
    where = {seq: i for i, seq in enumerate(seqs)}
    by_time = sorted(recv.items(), key=lambda kv: kv[1])
    gaps = [(b[1] - a[1]) / 1e6 for a, b in zip(by_time, by_time[1:])]
    report = BlackoutReport(target=raw["target"], interval_ms=raw["interval_ms"],
                            sent=len(send), received=len(recv), lost=len(send) - len(recv),
                            blackout_ms=None, max_reply_gap_ms=max(gaps) if gaps else None,
                            tcp=raw.get("tcp"), gaps_ms=[round(g, 3) for g in gaps])
    if not recv:
        report.recovered = not send
        report.lost_in_blackout = len(send)
    else:
        def waiting_since(after_seq: int, seen_at: int, until: int) -> int | None:
            """When a probe sent after ``after_seq``'s began to wait for an answer it did
            not get by ``seen_at`` (sent before ``until``); None: no such probe."""
            for q in seqs[where[after_seq] + 1:]:
                if send[q] >= until:
                    return None
                if recv.get(q, until + 1) > seen_at:
                    return max(send[q], seen_at)
            return None

        def lost_between(start: int, end: int) -> int:
            return sum(1 for q in seqs if start <= send[q] < end and q not in recv)

        outages = []                    # (ms, start ns, lost, recovered)
        for (sa, ta), (_sb, tb) in zip(by_time, by_time[1:]):
            start = waiting_since(sa, ta, tb)
            if start is not None:
                outages.append(((tb - start) / 1e6, start, lost_between(start, tb), True))
        last_seq, last_t = by_time[-1]
        end = send[seqs[-1]] + 1
        start = waiting_since(last_seq, last_t, end)
        if start is not None and any(q not in recv and send[q] >= start for q in seqs):
            outages.append(((end - 1 - start) / 1e6, start, lost_between(start, end), False))
        ms, start, lost, recovered = max(outages) if outages else (0.0, None, 0, True)
        report.blackout_ms, report.lost_in_blackout, report.recovered = ms, lost, recovered
        report.blackout_from = start / 1e9 if start is not None else None
    if switchover is not None:
        report.replies_after_switchover = sum(1 for _q, t in by_time if t / 1e9 > switchover)
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
    duration from a process of its own on the controller, or with ``host`` on that host
    (over SSH: ``python3`` runs the same prober there; the host needs an address on the
    guest network, and its clock is the controller's within NTP's error for the replies
    counted after the switchover); :meth:`report` afterwards.

    :raise ProbeError: the prober did not start (its reason), or did not report at the end.
    """

    def __init__(self, target: str, interval_ms: float = 5.0, tcp_port: int | None = None,
                 host: "SSHHost | None" = None):
        self.target, self.interval_ms, self.tcp_port = target, interval_ms, tcp_port
        self.host = host
        self._proc: asyncio.subprocess.Process | None = None
        self._remote: "RemoteProcess | None" = None
        self.raw: dict | None = None

    @property
    def _who(self) -> str:
        return f"the blackout prober for {self.target}" + \
            (f" on {self.host.name}" if self.host is not None else "")

    async def __aenter__(self) -> "BlackoutProbe":
        args = [self.target, f"{self.interval_ms:g}"]
        if self.tcp_port is not None:
            args.append(str(self.tcp_port))
        if self.host is not None:
            await self._enter_remote(args)
            return self
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, str(PROBE_SCRIPT), *args, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
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

    async def _enter_remote(self, args: list[str]) -> None:
        source = Path(PROBE_SCRIPT).read_text()
        command = f"exec python3 -c {quote(source)} " + " ".join(quote(a) for a in args)
        try:
            self._remote = await self.host.spawn(command)
        except HostError as exc:
            raise ProbeError(f"{self._who} did not start: {exc.message}") from None
        try:
            async with asyncio.timeout(PROBE_START_S):
                line = (await self._remote.readline()).strip()
            if line != "ready":
                remote, self._remote = self._remote, None
                _out, err, why = await remote.finish(PROBE_END_S)
                raise ProbeError(f"{self._who} did not start: "
                                 f"{err.strip()[-300:] or line or why}")
        except TimeoutError:
            await shielded(self._end(kill=True))
            raise ProbeError(f"{self._who} did not start within {PROBE_START_S:g} s") \
                from None
        except HostError as exc:
            raise ProbeError(f"{self._who} did not start: {exc.message}") from None
        except BaseException:
            await shielded(self._end(kill=True))
            raise

    async def __aexit__(self, *exc) -> None:
        await shielded(self._end(kill=exc[0] is not None))

    async def _end_remote(self, kill: bool) -> None:
        remote, self._remote = self._remote, None
        if kill:
            await remote.stop()
            return
        try:
            out, err, why = await remote.finish(PROBE_END_S)
        except HostError as exc:
            raise ProbeError(f"{self._who} did not report: {exc.message}") from None
        self._parse(out, f"{why}: {err.strip()[-300:]}")

    def _parse(self, out: str, why: str) -> None:
        line = out.strip().splitlines()[-1:] or [""]
        try:
            self.raw = json.loads(line[0])
        except ValueError:
            raise ProbeError(f"{self._who} ended without a report ({why})") from None

    async def _end(self, kill: bool) -> None:
        if self._remote is not None:
            await self._end_remote(kill)
            return
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
        self._parse(out.decode(errors="replace"),
                    f"exit {proc.returncode}: {err.decode(errors='replace').strip()[-300:]}")

    def report(self, switchover: float | None = None) -> BlackoutReport:
        """The blackout over the probed time; ``switchover`` (wall time): count the replies
        after it. :raise ProbeError: the probe has not ended with a report."""
        if self.raw is None:
            raise ProbeError(f"no report from the blackout prober for {self.target}")
        return summarize(self.raw, switchover)




_PING_REPLY = re.compile(r"seq=(\d+) ")
_PING_RTT = re.compile(r"seq=\d+ .*?time=([\d.]+) ms")
_PING_SENT = re.compile(r"(\d+) packets transmitted")


class GuestPingProbe:
    """``async with GuestPingProbe(peer_vm, address) as probe:`` probes ``address`` from a
    peer guest: ``ping -i`` (busybox or iputils) in the background on the peer's serial
    console, stopped with SIGINT for its totals; :meth:`report` afterwards. The blackout is
    the longest run of lost pings plus one, times the interval: the resolution is the
    interval, and no receive times are known (``replies_after_switchover`` and
    ``max_reply_gap_ms`` stay None).

    :raise ProbeError: the ping did not start (no first reply within ``PROBE_START_S``), or
        its output could not be read back.
    """

    _serial = itertools.count(1)

    def __init__(self, peer: "GuestVM", target: str, interval_ms: float = 10.0):
        self.peer, self.target, self.interval_ms = peer, target, interval_ms
        self._log = f"/tmp/migrator-probe.{target}.{next(self._serial)}"
        self._session = None
        self.output: str | None = None

    @property
    def _who(self) -> str:
        return f"the blackout ping for {self.target} from {self.peer.name}"

    async def __aenter__(self) -> "GuestPingProbe":
        from ..errors import GuestError
        log = quote(self._log)
        try:
            self._session = await self.peer.wait_for_login(PROBE_START_S)  # its one session
            await self._session.cmd(
                f"ping -i {self.interval_ms / 1000:g} {quote(self.target)} >{log} 2>&1 "
                f"</dev/null & echo $! >{log}.pid")
            await self._session.cmd(f"until grep -q 'seq=' {log}; do sleep 0.01; done",
                                    timeout=PROBE_START_S)
        except (GuestError, HostError, OSError) as exc:
            await shielded(self._end(read=False))
            raise ProbeError(f"{self._who} did not start: {exc}") from None
        except BaseException:
            await shielded(self._end(read=False))
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await shielded(self._end(read=exc[0] is None))

    async def _end(self, read: bool) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        from ..errors import GuestError
        log = quote(self._log)
        try:
            # the pings go on until one more reply came (a blackout still running when the
            # migration ended has ended: its length is known; the ping ran out of the window
            # once, seen in the suite: 15 pings lost at the end, 'not recovered'), at most
            # ~3 s; then they are stopped and read
            out = await session.cmd(f"n=$(grep -c 'seq=' {log}); i=0; "
                                    f"while [ $(grep -c 'seq=' {log}) -le $n ] "
                                    f"&& [ $i -lt 300 ]; do sleep 0.01; i=$((i+1)); done; "
                                    f"kill -INT $(cat {log}.pid) 2>/dev/null; "
                                    f"while kill -0 $(cat {log}.pid) 2>/dev/null; do "
                                    f"sleep 0.01; done; cat {log}; rm -f {log} {log}.pid",
                                    timeout=PROBE_END_S)
        except (GuestError, HostError, OSError) as exc:
            if read:
                raise ProbeError(f"{self._who} did not report: {exc}") from None
            return
        if read:
            self.output = out

    def report(self, switchover: float | None = None) -> BlackoutReport:
        """The blackout seen by the pings (``switchover`` is not used: no receive times).
        :raise ProbeError: the probe has not ended with its output."""
        if self.output is None:
            raise ProbeError(f"no report from {self._who}")
        return summarize_pings(self.output, self.target, self.interval_ms)


def summarize_pings(output: str, target: str, interval_ms: float) -> BlackoutReport:
    """The report of a ``ping -i`` run's output (its replies' ``seq=`` and its totals)."""
    got = sorted({int(m.group(1)) for m in _PING_REPLY.finditer(output)})
    sent_m = _PING_SENT.search(output)
    sent = int(sent_m.group(1)) if sent_m else (got[-1] + 1 if got else 0)
    report = BlackoutReport(target=target, interval_ms=interval_ms, sent=sent,
                            received=len(got), lost=max(0, sent - len(got)), blackout_ms=None)
    if not got:
        report.recovered, report.lost_in_blackout = sent == 0, sent
        return report
    runs = [(b - a - 1, True) for a, b in zip(got, got[1:])]
    runs.append((sent - 1 - got[-1], False))          # pings lost after the last reply
    lost, recovered = max(runs, key=lambda r: (r[0], r[1])) if runs else (0, True)
    # the pings sent within a round trip before the stop were still in flight: at least
    # two, more when the last replies took longer than an interval (a TCG peer on a loaded
    # machine: 4 pings at 10 ms, 'not recovered', seen in the suite)
    rtts = [float(m.group(1)) for m in _PING_RTT.finditer(output)][-5:]
    in_flight = max(2, math.ceil(max(rtts, default=0.0) / interval_ms) + 1)
    if not recovered and lost <= in_flight:
        lost, recovered = max((r for r in runs if r[1]), default=(0, True))
    report.blackout_ms = (lost + 1) * interval_ms if lost else 0.0
    report.lost_in_blackout, report.recovered = lost, recovered
    return report


__all__ = ["BlackoutProbe", "BlackoutReport", "GuestPingProbe", "ProbeError", "summarize",
           "summarize_pings", "switchover_time"]
