"""Per-host bounds on VM starts (DTS's ``@parallel_lock`` critical sections), shared by
everything that starts VMs in one run.

::

    async with gates.boot(host):          # limits.vm_boots_per_host
        async with gates.launch(host):    # limits.vm_launches_per_host
            await vm.start()
        await vm.wait_for_login()

Always taken in that order (boot, then launch), so two starts never wait on each other's
gates crosswise.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from ..config import Limits


class HostGates:
    """A semaphore per (host, kind); made lazily, on the running loop."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._sems: dict[tuple[str, str], asyncio.Semaphore] = {}
        #: the most VMs seen between launch and shell at once, per host (for reports, tests)
        self.peak_boots: dict[str, int] = {}
        self._booting: dict[str, int] = {}

    def _sem(self, host: str, kind: str, size: int) -> asyncio.Semaphore:
        sem = self._sems.get((host, kind))
        if sem is None:
            sem = self._sems[(host, kind)] = asyncio.Semaphore(size)
        return sem

    @contextlib.asynccontextmanager
    async def launch(self, host: str) -> AsyncIterator[None]:
        """One QEMU launch on ``host`` (``limits.vm_launches_per_host`` at once)."""
        async with self._sem(host, "launch", self.limits.vm_launches_per_host):
            yield

    @contextlib.asynccontextmanager
    async def boot(self, host: str) -> AsyncIterator[None]:
        """One VM from launch to an answering shell on ``host``
        (``limits.vm_boots_per_host`` at once)."""
        async with self._sem(host, "boot", self.limits.vm_boots_per_host):
            n = self._booting[host] = self._booting.get(host, 0) + 1
            self.peak_boots[host] = max(self.peak_boots.get(host, 0), n)
            try:
                yield
            finally:
                self._booting[host] -= 1
