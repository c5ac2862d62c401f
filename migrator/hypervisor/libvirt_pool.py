"""libvirt connections shared by the VMs of one run: one per host and URI.

::

    async with shared_connections():
        ...        # every LibvirtVM made in here (in this task or the tasks it starts)
                   # takes its host's connection from the pool instead of opening its own

Opening a connection to a host's libvirtd costs an SSH handshake (about 0.2 s on the lab's
2 cores: issue 22's profile), and a migration opens one to its destination: a run whose
migrations go back and forth paid it on every hop. Inside a pool a connection is opened on
first use and closed when the pool closes, explicitly (:meth:`LibvirtConnection.close`, with
every domain object taken from it), even when the run is cancelled. A VM's
:meth:`~migrator.hypervisor.libvirt.LibvirtVM.close` then only lets go of it.

A connection found dead (its daemon restarted, its host rebooted: the keepalive or the
socket said so) is closed and opened again on the next use. Outside a pool every VM owns a
connection of its own, as before.

Errors: :class:`~migrator.hypervisor.libvirt_conn.LibvirtError` from opening a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from typing import AsyncIterator, Awaitable, Callable

from ..aio import shielded
from .libvirt_conn import LibvirtConnection

log = logging.getLogger(__name__)


class ConnectionPool:
    """The connections of one :func:`shared_connections` block, by (host, URI)."""

    def __init__(self, close_timeout_s: float):
        self.close_timeout_s = close_timeout_s
        self._conns: dict[tuple[str, str], LibvirtConnection] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.opened = 0             #: connections opened (reopened ones included)
        self.closed = False

    async def get(self, host: str, uri: str,
                  opener: Callable[[], Awaitable[LibvirtConnection]]) -> LibvirtConnection:
        """``host``'s connection at ``uri``: the pool's, or a new one made by ``opener``
        (also in place of a dead one, which is closed first).

        :raise LibvirtError: ``opener``'s.
        :raise RuntimeError: the pool is closed.
        """
        key = (host, uri)
        async with self._locks.setdefault(key, asyncio.Lock()):
            if self.closed:
                raise RuntimeError("the libvirt connection pool is closed")
            conn = self._conns.get(key)
            if conn is not None and not conn.is_alive():
                log.info("[host=%s] libvirt connection lost: opened again", host)
                del self._conns[key]
                await shielded(conn.close(self.close_timeout_s))
                conn = None
            if conn is None:
                conn = await opener()
                self._conns[key] = conn
                self.opened += 1
            return conn

    async def close(self) -> None:
        """Close every connection of the pool (each one's errors logged, never raised)."""
        self.closed = True
        conns, self._conns = list(self._conns.values()), {}
        results = await asyncio.gather(*(c.close(self.close_timeout_s) for c in conns),
                                       return_exceptions=True)
        for conn, result in zip(conns, results):
            if isinstance(result, BaseException):
                log.warning("libvirt connection %s not closed cleanly: %s", conn, result)


_POOL: contextvars.ContextVar[ConnectionPool | None] = contextvars.ContextVar(
    "libvirt_pool", default=None)


def current_pool() -> ConnectionPool | None:
    """The pool of the :func:`shared_connections` block this task runs in, if any."""
    pool = _POOL.get()
    return pool if pool is not None and not pool.closed else None


@contextlib.asynccontextmanager
async def shared_connections(close_timeout_s: float = 30.0) -> AsyncIterator[ConnectionPool]:
    """Share libvirt connections among the VMs made inside the block (see the module's
    docstring); close them all when it ends, however it ends."""
    pool = ConnectionPool(close_timeout_s)
    token = _POOL.set(pool)
    try:
        yield pool
    finally:
        _POOL.reset(token)
        await shielded(pool.close())


__all__ = ["ConnectionPool", "current_pool", "shared_connections"]
