"""What the benchmarks measure of this machine as a whole."""

from __future__ import annotations

import os
from pathlib import Path


def busy_seconds() -> float:
    """CPU-seconds the machine has spent busy since boot, all cores and every process (the
    controller, the QEMUs, sshd, the hosts' helpers): /proc/stat's first line, less idle and
    iowait."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
