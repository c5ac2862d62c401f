"""Progress lines of one migration on the run's output: every phase, and at most every
``report.progress_interval_s`` what was sent, what remains, the rate and the throttle (and,
while a disk is copied ahead of the memory, how much of it)."""

from __future__ import annotations

import asyncio

from ..migration import BaseMigration, Phase
from .context import RunContext
from .data import MigrationData


class Progress:
    """Progress lines for one migration: every phase, and a progress line at most every
    ``report.progress_interval_s``."""

    def __init__(self, ctx: RunContext, md: MigrationData, mig: BaseMigration):
        self.ctx, self.md, self.mig = ctx, md, mig
        self.tag = f"[{md.mig_id} {mig.src_vm.name} {md.src.name}->{md.dst.name}]"

    def on_phase(self, mig: BaseMigration, phase: Phase) -> None:
        extra = ""
        if phase is Phase.LISTENING:
            extra = f" port {mig.result.port}"
        self.ctx.say(f"{self.tag} {phase.value}{extra}")

    async def follow(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._follow_disk())
            await self._follow_memory()

    async def _follow_disk(self) -> None:
        """A line per interval while the disk is copied (storage copy-*), until the memory
        starts or the migration ends."""
        if not getattr(self.mig, "copies_disk", False):
            return
        interval = self.ctx.config.report.progress_interval_s
        seen = False
        while not self.mig.phase.is_final and self.mig.phase not in (Phase.COMPLETED,
                                                                     Phase.ROLLING_BACK):
            await asyncio.sleep(interval)
            done = self.mig.disk_progress()
            if done is None:
                if seen:
                    return          # copied: the memory lines take over
                continue
            seen = True
            if self.ctx.progress_lines:
                self.ctx.say(f"{self.tag}   disk {done[0] / 2**20:7.1f} of "
                             f"{done[1] / 2**20:7.1f} MiB copied")

    async def _follow_memory(self) -> None:
        interval = self.ctx.config.report.progress_interval_s
        last = 0.0
        async for r in self.mig.progress():
            if self.mig.disk_progress() is not None:
                continue            # the disk is still copied: no memory moves yet
            if r.t - last >= interval and r.status == "active" and self.ctx.progress_lines:
                last = r.t
                self.ctx.say(f"{self.tag}   {r.t:6.2f} s iteration {r.iteration:<3} sent "
                             f"{r.transferred / 2**20:7.1f} MiB remaining "
                             f"{r.remaining / 2**20:6.1f} MiB {r.mbps:7.0f} Mbit/s"
                             + (f" throttle {r.cpu_throttle}%" if r.cpu_throttle else ""))
