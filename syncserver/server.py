"""The aiohttp sync server: ``make_app()`` and the embeddable ``SyncServer``.

::

    async with SyncServer(host="127.0.0.1", port=0, token=TOKEN) as server:
        print(server.url)          # http://127.0.0.1:<bound port>

Endpoints: ``GET /v1/ws`` (the protocol, see :mod:`.protocol`; token required),
``GET /metrics`` (Prometheus text, ``migrator_sync_*``: see :class:`SyncCollector`; token
required), ``GET /healthz`` (no token, says "ok"),
``GET|POST /v1/control/<name>`` (token required): the embedding process's own control calls
(``migrate-run status`` and ``cancel``), served by the handler :meth:`SyncServer.set_control`
installs (404 until one is).

The token is compared in constant time; a request without it gets 401 before any handler
runs. The token never appears in logs (aiohttp's access log shows the request line only).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiohttp import WSMsgType, web

from ._aio import cancel_and_wait
from .protocol import (MAX_MESSAGE_BYTES, PROTOCOL_VERSION, WS_PATH, ProtocolError, SyncError,
                       check_name, encode, parse_request, server_url)
from .gcpolicy import IdleFullCollections
from .registry import Connection, Instance, Registry

log = logging.getLogger(__name__)

#: release latency (last arrival -> release written): milliseconds on a LAN
RELEASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: barrier wait (round opened by its first arrival -> released): as long as the slowest host
WAIT_BUCKETS = (0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
#: a full garbage collection's pause: tens of ms with 1000 members connected
GC_PAUSE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class ServerOptions:
    """Server knobs, each with its reason."""

    heartbeat_s: float = 5.0
    """WebSocket ping interval; a member that does not answer within half of it is lost.
    Lab round trips are sub-millisecond; real fleets over a WAN need a few seconds."""
    run_idle_s: float = 3600.0
    """A run with no connections and no open rounds is forgotten after this long."""
    collect_every_s: float = 60.0
    """How often idle runs are looked for."""
    max_connections: int = 20_000
    """Connections beyond this are refused with 503 (each costs a file descriptor)."""


class Histogram:
    """Counts per bucket, for a Prometheus histogram made at scrape time."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        for i, b in enumerate(self.buckets):
            if seconds <= b:
                self.counts[i] += 1
                break
        self.sum += seconds
        self.count += 1

    def family(self, name: str, doc: str):
        from prometheus_client.core import HistogramMetricFamily
        cumulative, total = [], 0
        for b, n in zip(self.buckets, self.counts):
            total += n
            cumulative.append((repr(b), total))
        cumulative.append(("+Inf", self.count))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=self.sum)


class Metrics:
    def __init__(self) -> None:
        self.release = Histogram(RELEASE_BUCKETS)
        self.wait = Histogram(WAIT_BUCKETS)
        self.protocol_errors = 0
        self.auth_failures = 0
        self.connections = 0
        #: full garbage collections run by the server's own policy (.gcpolicy: the
        #: standalone server only), and their pauses
        self.gc_full = Histogram(GC_PAUSE_BUCKETS)


class SyncCollector:
    """The sync server's Prometheus metrics (``migrator_sync_*``), read from its state at
    each scrape: served on the server's own ``/metrics``, and registered in a run's
    (``migrate-run --metrics``, :mod:`migrator.report.metrics`) under the same names.
    Call ``collect`` from the server's event loop thread only (aiohttp handlers do)."""

    def __init__(self, registry: "Registry", metrics: Metrics):
        self.registry, self.metrics = registry, metrics

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        reg, m, c = self.registry, self.metrics, self.registry.counters
        for name, doc, value in (
                ("barriers_open", "Barrier and exchange rounds waiting for members.",
                 reg.open_count()),
                ("waiters", "Members waiting in open rounds.", reg.waiter_count()),
                ("runs", "Runs the server knows.", len(reg.runs)),
                ("connections", "Open client connections.", m.connections)):
            yield GaugeMetricFamily(f"migrator_sync_{name}", doc, value=value)
        for name, doc, value in (
                ("releases", "Rounds released (every member arrived).", c.releases),
                ("timeouts", "Rounds that timed out.", c.timeouts),
                ("aborts", "Rounds aborted by a member or a lost member.", c.aborts),
                ("members_lost", "Members whose last connection was lost.", c.members_lost),
                ("membership_errors", "Arrivals naming other members than the round's.",
                 c.membership_errors),
                ("protocol_errors", "Malformed or refused protocol messages.",
                 m.protocol_errors),
                ("auth_failures", "Requests without the token.", m.auth_failures)):
            yield CounterMetricFamily(f"migrator_sync_{name}", doc, value=value)
        yield m.release.family("migrator_sync_release_latency_seconds",
                               "From the last arrival to the round's release.")
        yield m.gc_full.family("migrator_sync_gc_full_pause_seconds",
                               "Full garbage collections the server ran when no round was "
                               "open (migrate-syncserver), and how long each paused it.")
        yield m.wait.family("migrator_sync_barrier_wait_seconds",
                            "From a round's first arrival to its release: how long the "
                            "first member waited for the last.")


REGISTRY = web.AppKey("registry", Registry)
METRICS = web.AppKey("metrics", Metrics)
TOKEN = web.AppKey("token", str)
OPTIONS = web.AppKey("options", ServerOptions)
#: the embedding process's control handler: ``async (name, body) -> (HTTP status, JSON)``
ControlHandler = Callable[[str, dict], Awaitable[tuple[int, dict]]]
CONTROL = web.AppKey("control", list)
COLLECTOR = web.AppKey("collector", list)        #: [its own CollectorRegistry], once scraped


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    return header[7:] if header.startswith("Bearer ") else ""


@web.middleware
async def _auth(request: web.Request, handler):
    if request.path == "/healthz":
        return await handler(request)
    expected = request.app[TOKEN]
    if not hmac.compare_digest(_bearer(request).encode(), expected.encode()):
        request.app[METRICS].auth_failures += 1
        raise web.HTTPUnauthorized(
            text='{"type": "AuthError", "message": "missing or wrong token"}',
            content_type="application/json", headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


async def _control(request: web.Request) -> web.Response:
    handlers = request.app[CONTROL]
    if not handlers:
        raise web.HTTPNotFound(text='{"type": "NotFound", "message": "no control here"}',
                               content_type="application/json")
    body: dict = {}
    if request.method == "POST" and request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response({"type": "BadRequest",
                                      "message": "the body must be a JSON object"}, status=400)
    status, reply = await handlers[0](request.match_info["name"], body)
    return web.json_response(reply, status=status)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _metrics(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    kept = request.app[COLLECTOR]
    if not kept:        # made at the first scrape: prometheus_client is imported only then
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(SyncCollector(request.app[REGISTRY], request.app[METRICS]))
        kept.append(scrape)
    body = generate_latest(kept[0])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _websocket(request: web.Request) -> web.StreamResponse:
    app = request.app
    reg, metrics, opts = app[REGISTRY], app[METRICS], app[OPTIONS]
    try:
        run_id = check_name(request.query.get("run"), "run id")
        member = check_name(request.query.get("member"), "member name")
    except ProtocolError as exc:
        raise web.HTTPBadRequest(text=encode({"error": exc.to_json()}),
                                 content_type="application/json") from None
    if metrics.connections >= opts.max_connections:
        raise web.HTTPServiceUnavailable(text="too many connections")
    ws = web.WebSocketResponse(heartbeat=opts.heartbeat_s, max_msg_size=2 * MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    conn = Connection(run_id, member, request.query.get("persistent") == "1",
                      request.remote or "")
    reg.connected(conn)
    metrics.connections += 1
    log.info("[run=%s member=%s] connected from %s%s", run_id, member, conn.peer,
             " (persistent)" if conn.persistent else "")

    async def answer(payload: dict) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(encode(payload))

    async def serve(req: dict) -> None:
        try:
            if req["op"] == "wait":
                result = await reg.wait(conn, req["name"], req["timeout"])
            else:
                result = await reg.join(conn, req["op"], req["name"], req["members"],
                                        req["timeout"], req["generation"], req.get("data"))
        except SyncError as exc:
            await answer({"id": req["id"], "ok": False, "error": exc.to_json()})
            return
        # the result's JSON is shared by every waiter of the round: encoded once
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str('{"v":%d,"id":%d,"ok":true,"result":%s}'
                              % (PROTOCOL_VERSION, req["id"], result.json))

    why = "connection closed"
    try:
        async with asyncio.TaskGroup() as tg:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    try:
                        req = parse_request(msg.data)
                    except ProtocolError as exc:
                        metrics.protocol_errors += 1
                        await answer({"id": exc.fields.get("id"), "ok": False,
                                      "error": exc.to_json()})
                        continue
                    if req["op"] == "abort":
                        result = reg.abort(conn, req["kind"], req["name"], req["reason"])
                        await answer({"id": req["id"], "ok": True, "result": result})
                    elif req["op"] == "send":
                        try:
                            result = reg.send(conn, req["name"], req["data"])
                        except SyncError as exc:
                            await answer({"id": req["id"], "ok": False,
                                          "error": exc.to_json()})
                        else:
                            await answer({"id": req["id"], "ok": True, "result": result})
                    else:
                        tg.create_task(serve(req))
                elif msg.type is WSMsgType.BINARY:
                    metrics.protocol_errors += 1
                    await answer({"id": None, "ok": False, "error": ProtocolError(
                        "binary frames are not part of the protocol", status=400).to_json()})
                elif msg.type is WSMsgType.ERROR:
                    why = f"error: {ws.exception()}"
                    break
            if ws.close_code == 1006 or (ws.close_code is None and not ws.closed):
                why = "heartbeat missed or connection dropped"
            # leaving: the member's open waits are aborted below; their tasks then answer
            # into a closed socket (suppressed) and end
            reg.disconnected(conn, why)
            conn = None
    finally:
        if conn is not None:      # cancelled (server shutting down) before the normal path
            reg.disconnected(conn, why)
        metrics.connections -= 1
        await ws.close()
    log.info("[run=%s member=%s] disconnected (%s)", run_id, member, why)
    return ws


async def _collect_idle_runs(app: web.Application) -> None:
    """Forget idle runs every ``collect_every_s``; runs until cancelled (at app cleanup)."""
    opts = app[OPTIONS]
    while True:
        await asyncio.sleep(opts.collect_every_s)
        app[REGISTRY].collect(opts.run_idle_s)


def make_app(token: str, options: ServerOptions | None = None) -> web.Application:
    """The sync server application. ``token`` is required (no anonymous mode)."""
    if not token or len(token) < 16:
        raise ValueError("the sync server needs a token of at least 16 characters")
    opts = options or ServerOptions()
    metrics = Metrics()

    def released(inst: Instance) -> None:
        # latency to *release* (futures resolved); the send itself is measured by the client
        metrics.release.observe(inst.released_at - inst.last_arrival)
        metrics.wait.observe(inst.released_at - inst.created)

    app = web.Application(middlewares=[_auth], client_max_size=MAX_MESSAGE_BYTES)
    app[TOKEN] = token
    app[OPTIONS] = opts
    app[METRICS] = metrics
    app[REGISTRY] = Registry(on_release=released)
    app[CONTROL] = []
    app[COLLECTOR] = []         # the /metrics registry, made at the first scrape

    async def collector(app: web.Application):
        # owned here: cancelled and awaited at cleanup (a stop() cancelled meanwhile still
        # ends cancelled)
        task = asyncio.get_running_loop().create_task(_collect_idle_runs(app))
        yield
        await cancel_and_wait(task)

    app.cleanup_ctx.append(collector)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get(WS_PATH, _websocket)
    app.router.add_route("*", "/v1/control/{name}", _control)
    return app


class SyncServer:
    """The sync server embedded in a process: an async context manager.

    :param host: address to bind; required in spirit (default loopback only).
    :param port: port to bind; 0 picks a free one (see :attr:`url`).
    :param token: shared secret every client must present.
    :param sock: a socket bound and listening already (``host`` and ``port`` are then its
        own): served from :meth:`start` on, and closed by :meth:`stop`. Clients that connect
        before are answered then.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token: str,
                 options: ServerOptions | None = None, sock: socket.socket | None = None):
        self.host, self.port = host, port
        self.app = make_app(token, options)
        self._sock = sock
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        if self._runner is None:
            raise RuntimeError("the sync server is not started")
        return server_url(self.host, self.port)

    @property
    def registry(self) -> Registry:
        return self.app[REGISTRY]

    @property
    def collector(self) -> SyncCollector:
        """The server's Prometheus metrics, to register in another CollectorRegistry."""
        return SyncCollector(self.app[REGISTRY], self.app[METRICS])

    def set_control(self, handler: ControlHandler) -> None:
        """Serve ``/v1/control/<name>`` with ``handler(name, body)`` (token required)."""
        self.app[CONTROL][:] = [handler]

    async def start(self) -> None:
        """Bind and serve. :raise OSError: when the address cannot be bound."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)
        await runner.setup()
        site = (web.TCPSite(runner, self.host, self.port, backlog=4096) if self._sock is None
                else web.SockSite(runner, self._sock, backlog=4096))
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner
        log.info("sync server listening on %s", self.url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> "SyncServer":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def serve_forever(host: str, port: int, token: str,
                        options: ServerOptions | None = None,
                        stop: asyncio.Event | None = None) -> None:
    """Run a server until ``stop`` is set (the ``migrate-syncserver`` command). The process
    is the server's: its full garbage collections run when no round is open
    (:mod:`.gcpolicy`), not in the middle of a release."""
    async with SyncServer(host, port, token=token, options=options) as server:
        metrics = server.app[METRICS]
        async with IdleFullCollections(lambda: server.registry.open_count() == 0,
                                       on_collect=metrics.gc_full.observe):
            print(f"migrate-syncserver: listening on {server.url}", flush=True)
            await (stop or asyncio.Event()).wait()


__all__ = ["SyncServer", "ServerOptions", "make_app", "serve_forever"]
