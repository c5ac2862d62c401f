"""Asyncio helpers of the sync server and its client.

Kept here, not imported from ``migrator.aio``: ``syncserver`` does not depend on ``migrator``.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Task[T]) -> T | None:
    """Cancel ``task``, a child the caller owns, and wait until it has ended.

    Never swallows the caller's own cancellation (``task.cancel(); with
    suppress(CancelledError): await task`` does: the caller's ``CancelledError``, cancelled
    while it waits, looks just like the child's). If the caller is cancelled meanwhile, it
    still waits for the child to end, its cleanup not interrupted a second time (like
    :class:`asyncio.TaskGroup`, no child outlives its owner), then raises ``CancelledError``.

    :return: ``None`` when the child ended cancelled; its result if it had already finished.
    :raise: the child's own exception if it failed (on cancellation or before).
    """
    task.cancel()
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            # asyncio.wait() neither raises the child's outcome nor forwards a cancellation
            # to it: a CancelledError here is the caller's own
            await asyncio.wait((task,))
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        if not task.cancelled():
            task.exception()                # retrieved: the caller's cancellation wins
        raise cancelled
    if task.cancelled():
        return None
    return task.result()
