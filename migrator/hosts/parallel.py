"""Fan-out: run awaitables concurrently, results in the order given."""

from __future__ import annotations

import asyncio
import inspect
from typing import Awaitable, Iterable, Sequence, TypeVar

from .result import CmdResult
from .ssh import SSHHost

T = TypeVar("T")


async def parallel(awaitables: Iterable[Awaitable[T]], limit: int | None = None,
                   fail_fast: bool = False) -> list[T | Exception]:
    """Await all of ``awaitables`` concurrently, at most ``limit`` at a time.

    Returns their results in the order given. With ``fail_fast=False`` an awaitable that
    raises has its exception returned in its place and the others go on. With
    ``fail_fast=True`` the first exception cancels the others (and waits for them to finish
    cancelling) and is raised itself.

    Cancelling the caller cancels every awaitable. ``BaseException``s other than ordinary
    errors (``KeyboardInterrupt``, ``SystemExit``) always propagate.
    """
    items = list(awaitables)
    gate = asyncio.Semaphore(limit) if limit else None
    results: list = [None] * len(items)

    async def one(i: int, aw: Awaitable[T]) -> None:
        try:
            if gate is None:
                results[i] = await aw
            else:
                async with gate:
                    results[i] = await aw
        except Exception as exc:
            if fail_fast:
                raise
            results[i] = exc

    try:
        async with asyncio.TaskGroup() as tg:
            for i, aw in enumerate(items):
                tg.create_task(one(i, aw))
    except BaseExceptionGroup as group:
        # the first failure, raised as itself (the contract), not as a group
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        raise exc from None
    finally:
        for aw in items:  # coroutines whose task was cancelled before it ever ran them
            if asyncio.iscoroutine(aw) and inspect.getcoroutinestate(aw) == inspect.CORO_CREATED:
                aw.close()
    return results


async def run_on(hosts: Sequence[SSHHost], command: str, limit: int | None = None,
                 fail_fast: bool = False, **run_kwargs) -> list[CmdResult | Exception]:
    """Run ``command`` on every host at once; results (or errors) in the order of ``hosts``."""
    return await parallel((h.run(command, **run_kwargs) for h in hosts), limit=limit,
                          fail_fast=fail_fast)
