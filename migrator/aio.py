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
    timeouts: the caller waits for it. If ``aw`` fails after the caller was cancelled, its
    error is raised and the cancellation delivered again (at the caller's next wait).
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
        except BaseException:
            if cancelled:       # the step failed: its error now, the cancellation not lost
                asyncio.current_task().cancel()
            raise
    if cancelled:
        raise asyncio.CancelledError("cancelled while an undo step ran (it completed)")
    return result


async def first_set(*events: asyncio.Event) -> None:
    """Return once any of ``events`` is set (at once if one is); the waits it made are
    ended before it returns or raises."""
    if not any(e.is_set() for e in events):
        await first_done(*(e.wait() for e in events))


async def first_done(*aws: Awaitable) -> None:
    """Return once any of ``aws`` is done; the others are cancelled and ended (owned here)
    before it returns or raises (a cancellation of the caller meanwhile still
    propagates)."""
    waits = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """``aw``, or :class:`TimeoutError` after ``timeout`` seconds (None: no limit): what
    ``asyncio.wait_for`` is from Python 3.12 on, a ``timeout`` block.

    Python 3.11's ``asyncio.wait_for`` loses the caller's cancellation when ``aw`` completes
    in the same turn of the loop as the cancel arrives: it returns the result instead of
    raising ``CancelledError`` (CPython gh-86296). A migration's progress loop waits on an
    event that QEMU's own events set; a Ctrl-C landing at such a moment was dropped, and that
    migration ran to completion instead of rolling back (seen in the suite,
    test_ctrl_c_mid_migration_rolls_back_and_leaves_nothing). Every wait with a limit in
    migrator goes through here.
    """
    async with asyncio.timeout(timeout):
        return await aw


async def cancel_and_wait(task: "asyncio.Task[T]") -> "T | None":
    """Cancel ``task``, a child the caller owns, and wait until it has ended; never swallows
    the caller's own cancellation. See :func:`syncserver._aio.cancel_and_wait` (the one
    implementation: ``syncserver`` does not import ``migrator``; imported here when first
    used, so that the lower layers do not load the sync server's package)."""
    from syncserver._aio import cancel_and_wait as implementation
    return await implementation(task)


__all__ = ["cancel_and_wait", "first_done", "first_set", "shielded", "wait_for"]
