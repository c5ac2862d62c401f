"""A guest workload that must survive migrations: a memory checksum and a counting process.

Before the first migration :meth:`SurvivingWorkload.before` writes a checksum over ``mib`` MiB
of guest memory (the lab image's ``memsum``) and starts a background counter; before every
hop it proves the counter alive and notes its value. :meth:`SurvivingWorkload.after` proves,
on the destination, the checksum intact, the counter's process alive, and the counter still
counting past the value noted. The scenarios ``ping_pong`` and ``cross_version`` use it.
"""

from __future__ import annotations

import asyncio

from .session import GuestSession

#: the counter: written then renamed (a reader never sees the file truncated and empty); its
#: first value is written before it starts, so a read right after never runs ahead of it (with
#: one vCPU the shell may go on before the background job has run at all: seen in the suite)
_COUNTER = ("echo 0 > /tmp/count; "
            "(i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; "
            "mv /tmp/count.new /tmp/count; sleep 0.2; done) "
            "</dev/null >/dev/null 2>&1 & echo $!")


class SurvivingWorkload:
    """One guest's checksum and counter; one object per guest, across all its hops.

    Every method raises :class:`~migrator.errors.GuestError` (through the session) when a
    command fails in the guest (the checksum does not verify, the counter's process is gone)
    and :class:`TimeoutError` when the counter does not move within ``timeout``.
    """

    def __init__(self, mib: int = 16, seed: int = 2026):
        self.mib, self.seed = mib, seed
        self.pid: str | None = None
        self.count: int | None = None

    async def before(self, session: GuestSession) -> None:
        """Before a hop: the first time, write the checksum and start the counter; every time,
        prove the counter alive and note its value."""
        if self.pid is None:
            await session.cmd(f"memsum write {self.mib} {self.seed}")
            self.pid = (await session.cmd(_COUNTER)).strip()
        await session.cmd(f"kill -0 {self.pid}")
        self.count = int(await session.cmd("cat /tmp/count"))

    async def after(self, session: GuestSession, timeout: float) -> None:
        """After a hop, on the destination: the checksum verifies, the counter's process is
        alive, and it counts past the value noted before the hop (waited for ``timeout``)."""
        await session.cmd("memsum verify")
        await session.cmd(f"kill -0 {self.pid}")
        async with asyncio.timeout(timeout):
            while int(await session.cmd("cat /tmp/count")) <= (self.count or 0):
                await asyncio.sleep(0.2)


__all__ = ["SurvivingWorkload"]
