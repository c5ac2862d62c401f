"""The standalone sync server's garbage collection: full collections when no round is open.

Why. With 1000 members connected the server holds some 150,000 long-lived objects (each
connection's aiohttp state). CPython's automatic *full* collection scans them all — 33–70 ms
on this machine, finding nothing to free — whenever enough objects have survived into the old
generation since the last one, and a busy round's live waiters (their requests, futures and
tasks, alive while the round is open) are such objects: every sixth round or so of
``bench/sync_barrier.py`` was released 70–110 ms after its last arrival, all members alike
(measured with ``gc.callbacks``), which made the 1000-member p99 120–130 ms.

What. The young generations are still collected automatically (cheap; they free most cycles
while they are young). The full collection is taken over: it runs when no round is open, at
most every ``min_interval_s``, and at the latest ``max_interval_s`` after the previous one
whatever the load, so cyclic garbage that reached the old generation (a closed connection's)
waits that long at most. Only where the server has its process to itself
(``migrate-syncserver``): the collector's thresholds are the process's.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Callable

from ._aio import cancel_and_wait

log = logging.getLogger(__name__)

#: a third threshold no count of young collections reaches: no automatic full collection
NEVER = 1 << 30


class IdleFullCollections:
    """``async with IdleFullCollections(is_idle):``: full collections only when
    ``is_idle()`` (checked every ``check_s``) and ``min_interval_s`` passed since the last,
    or once ``max_interval_s`` passed. The thresholds are restored at the block's end.

    :attr:`collections` counts the full collections it ran; :attr:`last_pause_s` is the
    latest one's duration, also given to ``on_collect``; :attr:`checks` counts the looks.
    """

    def __init__(self, is_idle: Callable[[], bool], check_s: float = 1.0,
                 min_interval_s: float = 10.0, max_interval_s: float = 300.0,
                 on_collect: Callable[[float], None] | None = None):
        self.is_idle, self.check_s, self.on_collect = is_idle, check_s, on_collect
        self.min_interval_s, self.max_interval_s = min_interval_s, max_interval_s
        self.collections = self.checks = 0
        self.last_pause_s: float | None = None
        self._saved: tuple[int, int, int] | None = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "IdleFullCollections":
        self._saved = gc.get_threshold()
        gc.set_threshold(self._saved[0], self._saved[1], NEVER)
        self._task = asyncio.get_running_loop().create_task(self._run())  # owned: __aexit__
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            if self._task is not None:
                await cancel_and_wait(self._task)
        finally:
            if self._saved is not None:
                gc.set_threshold(*self._saved)

    def due(self, since_last_s: float) -> bool:
        """Whether a full collection runs now, ``since_last_s`` after the previous one."""
        return since_last_s >= self.max_interval_s or (
            since_last_s >= self.min_interval_s and self.is_idle())

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.check_s)
            now = time.monotonic()
            self.checks += 1
            if not self.due(now - last):
                continue
            found = gc.collect()
            last = time.monotonic()
            self.collections += 1
            self.last_pause_s = last - now
            if self.on_collect is not None:
                self.on_collect(self.last_pause_s)
            log.debug("full garbage collection: %d objects freed in %.1f ms", found,
                      self.last_pause_s * 1000)


__all__ = ["IdleFullCollections", "NEVER"]
