"""Plain ``def`` code in worker threads, calling migrator's async objects as if they blocked.

Scenario callbacks and hooks may be ``def`` (Autotest's style) or ``async def``. A ``def`` one
runs in a worker thread (:func:`run_in_worker`). In such a thread the coroutine methods of
migrator's objects (hosts, VMs, guest sessions, migration data and handles, the scenario
itself) *block*: the call is handed to the event loop, and returns its result (or raises its
error) once the loop has run it. The few plain methods that touch loop state (``migrate()``,
``cancel()``) are run on the loop too. Anywhere else -- on the loop, or in a thread migrator did
not start -- every method behaves exactly as defined: coroutine methods return coroutines.

This is one bridge, put on each class once (:class:`BlockingInWorkers`), not a second
implementation: a worker gets the very objects async code gets, and every call runs the same
code on the loop.

What can go wrong:

* a worker thread is cancelled (the run is interrupted, a sibling migration failed): its
  calls in flight are cancelled and every later call raises :class:`asyncio.CancelledError`
  in the thread; code that never calls into migrator again (a ``while True: time.sleep()``)
  cannot be stopped -- Python cannot kill a thread -- and is reported with where it runs;
* a call from a worker thread whose loop has ended raises :class:`RuntimeError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import logging
import os
import sys
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

_local = threading.local()      # .call: the WorkerCall this worker thread runs


class WorkerCall:
    """One ``def`` callable running in its worker thread, bridged to ``loop``."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop):
        self.name, self.loop = name, loop
        self.thread: threading.Thread | None = None
        self.cancelled = False
        self._inflight: set[concurrent.futures.Future] = set()
        self._lock = threading.Lock()

    def run(self, coro) -> Any:
        """Run ``coro`` on the loop; block this (worker) thread until it ends."""
        with self._lock:
            if self.cancelled:
                coro.close()
                raise asyncio.CancelledError(f"{self.name} was cancelled")
            try:
                fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
            except RuntimeError:            # the loop is closed
                coro.close()
                raise RuntimeError(f"{self.name}: the run's event loop has ended") from None
            self._inflight.add(fut)
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            raise asyncio.CancelledError(f"{self.name} was cancelled") from None
        finally:
            with self._lock:
                self._inflight.discard(fut)

    def cancel(self) -> None:
        """(On the loop.) Cancel the calls in flight and refuse the next ones."""
        with self._lock:
            self.cancelled = True
            inflight = list(self._inflight)
        for fut in inflight:
            fut.cancel()

    def where(self) -> str:
        """``file:line (function)`` where the worker thread's own code is now, or ``"?"``."""
        frame = sys._current_frames().get(self.thread.ident) if self.thread else None
        return code_site(frame)


_STDLIB_DIR = os.path.dirname(threading.__file__)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _is_library(path: str) -> bool:
    return (path.startswith(_PACKAGE_DIR) or path.startswith("<")
            or (path.startswith(_STDLIB_DIR) and "-packages" not in path))


def code_site(frame, is_user_file: Callable[[str], bool] = lambda path: False) -> str:
    """Where a thread stopped in its caller's code: ``file:line (function)`` of the
    innermost frame of ``frame``'s stack in a file ``is_user_file`` accepts, else the
    innermost one outside the standard library and migrator, else ``"?"``."""
    fallback = None
    while frame is not None:
        path = frame.f_code.co_filename
        if is_user_file(path):
            fallback = frame
            break
        if fallback is None and not _is_library(path):
            fallback = frame
        frame = frame.f_back
    if fallback is None:
        return "?"
    return f"{fallback.f_code.co_filename}:{fallback.f_lineno} ({fallback.f_code.co_name})"


def worker_call() -> WorkerCall | None:
    """The :class:`WorkerCall` of this thread; None on a loop's thread or in a thread
    migrator did not start for a ``def`` callable."""
    return getattr(_local, "call", None)


def is_async(fn: Callable) -> bool:
    """Whether calling ``fn`` returns a coroutine (bridged methods included)."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    call = getattr(fn, "__call__", None) if not inspect.isfunction(fn) else None
    return inspect.iscoroutinefunction(fn) or (call is not None
                                               and inspect.iscoroutinefunction(call))


def bridged(fn: Callable) -> Callable:
    """``fn`` (a coroutine function) made to block when called in a worker thread."""
    if getattr(fn, "__migrator_bridged__", False):
        return fn

    @functools.wraps(fn)
    def method(*args, **kwargs):
        call = getattr(_local, "call", None)
        if call is None:
            return fn(*args, **kwargs)
        return call.run(fn(*args, **kwargs))
    method.__migrator_bridged__ = True
    return method


def on_loop(fn: Callable) -> Callable:
    """A plain method that touches loop state (creates tasks, cancels): called in a worker
    thread, it runs on the loop and the thread waits for its result."""
    @functools.wraps(fn)
    def method(*args, **kwargs):
        call = getattr(_local, "call", None)
        if call is None:
            return fn(*args, **kwargs)

        async def on_the_loop():
            return fn(*args, **kwargs)
        return call.run(on_the_loop())
    method.__migrator_bridged__ = True
    return method


def bridge_class(cls: type) -> type:
    """Bridge every public coroutine method defined in ``cls`` itself."""
    for name, attr in list(vars(cls).items()):
        if name.startswith("_") or isinstance(attr, (staticmethod, classmethod, property)):
            continue
        if inspect.iscoroutinefunction(attr):
            setattr(cls, name, bridged(attr))
    return cls


class BlockingInWorkers:
    """Base of the classes whose public coroutine methods block in worker threads; every
    subclass (a driver's VM, a user's scenario) is bridged when it is defined."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        bridge_class(cls)


async def run_in_worker(fn: Callable, *args: Any, name: str, grace_s: float = 10.0) -> Any:
    """Run ``fn(*args)`` in a new worker thread; its result (awaited if it is awaitable).

    The thread runs in a copy of the caller's context. When the caller is cancelled the
    worker's calls in flight are cancelled too, and the thread is given ``grace_s`` to
    return; one that does not is logged with where it runs (it cannot be killed).

    :raise: what ``fn`` raised; ``asyncio.CancelledError`` when cancelled.
    """
    loop = asyncio.get_running_loop()
    call = WorkerCall(name, loop)
    done: asyncio.Future = loop.create_future()
    context = contextvars.copy_context()

    def deliver(result: Any, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def body() -> None:
        _local.call = call
        try:
            result, error = context.run(fn, *args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            result, error = None, exc
        finally:
            _local.call = None
        try:
            loop.call_soon_threadsafe(deliver, result, error)
        except RuntimeError:        # the loop has ended: nobody waits any more
            pass

    # retrieved here, so an error that arrives after a cancellation is never "unretrieved"
    done.add_done_callback(lambda f: f.cancelled() or f.exception())
    call.thread = threading.Thread(target=body, name=f"migrator: {name}", daemon=True)
    call.thread.start()
    try:
        result = await asyncio.shield(done)
    except asyncio.CancelledError:
        call.cancel()
        try:
            async with asyncio.timeout(grace_s):
                await asyncio.shield(done)
        except TimeoutError:
            log.warning("%s did not return within %g s of being cancelled; its thread runs "
                        "on at %s", name, grace_s, call.where())
        except BaseException:  # noqa: BLE001 - its own end after the cancellation
            pass
        raise
    if inspect.isawaitable(result):     # a def that returned a coroutine (a lambda)
        result = await result
    return result
