"""Owned connections to libvirtd, and libvirt's event loop on asyncio.

::

    conn = await LibvirtConnection.open("hostA", uri, timeout=15, keepalive=(5, 3))
    dom = await conn.call("lookup", conn.raw.lookupByName, "vm1", timeout=30)
    ...
    await conn.close()            # idempotent; frees every domain object taken from it

**Why an owner.** A libvirt connection is reference counted in C: the open holds one
reference and every ``virDomain`` Python object holds another. Whoever drops the *last* one
disposes of the connection, which sends a close RPC and waits for libvirt's client lock. When
that happens inside one of libvirt's own I/O callbacks on the event loop (the garbage
collector freeing a forgotten domain object there, say), the lock is already held by the same
thread: the process deadlocks for good, and no asyncio timeout can fire. Left to the garbage
collector, connections also stay open (one sshd session each for ``qemu+libssh`` URIs).

So every connection here has an owner that closes it explicitly, and :meth:`close` releases
the connection's last reference itself, in a worker thread, after freeing (in that thread)
every domain object obtained from it and deregistering its event callbacks: whatever the
collector later finds of those objects holds no C reference any more. A close while calls on
the connection are still running (a hung call abandoned by its timeout) is finished by the
last of those calls, never under it.

Errors: :class:`LibvirtError` (a :class:`HostError` naming the host and the call, with
libvirt's error code; ``unreachable`` when the daemon could not be reached at all).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import libvirt
import libvirtmod

from ..aio import wait_for
from ..errors import HostError

log = logging.getLogger(__name__)
# errors are raised as exceptions (and logged where they matter); libvirt's default handler
# would also print every one of them, expected ones included, on stderr
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

#: libvirt calls run here: a migration holds a thread for its whole length, so the default
#: executor (a handful of threads on a small machine) would let job-stats polls and an
#: abortJob queue behind running migrations
_EXECUTOR = ThreadPoolExecutor(max_workers=64, thread_name_prefix="libvirt")
_proxy: "_LoopProxy | None" = None
_OPEN_STRONG: set["LibvirtConnection"] = set()     # an open connection is never collected


class LibvirtError(HostError):
    """A libvirt call failed or did not answer in time. ``code`` is libvirt's error code
    (None for a timeout)."""

    def __init__(self, host: str, message: str, code: int | None = None,
                 unreachable: bool = False):
        super().__init__(host, message)
        self.code = code
        #: libvirtd could not be reached at all (as opposed to answering with an error)
        self.unreachable = unreachable


def open_connections() -> list["LibvirtConnection"]:
    """Connections opened and not yet fully closed in this process (for leak checks)."""
    return sorted(_OPEN_STRONG, key=lambda c: c.serial)


def ensure_event_loop() -> None:
    """Dispatch libvirt's events (and keepalives) on the running asyncio loop, through
    ``libvirtaio``: registered once per process, before the first connection is opened; a
    later loop (a new ``asyncio.run``) takes over from the previous one."""
    global _proxy
    loop = asyncio.get_running_loop()
    if _proxy is None:
        import libvirtaio
        _proxy = _LoopProxy(loop)
        libvirtaio.virEventAsyncIOImpl(loop=_proxy).register()
    else:
        _proxy.loop = loop


class _LoopProxy:
    """The asyncio loop as libvirtaio sees it.

    libvirt adds and removes its handles and timers from whichever thread runs libvirt code,
    here the executor threads of blocking calls, and libvirtaio passes those straight to the
    loop, whose methods are not thread-safe. Through this proxy every such call is queued to
    the loop's thread with ``call_soon_threadsafe``, in the order made, and never waited for
    (a worker thread waiting for the loop while holding a libvirt lock could deadlock with a
    libvirt callback running on the loop). Once the loop is closed (process exit) the calls
    are dropped instead of raising "Event loop is closed" from libvirt's threads.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def _queue(self, fn: Callable[..., Any], *args: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:                  # the loop is closed
            return False

    def add_reader(self, fd: int, cb, *args) -> None:
        self._queue(self.loop.add_reader, fd, cb, *args)

    def remove_reader(self, fd: int) -> None:
        self._queue(self.loop.remove_reader, fd)

    def add_writer(self, fd: int, cb, *args) -> None:
        self._queue(self.loop.add_writer, fd, cb, *args)

    def remove_writer(self, fd: int) -> None:
        self._queue(self.loop.remove_writer, fd)

    def create_task(self, coro, **_kw) -> "_QueuedTask":
        task = _QueuedTask(self.loop, coro)
        if not self._queue(task.start):
            coro.close()
        return task

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loop, name)


class _QueuedTask:
    """A task created on the loop's thread later; ``cancel()`` is queued behind its start."""

    def __init__(self, loop: asyncio.AbstractEventLoop, coro):
        self._loop, self._coro = loop, coro
        self._task: asyncio.Task | None = None
        self._cancelled = False

    def start(self) -> None:
        if self._cancelled:
            self._coro.close()
        else:
            self._task = self._loop.create_task(self._coro)

    def cancel(self, msg: Any = None) -> bool:
        self._cancelled = True
        try:
            self._loop.call_soon_threadsafe(self._cancel_now)
        except RuntimeError:
            pass
        return True

    def _cancel_now(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _as_error(host: str, what: str, exc: libvirt.libvirtError) -> LibvirtError:
    return LibvirtError(host, f"{what}: {exc.get_error_message() or exc}",
                        exc.get_error_code())


class LibvirtConnection:
    """One connection to one host's libvirtd, owned by whoever opened it (see the module
    docstring). ``raw`` is the ``libvirt.virConnect``; use it only through :meth:`call`,
    :meth:`submit` and :meth:`register_event`, so that what it hands out is tracked."""

    _serials = 0

    def __init__(self, host: str, uri: str, raw: libvirt.virConnect):
        LibvirtConnection._serials += 1
        self.serial = LibvirtConnection._serials
        self.host, self.uri, self.raw = host, uri, raw
        self._domains: "weakref.WeakSet[libvirt.virDomain]" = weakref.WeakSet()
        self._callbacks: set[int] = set()
        self._running: set[concurrent.futures.Future] = set()
        self._lock = threading.Lock()
        self._closing = False
        self.closed = False
        _OPEN_STRONG.add(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "closing" if self._closing else "open"
        return f"<LibvirtConnection #{self.serial} {self.host} {state}>"

    @classmethod
    async def open(cls, host: str, uri: str, *, timeout: float,
                   keepalive: tuple[int, int] | None = None) -> "LibvirtConnection":
        """Connect to ``uri`` (bounded by ``timeout``) and set libvirt keepalives.

        :raise LibvirtError: with ``unreachable`` set: the host or daemon cannot be reached,
            the host key is refused, or the login fails.
        """
        ensure_event_loop()
        what = f"connect {uri.split('?')[0]}"
        fut = _EXECUTOR.submit(libvirt.open, uri)
        try:
            raw = await wait_for(asyncio.wrap_future(fut), timeout)
        except libvirt.libvirtError as exc:
            err = _as_error(host, what, exc)
            err.unreachable = True
            raise err from exc
        except (TimeoutError, asyncio.CancelledError) as exc:
            # the open may still succeed in its thread: that connection is closed there
            fut.add_done_callback(_close_orphan)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise LibvirtError(host, f"{what}: no answer within {timeout:g} s",
                               unreachable=True) from None
        conn = cls(host, uri, raw)
        if keepalive is not None:
            try:
                raw.setKeepAlive(*keepalive)
            except libvirt.libvirtError as exc:
                log.warning("[host=%s] libvirt keepalive not set: %s", host, exc)
        return conn

    def is_alive(self) -> bool:
        """Whether the connection still works (a local check, no RPC)."""
        return not self._closing and bool(self.raw.isAlive())

    # -- calls ------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any,
               also: tuple["LibvirtConnection", ...] = ()) -> asyncio.Future:
        """Run ``fn(*args)`` in a libvirt worker thread, unbounded (for a migration job that
        lasts as long as it lasts); domain objects it returns are tracked. Connections in
        ``also`` that the call uses too (a migration's destination) do not close under it.

        :raise LibvirtError: a connection is closing or closed.
        """
        for conn in (self, *also):
            if conn._closing:
                raise LibvirtError(conn.host, f"connection to {conn.uri.split('?')[0]} "
                                              "is closed")

        def tracked():
            result = fn(*args)
            for conn in (self, *also):
                conn._track(result)
            return result
        fut = _EXECUTOR.submit(tracked)
        for conn in (self, *also):
            with conn._lock:
                conn._running.add(fut)
            fut.add_done_callback(conn._call_done)
        result = asyncio.wrap_future(fut)
        # a call given up on (timed out, or a migration job the run stopped waiting for) may
        # fail later: its error is logged here, never as "exception was never retrieved"
        result.add_done_callback(_log_abandoned)
        return result

    async def call(self, what: str, fn: Callable[..., Any], *args: Any,
                   timeout: float) -> Any:
        """Run the blocking libvirt call ``fn(*args)`` off the event loop, at most ``timeout``
        (the thread of a call that times out is abandoned; the caller goes on).

        :raise LibvirtError: libvirt's error (code kept), no answer within ``timeout``, or
            the connection is closed.
        """
        try:
            return await wait_for(self.submit(fn, *args), timeout)
        except libvirt.libvirtError as exc:
            raise _as_error(self.host, what, exc) from exc
        except TimeoutError:
            raise LibvirtError(self.host, f"{what}: no answer from libvirt within "
                                          f"{timeout:g} s (daemon hung or link lost?)") from None

    def _track(self, result: Any) -> None:
        items = result if isinstance(result, list) else [result]
        for item in items:
            if isinstance(item, libvirt.virDomain) and item.connect() is self.raw:
                self._domains.add(item)

    def _call_done(self, fut: concurrent.futures.Future) -> None:
        with self._lock:
            self._running.discard(fut)
            finish = self._closing and not self.closed and not self._running
        if finish:                          # the last call of a deferred close ended
            self._release()

    # -- events -----------------------------------------------------------------------------

    async def register_event(self, event_id: int, cb: Callable, *, timeout: float) -> int:
        """``domainEventRegisterAny`` for all domains; deregistered at the latest by
        :meth:`close`."""
        cbid = await self.call("register events", self.raw.domainEventRegisterAny, None,
                               event_id, cb, None, timeout=timeout)
        self._callbacks.add(cbid)
        return cbid

    async def deregister_event(self, cbid: int, *, timeout: float) -> None:
        if cbid in self._callbacks:
            self._callbacks.discard(cbid)
            await self.call("deregister events", self.raw.domainEventDeregisterAny, cbid,
                            timeout=timeout)

    # -- close ------------------------------------------------------------------------------

    async def close(self, timeout: float = 30.0) -> None:
        """Deregister the events, free every domain object taken from this connection and
        close it, in a worker thread. Idempotent; never raises. Calls still running are
        waited for up to ``timeout``; after that the close is finished by the last of them
        (:func:`open_connections` lists the connection until then)."""
        if self._closing:
            return
        self._closing = True
        with self._lock:
            running = set(self._running)
        if running:
            waiters = [asyncio.wrap_future(f) for f in running]
            for waiter in waiters:      # one that ends after the timeout fails unheard: its
                waiter.add_done_callback(_log_abandoned)   # error is logged, not "never
            await asyncio.wait(waiters, timeout=timeout)   # retrieved" (a SPLIT's migrate3)
        with self._lock:
            if self._running:
                log.warning("[host=%s] libvirt connection #%d: %d call(s) still running; "
                            "it closes when they end", self.host, self.serial,
                            len(self._running))
                return
        fut = _EXECUTOR.submit(self._release)
        await asyncio.shield(asyncio.wrap_future(fut))

    def _release(self) -> None:
        """In a worker thread: the connection's last references, released in order."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        raw = self.raw
        for cbid in list(self._callbacks):
            try:
                raw.domainEventDeregisterAny(cbid)
            except libvirt.libvirtError:
                pass                        # a dead connection: freed with it below
        self._callbacks.clear()
        for dom in list(self._domains):
            obj, dom._o = dom._o, None     # its __del__ then does nothing
            if obj is not None:
                libvirtmod.virDomainFree(obj)
        try:
            raw.close()
        except libvirt.libvirtError as exc:
            log.debug("[host=%s] close: %s", self.host, exc)
        _OPEN_STRONG.discard(self)


def _close_orphan(fut: concurrent.futures.Future) -> None:
    """A connection opened after its caller gave up: closed in the thread that opened it."""
    try:
        raw = fut.result()
    except Exception:  # noqa: BLE001 - the open failed: nothing to close
        return
    try:
        raw.close()
    except libvirt.libvirtError:
        pass


def _log_abandoned(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("libvirt call ended with %s", fut.exception())


__all__ = ["LibvirtConnection", "LibvirtError", "ensure_event_loop", "open_connections"]
