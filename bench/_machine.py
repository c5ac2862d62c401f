"""What the benchmarks measure of this machine as a whole."""

from __future__ import annotations

import os
import time
from pathlib import Path


def busy_seconds() -> float:
    """CPU-seconds the machine has spent busy since boot, all cores and every process (the
    controller, the QEMUs, sshd, the hosts' helpers): /proc/stat's first line, less idle and
    iowait."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def settle(idle_below: float = 0.1, window_s: float = 0.3, limit_s: float = 20.0) -> float:
    """Wait until the machine is quiet: a ``window_s`` window in which every core together
    was busy less than ``idle_below`` of one core (what a run left behind has ended: the
    hosts' QEMUs freeing guest memory, sshd sessions closing, logs written). Returns the
    seconds waited (a benchmark reports it: a side that leaves the machine busy slows the
    next). Gives up after ``limit_s`` (an idle load this machine never reaches)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        b0 = busy_seconds()
        time.sleep(window_s)
        if busy_seconds() - b0 < idle_below * window_s:
            break
    return time.monotonic() - t0
