"""The server's state: runs, their members, and barrier/exchange rounds (generations).

Every run (run id) is its own namespace. In a run, a barrier name identifies a sequence of
rounds; round ``g`` is an :class:`Instance` that is OPEN until it ends RELEASED (everyone
arrived), TIMED_OUT (a waiter's deadline passed), ABORTED (a member aborted it or was lost) or
FAILED on bad membership. An ended round keeps its outcome: a late arrival for a failed round
gets the same error at once instead of hanging.

Failure propagation, the point of this design:

* every waiter of a round gets *the same* error, which names who is missing / who aborted;
* a waiter whose connection closes (or misses heartbeats) aborts its round for everyone;
* a *persistent* member (a host's participant process) that is lost marks the member gone in
  its run: every open round listing it aborts now, and later rounds listing it fail at once.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .protocol import BarrierAborted, BarrierTimeout, Members, MembershipError, SyncError


class Result(dict):
    """A released round's result, shared by every waiter; its JSON is made once."""

    @functools.cached_property
    def json(self) -> str:
        return json.dumps(self, separators=(",", ":"))


class State(enum.Enum):
    OPEN = "open"
    RELEASED = "released"
    TIMED_OUT = "timed-out"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass(eq=False)
class Connection:
    """One client connection of a member."""

    run_id: str
    member: str
    persistent: bool = False
    peer: str = ""


@dataclass(eq=False)
class Waiter:
    conn: Connection
    future: asyncio.Future
    deadline: float
    timeout: float
    data: Any = None


@dataclass(eq=False)
class Instance:
    kind: str
    name: str
    generation: int
    members: tuple[str, ...] | None          # None: made by an abort before anyone arrived
    state: State = State.OPEN
    waiters: dict[str, Waiter] = field(default_factory=dict)
    error: SyncError | None = None
    result: Result | None = None
    timer: asyncio.TimerHandle | None = None
    deadline: float = float("inf")            #: earliest waiter deadline (loop time)
    created: float = field(default_factory=time.monotonic)
    last_arrival: float = 0.0
    released_at: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name!r} generation {self.generation}"


@dataclass(eq=False)
class Run:
    run_id: str
    latest: dict[tuple[str, str], Instance] = field(default_factory=dict)
    history: dict[tuple[str, str], dict[int, Instance]] = field(default_factory=dict)
    persistent: dict[str, int] = field(default_factory=dict)    # member -> live connections
    lost: dict[str, str] = field(default_factory=dict)          # member -> why
    #: send/wait: key -> (value, who sent it); key -> the waits not answered yet
    values: dict[str, tuple[Any, str]] = field(default_factory=dict)
    value_waiters: dict[str, list[Waiter]] = field(default_factory=dict)
    connections: int = 0
    last_activity: float = field(default_factory=time.monotonic)

    def open_instances(self):
        return [i for i in self.latest.values() if i.state is State.OPEN]


@dataclass
class Counters:
    releases: int = 0
    timeouts: int = 0
    aborts: int = 0
    members_lost: int = 0
    membership_errors: int = 0


class Registry:
    """All runs of one server. Call only from the event loop's thread."""

    #: ended rounds kept per barrier name, so late arrivals still learn the outcome
    HISTORY = 64
    #: keys (send/wait) one run may hold
    MAX_KEYS = 10_000

    def __init__(self, on_release: Callable[[Instance], None] | None = None):
        self.runs: dict[str, Run] = {}
        self.counters = Counters()
        self.on_release = on_release

    # -- lookups -------------------------------------------------------------------------------

    def run(self, run_id: str) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            run = self.runs[run_id] = Run(run_id)
        run.last_activity = time.monotonic()
        return run

    def open_count(self) -> int:
        return sum(len(r.open_instances()) for r in self.runs.values())

    def waiter_count(self) -> int:
        return sum(len(i.waiters) for r in self.runs.values() for i in r.open_instances())

    def open_rounds(self, run_id: str, with_parts: bool = False) -> list[dict]:
        """The open barrier and exchange rounds of ``run_id``, oldest first: each with its
        run, members, who arrived, whom it waits on, and how long it has been open (for a
        live view: "barrier 'ready' waits on hostB"). With ``with_parts``, also those of the
        runs named ``<run_id>.<part>`` (migrate-run's scenario instances sync as
        ``<run-id>.pair1``, ...). Does not count as any run's activity."""
        runs = [r for rid, r in self.runs.items()
                if rid == run_id or (with_parts and rid.startswith(run_id + "."))]
        now = time.monotonic()
        out = []
        for inst, run in sorted(((i, r) for r in runs for i in r.open_instances()),
                                key=lambda pair: pair[0].created):
            members = list(inst.members or ())
            out.append({"run": run.run_id, "kind": inst.kind, "name": inst.name,
                        "generation": inst.generation, "members": members,
                        "arrived": sorted(inst.waiters),
                        "waiting_on": [m for m in members if m not in inst.waiters],
                        "open_s": round(now - inst.created, 1)})
        return out

    # -- connections ---------------------------------------------------------------------------

    def connected(self, conn: Connection) -> None:
        run = self.run(conn.run_id)
        run.connections += 1
        if conn.persistent:
            run.persistent[conn.member] = run.persistent.get(conn.member, 0) + 1
            run.lost.pop(conn.member, None)       # a member that comes back is back

    def disconnected(self, conn: Connection, why: str) -> None:
        """``conn`` is gone: abort every open round it waits in; a persistent member whose last
        participant connection this was is marked lost and aborts every open round listing it.
        """
        run = self.run(conn.run_id)
        run.connections -= 1
        reason = f"member {conn.member} lost its connection ({why})"
        for key, waiters in list(run.value_waiters.items()):      # its waits end with it
            for w in [w for w in waiters if w.conn is conn]:
                waiters.remove(w)
                if not w.future.done():
                    w.future.set_exception(BarrierAborted(
                        f"wait {key!r}: {reason}", barrier=key, kind="wait",
                        by=conn.member, reason=reason, lost=True))
            if not waiters:
                del run.value_waiters[key]
        for inst in run.open_instances():
            w = inst.waiters.get(conn.member)
            if w is not None and w.conn is conn:
                self._lost(inst, conn.member, reason)
        if conn.persistent:
            left = run.persistent.get(conn.member, 1) - 1
            if left > 0:
                run.persistent[conn.member] = left
                return
            run.persistent.pop(conn.member, None)
            run.lost[conn.member] = reason
            self.counters.members_lost += 1
            for inst in run.open_instances():
                if inst.members and conn.member in inst.members \
                        and conn.member not in inst.waiters:
                    self._lost(inst, conn.member, reason)

    # -- rounds --------------------------------------------------------------------------------

    def _choose(self, run: Run, kind: str, name: str, members: tuple[str, ...],
                generation: int | None) -> Instance:
        key = (kind, name)
        latest = run.latest.get(key)
        history = run.history.setdefault(key, {})
        next_gen = latest.generation + 1 if latest else 1
        if generation is None:
            if latest is not None and latest.state is State.OPEN:
                return latest
            if latest is not None and latest.state is not State.RELEASED:
                raise latest.error
            generation = next_gen
        if latest is not None and generation == latest.generation:
            if latest.state is State.OPEN:
                return latest
            if latest.error is not None:
                raise latest.error
            raise MembershipError(f"{kind} {name!r} generation {generation} was already "
                                  f"released; the next round is {next_gen}", barrier=name,
                                  generation=generation)
        if generation == next_gen and (latest is None or latest.state is not State.OPEN):
            inst = Instance(kind, name, generation, members)
            run.latest[key] = history[generation] = inst
            for old in sorted(history)[:-self.HISTORY]:
                del history[old]
            return inst
        past = history.get(generation)
        if past is not None and past.error is not None:
            raise past.error
        where = (f"round {latest.generation} is open" if latest and latest.state is State.OPEN
                 else f"the next round is {next_gen}")
        raise MembershipError(f"{kind} {name!r}: generation {generation} asked for, but "
                              f"{where}", barrier=name, generation=generation)

    # -- key-value messages -----------------------------------------------------------------

    def send(self, conn: Connection, key: str, data: Any) -> dict:
        """Set ``key`` to ``data`` in the run (the last send wins); answer its waiters."""
        run = self.run(conn.run_id)
        if key not in run.values and len(run.values) >= self.MAX_KEYS:
            raise MembershipError(f"send {key!r}: run {conn.run_id} holds {self.MAX_KEYS} keys "
                                  "already (the most a run keeps)", barrier=key)
        run.values[key] = (data, conn.member)
        result = Result({"data": data, "from": conn.member})
        for w in run.value_waiters.pop(key, []):
            if not w.future.done():
                w.future.set_result(result)
        return {"name": key}

    async def wait(self, conn: Connection, key: str, timeout: float) -> dict:
        """``key``'s value once it is sent (at once if it was).

        :raise BarrierTimeout: nobody sent it within ``timeout`` (naming the run's lost
            members: one of them may have been meant to).
        """
        run = self.run(conn.run_id)
        if key in run.values:
            data, sender = run.values[key]
            return Result({"data": data, "from": sender})
        loop = asyncio.get_running_loop()
        waiter = Waiter(conn, loop.create_future(), loop.time() + timeout, timeout)
        run.value_waiters.setdefault(key, []).append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await waiter.future
        except TimeoutError:
            self.counters.timeouts += 1
            gone = (" (members gone: " + "; ".join(f"{m}: {why}" for m, why in
                                                   sorted(run.lost.items())) + ")"
                    if run.lost else "")
            raise BarrierTimeout(f"wait {key!r}: nobody sent it within {timeout:g} s{gone}",
                                 barrier=key, kind="wait", missing=[], timeout=timeout) \
                from None
        finally:
            waiters = run.value_waiters.get(key)
            if waiters and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del run.value_waiters[key]

    async def join(self, conn: Connection, kind: str, name: str, members: list[str],
                   timeout: float, generation: int | None, data: Any = None) -> dict:
        """Arrive at round ``generation`` (or the current one) of ``name`` and wait for it.

        :return: a :class:`Result`: ``{"generation": g}``, plus ``"data": {member: data}``
            for an exchange, once every member arrived.
        :raise BarrierTimeout: when any waiter's ``timeout`` passes first (the same error
            for every waiter, naming the members that did not arrive).
        :raise BarrierAborted: when a member aborts the round or is lost.
        :raise MembershipError: bad or disagreeing member lists, duplicate arrival, a member
            already known to be gone.
        """
        run = self.run(conn.run_id)
        me = conn.member
        member_set = members.set if isinstance(members, Members) else frozenset(members)
        members = tuple(members)
        if len(member_set) != len(members):
            dups = sorted({m for m in members if members.count(m) > 1})
            self.counters.membership_errors += 1
            raise MembershipError(f"{kind} {name!r}: duplicate members {dups} in the list",
                                  barrier=name, duplicates=dups)
        if me not in member_set:
            self.counters.membership_errors += 1
            raise MembershipError(f"{kind} {name!r}: member {me!r} is not in its own member "
                                  f"list {list(members)}", barrier=name, member=me)
        gone = [m for m in members if m in run.lost] if run.lost else []
        if gone:
            raise BarrierAborted(f"{kind} {name!r}: member {gone[0]} is gone: {run.lost[gone[0]]}",
                                 barrier=name, kind=kind, by=gone[0], reason=run.lost[gone[0]],
                                 lost=True)
        inst = self._choose(run, kind, name, members, generation)
        if inst.members is not None and inst.members != members \
                and frozenset(inst.members) != member_set:
            err = MembershipError(
                f"{inst.label}: member lists disagree: {me} has {sorted(members)}, the round "
                f"was opened with {sorted(inst.members)}", barrier=name, kind=kind,
                generation=inst.generation, expected=sorted(inst.members), got=sorted(members),
                member=me)
            self.counters.membership_errors += 1
            self._fail(inst, State.FAILED, err)
            raise err
        if me in inst.waiters:
            self.counters.membership_errors += 1
            raise MembershipError(f"{inst.label}: member {me!r} is already waiting (a second "
                                  "arrival under the same name)", barrier=name, member=me,
                                  generation=inst.generation)
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiter = Waiter(conn, loop.create_future(), now + timeout, timeout, data)
        inst.waiters[me] = waiter
        inst.last_arrival = time.monotonic()
        if len(inst.waiters) == len(inst.members):
            self._release(inst)
        elif waiter.deadline < inst.deadline:
            self._arm(inst, waiter.deadline)
        return await waiter.future

    def abort(self, conn: Connection, kind: str, name: str, reason: str) -> dict:
        """Abort the open round of ``name``, or the next one if none is open."""
        run = self.run(conn.run_id)
        key = (kind, name)
        latest = run.latest.get(key)
        err_for = (lambda inst: BarrierAborted(
            f"{inst.label} aborted by {conn.member}: {reason}", barrier=name, kind=kind,
            generation=inst.generation, by=conn.member, reason=reason, lost=False))
        if latest is not None and latest.state is State.OPEN:
            waiting = len(latest.waiters)
            self._fail(latest, State.ABORTED, err_for(latest))
            return {"generation": latest.generation, "waiters": waiting}
        if latest is not None and latest.state in (State.ABORTED, State.TIMED_OUT, State.FAILED):
            return {"generation": latest.generation, "waiters": 0, "already": latest.state.value}
        inst = Instance(kind, name, latest.generation + 1 if latest else 1, None)
        run.latest[key] = run.history.setdefault(key, {})[inst.generation] = inst
        self._fail(inst, State.ABORTED, err_for(inst))
        return {"generation": inst.generation, "waiters": 0}

    # -- endings -------------------------------------------------------------------------------

    def _arm(self, inst: Instance, deadline: float) -> None:
        """(Re)schedule the round's timeout at the earliest waiter deadline (O(1) per arrival)."""
        if inst.timer is not None:
            inst.timer.cancel()
        inst.deadline = deadline
        inst.timer = asyncio.get_running_loop().call_at(deadline, self._timed_out, inst)

    def _timed_out(self, inst: Instance) -> None:
        if inst.state is not State.OPEN:
            return
        first = min(inst.waiters.values(), key=lambda w: w.deadline)
        missing = sorted(set(inst.members) - set(inst.waiters))
        self.counters.timeouts += 1
        self._fail(inst, State.TIMED_OUT, BarrierTimeout(
            f"{inst.label} timed out after {first.timeout:g} s ({first.conn.member}'s timeout): "
            f"missing {', '.join(missing)}", barrier=inst.name, kind=inst.kind,
            generation=inst.generation, missing=missing, arrived=sorted(inst.waiters),
            timeout=first.timeout))

    def _release(self, inst: Instance) -> None:
        if inst.timer is not None:
            inst.timer.cancel()
        inst.state = State.RELEASED
        inst.released_at = time.monotonic()
        # the members already know the member list: a barrier answer is just its round
        result = Result(generation=inst.generation)
        if inst.kind == "exchange":
            result["data"] = {m: w.data for m, w in inst.waiters.items()}
        inst.result = result
        self.counters.releases += 1
        for w in inst.waiters.values():
            if not w.future.done():
                w.future.set_result(result)
        if self.on_release is not None:
            self.on_release(inst)
        for w in inst.waiters.values():
            w.data = None

    def _lost(self, inst: Instance, member: str, reason: str) -> None:
        """Abort ``inst`` because ``member`` was lost (connection closed or heartbeat missed)."""
        self._fail(inst, State.ABORTED, BarrierAborted(
            f"{inst.label} aborted: {reason}", barrier=inst.name, kind=inst.kind,
            generation=inst.generation, by=member, reason=reason, lost=True))

    def _fail(self, inst: Instance, state: State, error: SyncError) -> None:
        if inst.state is not State.OPEN:
            return
        if inst.timer is not None:
            inst.timer.cancel()
        inst.state = state
        inst.error = error
        if state is State.ABORTED:
            self.counters.aborts += 1
        for w in inst.waiters.values():
            if not w.future.done():
                w.future.set_exception(error)
                w.future.exception()  # retrieved: no "never retrieved" warning if unused

    # -- housekeeping --------------------------------------------------------------------------

    def collect(self, idle_s: float) -> int:
        """Forget runs with no connections and no open rounds, idle for ``idle_s``."""
        now = time.monotonic()
        stale = [rid for rid, r in self.runs.items()
                 if r.connections <= 0 and not r.open_instances()
                 and now - r.last_activity > idle_s]
        for rid in stale:
            del self.runs[rid]
        return len(stale)
