"""Blocking calls on the event loop, caught: a ``time.sleep(20)`` in an ``async def``
scenario freezes every migration in flight, every barrier and every progress line.

:class:`LoopStallWatch` ticks on the loop; a watchdog thread notices when the ticks stop for
longer than ``bound_s`` and takes where the loop's thread is at that moment (the innermost
frame that is neither the standard library nor an installed package). When that frame is the
scenario's (not migrator's own: an fsync, a crypto step, which are only logged), the run
reports it once the loop runs again, with how long it was blocked::

    WARNING: the event loop was blocked for 20.0 s by seed.py:41 (migration_scenario):
    a blocking call in async code (time.sleep?) freezes every migration in flight; await
    asyncio.sleep() or write the callback as a plain def (it then runs in a worker thread)
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from typing import Callable

from ..blocking import code_site

log = logging.getLogger(__name__)


class LoopStallWatch:
    """``async with LoopStallWatch(bound_s, warn, is_user_file):`` around the code to watch.

    :param warn: called on the loop with the warning's text, once per stall.
    :param is_user_file: which source files are the scenario's (preferred in the report).
    """

    def __init__(self, bound_s: float, warn: Callable[[str], None],
                 is_user_file: Callable[[str], bool] = lambda path: False):
        self.bound_s, self.warn, self.is_user_file = bound_s, warn, is_user_file
        self.stalls: list[tuple[float, str]] = []   #: (seconds, where) of each stall
        self._beat = time.monotonic()
        self._where: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ticker: asyncio.Task | None = None
        self._loop_thread = threading.get_ident()

    async def __aenter__(self) -> "LoopStallWatch":
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="loop watch")
        self._thread = threading.Thread(target=self._watch, name="migrator: loop watch",
                                        daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        self._ticker.cancel()
        await asyncio.wait([self._ticker])     # never swallows a cancellation of the caller
        # joined in a thread: the watchdog wakes at least every bound_s / 4
        await asyncio.to_thread(self._thread.join)
        self._report()          # a stall that ended the watched code

    async def _tick(self) -> None:
        period = self.bound_s / 4
        while True:
            self._report()
            self._beat = time.monotonic()
            await asyncio.sleep(period)

    def _report(self) -> None:
        where = self._where
        if where is None:
            return
        seconds = time.monotonic() - self._beat
        self._where = None
        self.stalls.append((seconds, where))
        self.warn(f"the event loop was blocked for {seconds:.1f} s by {where}: a blocking "
                  "call in async code (time.sleep?) freezes every migration in flight; "
                  "await asyncio.sleep() or write the callback as a plain def (it then runs "
                  "in a worker thread)")

    def _watch(self) -> None:
        while not self._stop.wait(self.bound_s / 4):
            beat = self._beat
            if self._where is not None or time.monotonic() - beat <= self.bound_s:
                continue
            where, theirs = code_site(sys._current_frames().get(self._loop_thread),
                                      self.is_user_file)
            if self._beat != beat:      # the loop ticked meanwhile: it was not blocked there
                continue
            if theirs:
                self._where = where
                log.warning("the event loop has been blocked for over %g s, at %s",
                            self.bound_s, where)
            else:       # migrator's own (an fsync, a crypto step) or a stopped process
                log.warning("the event loop has been blocked for over %g s in migrator's own "
                            "code, at %s", self.bound_s, where)
                while self._beat == beat and not self._stop.wait(self.bound_s / 4):
                    pass
