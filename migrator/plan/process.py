"""One ``migrate-run`` process of a plan or a sweep: interrupted as Ctrl-C would (SIGINT to
its process group: it rolls back and cleans up), waited for, killed only if it outlives the
interrupt by its stop timeout. Start it with ``start_new_session=True``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from ..aio import wait_for


def interrupt(proc: asyncio.subprocess.Process) -> None:
    """SIGINT to ``proc``'s process group, if it still runs."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):    # it ended meanwhile
            os.killpg(proc.pid, signal.SIGINT)


async def wait_run(proc: asyncio.subprocess.Process, stop_timeout_s: float) -> int:
    """Its exit status. Cancelled meanwhile: it is interrupted and waited for (killed, group
    and all, if it outlives the interrupt by ``stop_timeout_s``), then the cancellation
    goes on."""
    try:
        return await proc.wait()
    finally:
        if proc.returncode is None:
            interrupt(proc)
            try:
                await wait_for(proc.wait(), stop_timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


__all__ = ["interrupt", "wait_run"]
