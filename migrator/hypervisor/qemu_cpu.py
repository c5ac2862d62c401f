"""What a migration costs QEMU in CPU: a QEMU process's CPU seconds outside its vCPU threads,
read from ``/proc`` on its host.

A QEMU's vCPU threads run the guest; every other thread is QEMU's own: the main loop, the
migration thread, multifd's channels (compression, xbzrle's encoding and zero-page
detection happen there), the destination's receiving side. A process's total in
``/proc/PID/stat`` keeps the CPU of threads that already ended (the migration thread ends
with the migration), so *outside the vCPUs* is the process's total minus its live vCPU
threads'. The vCPU threads are named by their thread ids (the qemu driver asks QMP's
``query-cpus-fast``) or, under libvirt (which starts QEMU with ``debug-threads=on``), by
their names ``CPU n/ACCEL``.

Two ways to read it:

- :func:`read_qemu_cpu`: one snapshot, one SSH command (shell built-ins, and ``getconf`` for
  the clock rate).
- :class:`CpuSampler`: a snapshot every ``interval_s`` streamed back by one small shell loop
  on the host, for a QEMU that someone else stops (libvirt kills the source QEMU inside
  ``migrate3``, before its caller could read it), and one at once when asked
  (:meth:`CpuSampler.snapshot_now`: when the caller learns the QEMU's work is done, e.g.
  the destination resumed). Its last snapshot is the later of the last asked for and the
  last periodic one, at most one interval before the QEMU went away: a migration shorter
  than a few intervals needs the asked-for one for a figure that means anything.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

from ..aio import cancel_and_wait, shielded, wait_for
from ..errors import HostError
from ..hosts import SSHHost, quote

log = logging.getLogger(__name__)

#: a vCPU thread's name under ``debug-threads=on`` ("CPU 0/TCG", "CPU 1/KVM"; TCG's one
#: round-robin thread "ALL CPUs/TCG")
VCPU_NAME = re.compile(r"^(CPU \d+|ALL CPUs)/")


@dataclass(frozen=True)
class QemuCpu:
    """One snapshot of a QEMU process's CPU (user + system seconds so far)."""

    total_s: float                    #: every thread, those that ended included
    vcpu_s: float                     #: the live vCPU threads
    vcpu_tids: tuple[int, ...] = ()   #: which threads those were
    hz: int = 100                     #: the host's clock ticks per second (CLK_TCK)

    @property
    def outside_vcpus_s(self) -> float:
        """QEMU's own work: the total minus the guest's vCPU threads."""
        return self.total_s - self.vcpu_s


def _ticks(stat_line: str) -> tuple[str, int]:
    """(thread name, utime + stime ticks) of one ``/proc/.../stat`` line (the name may hold
    spaces and parentheses: it ends at the last ')')."""
    head, _, rest = stat_line.rpartition(") ")
    fields = rest.split()
    return head.partition(" (")[2], int(fields[11]) + int(fields[12])


async def _read_stat(host: SSHHost, pid: int, threads: bool) -> tuple | None:
    """``(hz, total ticks, [(tid, name, ticks)] or [])`` of process ``pid`` on ``host``
    (its threads' only with ``threads``); None when the process is gone or its ``/proc``
    could not be read (logged).

    :raise HostError: the host cannot be reached.
    """
    p = f"/proc/{int(pid)}"
    each = (f" && for t in {p}/task/*; do read -r s < $t/stat && echo \"$s\"; "
            f"done 2>/dev/null" if threads else "")
    r = await host.run(f"read -r s < {p}/stat && echo \"$s\"{each}; getconf CLK_TCK")
    lines = r.stdout.splitlines()
    try:
        return (int(lines[-1]), _ticks(lines[0])[1],
                [(int(line.split(" ", 1)[0]), *_ticks(line)) for line in lines[1:-1]])
    except (ValueError, IndexError):
        log.info("[host=%s] pid %s: no CPU figures (%s)", host.name, pid,
                 (r.stderr.strip() or r.stdout.strip() or f"status {r.status}")[:200])
        return None


async def process_cpu_s(host: SSHHost, pid: int) -> float | None:
    """CPU seconds (user + system, every thread) process ``pid`` on ``host`` used so far;
    None when it is gone or could not be read.

    :raise HostError: the host cannot be reached.
    """
    stat = await _read_stat(host, pid, threads=False)
    return None if stat is None else stat[1] / stat[0]


async def read_qemu_cpu(host: SSHHost, pid: int,
                        vcpu_tids: tuple[int, ...] | None = None) -> QemuCpu | None:
    """The CPU of QEMU process ``pid`` on ``host`` now; its vCPU threads are ``vcpu_tids``,
    or (None) those named ``CPU n/...``. None when the process is gone or its ``/proc`` could
    not be read (logged).

    :raise HostError: the host cannot be reached.
    """
    stat = await _read_stat(host, pid, threads=True)
    if stat is None:
        return None
    hz, total, threads = stat
    vcpus = tuple(tid for tid, name, _ in threads
                  if (tid in vcpu_tids if vcpu_tids is not None else VCPU_NAME.match(name)))
    if not vcpus:       # QEMU without debug-threads=on: the guest's share cannot be told
        log.info("[host=%s] QEMU pid %s: no vCPU thread found (%s): no CPU figures",
                 host.name, pid, "ids " + str(vcpu_tids) if vcpu_tids is not None
                 else "none named 'CPU n/...'")
        return None
    return QemuCpu(total / hz, sum(t for tid, _, t in threads if tid in vcpus) / hz, vcpus, hz)


class CpuSampler:
    """``async with CpuSampler(host, pid, start, interval_s) as sampler:``: a snapshot of
    QEMU ``pid``'s CPU every ``interval_s``, the newest in :attr:`last`, until the block ends
    or the QEMU does; ``start`` (a :func:`read_qemu_cpu` snapshot) names the vCPU threads and
    the host's clock rate (None: the block samples nothing).

    On the host, one shell loop of built-ins (``read`` from ``/proc``, arithmetic; its sleep
    is a ``read -t`` on its standard input: a line there takes a snapshot at once, closing
    it ends the loop at once): no process started per snapshot. The block's end closes its
    input, reads what it sent to the end (snapshots that arrived while the controller was
    busy elsewhere included), then reaps it (shielded); a loop that does not leave is killed
    with its process group (:meth:`RemoteProcess.stop`). A sampler that cannot start (host
    unreachable) is logged and leaves :attr:`last` None: the figure is missing, the
    migration is not disturbed.
    """

    def __init__(self, host: SSHHost, pid: int, start: QemuCpu | None, interval_s: float):
        self.host, self.pid, self.start = host, int(pid or 0), start
        self.vcpu_tids = start.vcpu_tids if start else ()
        self.interval_s, self.hz = interval_s, start.hz if start else 100
        self.last: QemuCpu | None = None
        self._proc = None
        self._task: asyncio.Task | None = None
        self._spawned = asyncio.Event()     # its start ended, started or not

    def script(self) -> str:
        """The loop run on the host (bash: ``read -t`` takes a fraction of a second)."""
        p = f"/proc/{self.pid}"
        tids = " ".join(str(int(t)) for t in self.vcpu_tids)
        ticks = 's=${s##*) }; set -- $s; n=$(( ${12} + ${13} ))'
        script = (f"p={p}; while read -r s < $p/stat; do {ticks}; tot=$n; v=0; "
                  f"for t in {tids}; do read -r s < $p/task/$t/stat || exit 0; {ticks}; "
                  f"v=$(( v + n )); done; echo \"$tot $v\"; "
                  f"read -t {self.interval_s:g} _; r=$?; "     # 0 asked, >128 timed out
                  f"[ $r -eq 0 ] || [ $r -gt 128 ] || exit 0; "  # else its input closed
                  f"done 2>/dev/null")
        return f"exec bash -c {quote(script)}"

    async def __aenter__(self) -> "CpuSampler":
        if self.start is None or not self.pid:
            return self             # nothing to follow: no start figures
        # started in the background: the block's work (a migration) does not wait for it
        self._task = asyncio.create_task(self._follow())    # owned: ended in __aexit__
        return self

    async def _follow(self) -> None:
        try:
            self._proc = await self.host.spawn(self.script())
        except HostError as exc:
            log.warning("[host=%s] QEMU pid %d: no CPU sampler (%s): its CPU is not "
                        "recorded", self.host.name, self.pid, exc)
            return
        finally:
            self._spawned.set()
        while line := await self._proc.readline():
            try:
                total, vcpu = (int(x) for x in line.split())
            except ValueError:
                continue
            self.last = QemuCpu(total / self.hz, vcpu / self.hz, self.vcpu_tids, self.hz)

    def snapshot_now(self) -> None:
        """Ask for a snapshot at once (the QEMU's work is done: its figure is final now).
        Not started yet, or ended: nothing happens. Never raises."""
        if self._proc is not None and not self._task.done():
            try:
                self._proc.write("\n")
            except HostError:
                pass                        # the loop left: its last snapshot stands

    async def __aexit__(self, *exc) -> None:
        if self._task is not None:
            await shielded(self._stop())

    async def _stop(self) -> None:
        """Let its start finish (a spawn cut short would leave the loop running on the
        host), close its input, read what it sent to the end, reap it. The reading comes
        first: reaping collects the output nobody read yet, and it would be lost."""
        await self._spawned.wait()     # spawn() is bounded by ssh_connect_s itself
        if self._proc is not None:
            self._proc.close_input()
        try:
            await wait_for(asyncio.shield(self._task), 1.0)
        except TimeoutError:
            log.info("[host=%s] QEMU pid %d: its CPU sampler did not end within 1 s",
                     self.host.name, self.pid)
            await cancel_and_wait(self._task)
        if self._proc is not None:
            await self._proc.stop()


__all__ = ["CpuSampler", "QemuCpu", "VCPU_NAME", "process_cpu_s", "read_qemu_cpu"]
