"""Concurrent steps whose first failure is raised as itself (not as an ExceptionGroup), and
errors described in one line for reports."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Sequence

from ..errors import MigrationError


async def first_error(aws: Sequence[Awaitable[Any]]) -> list[Any]:
    """Run ``aws`` concurrently in a task group; the first failure cancels the rest and is
    raised as itself (not as an ExceptionGroup); later failures are added as notes."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_as_coro(aw)) for aw in aws]
    except BaseExceptionGroup as eg:
        raise first_of(eg) from None
    return [t.result() for t in tasks]


async def _as_coro(aw: Awaitable[Any]) -> Any:
    return await aw


def first_of(eg: BaseExceptionGroup) -> BaseException:
    leaves = _leaves(eg)
    first = leaves[0]
    for other in leaves[1:]:
        first.add_note(f"also failed: {type(other).__name__}: {other}")
    return first


def _leaves(eg: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


def describe(exc: BaseException) -> str:
    notes = getattr(exc, "__notes__", None) or []
    text = str(exc) or type(exc).__name__
    return "; ".join([f"{type(exc).__name__}: {text}" if not isinstance(exc, MigrationError)
                      else text, *notes])
