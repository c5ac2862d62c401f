"""What the scenario instances of one run share: id, config, inventory, sync server, records."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from syncserver.protocol import server_url

from ..config import Config, Inventory
from ..errors import ConfigError, MigratorError
from .gates import HostGates
from .journal import RunJournal
from .loopwatch import LoopStallWatch
from .slots import SlotQueue

if TYPE_CHECKING:
    from syncserver.server import SyncServer

log = logging.getLogger(__name__)


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxx``: sortable, and unique for runs started in the same second."""
    now = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{now}-{secrets.token_hex(2)}"


@dataclass
class MigrationRecord:
    """One migration of a run, as reports show it."""

    instance: str
    mig_id: str
    vm: str
    src: str
    dst: str
    status: str                      #: completed | failed | cancelled
    error: str | None
    result: dict[str, Any]           #: MigrationResult.to_json()
    handled: bool = False            #: the scenario caught its failure (an expected outcome)

    @property
    def passed(self) -> bool:
        return self.status == "completed" or self.handled


@dataclass
class InstanceRecord:
    """One scenario instance (a pair, or all hosts with ``--all``)."""

    instance: str
    hosts: list[str]
    status: str = "pending"          #: passed | failed | interrupted
    error: str | None = None
    error_type: str | None = None
    started: float = 0.0
    duration_s: float = 0.0
    cleanup_problems: list[str] = field(default_factory=list)


class RunContext:
    """One run: shared by every scenario instance of it.

    :param say: where human-readable progress lines go (the CLI prints them).
    """

    def __init__(self, config: Config, inventory: Inventory, run_id: str | None = None,
                 say: Callable[[str], None] | None = None):
        self.config, self.inventory = config, inventory
        self.run_id = run_id or new_run_id()
        self.say = say or (lambda line: log.info("%s", line))
        #: say a progress line per ``report.progress_interval_s`` (off while a live view
        #: draws the same as bars: :mod:`migrator.report.live`)
        self.progress_lines = True
        self.token = secrets.token_urlsafe(32)
        #: the run's sync server once it serves (:meth:`start_server`, :meth:`server_started`)
        self.server: SyncServer | None = None
        self._sync_url: str | None = None
        self._serving: asyncio.Future | None = None
        self._sock: socket.socket | None = None
        #: something waits for the sync server (:meth:`server_started`): serve it now
        self._server_wanted = asyncio.Event()
        self._control: Callable | None = None
        self.migrations: list[MigrationRecord] = []
        self.instances: list[InstanceRecord] = []
        #: parallel VM tasks' results (:class:`~.tasks.TaskResult`), in the order added
        self.tasks: list = []
        #: per-host bounds on VM starts, shared by every instance of the run
        self.gates = HostGates(config.limits)
        #: the run's queue for migration slots (limits across every run on the hosts)
        self.slots = SlotQueue(self)
        #: mig_id -> how to cancel that migrate() call (``migrate-run cancel MIG-ID``)
        self.cancellers: dict[str, Callable[[str], None]] = {}
        #: (mig_id, vm) -> (MigrationData, migration) of each migration in flight, for
        #: ``migrate-run status``
        self.live: dict[tuple[str, str], tuple[Any, Any]] = {}
        #: the run's journal (:mod:`.journal`), open while the run runs
        self.journal: RunJournal | None = None
        #: what went wrong without failing the run (a blocked event loop), for the report
        self.warnings: list[str] = []
        #: host -> its kernel, QEMU (binary, version) and libvirt versions, probed beside
        #: the hosts' preparation (:func:`.hostprep.probe_versions`)
        self.versions: dict[str, dict] = {}
        #: set when a VM of the run has started and its guest boots: the controller waits
        #: (seconds under TCG), and uses the time: the instances start their sync, the
        #: sync server is served (``migrate-run``), the report's template readied
        self.guest_booting = asyncio.Event()
        self._watch: LoopStallWatch | None = None
        self._watchers = 0
        self._code_files: set[str] = set()

    def add_migration(self, record: MigrationRecord) -> None:
        """A migration ended: its record joins the run's."""
        self.migrations.append(record)

    def warn(self, text: str) -> None:
        """A warning of the run: said, logged, and kept for the report."""
        self.warnings.append(text)
        log.warning("%s", text)
        self.say(f"WARNING: {text}")

    @contextlib.asynccontextmanager
    async def loop_watch(self, code_files: set[str]) -> AsyncIterator[None]:
        """One :class:`LoopStallWatch` for the run while any instance runs; a stall is
        reported at the line in ``code_files`` (the scenarios' sources) it happened."""
        self._code_files |= code_files
        if self._watch is None:
            watch = LoopStallWatch(self.config.timeouts.loop_stall_warn_s, self.warn,
                                   lambda path: path in self._code_files)
            await watch.__aenter__()
            self._watch = watch
        self._watchers += 1
        try:
            yield
        finally:
            self._watchers -= 1
            if self._watchers == 0 and self._watch is not None:
                watch, self._watch = self._watch, None
                await watch.__aexit__(None, None, None)

    def open_journal(self, hosts: list[str], path: str | os.PathLike | None = None) -> None:
        """Take the run's lock and write the journal's head: everything ``recover`` needs
        (hosts and addresses, inventory, config, this controller).

        :raise ConfigError: the state dir cannot be written.
        """
        inv = self.inventory
        head = {"hosts": {h: inv.host(h).address for h in hosts},
                "driver": self.config.driver, "run_root": str(inv.run_dir),
                "inventory": inv.model_dump(mode="json"),
                "config": self.config.model_dump(mode="json")}
        self.journal = RunJournal.create(self.run_id, self.config.journal.state_dir, path, head,
                                         self.config.journal.stop_after)

    def record(self, event: str, **fields: Any) -> None:
        """One journal record, durable when this returns (nothing without a journal)."""
        if self.journal is not None:
            self.journal.record(event, **fields)
        if event == "vm" and fields.get("state") == "started":
            self.guest_booting.set()

    def close_journal(self, leftovers: list[str]) -> None:
        """The run is over and cleaned up (``leftovers``: what could not be removed)."""
        journal, self.journal = self.journal, None
        if journal is not None:
            status = "passed" if self.verdict else "failed"
            if any(i.status == "interrupted" for i in self.instances):
                status = "interrupted"
            journal.finish(status, leftovers)

    @property
    def sync_url(self) -> str:
        assert self._sync_url is not None, "the sync server is not started"
        return self._sync_url

    @property
    def server_bound(self) -> bool:
        """:meth:`start_server` was called (and :meth:`stop_server` not since)."""
        return self._serving is not None

    def sync_bind(self, towards: str) -> str:
        """Where the run's sync server binds: ``sync.bind``, else the controller's own
        address on the route to host ``towards`` (its SSH port's)."""
        host = self.inventory.host(towards)
        return self.config.sync.bind or local_address_towards(
            host.address, (host.ssh or self.inventory.ssh).port)

    async def start_server(self, bind: str, serve_from: asyncio.Event | None = None) -> None:
        """Bind the run's sync server on ``bind`` (a port the system picks unless
        ``sync.port`` says): bound and listening when this returns (:attr:`sync_url` is
        known). It serves once aiohttp is imported, which a thread does (0.3-0.5 CPU-s on
        a slow machine) from the moment ``serve_from`` is set (None: at once), or earlier
        when something waits for it (:meth:`server_started`) or a client connects
        (``migrate-run status``; it waits in the socket's backlog meanwhile).

        ``migrate-run`` passes :attr:`guest_booting`: the import, in the event loop's
        process, takes the interpreter's lock from the loop in 5 ms slices, and the path
        to the first guest's start (the controller's own start-up, SSH, the hosts'
        preparation: many short wake-ups of the loop) was 0.2-0.3 s slower beside it;
        while a guest boots, the loop mostly waits.

        :raise ConfigError: the address cannot be bound.
        """
        port = self.config.sync.port
        try:
            sock = socket.create_server((bind, port), family=socket.AF_INET6 if ":" in bind
                                        else socket.AF_INET, backlog=4096)
        except OSError as exc:
            # (create_server's strerror names the address again: the words only; a name
            # that does not resolve has a negative errno, which os.strerror does not know)
            why = (os.strerror(exc.errno) if exc.errno and exc.errno > 0
                   else str(exc.strerror or exc).split(" (while attempting", 1)[0])
            raise ConfigError(f"the sync server cannot bind {bind}:{port}: {why}") from exc
        sock.setblocking(False)
        self._sync_url = server_url(bind, sock.getsockname()[1])
        self._sock = sock
        self._serving = asyncio.ensure_future(self._serve(sock, bind, serve_from))

    async def _serve(self, sock: socket.socket, bind: str,
                     serve_from: asyncio.Event | None) -> None:
        """Once ``serve_from`` is set, someone waits (:meth:`server_started`) or a client
        connects, import the server (in a thread: the loop's thread imports nothing of
        aiohttp meanwhile, the controller's clients import it after
        :meth:`server_started`) and serve ``sock``.
        A cancellation lands before or during the import, or after the server's start
        (which is then stopped): never in the middle of it.

        :raise MigratorError: the server could not start (why, and where it was to serve).
        """
        from ..aio import first_set, shielded
        server = None
        try:
            if serve_from is not None:
                # (a connection waiting in the backlog makes the socket readable)
                knocked = asyncio.Event()
                loop = asyncio.get_running_loop()
                loop.add_reader(sock.fileno(), knocked.set)
                try:
                    await first_set(serve_from, self._server_wanted, knocked)
                finally:
                    loop.remove_reader(sock.fileno())
            module = await asyncio.to_thread(importlib.import_module, "syncserver.server")
            server = module.SyncServer(bind, sock.getsockname()[1], token=self.token,
                                       sock=sock)
            await shielded(server.start())
        except BaseException as exc:
            if server is not None:
                await shielded(server.stop())       # (started, then cancelled; else no-op)
            sock.close()
            if isinstance(exc, Exception):
                raise MigratorError(f"the sync server did not start on {self._sync_url}: "
                                    f"{type(exc).__name__}: {exc}") from exc
            raise
        if self._control is not None:
            server.set_control(self._control)
        self.server = server

    async def server_started(self) -> SyncServer:
        """The run's sync server, once it serves.

        :raise RuntimeError: it was not started (:meth:`start_server`), or stopped before
            it served.
        :raise MigratorError: it could not be started.
        """
        serving = self._serving
        if serving is None:
            raise RuntimeError("the sync server is not started")
        self._server_wanted.set()
        await asyncio.wait([serving])       # (this caller's cancellation is raised here)
        if serving.cancelled():
            raise RuntimeError("the sync server was stopped before it served")
        serving.result()
        assert self.server is not None
        return self.server

    def set_control(self, handler: Callable) -> None:
        """Serve ``/v1/control/<name>`` with ``handler`` (:mod:`.control`), from the moment
        the server serves."""
        self._control = handler
        if self.server is not None:
            self.server.set_control(handler)

    async def start_control(self, cancel_run: Callable[[], Any] | None = None,
                            bind: str = "127.0.0.1") -> None:
        """Serve ``migrate-run status`` and ``cancel`` (:mod:`.control`) on the run's sync
        server, started on ``bind`` first if the run has none.

        :param cancel_run: what cancelling the run's own id does (the CLI: cancel its main
            task, as Ctrl-C does); None: refused.
        :raise ConfigError: the address cannot be bound.
        """
        from .control import publish
        if not self.server_bound:
            await self.start_server(bind)
        await publish(self, cancel_run)

    async def stop_server(self) -> None:
        """Stop the sync server (or its start, if it does not serve yet). Never raises."""
        serving, self._serving = self._serving, None
        self._sync_url = None
        self._server_wanted.clear()
        if serving is not None and not serving.done():
            serving.cancel()
        if serving is not None:
            await asyncio.wait([serving])
            if not serving.cancelled() and serving.exception() is not None:
                log.warning("%s", serving.exception())     # (said here if nobody waited)
        server, self.server = self.server, None
        if server is not None:
            await server.stop()
        sock, self._sock = self._sock, None
        if sock is not None:        # (a start cancelled before its first step never ran)
            sock.close()

    @property
    def verdict(self) -> bool:
        """True when every instance passed and every migration completed or was an outcome
        its scenario expected."""
        return (bool(self.instances) and all(i.status == "passed" for i in self.instances)
                and all(m.passed for m in self.migrations)
                and all(t.status == "passed" for t in self.tasks))


def local_address_towards(address: str, port: int) -> str:
    """The controller's own address on the route to ``address`` (no packet is sent: a UDP
    socket's connect only picks the route)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with contextlib.closing(socket.socket(family, socket.SOCK_DGRAM)) as s:
        try:
            s.connect((address, port))
        except OSError as exc:
            raise ConfigError(f"no route from this controller to {address}: {exc.strerror}") \
                from None
        return s.getsockname()[0]
