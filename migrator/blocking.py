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
  calls in flight are cancelled -- each runs its own cleanup to the end on the loop (a
  migration rolls back) before the thread hears of it -- and every later call raises
  :class:`asyncio.CancelledError` in the thread; code that never calls into migrator again
  (a ``while True: time.sleep()``) cannot be stopped -- Python cannot kill a thread -- and is
  reported with where it runs;
* a ``def`` that raises ``StopIteration`` gets a RuntimeError (a future cannot carry it), one
  that raises ``SystemExit`` or ``KeyboardInterrupt`` a ScenarioError naming it: neither may
  escape into the event loop and skip the run's cleanup;
* a call from a worker thread whose loop has ended raises :class:`RuntimeError`;
* threads you start yourself are not worker threads: there these methods return coroutines,
  as everywhere outside migrator's workers (hand them to the loop with
  ``asyncio.run_coroutine_threadsafe``, or run the code as a ``def`` callback).
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

from .errors import ScenarioError

log = logging.getLogger(__name__)

_local = threading.local()      # .call: the WorkerCall this worker thread runs


class WorkerCall:
    """One ``def`` callable running in its worker thread, bridged to ``loop``."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop):
        self.name, self.loop = name, loop
        self.thread: threading.Thread | None = None
        self.cancelled = False
        #: the calls in flight, as tasks on the loop (owned here: see :func:`run_in_worker`)
        self.tasks: set[asyncio.Task] = set()

    def run(self, coro) -> Any:
        """Run ``coro`` as a task on the loop; block this (worker) thread until the task has
        ended (when cancelled: after its own cleanup)."""
        result: concurrent.futures.Future = concurrent.futures.Future()

        def start() -> None:                        # on the loop
            if self.cancelled:
                coro.close()
                result.set_exception(asyncio.CancelledError(f"{self.name} was cancelled"))
                return
            task = self.loop.create_task(coro)
            self.tasks.add(task)
            task.add_done_callback(ended)

        def ended(task: asyncio.Task) -> None:      # on the loop
            self.tasks.discard(task)
            if task.cancelled():
                result.set_exception(asyncio.CancelledError(f"{self.name} was cancelled"))
            elif task.exception() is not None:
                result.set_exception(task.exception())
            else:
                result.set_result(task.result())

        try:        # the task runs in a copy of this thread's context (the instance's)
            self.loop.call_soon_threadsafe(start, context=contextvars.copy_context())
        except RuntimeError:                        # the loop is closed
            coro.close()
            raise RuntimeError(f"{self.name}: the run's event loop has ended") from None
        return result.result()

    def cancel(self) -> None:
        """(On the loop.) Cancel the calls in flight and refuse the next ones."""
        self.cancelled = True
        for task in list(self.tasks):
            task.cancel()

    def where(self) -> str:
        """``file:line (function)`` where the worker thread's own code is now, or ``"?"``."""
        frame = sys._current_frames().get(self.thread.ident) if self.thread else None
        return code_site(frame)[0]


_STDLIB_DIR = os.path.dirname(threading.__file__)
#: migrator's own source directory (frames in it are migrator's, not a scenario's)
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def code_site(frame, is_user_file: Callable[[str], bool] = lambda path: False
              ) -> tuple[str, bool]:
    """Whose code a thread is in: ``("file:line (function)", theirs)`` of the innermost frame
    of ``frame``'s stack that is neither the standard library nor an installed package;
    ``theirs`` is False when that frame is migrator's own. A file ``is_user_file`` accepts
    is theirs wherever it lies. ``("?", False)`` when there is none."""
    while frame is not None:
        path = frame.f_code.co_filename
        where = f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"
        if is_user_file(path):
            return where, True
        if path.startswith(PACKAGE_DIR):
            return where, False
        if not (path.startswith("<") or "-packages" in path or path.startswith(_STDLIB_DIR)):
            return where, True
        frame = frame.f_back
    return "?", False


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
        except (StopIteration, StopAsyncIteration) as exc:   # a future cannot carry these
            result, error = None, RuntimeError(f"{name} raised {type(exc).__name__}")
            error.__cause__ = exc
        except (Exception, asyncio.CancelledError) as exc:  # handed to the awaiting task
            result, error = None, exc
        except BaseException as exc:  # noqa: BLE001 - SystemExit must not reach the loop
            result, error = None, ScenarioError(f"{name} raised {type(exc).__name__}"
                                                f"{f': {exc}' if str(exc) else ''}")
            error.__cause__ = exc
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
        # its calls on the loop end first (each bounded by its own timeouts: a migration's
        # rollback), so nothing it started outlives it; then the thread is given grace_s
        if call.tasks:
            await asyncio.wait(list(call.tasks))
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
