"""Migration slots: how many migrations run at once out of a host, into a host and in the
cluster, across every controller on the same hosts (issue 18, part 2).

::

    queue = SlotQueue(ctx)                                    # one per run (RunContext)
    async with queue.ticket(src_host, dst, vm, mig_id, priority) as ticket:
        await ticket.wait()           # queued until the limits allow it (first try at once)
        ...                           # the migration; the slot is given back on leaving

**Where slots live.** A slot is a file ``<run-id>.<mig-id>.<vm>.slot`` in
``<shared_dir>/migrator-slots/`` (the cluster is the set of hosts sharing that storage;
without shared storage each source host's own, see :func:`slots_home`), its
first line ``SRC DST``, its second who holds it (run, migration, controller). A pass of the
queue runs one shell command on a host that sees the storage: under ``flock`` it counts the
slots held, then takes them for as many waiting tickets as the limits allow, in the queue's
order (priority, then order of asking), skipping a ticket whose host is full so that one busy
host does not hold up migrations between others. Each ticket's slot is a run-journal
resource (``kind: migration_slot``) before it can exist: the migration gives it back when
it ends, and ``recover`` removes a dead run's (by its run id, journal or not).

**When a ticket is looked at again.** At once when this run frees a slot; every
``queue.poll_s`` for slots freed by other controllers (they share no process to be woken
by). A ticket cancelled while it waits is withdrawn: it never held a slot, its migration never
started.

What can go wrong: the shared storage cannot be written or its lock not taken within 30 s
(:class:`~migrator.errors.CommandError` from :meth:`Ticket.wait`; nothing was claimed).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

from ..aio import shielded, wait_for
from ..errors import CommandError
from ..hosts import SSHHost, quote
from .journal import controller_identity

if TYPE_CHECKING:
    from .context import RunContext

log = logging.getLogger(__name__)


def slots_home(inventory) -> str:
    """Where the cluster's slots are: the shared storage. Without it, each host's own
    storage (``local_dir``, else its run dir): then each source host counts only the
    migrations out of itself, so ``per_destination`` and ``per_cluster`` hold among the
    migrations of one source only."""
    return str(inventory.shared_dir or inventory.local_dir or inventory.run_dir)


def slots_dir(shared_dir: str) -> str:
    return f"{shared_dir.rstrip('/')}/migrator-slots"


def release_command(path: str, run_id: str) -> str:
    """Shell: remove the slot at ``path`` (its name holds ``run_id``: a run only ever removes
    its own)."""
    if f"/{run_id}." not in path:
        raise ValueError(f"{path} is not a slot of run {run_id}")
    return f"rm -f {quote(path)} {quote(path + '.tmp')}"


def _pass_script(directory: str, per_source: int, per_destination: int, per_cluster: int,
                 owner: str) -> str:
    """Shell: under the directory's lock, take slots for the candidates on stdin (``NAME SRC
    DST`` lines, in the queue's order) while the limits allow; print the names taken, then a
    line ``held N`` and one ``H SRC DST`` per slot held before (for saying why one waits)."""
    return (f"set -e; d={quote(directory)}; mkdir -p \"$d\"; exec 9>\"$d/.lock\"; "
            "flock -w 30 9; "
            "held=$(find \"$d\" -maxdepth 1 -name '*.slot' -exec head -qn1 {} + | "
            "sed 's/^/H /'); "
            "{ printf '%s\\n' \"$held\"; sed 's/^/W /'; } | "
            f"awk -v S={per_source} -v D={per_destination} -v C={per_cluster} "
            "'$1==\"H\" && NF==3 { o[$2]++; i[$3]++; n++; next } "
            "$1==\"W\" { if (o[$3]+0 < S && i[$4]+0 < D && n < C) "
            "{ o[$3]++; i[$4]++; n++; print $2, $3, $4 } }' | "
            "while read -r name src dst; do "
            f"printf '%s %s\\n%s\\n' \"$src\" \"$dst\" {quote(owner)} > \"$d/$name.tmp\"; "
            "mv \"$d/$name.tmp\" \"$d/$name\"; echo \"$name\"; done; "
            "printf '%s\\n' \"$held\" | grep -c '^H ' | sed 's/^/held /' || true; "
            "printf '%s\\n' \"$held\"")


def release_all_command(shared_dir: str, run_id: str) -> str:
    """Shell: remove every slot of run ``run_id`` (``recover``)."""
    if not run_id or "/" in run_id or "*" in run_id:
        raise ValueError(f"not a run id: {run_id!r}")
    return f"rm -f -- {quote(slots_dir(shared_dir))}/{quote(run_id)}.*.slot*"


@dataclass(eq=False)
class Ticket:
    """One migration's place in the queue, and its slot once granted."""

    queue: "SlotQueue"
    host: SSHHost               #: the source: sees the shared storage; slots go through it
    src: str
    dst: str
    name: str                   #: the slot file's name
    priority: int
    seq: int
    granted: bool = False
    asked_at: float = field(default_factory=time.monotonic)
    granted_at: float | None = None
    _event: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _error: BaseException | None = field(default=None, repr=False)

    @property
    def path(self) -> str:
        return f"{self.queue.directory}/{self.name}"

    @property
    def waited_s(self) -> float:
        return (self.granted_at or time.monotonic()) - self.asked_at

    async def wait(self) -> None:
        """Return once this ticket holds its slot.

        :raise CommandError: the slots could not be read or written on the shared storage.
        """
        await self.queue._serve(self)

    async def try_once(self) -> bool:
        """One pass of the queue now (at most one SSH round trip); whether this ticket holds
        its slot after it.

        :raise CommandError: as :meth:`wait`.
        """
        if not self.granted:
            async with self.queue._lock:
                if not self.granted:
                    await shielded(self.queue._pass(self.host))
        return self.granted

    def why_waiting(self) -> str:
        return self.queue.why_waiting(self)


class SlotQueue:
    """The run's queue of migrations waiting for slots (see the module's docstring).

    :param ctx: the run (config, inventory, journal, run id).
    """

    def __init__(self, ctx: "RunContext"):
        self.ctx = ctx
        self.directory = slots_dir(slots_home(ctx.inventory))
        self._waiting: list[Ticket] = []
        self._seq = itertools.count()
        self._lock = asyncio.Lock()         # one pass at a time
        self._freed = asyncio.Event()
        self._held: list[tuple[str, str]] = []   # as the last pass saw them

    @property
    def settings(self):
        """The run's ``queue.*`` limits, as its config says now (a drain sets its own)."""
        return self.ctx.config.queue

    @property
    def waiting(self) -> list[Ticket]:
        """The tickets waiting, in the order they are served."""
        return sorted(self._waiting, key=lambda t: (-t.priority, t.seq))

    @contextlib.asynccontextmanager
    async def ticket(self, src: SSHHost, dst: str, vm: str, mig_id: str,
                     priority: int = 0) -> AsyncIterator[Ticket]:
        """A ticket for one migration of ``vm`` from host ``src`` (which must see the shared
        storage) to ``dst``; its slot (if it got one) is given back on leaving, whatever
        happened."""
        t = Ticket(self, src, src.name, dst, f"{self.ctx.run_id}.{mig_id}.{vm}.slot",
                   priority, next(self._seq))
        self.ctx.record("resource", kind="migration_slot", host=src.name, path=t.path,
                        mig_id=mig_id, vm=vm)
        self._waiting.append(t)
        try:
            yield t
        finally:
            if t in self._waiting:
                self._waiting.remove(t)
            if t.granted:
                await shielded(self._release(t))

    async def _serve(self, t: Ticket) -> None:
        while not t.granted:
            if t._error is not None:
                raise t._error
            freed = self._freed
            async with self._lock:
                if not t.granted:
                    # never cut in half: slots taken remotely must be known here, so that
                    # their tickets give them back (a cancelled waiter's too)
                    await shielded(self._pass(t.host))
            if t.granted:
                return
            if t._error is not None:
                raise t._error
            try:
                await wait_for(freed.wait(), self.settings.poll_s)
            except TimeoutError:
                pass

    async def _pass(self, host: SSHHost) -> None:
        """One pass, through ``host``: slots for as many waiting tickets as the limits allow,
        in order. Without shared storage ``host`` sees only its own slots: only its own
        tickets (migrations out of it) are served, their slot files where they are given
        back (on that host)."""
        waiting = self.waiting
        if self.ctx.inventory.shared_dir is None:
            waiting = [t for t in waiting if t.src == host.name]
        if not waiting:
            return
        s = self.settings
        owner = json.dumps({"run_id": self.ctx.run_id, "controller": controller_identity()})
        r = await host.run(
            _pass_script(self.directory, s.per_source, s.per_destination, s.per_cluster,
                         owner),
            stdin="".join(f"{t.name} {t.src} {t.dst}\n" for t in waiting),
            timeout=self.ctx.config.timeouts.host_cleanup_s + 30)
        if not r.ok:
            error = CommandError(host.name, r)
            for t in waiting:
                t._error = error
            raise error
        lines = r.stdout.splitlines()
        taken = set()
        for i, line in enumerate(lines):
            if line.startswith("held "):
                self._held = [tuple(x.split()[1:3]) for x in lines[i + 1:]
                              if x.startswith("H ") and len(x.split()) == 3]
                break
            taken.add(line.strip())
        now = time.monotonic()
        for t in waiting:
            if t.name in taken:
                self._held.append((t.src, t.dst))
                t.granted, t.granted_at = True, now
                if t not in self._waiting:      # withdrawn while this pass ran
                    await self._release(t)
                    continue
                self._waiting.remove(t)
                if t.waited_s > 0.5:
                    self.ctx.say(f"[queue] {t.name.split('.')[2]} {t.src}->{t.dst}: slot after "
                                 f"{t.waited_s:.1f} s")

    async def _release(self, t: Ticket) -> None:
        try:
            await t.host.run(release_command(t.path, self.ctx.run_id), check=True,
                                timeout=self.ctx.config.timeouts.host_cleanup_s)
        except Exception as exc:  # noqa: BLE001 - recover removes it; said
            self.ctx.warn(f"migration slot {t.path} not given back ({exc}): 'migrate-run "
                          "recover' removes it")
        t.granted = False
        freed, self._freed = self._freed, asyncio.Event()
        freed.set()                     # wake this run's waiters at once

    def why_waiting(self, t: Ticket) -> str:
        """Which limit holds ``t`` back, as the last pass saw the slots (for status lines)."""
        s = self.settings
        out = sum(1 for src, _ in self._held if src == t.src)
        inn = sum(1 for _, dst in self._held if dst == t.dst)
        full = []
        if out >= s.per_source:
            full.append(f"{t.src} sends {out}/{s.per_source}")
        if inn >= s.per_destination:
            full.append(f"{t.dst} receives {inn}/{s.per_destination}")
        if len(self._held) >= s.per_cluster:
            full.append(f"cluster {len(self._held)}/{s.per_cluster}")
        ahead = [w for w in self.waiting if (-w.priority, w.seq) < (-t.priority, t.seq)]
        return ", ".join(full) or (f"{len(ahead)} ahead" if ahead else "next")


__all__ = ["SlotQueue", "Ticket", "release_all_command", "release_command", "slots_dir",
           "slots_home"]
