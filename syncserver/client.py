"""``SyncClient``: one member of a run, talking to the sync server over a WebSocket.

::

    async with SyncClient(server.url, token=TOKEN, member="hostA", run_id=RUN) as sync:
        await sync.barrier("disks_prepared", ["hostA", "hostB"], timeout=30)
        ports = await sync.exchange("ports", ["hostA", "hostB"], {"vm1": 4444}, timeout=30)

The client counts its own rounds per name and sends the generation with every call, so a
name is reused across rounds safely: a member that runs ahead joins the next round, never
the one its peers are still finishing. A failed round counts as used.

Every call raises the server's error as the matching exception (:class:`BarrierTimeout`,
:class:`BarrierAborted`, :class:`MembershipError`, :class:`ProtocolError`), or
:class:`SyncConnectionError` when the server cannot be reached or the link is lost; an
:class:`AuthError` when the token is refused.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import aiohttp

from ._aio import cancel_and_wait
from .protocol import (MAX_MESSAGE_BYTES, WS_PATH, AuthError, ProtocolError, SyncConnectionError,
                       check_name, encode, error_from_json, join_members)


class SyncClient:
    """A member of run ``run_id``. An async context manager; not shareable across loops.

    :param persistent: this connection is the member's liveness anchor (a host's participant
        process): if it is lost, the server treats the member as gone for the run.
    :param heartbeat_s: WebSocket ping interval; the server is considered lost when a ping is
        not answered within half of it.
    :param grace_s: how long past a call's own timeout to wait for the server's answer before
        declaring the server unresponsive.
    """

    def __init__(self, url: str, *, token: str, member: str, run_id: str,
                 persistent: bool = False, heartbeat_s: float = 5.0,
                 connect_timeout_s: float = 10.0, grace_s: float = 10.0):
        self.url = url.rstrip("/")
        self.member = check_name(member, "member name")
        self.run_id = check_name(run_id, "run id")
        self.persistent = persistent
        self._token = token
        self._heartbeat_s = heartbeat_s
        self._connect_timeout_s = connect_timeout_s
        self._grace_s = grace_s
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._generations: dict[tuple[str, str], int] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task | None = None
        self._lost: SyncConnectionError | None = None

    def __repr__(self) -> str:
        return f"<SyncClient {self.member}@{self.run_id} {self.url}>"

    async def __aenter__(self) -> "SyncClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        """:raise AuthError: token refused; :raise SyncConnectionError: server unreachable;
        :raise ProtocolError: the server rejected the run id or member name."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout_s))
        try:
            self._ws = await self._session.ws_connect(
                self.url + WS_PATH,
                params={"run": self.run_id, "member": self.member,
                        "persistent": "1" if self.persistent else "0"},
                headers={"Authorization": f"Bearer {self._token}"},
                heartbeat=self._heartbeat_s, max_msg_size=2 * MAX_MESSAGE_BYTES,
                autoping=True)
        except aiohttp.WSServerHandshakeError as exc:
            await self._close_session()
            if exc.status == 401:
                raise AuthError(f"sync server {self.url} refused the token") from None
            if exc.status == 400:
                raise ProtocolError(f"sync server {self.url} refused the connection: "
                                    f"{exc.message}", status=400) from None
            raise SyncConnectionError(f"sync server {self.url}: HTTP {exc.status} "
                                      f"{exc.message}") from exc
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            await self._close_session()
            raise SyncConnectionError(f"cannot reach sync server {self.url}: {exc}") from exc
        except BaseException:       # cancelled mid-handshake: leave no session open
            await self._close_session()
            raise
        # the reader belongs to this client: cancelled and awaited in close()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def close(self) -> None:
        """Close the connection (pending calls fail with SyncConnectionError). Idempotent.

        Cancelled meanwhile, it still ends its reader task and closes its session, then
        raises ``CancelledError``."""
        try:
            if self._ws is not None:
                await self._ws.close()
        finally:
            try:
                reader, self._reader = self._reader, None
                if reader is not None:
                    await cancel_and_wait(reader)
            finally:
                await self._close_session()
                self._fail_pending(SyncConnectionError("client closed"))

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _read(self) -> None:
        why = "connection closed by the server"
        try:
            async for msg in self._ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    answer = json.loads(msg.data)
                    fut = self._pending.pop(answer.get("id"), None)
                    if fut is None or fut.done():
                        continue
                    if answer.get("ok"):
                        fut.set_result(answer.get("result"))
                    else:
                        fut.set_exception(error_from_json(answer.get("error") or {}))
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    why = f"connection error: {self._ws.exception()}"
                    break
            if self._ws.close_code not in (1000, None):
                why = f"connection lost (close code {self._ws.close_code})"
        finally:
            self._lost = SyncConnectionError(f"{self}: {why}")
            self._fail_pending(self._lost)

    def _fail_pending(self, error: Exception) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()

    async def _request(self, payload: dict, answer_within_s: float) -> Any:
        if self._ws is None:
            raise SyncConnectionError(f"{self} is not connected")
        if self._lost is not None:
            raise self._lost
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:                        # the entry goes, however this ends (cancelled included)
            try:
                await self._ws.send_str(encode({"id": rid, **payload}))
            except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
                raise SyncConnectionError(f"{self}: cannot send: {exc}") from exc
            # not asyncio.wait_for: on Python 3.11 it returns the answer, swallowing the
            # caller's cancellation, when both arrive in the same loop turn
            try:
                async with asyncio.timeout(answer_within_s):
                    return await fut
            except TimeoutError:
                raise SyncConnectionError(f"{self}: no answer from the sync server within "
                                          f"{answer_within_s:g} s") from None
        finally:
            self._pending.pop(rid, None)

    def _next_generation(self, kind: str, name: str) -> int:
        gen = self._generations.get((kind, name), 0) + 1
        self._generations[(kind, name)] = gen
        return gen

    async def barrier(self, name: str, members: list[str], timeout: float) -> dict:
        """Wait until every one of ``members`` (this member included) arrived at ``name``.

        :return: ``{"generation": g}``: the round this was.
        :raise BarrierTimeout: ``missing`` names who did not arrive in time.
        :raise BarrierAborted: ``by`` and ``reason`` say who aborted, or who was lost.
        :raise MembershipError: bad member list (duplicates, self missing, disagreement).
        :raise SyncConnectionError: the server is unreachable or stopped answering.
        """
        return await self._request(
            {"op": "barrier", "name": name, "members": join_members(members), "timeout": timeout,
             "generation": self._next_generation("barrier", name)}, timeout + self._grace_s)

    async def exchange(self, name: str, members: list[str], data: Any,
                       timeout: float) -> dict[str, Any]:
        """Like :meth:`barrier`, carrying ``data`` (JSON); returns ``{member: data}``."""
        result = await self._request(
            {"op": "exchange", "name": name, "members": join_members(members), "timeout": timeout,
             "generation": self._next_generation("exchange", name), "data": data},
            timeout + self._grace_s)
        return result["data"]

    async def send(self, key: str, data: Any) -> None:
        """Set the run's ``key`` to ``data`` (JSON; the last send wins): every ``wait`` for it,
        now or later, gets it (LAVA's ``lava-send``)."""
        await self._request({"op": "send", "name": key, "data": data}, self._grace_s)

    async def wait(self, key: str, timeout: float) -> Any:
        """The value of the run's ``key``, once a member sent it (LAVA's ``lava-wait``).

        :raise BarrierTimeout: nobody sent it within ``timeout`` (naming lost members).
        :raise SyncConnectionError: the server is unreachable or stopped answering.
        """
        result = await self._request({"op": "wait", "name": key, "timeout": timeout},
                                     timeout + self._grace_s)
        return result["data"]

    async def abort(self, name: str, reason: str, kind: str = "barrier") -> dict:
        """Abort the open round of ``name`` for everyone (or the next round, if none is
        open): each waiter gets :class:`BarrierAborted` naming this member and ``reason``."""
        return await self._request({"op": "abort", "name": name, "reason": reason,
                                    "kind": kind}, self._grace_s)
