"""The guest dirtier's own figures during a migration, stamped with the hosts' clocks
(``MigrationResult.dirtier``): what the guest saw, beside what QEMU reports.

When the lab's dirtier runs in the VM (booted with ``lab.dirty=N`` and ``lab.out=ttyS1``:
its ``DIRTY`` lines on the VM's status port), a
follower (:mod:`migrator.guest.statusfollow`) on the source host and one on the destination
read those lines while the VM migrates. Each sample::

    {"now": 1796099743.013,   # the host's clock when the line reached the file
     "t": 1.05,               # the same on the migration's progress axis (seconds since
                              # 'migrate', from the controller's clock at 'migrate')
     "host": "hostA",         # which copy of the guest printed it
     "guest_t": 12, "pass": 3, "rate_mibs": 80, "stale_pages": 0}

The hosts' clocks and the controller's are taken to agree (one machine in the lab; NTP
elsewhere: a skew shifts ``t``). A gap in the samples where the guest was paused, and the
copy that printed them, show the switchover as the guest lived it; ``stale_pages`` rising
is a lost write. After a completed migration the destination's first line is waited for
(up to :data:`LANDED_WAIT_S`: the dirtier prints once a second, so a migration of such a VM
returns up to a second later). ``report.dirtier_series: false`` turns it off. A follower that cannot
start is a warning, never the migration's failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import TYPE_CHECKING, AsyncIterator

from ..guest.statusfollow import follow_status
from ..aio import shielded, wait_for
from ..migration import BaseMigration, Phase

if TYPE_CHECKING:
    from ..hypervisor.vm import GuestVM
    from .context import RunContext

DIRTY = re.compile(r"DIRTY t=(\d+) pass=(\d+) rate=(\d+)MB/s bad=(\d+)")
#: after a completed migration, how long the destination's first line is waited for (the
#: dirtier prints once a second)
LANDED_WAIT_S = 1.5
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


@contextlib.asynccontextmanager
async def dirtier_series(ctx: "RunContext", vm: "GuestVM", mig: BaseMigration
                         ) -> AsyncIterator[None]:
    """Around one migration of ``vm``: its dirtier's lines from both hosts, into
    ``mig.result.dirtier`` when the block ends (see the module's docstring)."""
    if not ctx.config.report.dirtier_series or not runs_dirtier(vm.spec.append):
        yield
        return
    samples: list[dict] = []
    landed = asyncio.Event()            # a line from the destination's copy came

    def collect(host: str):
        def on_line(now: float, line: str) -> None:
            m = DIRTY.search(line)
            if m:
                samples.append({"now": round(now, 3), "host": host,
                                "guest_t": int(m.group(1)), "pass": int(m.group(2)),
                                "rate_mibs": int(m.group(3)), "stale_pages": int(m.group(4))})
                if host == mig.dst_host.name:
                    landed.set()
        return on_line

    async with contextlib.AsyncExitStack() as stack:
        for host, path in ((vm.host, vm.paths.status_log),
                           (mig.dst_host, mig.dst_vm.paths.status_log)):
            try:
                await stack.enter_async_context(follow_status(host, str(path),
                                                              collect(host.name)))
            except Exception as exc:  # noqa: BLE001 - as above
                ctx.warn(f"{vm.name}: no dirtier series from {host.name}: {exc}")
        try:
            yield
        finally:
            if mig.phase is Phase.CLEANED and not landed.is_set():
                # the guest prints once a second: its first line on the destination, which
                # shows when it ran again, comes up to a second after the switchover
                with contextlib.suppress(TimeoutError):
                    await shielded(wait_for(landed.wait(), LANDED_WAIT_S))
            await stack.aclose()               # the followers' last lines are in
            mig.result.dirtier = on_axis(samples, mig.result.progress)


__all__ = ["DIRTY", "dirtier_series", "on_axis", "runs_dirtier"]
