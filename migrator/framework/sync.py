"""Hosts as real barrier members: one participant process per host, arrivals from the hosts.

::

    async with HostsSync(hosts, url, token, sync_run, config) as sync:
        await sync.barrier("disks_prepared", hosts)         # every host arrives itself

* :meth:`HostsSync.start` installs the host-side client (``migrate-sync.pyz``, standard
  library only) and a token file (mode 0600; the token never appears on a command line) on
  every host, then starts ``migrate-sync member --until-stdin-eof`` on each over SSH. That
  process is the host's liveness anchor at the sync server: if the host dies or loses its link,
  the server aborts every open barrier listing it, naming it. It leaves by itself when its SSH
  session ends, so a lost controller leaves nothing behind on hosts.
* :meth:`HostsSync.barrier` makes each host arrive through its participant: the request goes
  down the participant's stdin and the participant sends it to the server as that host, over
  its own connection (no process started per arrival). A host whose participant is gone (SSH
  lost, sshd killed) makes the controller abort that barrier for everyone at once, with the
  host's name and why; nobody waits for the timeout.
* Round numbers (generations) are counted here, per barrier name, and pinned on every arrival:
  a host that is fast never joins a round its peers are still finishing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

from syncserver.protocol import SyncError, error_from_json
from syncserver.zipapp import build_bytes

from ..aio import wait_for
from ..config import Config
from ..errors import BarrierError, HostError
from ..hosts import Installable, RemoteProcess, SSHHost, quote

if TYPE_CHECKING:
    from syncserver.client import SyncClient

log = logging.getLogger(__name__)

CONTROLLER = "controller"
_READY = "is a member of run"


class HostsSync:
    """The sync side of one scenario instance: participants on ``hosts``, barriers among them."""

    def __init__(self, hosts: Sequence[SSHHost], url: str, token: str, sync_run: str,
                 config: Config, server_started: Callable[[], Awaitable] | None = None):
        self.hosts = list(hosts)
        #: awaited before the controller connects (the server at ``url`` may be bound and
        #: not serve yet: :meth:`.RunContext.start_server`); the participants start meanwhile
        self._server_started = server_started
        self.url, self.sync_run, self.config = url, sync_run, config
        self._token = token
        self._participants: dict[str, RemoteProcess] = {}
        self._readers: list[asyncio.Task] = []
        self._pending: dict[str, dict[int, asyncio.Future]] = {}
        self._ids = itertools.count(1)
        self._generations: dict[str, int] = {}
        self._controller: SyncClient | None = None
        self._stopping = False
        #: hosts whose participant ended before the run did, with why
        self.lost: dict[str, str] = {}

    async def __aenter__(self) -> "HostsSync":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        """Install the client, start every host's participant, wait until each is a member.

        :raise HostError: a host could not be reached or its participant did not join
            (e.g. the host cannot reach the sync server's address).
        """
        pyz = Installable.get(build_bytes(), name="migrate-sync.pyz")
        token = Installable.get(self._token.encode(), name="sync-token", mode=0o600)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._connect_controller())
            for host in self.hosts:
                tg.create_task(self._start_participant(host, pyz, token))

    async def _connect_controller(self) -> None:
        if self._server_started is not None:
            await self._server_started()
        from syncserver.client import SyncClient      # aiohttp: imported by then
        self._controller = SyncClient(self.url, token=self._token, member=CONTROLLER,
                                      run_id=self.sync_run,
                                      heartbeat_s=self.config.sync.heartbeat_s,
                                      connect_timeout_s=self.config.timeouts.ssh_connect_s)
        await self._controller.connect()

    async def _start_participant(self, host: SSHHost, pyz: Installable,
                                 token: Installable) -> None:
        client, token_file = await asyncio.gather(pyz.install(host), token.install(host))
        env = {"MIGRATE_SYNC_URL": self.url, "MIGRATE_SYNC_RUN": self.sync_run,
               "MIGRATE_SYNC_MEMBER": host.name, "MIGRATE_SYNC_TOKEN_FILE": token_file}
        proc = await host.spawn(f"exec python3 {quote(client)} member --until-stdin-eof",
                                env=env)
        self._participants[host.name] = proc
        try:
            async with asyncio.timeout(self.config.timeouts.ssh_connect_s):
                line = await proc.readline()
        except TimeoutError:
            line = ""
        if _READY not in line:
            why = await wait_for(proc.wait(), self.config.timeouts.host_cleanup_s) \
                if not line else line.strip()
            raise HostError(host.name, f"its sync participant did not join the sync server "
                                       f"at {self.url}: {why or 'no answer'}")
        self._pending[host.name] = {}
        self._readers.append(asyncio.get_running_loop().create_task(
            self._read_answers(host.name, proc), name=f"participant-{host.name}"))
        log.info("[host=%s] sync participant joined run %s", host.name, self.sync_run)

    async def _read_answers(self, name: str, proc: RemoteProcess) -> None:
        """Route the participant's answer lines to their requests; when it ends, fail what
        is still pending with why."""
        pending = self._pending[name]
        while line := await proc.readline():
            try:
                answer = json.loads(line)
            except ValueError:
                log.warning("[host=%s] participant said %r", name, line.strip())
                continue
            fut = pending.pop(answer.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(answer)
        why = await proc.wait()
        if not self._stopping:
            self.lost[name] = why
            log.error("[host=%s] sync participant ended: %s", name, why)
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(HostError(name, f"its sync participant ended: {why}"))
        pending.clear()

    async def _ask(self, host: SSHHost, request: dict, within: float) -> dict:
        """Send ``request`` as ``host`` through its participant; its answer (or HostError)."""
        if host.name in self.lost:
            raise HostError(host.name, f"its sync participant ended: {self.lost[host.name]}")
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[host.name][rid] = fut
        try:
            self._participants[host.name].write(json.dumps({"id": rid, **request}) + "\n")
            return await wait_for(fut, within)
        except TimeoutError:
            raise HostError(host.name, f"its sync participant gave no answer within "
                                       f"{within:g} s") from None
        finally:
            self._pending[host.name].pop(rid, None)

    async def barrier(self, name: str, hosts: Sequence[SSHHost],
                      timeout: float | None = None) -> None:
        """Every host of ``hosts`` arrives at barrier ``name`` (its next round).

        :raise BarrierError: naming the hosts that were missing, lost, or could not arrive
            (the error of the first such host is chained).
        """
        await self._meet("barrier", name, hosts, timeout)

    async def exchange(self, name: str, hosts: Sequence[SSHHost], data: dict[str, Any],
                       timeout: float | None = None) -> dict[str, Any]:
        """A barrier carrying data: each host of ``hosts`` arrives at exchange ``name`` with
        ``data[host]`` (JSON; None if absent), sent as that host by its participant.

        :return: ``{host: data}`` of every member, as the sync server gathered it, in the
            order of ``hosts``.
        :raise BarrierError: as :meth:`barrier`.
        """
        answers = await self._meet("exchange", name, hosts, timeout, data)
        gathered = answers[hosts[0].name]["result"]["data"]
        return {h.name: gathered.get(h.name) for h in hosts}      # in the members' order

    async def _meet(self, op: str, name: str, hosts: Sequence[SSHHost],
                    timeout: float | None, data: dict[str, Any] | None = None
                    ) -> dict[str, dict]:
        """Every host arrives at round ``op``/``name`` through its participant; the answers
        by host. :raise BarrierError: see :meth:`barrier`."""
        timeout = timeout or self.config.timeouts.barrier_s
        gen = self._generations[(op, name)] = self._generations.get((op, name), 0) + 1
        members = [h.name for h in hosts]
        request: dict[str, Any] = {"op": op, "name": name, "members": ",".join(members),
                                   "timeout": timeout, "generation": gen}
        answers: dict[str, dict] = {}

        async def arrive(host: SSHHost) -> tuple[str, Exception | None, str]:
            mine = request if data is None else {**request, "data": data.get(host.name)}
            try:
                answer = await self._ask(host, mine,
                                         timeout + self.config.timeouts.host_cleanup_s)
            except HostError as exc:
                await self._abort(name, f"{host.name} could not arrive: {exc.message}", op)
                return host.name, exc, f"could not arrive ({exc.message})"
            if answer.get("ok"):
                answers[host.name] = answer
                return host.name, None, ""
            return host.name, None, str(error_from_json(answer.get("error") or {}))

        outcomes = await asyncio.gather(*(arrive(h) for h in hosts))
        failed = [(n, exc, why) for n, exc, why in outcomes if why]
        if not failed:
            return answers
        # blame hosts that could not arrive first, then whom the server names
        blamed = [n for n, exc, _ in failed if exc is not None]
        cause = next((exc for _, exc, _ in failed if exc is not None), None)
        text = "; ".join(f"{n}: {why}" for n, _, why in failed)
        if not blamed:
            blamed = sorted({m for m in members for _, _, why in failed if m in why})
        lost = {n: self.lost[n] for n in members if n in self.lost}
        if lost:
            text += "; participants lost: " + "; ".join(f"{n}: {w}" for n, w in lost.items())
        raise BarrierError(name, blamed, text) from cause

    async def _abort(self, name: str, reason: str, kind: str = "barrier") -> None:
        try:
            await self._controller.abort(name, reason, kind)
        except SyncError as exc:
            log.warning("could not abort barrier %s: %s", name, exc)

    async def stop(self) -> None:
        """End every participant (stdin closed) and the controller's connection. Never
        raises; idempotent."""
        self._stopping = True
        await asyncio.gather(*(p.stop() for p in self._participants.values()),
                             return_exceptions=True)
        self._participants.clear()
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._readers.clear()
        if self._controller is not None:
            await self._controller.close()
            self._controller = None
