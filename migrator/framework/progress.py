"""Progress lines of one migration on the run's output: every phase, and at most every
``report.progress_interval_s`` what was sent, what remains, the rate and the throttle."""

from __future__ import annotations

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
        interval = self.ctx.config.report.progress_interval_s
        last = 0.0
        async for r in self.mig.progress():
            if r.t - last >= interval and r.status == "active":
                last = r.t
                self.ctx.say(f"{self.tag}   {r.t:6.2f} s iteration {r.iteration:<3} sent "
                             f"{r.transferred / 2**20:7.1f} MiB remaining "
                             f"{r.remaining / 2**20:6.1f} MiB {r.mbps:7.0f} Mbit/s"
                             + (f" throttle {r.cpu_throttle}%" if r.cpu_throttle else ""))
