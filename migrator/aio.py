"""Small asyncio helpers shared by every layer."""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def shielded(aw: Awaitable[T]) -> T:
    """Run ``aw`` to its end even if the caller is cancelled meanwhile, then deliver the
    cancellation.

    For undo steps that must not be cut in half: a rollback (a VM left paused), a firewall
    rule removed in a ``finally`` (a port left blocked). Keep what it runs bounded by its own
    timeouts: the caller waits for it.
    """
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError("cancelled while an undo step ran (it completed)")
    return result
