"""What a ``migrate()`` call returns (:class:`MigrationHandle`), and the calls a scenario
must await (:func:`must_await`, :func:`unawaited`).

In ``async def`` scenario code a call that waits does nothing until it is awaited; a
forgotten ``await`` would silently skip a migration. The calls that wait note their coroutine
and the caller's line in the instance's ledger, and :func:`unawaited` names the ones never
awaited when the scenario ends. In a worker thread (``def`` code) they block instead.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import sys
from typing import TYPE_CHECKING, Any, Callable

from ..blocking import PACKAGE_DIR, BlockingInWorkers, on_loop, worker_call
from ..errors import ScenarioError
from .data import MigrationData

if TYPE_CHECKING:
    from .multihost import MultihostMigration

#: the instance whose scenario runs in this context (its tasks and worker threads)
current_instance: contextvars.ContextVar["MultihostMigration | None"] = \
    contextvars.ContextVar("migrator_instance", default=None)


def must_await(fn: Callable) -> Callable:
    """A coroutine method the scenario must await (it waits for something). In a worker
    thread it blocks; on the loop its coroutine is noted with the caller's line, so one
    never awaited fails the run naming that line (:func:`unawaited`)
    instead of silently doing nothing."""
    @functools.wraps(fn)
    def method(obj, *args, **kwargs):
        coro = fn(obj, *args, **kwargs)
        call = worker_call()
        if call is not None:
            return call.run(coro)
        owner = getattr(obj, "_owner", obj)
        try:
            task = asyncio.current_task()
        except RuntimeError:                # no loop: a coroutine for asyncio.run()
            task = None
        if task is None or task is not owner._scenario_task:
            return coro     # noted only for the scenario's own code: hooks await in tasks
            # that outlive it, where "not awaited yet" at its end is no mistake
        pending = owner._must_await         # the instance's ledger
        if len(pending) > 64:           # long scenarios: forget the ones already awaited
            pending[:] = [p for p in pending
                          if inspect.getcoroutinestate(p[0]) == inspect.CORO_CREATED]
        pending.append((coro, f"{fn.__name__}()", _caller_site()))
        return coro
    method.__migrator_bridged__ = True
    return method


def _caller_site() -> str:
    """``file:line`` of the innermost frame outside migrator (the scenario's call)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
        frame = frame.f_back
    return "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"



class MigrationHandle(BlockingInWorkers):
    """A started ``migrate()`` call. ``await handle`` (or ``await handle.join()``; in
    ``def`` code ``handle.join()``) returns its :class:`MigrationData` or raises its
    error."""

    def __init__(self, mig_data: MigrationData, owner: "MultihostMigration"):
        self.mig_data = mig_data
        self._owner = owner
        self.error: BaseException | None = None
        self.retrieved = False
        #: cancelled because a sibling failed (not a root cause)
        self.collateral = False
        self._done = asyncio.Event()
        self.task: asyncio.Task | None = None

    def __repr__(self) -> str:
        state = "running" if not self._done.is_set() else ("failed" if self.error else "done")
        return f"<MigrationHandle {self.mig_data} {state}>"

    def done(self) -> bool:
        return self._done.is_set()

    @on_loop
    def cancel(self, reason: str) -> None:
        """Cancel its migrations (they roll back) and mark the call failed with ``reason``."""
        if not self.done():
            self.mig_data.cancel(reason)
            if not self.mig_data.migrations and self.task is not None:
                self.task.cancel(reason)

    def __await__(self):
        return self._wait().__await__()

    @must_await
    async def join(self) -> MigrationData:
        """Wait for the call to end (Autotest's ``mig.join()``); its MigrationData.

        :raise ScenarioError: the handle belongs to another scenario instance.
        :raise: the call's error, as ``await handle`` does.
        """
        current = current_instance.get()
        if current is not None and current is not self._owner:
            raise ScenarioError(f"join(): migration {self.mig_data} belongs to instance "
                                f"{self._owner.name}, not to {current.name}")
        return await self._wait()

    async def _wait(self) -> MigrationData:
        await self._done.wait()
        self.retrieved = True
        if self.error is not None:
            self._owner._handled(self)
            raise self.error
        return self.mig_data


def unawaited(pending: list[tuple[Any, str, str]]) -> list[str]:
    """``"call() at file:line"`` of each coroutine in ``pending`` that was never awaited;
    those are closed (so Python does not warn about them again) and ``pending`` emptied."""
    left = []
    for coro, what, site in pending:
        if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
            coro.close()
            left.append(f"{what} at {site}")
    pending.clear()
    return left
