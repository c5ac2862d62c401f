"""One live migration of one VM, as an explicit state machine.

::

    mig = Migration(src_vm, dst_host, dst_address, MigrationParams(), config)
    result = await mig.run()          # MigrationResult; src_vm (and its open session) now
                                      # refer to the VM on the destination
    async for record in mig.progress(): ...   # from another task, while it runs

:class:`BaseMigration` holds what every driver shares (the phase machine, the progress
stream, ``cancel()``, the result record and the failure guarantees of ``run()``);
:class:`Migration` drives QEMU through QMP (the ``qemu`` driver) and
:class:`~migrator.migration.libvirt.LibvirtMigration` drives libvirt;
:func:`~migrator.migration.make_migration` picks the one for a VM object.

Phases (every transition is checked against :data:`EDGES` and recorded with monotonic and
wall-clock times in ``mig.history``)::

    PENDING -> PREPARING_DEST -> CONFIGURED -> LISTENING [-> MIRRORING] -> MIGRATING
            [-> POSTCOPY]
            -> COMPLETED -> VERIFIED -> CLEANED                         (success)
    [PENDING ->] QUEUED, before PREPARING_DEST or MIGRATING    (waiting for a slot: .slot)
    any phase before COMPLETED -> ROLLING_BACK -> ROLLED_BACK           (failure/cancel)
    POSTCOPY -> SPLIT                                                   (see below)
    COMPLETED | VERIFIED -> LANDED          (failed after completion; VM on the destination)
    any phase that is not final -> UNRESOLVED   (the VM's place could not be established)
    any phase that is not final -> LOST   (the copy holding the VM is gone: before the postcopy
                                           switchover the source, after it either side)

Every run ends in one of the final phases CLEANED, ROLLED_BACK, SPLIT, LANDED, UNRESOLVED or
LOST, and the final phase tells the truth about where the VM runs.

The promise, kept by :meth:`Migration._rollback` on every failure, timeout, ``cancel()`` and
cancellation of the caller's task: the VM keeps running on its source with its memory intact,
the destination QEMU and its run directory are gone, and the error (:class:`MigrationError`)
names the VM, both hosts and the phase, with the original error chained.

After a postcopy switchover the guest's memory is split between the hosts and the source can
no longer resume it; such a failure ends in SPLIT and is reported as exactly that (the
destination is *not* killed, since it holds the newest pages). A stop asked for on purpose
there (``cancel()``, the caller's task cancelled) finishes a healthy postcopy instead:
POSTCOPY -> COMPLETED -> VERIFIED -> LANDED, the VM whole on the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator, Callable

from qemu.qmp import ExecuteError, QMPError

from ..aio import cancel_and_wait, shielded, wait_for
from ..blocking import BlockingInWorkers, on_loop
from ..config import Config
from ..errors import HostError, MigrationError, MigratorError
from ..hosts.ssh import SSHHost
from ..hypervisor.qemu import machine_types
from ..hypervisor.vm import qemu_binary
from . import cpu, storage
from .params import MIB, MigrationParams
from .timeline import timeline
from .policy import Decision, PolicyTracker

#: the id of the x509 credentials object a TLS migration adds to both QEMUs
TLS_CREDS_ID = "migrator-tls"

log = logging.getLogger(__name__)


class Phase(str, enum.Enum):
    PENDING = "PENDING"
    PREPARING_DEST = "PREPARING_DEST"   #: starting the destination QEMU (-incoming defer)
    CONFIGURED = "CONFIGURED"           #: capabilities and parameters set on both ends
    LISTENING = "LISTENING"             #: destination bound its port (QEMU chose it)
    MIRRORING = "MIRRORING"             #: disks copied to the destination (qemu driver,
                                        #: storage copy-*) until in sync; the guest runs
    QUEUED = "QUEUED"                   #: waiting for a migration slot (framework.slots):
                                        #: before anything (slot_first) or with the
                                        #: destination prepared, listening (qemu)
    MIGRATING = "MIGRATING"             #: 'migrate' issued, precopy running
    POSTCOPY = "POSTCOPY"               #: switch to postcopy requested (QEMU switches at its
                                        #: next iteration, unless precopy converged first)
    COMPLETED = "COMPLETED"             #: QEMU says completed
    VERIFIED = "VERIFIED"               #: destination running, source postmigrate
    CLEANED = "CLEANED"                 #: source QEMU stopped; the VM lives on the destination
    ROLLING_BACK = "ROLLING_BACK"
    ROLLED_BACK = "ROLLED_BACK"         #: VM running on the source, destination gone
    SPLIT = "SPLIT"                     #: failed after postcopy switchover: state split
    LANDED = "LANDED"                   #: failed after completion (a check or the source's
                                        #: cleanup): the VM runs on the destination
    UNRESOLVED = "UNRESOLVED"           #: where the VM runs could not be established:
                                        #: nothing was destroyed, both sides were kept
    LOST = "LOST"                       #: the copy that held the VM is gone (its QEMU
                                        #: exited or was killed): it runs nowhere; what was
                                        #: left of it on either host was removed

    @property
    def is_final(self) -> bool:
        return self in FINAL


FINAL = frozenset({Phase.CLEANED, Phase.ROLLED_BACK, Phase.SPLIT, Phase.LANDED,
                   Phase.UNRESOLVED, Phase.LOST})

EDGES: dict[Phase, set[Phase]] = {
    Phase.PENDING: {Phase.PREPARING_DEST, Phase.QUEUED, Phase.ROLLING_BACK},
    Phase.QUEUED: {Phase.PREPARING_DEST, Phase.MIRRORING, Phase.MIGRATING,
                   Phase.ROLLING_BACK},
    Phase.PREPARING_DEST: {Phase.CONFIGURED, Phase.ROLLING_BACK},
    # libvirt's migrate3 prepares the listening destination inside the call: no LISTENING
    Phase.CONFIGURED: {Phase.LISTENING, Phase.QUEUED, Phase.MIGRATING, Phase.ROLLING_BACK},
    Phase.LISTENING: {Phase.QUEUED, Phase.MIRRORING, Phase.MIGRATING, Phase.ROLLING_BACK},
    Phase.MIRRORING: {Phase.MIGRATING, Phase.ROLLING_BACK},
    Phase.MIGRATING: {Phase.POSTCOPY, Phase.COMPLETED, Phase.ROLLING_BACK},
    # libvirt: a source its hypervisor resumed never handed the guest over
    Phase.POSTCOPY: {Phase.COMPLETED, Phase.SPLIT, Phase.ROLLING_BACK},
    # after completion: the destination is checked; a precopy source can still take the VM
    # back while the destination does not run it
    Phase.COMPLETED: {Phase.VERIFIED, Phase.SPLIT, Phase.LANDED, Phase.ROLLING_BACK},
    Phase.VERIFIED: {Phase.CLEANED, Phase.LANDED},
    # libvirt may finish a migration while it is being aborted
    Phase.ROLLING_BACK: {Phase.ROLLED_BACK, Phase.LANDED},
    Phase.CLEANED: set(), Phase.ROLLED_BACK: set(), Phase.SPLIT: set(), Phase.LANDED: set(),
    Phase.UNRESOLVED: set(), Phase.LOST: set(),
}
for _phase in EDGES:         # any phase that is not final can end unresolved, or the VM lost
    if not _phase.is_final:
        EDGES[_phase] |= {Phase.UNRESOLVED, Phase.LOST}

ACTIVE = {"setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling",
          "postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-recover-setup"}


@dataclass(frozen=True)
class ProgressRecord:
    """One poll of a running migration (QEMU's query-migrate)."""

    t: float                 #: seconds since 'migrate' was issued
    status: str
    transferred: int         #: bytes
    remaining: int           #: bytes of RAM still to send
    total: int               #: bytes of guest RAM
    dirty_pages_rate: int    #: pages/s
    mbps: float              #: QEMU's throughput estimate, Mbit/s
    iteration: int           #: dirty-bitmap syncs so far
    expected_downtime_ms: int
    cpu_throttle: int        #: auto-converge throttle, percent
    disk_transferred: int = 0    #: bytes of disk copied (storage copy-*; libvirt)
    disk_total: int = 0          #: bytes of disk to copy in all
    wall: float = field(default_factory=time.time)   #: the controller's clock at the poll


@dataclass
class MigrationResult:
    """The record of one migration (all times in ms unless named ``_s``)."""

    vm: str
    src: str
    dst: str
    status: str                          #: completed | failed | cancelled
    phase: str                           #: final phase
    driver: str = "qemu"
    total_time_ms: int | None = None     #: QEMU's total-time
    downtime_ms: int | None = None       #: QEMU's downtime
    downtime_events_ms: float | None = None  #: source STOP -> destination RESUME events
    total_time_net_ms: int | None = None     #: libvirt: time_elapsed_net (excl. its own RPCs)
    downtime_net_ms: int | None = None       #: libvirt: downtime_net
    setup_time_ms: int | None = None
    transferred_bytes: int | None = None
    throughput_mbps: float | None = None
    iterations: int | None = None
    postcopy_requests: int | None = None
    postcopy_recoveries: int = 0         #: postcopy links recovered (migrate-recover)
    #: postcopy asked for: did the guest really run on the destination before all its pages
    #: had arrived (QEMU's MIGRATION event postcopy-active; libvirt's post-copy suspend
    #: event)? False: precopy converged before the switch. None: no postcopy asked for
    postcopy_switched: bool | None = None
    max_cpu_throttle: int = 0
    #: what the convergence policy did, in order (see .policy.Decision): downtime steps,
    #: auto-converge, postcopy, pause, abort, each with its trigger, reason and figures
    decisions: list[dict] = field(default_factory=list)
    queued_s: float | None = None        #: waited for a migration slot (None: not queued)
    wall_s: float | None = None          #: 'migrate' issued -> completed seen
    run_s: float | None = None           #: the whole run(): destination start to cleanup
    overhead_s: float | None = None      #: run_s minus QEMU's total time
    port: int | None = None
    storage: str = "shared"              #: migration.storage
    disk_size: int | None = None         #: the copied disk's virtual size, bytes
    disk_bytes: int | None = None        #: bytes the disk copy sent (mirror), writes included
    mirror_s: float | None = None        #: disk copy started -> in sync (READY)
    #: qemu driver: the guest stopped at pre-switchover, seen -> the disk's copy finished and
    #: the migration continued (part of the downtime)
    disk_switchover_ms: float | None = None
    source_disk_removed: bool | None = None  #: the source's copy removed after the move
    #: the guest-visible blackout (VMs with an address, probed: see .blackout): the longest
    #: gap between ICMP replies, and the prober's whole report
    blackout_ms: float | None = None
    blackout: dict | None = None
    params: dict = field(default_factory=dict)
    phases: list[tuple[str, float, float]] = field(default_factory=list)
    #: the progress history: a sample per ``report.progress_interval_s`` (see .timeline)
    progress: list[dict] = field(default_factory=list)
    #: the guest dirtier's samples, stamped on the hosts (framework.dirtier); [] when
    #: it does not run
    dirtier: list[dict] = field(default_factory=list)
    #: the dirtier's check of the guest's memory after the migration (framework.dirtier)
    dirtier_check: dict | None = None
    #: the machine type the guest runs as (an alias such as ``pc`` resolved on the source)
    machine: str | None = None
    #: XBZRLE's work, where its cache was on (QEMU's xbzrle-cache figures): ``cache_size``,
    #: ``bytes`` and ``pages`` sent as deltas, ``cache_miss`` (pages not in the cache: sent
    #: whole), ``overflow`` (deltas larger than the page: sent whole), ``cache_miss_rate``,
    #: ``encoding_rate``
    xbzrle: dict | None = None
    #: each side's QEMU: ``{"src": {"host", "binary", "version"}, "dst": {...}}`` (qemu
    #: driver: query-version; the destination's known once it started)
    qemu: dict = field(default_factory=dict)
    #: each side's QEMU CPU seconds outside its vCPU threads while the migration ran (see
    #: .cpu): ``{"src_s", "dst_s", "dst_since": "migration" | "launch"}``; None: not
    #: measured (the migration did not complete)
    qemu_cpu: dict | None = None
    migration_cpu_s: float | None = None     #: qemu_cpu's src_s + dst_s (None: one missing)
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


async def qmp_version(qmp) -> str:
    """QEMU's version as ``--version`` prints it: ``10.0.2 (Debian 1:10.0.2+ds-2...)``.

    :raise QMPError: QEMU did not answer.
    """
    v = await qmp.execute("query-version")
    q, package = v["qemu"], (v.get("package") or "").strip()
    return f"{q['major']}.{q['minor']}.{q['micro']}" + (f" ({package})" if package else "")


class BaseMigration(BlockingInWorkers):
    """The phase machine, progress stream, cancel and result record every driver's migration
    shares. A driver implements :meth:`_run_phases` (PENDING -> ... -> CLEANED) and
    :meth:`_rollback`; :meth:`run` wraps them with the failure guarantees.

    :param dst_address: where the destination listens (its migration address).
    """

    driver = "?"

    def __init__(self, src_vm, dst_host: SSHHost, dst_address: str,
                 params: MigrationParams | None = None, config: Config | None = None):
        self.src_vm = src_vm
        self.dst_host = dst_host
        self.dst_address = dst_address
        self.params = params or MigrationParams()
        self.config = config or src_vm.config
        self.dst_vm = type(src_vm)(src_vm.spec, dst_host, src_vm.run_dir, self.config)
        self.phase = Phase.PENDING
        self.history: list[tuple[Phase, float, float]] = [(Phase.PENDING, time.monotonic(),
                                                           time.time())]
        self.records: list[ProgressRecord] = []
        self._changed = asyncio.Event()
        #: called with (migration, new phase) on every transition, e.g. to show progress
        self.observers: list[Callable[["BaseMigration", Phase], None]] = []
        self._cancel_requested: str | None = None
        self._interrupted = False           # the caller's task was cancelled
        #: why the caller's task is being cancelled, when its owner knows and says so before
        #: (the framework: its sync failed); else the record says only that it was
        self.interrupt_reason: str | None = None
        self._t_migrate: float | None = None
        self._policy: PolicyTracker | None = None
        self._throttle_catching_up = False  # the first released step is not the policy's
        #: the migration's slot (a :class:`~migrator.framework.slots.Ticket`: ``granted``,
        #: ``try_once()``, ``wait()``), waited for before 'migrate' (phase QUEUED), or before
        #: anything with ``slot_first``; None: no limit
        self.slot = None
        self.slot_first = False
        #: the disk migrates with the VM (``storage`` copy-*): the source's image, once known
        self.copies_disk = self.params.storage != "shared" and bool(src_vm.spec.disk)
        #: called right before the destination's disk is made (the run's journal records it)
        self.on_disk_copy: Callable[[], None] | None = None
        self.disk: storage.DiskImage | None = None
        self._dst_disk_made = False         # this migration made the destination's disk
        self.result = MigrationResult(src_vm.name, src_vm.host.name, dst_host.name,
                                      "pending", Phase.PENDING.value, driver=self.driver,
                                      params=self.params.model_dump(),
                                      storage=self.params.storage)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.src_vm.name} {self.src_vm.host.name}->"
                f"{self.dst_host.name} {self.phase.value}>")

    # -- state ----------------------------------------------------------------------------------

    def _set_phase(self, phase: Phase) -> None:
        if phase not in EDGES[self.phase]:
            raise AssertionError(f"{self}: illegal transition {self.phase.value} -> {phase.value}")
        # the source by name: the VM object's host is the destination once it moved
        log.info("[vm=%s %s->%s] %s -> %s", self.src_vm.name, self.result.src,
                 self.dst_host.name, self.phase.value, phase.value)
        self.phase = phase
        self.history.append((phase, time.monotonic(), time.time()))
        if phase in (Phase.POSTCOPY, Phase.COMPLETED):
            self.src_vm.console_switchover()    # the guest runs on the destination now
        for observer in self.observers:
            observer(self, phase)
        self._pulse()

    def _error(self, message: str, outcome: str = "") -> MigrationError:
        return MigrationError(self.src_vm.host.name, self.dst_host.name, self.src_vm.name,
                              self.phase.value, message, outcome)

    @on_loop
    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the migration to stop; ``run()`` then rolls back and raises MigrationError.
        After the postcopy switchover nothing can be rolled back: a healthy postcopy is
        finished first and the VM lands on the destination (phase LANDED)."""
        self._cancel_requested = reason
        self._pulse()

    def _pulse(self) -> None:
        """Wake everyone waiting for a change, with a fresh event for the next one (an event
        left set would make every later wait return at once: a busy loop)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self) -> None:
        """Return at the next phase change or progress record."""
        await self._changed.wait()

    def disk_progress(self) -> tuple[int, int] | None:
        """While the disk is copied ahead of the memory (storage copy-*): (bytes copied,
        bytes to copy in all, which grows with the guest's writes); else None."""
        return None

    async def progress(self) -> AsyncIterator[ProgressRecord]:
        """Every progress record, from the first, until the migration ends."""
        i = 0
        while True:
            while i < len(self.records):
                yield self.records[i]
                i += 1
            if self.phase.is_final or self.phase in (Phase.COMPLETED, Phase.VERIFIED,
                                                     Phase.ROLLING_BACK):
                return
            await self._changed.wait()

    # -- the run ----------------------------------------------------------------------------------

    async def run(self) -> MigrationResult:
        """Run the migration to its end.

        :return: the result record (``status == "completed"``, phase CLEANED).
        :raise MigrationError: on any failure, timeout or ``cancel()``; the VM then runs on
            its source and the destination is gone (phase ROLLED_BACK), or, after a postcopy
            switchover, the outcome says the state is split (phase SPLIT) or, for a
            ``cancel()``, that the postcopy was finished first (phase LANDED).
        :raise asyncio.CancelledError: when the caller's task is cancelled, after the same
            rollback.
        """
        with self.src_vm.console_moving():     # an open console session follows the VM
            return await self._run(time.monotonic())

    async def _run(self, t0: float) -> MigrationResult:
        timeouts = self.config.timeouts
        try:
            if self.slot_first:
                await self._wait_for_slot()
            await self._run_phases()
        except asyncio.CancelledError:
            failed_in = self.phase
            self._interrupted = True
            why = "interrupted: " + (self.interrupt_reason
                                     or "the controller's task was cancelled")
            outcome = await shielded(self._guarded_rollback(why))
            self.result.status = "cancelled"
            self.result.error = str(MigrationError(
                self.src_vm.host.name, self.dst_host.name, self.src_vm.name, failed_in.value,
                why, outcome))
            raise
        except TimeoutError as exc:
            limit = (self._deadline(memory=False) if self.phase is Phase.MIRRORING
                     else self._transfer_deadline()
                     if self.phase in (Phase.MIGRATING, Phase.POSTCOPY)
                     else timeouts.migration_setup_s)
            raise await self._fail(f"timed out after {limit:g} s", exc) from exc
        except MigrationError as exc:
            raise await self._fail(exc.message, exc) from exc
        except Exception as exc:  # noqa: BLE001 - every failure is rolled back, then named
            raise await self._fail(f"{type(exc).__name__}: {exc}", exc) from exc
        finally:
            if self.dst_vm is not self.src_vm:
                # not handed over (rolled back, split, unresolved): the destination object's
                # connections (QMP, libvirt) end with the run, whatever is kept on the host
                await shielded(self.dst_vm.disconnect())
            self.result.run_s = time.monotonic() - t0
            self.result.progress = timeline(self.records,
                                            self.config.report.progress_interval_s)
            self.result.phase = self.phase.value
            self.result.phases = [(p.value, round(m - self.history[0][1], 4), w)
                                  for p, m, w in self.history]
        if self.result.total_time_ms:
            self.result.overhead_s = self.result.run_s - self.result.total_time_ms / 1000
        return self.result

    async def _run_phases(self) -> None:
        """PENDING -> ... -> CLEANED; raise on any failure (``run`` rolls back)."""
        raise NotImplementedError

    def _deadline(self, memory: bool = True, disk: bool = True) -> float:
        """How long a transfer may take in all (the policy's deadline), sized by what it
        moves: the guest's memory and, when it is copied too, its disk."""
        mib = (self.src_vm.spec.mem_mib if memory else 0) \
            + (self.disk.mib if self.disk and disk else 0)
        return self.params.policy.deadline_for(mib)

    def _transfer_deadline(self) -> float:
        """The deadline of the phases MIGRATING and POSTCOPY (this driver: the disk's copy,
        when there is one, happens inside them too)."""
        return self._deadline()

    # -- the disk, when it moves too --------------------------------------------------------

    async def _make_destination_disk(self) -> None:
        """The destination's disk, made on its host (see :mod:`.storage`).

        :raise MigrationError: what prevents it (a file already there, no backing image).
        """
        try:
            self.disk = await storage.make_destination_disk(
                self.src_vm.host, self.dst_host, self.src_vm.spec.disk, self.params.storage,
                self.config.timeouts.disk_prepare_s, before_create=self.on_disk_copy)
        except ValueError as exc:
            raise self._error(f"storage {self.params.storage}: {exc}") from None
        self._dst_disk_made = True
        self.result.disk_size = self.disk.virtual_size

    async def _remove_destination_disk(self) -> list[str]:
        """The disk this migration made on the destination, removed (its QEMU is gone)."""
        if not self._dst_disk_made:
            return []
        note = await storage.remove_disk(self.dst_host, self.src_vm.spec.disk,
                                         self.config.timeouts.host_cleanup_s)
        self._dst_disk_made = "NOT REMOVED" in note
        return [f"destination {note}"]

    async def _rollback(self, why: str) -> str:
        """Keep the VM on the source, remove the destination; return what was done."""
        raise NotImplementedError

    async def _wait_for_slot(self) -> None:
        """Return once the migration holds its slot; queued (phase QUEUED) meanwhile, where a
        ``cancel()`` ends it without the transfer ever starting.

        :raise MigrationError: cancelled while queued, or the slots could not be taken.
        """
        if self.slot is None or self.slot.granted:
            return
        try:
            if await self.slot.try_once():
                return
            self._set_phase(Phase.QUEUED)
            self.result.queued_s = 0.0
            t0 = time.monotonic()
            wait = asyncio.ensure_future(self.slot.wait())
            try:
                while not wait.done():
                    if self._cancel_requested:
                        raise self._error(f"cancelled while queued for a migration slot: "
                                          f"{self._cancel_requested}")
                    await asyncio.wait([wait], timeout=self.config.timeouts.progress_interval_s)
                wait.result()
            finally:
                self.result.queued_s = round(time.monotonic() - t0, 3)
                if not wait.done():     # (the caller's own cancellation never swallowed)
                    await cancel_and_wait(wait)
        except MigratorError as exc:
            if isinstance(exc, MigrationError):
                raise
            raise self._error(f"migration slot: {exc}") from exc

    # -- the convergence policy -------------------------------------------------------------

    async def _start_policy(self) -> None:
        """The policy's tracker, its clocks started now ('migrate' is being issued), and the
        downtime ramp's first step set."""
        self._t_migrate = time.monotonic()
        self._policy = PolicyTracker(self.params.policy, self.src_vm.spec.mem_mib,
                                     self._t_migrate)
        if (first := self._policy.initial_downtime_ms()) is not None:
            await self._set_downtime(first)

    async def _apply_policy(self) -> None:
        """Carry out what the policy decides after the newest progress record; each decision
        is recorded (``result.decisions``) and logged before it is carried out.

        :raise MigrationError: the policy aborts (the caller rolls back), or carrying out a
            decision failed.
        """
        if self._policy is None or not self.records:
            return
        if (self._throttle_catching_up
                and self.records[-1].cpu_throttle >= self.params.policy.throttle_initial):
            self._throttle_catching_up = False      # QEMU took the first step: back to ours
            await self._set_throttle(self.params.throttle_caught_up())
        for d in self._policy.step(self.records[-1], postcopy=self.phase is Phase.POSTCOPY):
            self.result.decisions.append(d.to_json())
            log.warning("[vm=%s %s->%s] policy: %s (%s at %.1f s, pass %d, %d MiB left, "
                        "throttle %d%%)", self.src_vm.name, self.src_vm.host.name,
                        self.dst_host.name,
                        f"downtime {d.downtime_ms} ms" if d.action == "downtime" else d.action,
                        d.reason, d.t, d.iteration, d.remaining >> 20, d.cpu_throttle)
            self._pulse()
            if d.action == "abort":
                raise self._error(f"convergence policy: {d.reason}: "
                                  + ("given up" if self.phase is Phase.POSTCOPY else "aborted"))
            await self._carry_out(d)

    async def _carry_out(self, d: Decision) -> None:
        """Do what decision ``d`` says (never ``abort``: that is an error of the caller)."""
        if d.action == "downtime":
            await self._set_downtime(d.downtime_ms)
        elif d.action == "auto-converge":
            step = self.params.throttle_on(d.cpu_throttle)
            await self._set_throttle(step)
            self._throttle_catching_up = \
                step["cpu-throttle-increment"] != self.params.policy.throttle_increment
        elif d.action == "postcopy":
            if self.phase is Phase.MIGRATING:
                await self._start_postcopy()
        elif d.action == "pause":
            await self._pause_guest()
        else:
            raise AssertionError(f"no such policy action {d.action!r}")

    async def _set_downtime(self, ms: int) -> None:
        raise NotImplementedError

    async def _set_throttle(self, parameters: dict[str, int]) -> None:
        """Set auto-converge's throttle parameters on the source (enabled at start, held at
        1 % until the policy releases it: :meth:`MigrationParams.throttle_on`)."""
        raise NotImplementedError

    async def _start_postcopy(self) -> None:
        """Ask for the switch to postcopy (phase POSTCOPY); a precopy that converged a moment
        before is no error."""
        raise NotImplementedError

    async def _pause_guest(self) -> None:
        """Stop the guest's vCPUs on the source (the migration goes on; the destination is
        resumed after completion, the source by a rollback)."""
        raise NotImplementedError

    def _add_record(self, record: ProgressRecord) -> None:
        self.records.append(record)
        self.result.max_cpu_throttle = max(self.result.max_cpu_throttle, record.cpu_throttle)
        self._pulse()

    async def _fail(self, message: str, cause: BaseException) -> MigrationError:
        failed_in = self.phase
        outcome = await shielded(self._guarded_rollback(message))
        err = MigrationError(self.src_vm.host.name, self.dst_host.name, self.src_vm.name,
                             failed_in.value, message, outcome)
        self.result.error = str(err)
        log.error("%s", err)
        return err

    async def _guarded_rollback(self, why: str) -> str:
        """:meth:`_rollback`, and whatever it raises ends the run UNRESOLVED (a final phase
        that says so) instead of leaving it in a phase that is not final."""
        try:
            return await self._rollback(why)
        except Exception as exc:  # noqa: BLE001 - reported in the outcome and the phase
            outcome = (f"the rollback itself failed ({type(exc).__name__}: {exc}); where the "
                       f"VM runs was not established: nothing more was destroyed")
            log.error("[vm=%s] %s", self.src_vm.name, outcome)
            if not self.phase.is_final:
                self._set_phase(Phase.UNRESOLVED)
            self.result.status = "failed"
            return outcome

    async def _gone(self, vm) -> bool:
        """Whether ``vm``'s QEMU is known to be gone (False when it runs or nobody can say:
        an unreachable host proves nothing)."""
        try:
            async with asyncio.timeout(self.config.timeouts.migration_cancel_s):
                return not await vm.is_alive()
        except Exception as exc:  # noqa: BLE001 - unknown is not gone
            log.info("[vm=%s] is %s's copy alive? unknown: %s", vm.name, vm.host.name, exc)
            return False

    async def _lost(self, why: str) -> str:
        """The VM runs nowhere: remove what is left of it on both hosts (phase LOST); the
        source's disk is kept (the VM's data), a disk copy made on the destination is not."""
        notes = []
        for vm in (self.src_vm, self.dst_vm):
            try:
                await vm.stop()
                notes.append(f"what was left on {vm.host.name} removed")
                if vm is self.dst_vm:       # its QEMU gone: the disk copy it used too
                    notes += await self._remove_destination_disk()
            except Exception as exc:  # noqa: BLE001 - reported
                notes.append(f"LEFTOVER NOT REMOVED on {vm.host.name} ({exc})")
        self._set_phase(Phase.LOST)
        self.result.status = "failed"
        outcome = f"VM LOST: {why}; " + ", ".join(notes)
        log.error("[vm=%s] %s", self.src_vm.name, outcome)
        return outcome

    async def _source_lost(self) -> str | None:
        """Before completion only the source holds the VM (the destination never ran it):
        when its QEMU is gone, the VM is lost (phase LOST; the destination removed)."""
        if await self._gone(self.src_vm):
            return await self._lost(f"its source QEMU on {self.src_vm.host.name} is gone "
                                    f"before the migration completed, and the destination on "
                                    f"{self.dst_host.name} never ran it")
        return None

    async def _split_outcome(self) -> str | None:
        """After a postcopy switchover the source cannot take the VM back: the outcome to
        report (phase SPLIT; LOST when either side's QEMU is gone, since each held pages the
        other lacks), or None when that is not the case."""
        if self.phase is Phase.POSTCOPY and await self._finish_postcopy():
            return None         # it completed: the caller settles it as landed
        if self.phase is Phase.POSTCOPY and await self._postcopy_never_began():
            self.src_vm.console_switchback()
            return None         # the source holds the whole VM: the caller rolls back
        if self.phase is Phase.POSTCOPY:
            for vm, role in ((self.src_vm, "source"), (self.dst_vm, "destination")):
                if await self._gone(vm):
                    return await self._lost(
                        f"its {role} QEMU on {vm.host.name} is gone after the postcopy "
                        "switchover: the guest's memory was split between the hosts")
            self._set_phase(Phase.SPLIT)
            self.result.status = "failed"
            tried = self.result.postcopy_recoveries
            return ("failed after the postcopy switchover: the guest's memory is split between "
                    f"{self.src_vm.host.name} and {self.dst_host.name}; the destination was "
                    f"kept (it holds the newest pages); postcopy recovery attempted {tried} "
                    "time(s): once the link is back, migrate-recover on the destination and "
                    "'migrate' with resume on the source can still finish it")
        return None

    def _stop_asked(self) -> bool:
        """The migration is being stopped on purpose (``cancel()``, or the caller's task
        cancelled), not because something broke."""
        return self._cancel_requested is not None or self._interrupted

    async def _postcopy_never_began(self) -> bool:
        """Phase POSTCOPY (the switch asked for), but the hypervisor never left precopy: its
        migration is stopped here, and True when that is certain, so that the source, which
        holds the whole VM, takes it back. False when it switched, or nobody can say.
        Never raises."""
        return False

    async def _finish_postcopy(self) -> bool:
        """A failure or stop after the postcopy switchover, which cannot be undone: finish the
        postcopy when the driver can, so that the VM lands whole on the destination.

        :return: True when the migration completed and the destination runs the VM (phase
            VERIFIED); False when it cannot be finished (the caller reports SPLIT or LOST).
            Never raises.
        """
        return False

    async def _settle_after_completion(self, why: str) -> str | None:
        """A failure after COMPLETED or VERIFIED: ask both sides where the VM runs.

        * the destination runs it: phase LANDED; the source's leftover is removed;
        * it does not, and the source can still take it back (precopy, COMPLETED): None,
          the caller rolls back as before completion;
        * anything else, or no answer: phase UNRESOLVED, nothing destroyed.

        :return: the outcome, or None when the caller should roll back.
        """
        split = await self._split_outcome()
        if split is not None:
            return split
        if self.phase not in (Phase.COMPLETED, Phase.VERIFIED):
            return None
        try:
            src_state, dst_state = await self._states()
        except Exception as exc:  # noqa: BLE001 - unknown: keep everything
            src_state = dst_state = f"unknown ({type(exc).__name__}: {exc})"
        self.result.status = "failed"
        where = f"source {src_state!r} on {self.src_vm.host.name}, destination " \
                f"{dst_state!r} on {self.dst_host.name}"
        if dst_state == "running":
            notes = await self._clean_source()
            await self._follow_to_destination()
            self._set_phase(Phase.LANDED)
            return (f"the migration completed but {why}: the VM runs on {self.dst_host.name} "
                    f"and the VM object now refers to it; {notes}; nothing was rolled back")
        if self._switched_to_postcopy():
            # complete on the destination, stale on the source: never the source again
            if await self._gone(self.dst_vm):
                return await self._lost(
                    f"the migration completed after the postcopy switchover but {why}, and "
                    f"its destination QEMU on {self.dst_host.name} is gone (the source's "
                    "memory is stale)")
        elif self.phase is Phase.COMPLETED and self._source_can_resume(src_state):
            return None
        self._set_phase(Phase.UNRESOLVED)
        return (f"the migration completed but {why}, and the VM runs on neither side as far "
                f"as could be seen ({where}): both sides were kept as they are")

    def _switched_to_postcopy(self) -> bool:
        """Whether the switch to postcopy was asked for (phase POSTCOPY, ever): from then on
        the destination may have run the guest, and the source's memory is stale."""
        return any(phase is Phase.POSTCOPY for phase, *_ in self.history)

    async def _states(self) -> tuple[str, str]:
        """(source state, destination state) as each side's hypervisor reports them."""
        raise NotImplementedError

    def _source_can_resume(self, src_state: str) -> bool:
        raise NotImplementedError

    async def _clean_source(self) -> str:
        """The VM landed: remove what is left of it on the source and say what was done
        (never raises)."""
        raise NotImplementedError

    async def _follow_to_destination(self) -> None:
        """The caller's VM object (and its open session) now refer to the VM on the
        destination; this migration's destination object is that same object. A disk that
        was copied is the destination's now: the source's copy is removed once its QEMU is
        known gone (it is stale, and would only look like a place the VM could restart)."""
        if self.copies_disk and self._dst_disk_made:
            self._dst_disk_made = False         # the VM's own disk now: never rolled back
            if await self._gone(self.src_vm):
                note = await storage.remove_disk(self.src_vm.host, self.src_vm.spec.disk,
                                                 self.config.timeouts.host_cleanup_s)
                self.result.source_disk_removed = "NOT REMOVED" not in note
                log.info("[vm=%s] source %s", self.src_vm.name, note)
            else:
                self.result.source_disk_removed = False
                log.warning("[vm=%s] the source's disk copy on %s was kept: its QEMU may "
                            "still run", self.src_vm.name, self.src_vm.host.name)
        await self.src_vm.adopt(self.dst_vm)
        self.dst_vm = self.src_vm


class Migration(BaseMigration):
    """A migration driven through QMP on both QEMUs (the ``qemu`` driver)."""

    driver = "qemu"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._mirror: storage.NbdMirror | None = None
        self._nbd_port: int | None = None
        self._switched_over = False     # pre-switchover seen and continued
        self._cancelled_in_qemu = False  # the migration cancelled before the rollback began
        self._tids: dict[int, tuple | None] = {}  # each QEMU's vCPU thread ids (.cpu)

    async def _run_phases(self) -> None:
        timeouts = self.config.timeouts
        async with asyncio.timeout(timeouts.migration_setup_s):
            self._set_phase(Phase.PREPARING_DEST)
            src = await self.src_vm.qmp()
            await self._match_destination(src)
            if self.copies_disk:
                await self._make_destination_disk()
            # the CPU figures' start (.cpu), each side's read alongside the preparation's
            # next step: off the transfer's path; again at the slot if it was waited for
            _, src_cpu = await cpu.alongside(self.dst_vm.start(incoming=True),
                                             self._cpu_now(self.src_vm, src))
            dst = await self.dst_vm.qmp()
            port, dst_cpu = await cpu.alongside(self._configure_and_listen(src, dst),
                                                self._cpu_now(self.dst_vm, dst))
        cpu_start = (src_cpu, dst_cpu)
        await self._wait_for_slot()             # prepared: the transfer starts at the slot
        if self.result.queued_s is not None:
            cpu_start = await self._read_cpu(src, dst)
        if self._mirror is not None:
            await self._mirror_disk()
        await self._migrate(src, dst, port)
        await self._verify(src, dst)
        cpu_end = await self._read_cpu(src, dst)
        cpu.record(self.result, cpu.spent(cpu_start[0], cpu_end[0]),
                   cpu.spent(cpu_start[1], cpu_end[1]), "migration")
        await self.src_vm.stop()
        await self._follow_to_destination()
        self._set_phase(Phase.CLEANED)

    def _transfer_deadline(self) -> float:
        return self._deadline(disk=False)       # the disk was copied before (MIRRORING)

    async def _configure_and_listen(self, src, dst) -> int:
        """The destination started: its version, both sides' migration settings, the disk's
        export, the listening port (returned), the console connected ahead."""
        self.result.qemu["dst"]["version"] = await qmp_version(dst)
        await self._configure(src, dst)
        self._set_phase(Phase.CONFIGURED)
        if self.copies_disk:
            await self._export_disk(src, dst)
        port = await self._listen(dst)
        self._set_phase(Phase.LISTENING)
        await self.src_vm.connect_console_ahead(self.dst_vm)
        return port

    async def _cpu_now(self, vm, qmp):
        """``vm``'s QEMU CPU now (:mod:`.cpu`); its vCPU threads asked over ``qmp`` once.
        None: not read. Never raises."""
        if id(vm) not in self._tids:
            self._tids[id(vm)] = await cpu.vcpu_threads(qmp)
        tids = self._tids[id(vm)]
        return None if tids is None else await cpu.read_side(vm, tids)

    async def _read_cpu(self, src, dst) -> tuple:
        """Both QEMUs' CPU now (``src``, ``dst``: their QMP connections)."""
        return tuple(await asyncio.gather(self._cpu_now(self.src_vm, src),
                                          self._cpu_now(self.dst_vm, dst)))

    def disk_progress(self) -> tuple[int, int] | None:
        if self.phase is Phase.MIRRORING and self._mirror is not None:
            return self._mirror.offset, self._mirror.length
        return None

    async def _export_disk(self, src, dst) -> None:
        """The destination's NBD export of its (new) disk: see :mod:`.storage`."""
        self._mirror = storage.NbdMirror(src, dst, self.params.storage, self.dst_address)
        try:
            self._nbd_port = await self._mirror.export(
                self.dst_host, self.dst_vm.pid, tls=TLS_CREDS_ID if self.params.tls else None,
                timeout=self.config.timeouts.host_cleanup_s)
        except (QMPError, RuntimeError) as exc:
            raise self._error(f"the destination's disk export (NBD): {exc}") from exc

    async def _mirror_disk(self) -> None:
        """MIRRORING: the source's disk mirrored to the destination's export until both are
        in sync (the guest runs and writes meanwhile; the mirror goes on copying its writes
        until the switchover). Bounded by the migration's deadline and its stall limit."""
        policy, timeouts = self.params.policy, self.config.timeouts
        mirror = self._mirror
        self._set_phase(Phase.MIRRORING)
        t0 = time.monotonic()
        speed = int(self.params.bandwidth_mibs * MIB) if self.params.bandwidth_mibs else 0

        def check() -> None:
            if self._cancel_requested:
                raise self._error(f"cancelled: {self._cancel_requested}")
        try:
            await mirror.start(self._nbd_port, speed=speed,
                               tls=TLS_CREDS_ID if self.params.tls else None,
                               tls_hostname=self.params.tls_hostname)
            async with asyncio.timeout(self._deadline(memory=False)):
                await mirror.wait_ready(policy.stall_s, timeouts.progress_interval_s, check)
        except (QMPError, RuntimeError) as exc:
            raise self._error(f"disk copy: {exc}") from exc
        self.result.mirror_s = round(mirror.ready_at - t0, 3)
        log.info("[vm=%s %s->%s] disk in sync after %.1f s (%d bytes)", self.src_vm.name,
                 self.src_vm.host.name, self.dst_host.name, self.result.mirror_s,
                 mirror.offset)

    async def _switch_disk_over(self, src) -> None:
        """pre-switchover (the guest is stopped): the mirror's last writes copied and the job
        ended (point-in-time copy, no pivot), then the migration goes on."""
        t0 = time.monotonic()
        if self._mirror is not None and not self._mirror.completed:
            try:
                await self._mirror.complete(self.config.timeouts.migration_setup_s)
            except (QMPError, RuntimeError) as exc:
                raise self._error(f"disk copy at the switchover: {exc}") from exc
            self.result.disk_bytes = self._mirror.offset
        await src.execute("migrate-continue", {"state": "pre-switchover"})
        self.result.disk_switchover_ms = round((time.monotonic() - t0) * 1000, 1)

    async def _match_destination(self, src) -> None:
        """The destination QEMU is started as the source's very machine type (an alias like
        ``pc`` is the newest type of whichever QEMU starts it); when it is another QEMU (its
        binary or its version: hosts at different package versions share a path), it must
        have that type: checked before anything is started (each host's QEMU asked once).

        :raise MigrationError: the destination's QEMU has no such machine type (both QEMU
            versions and the type named), or it cannot be asked.
        """
        try:
            qom = await src.execute("qom-get", {"path": "/machine", "property": "type"})
            version = await qmp_version(src)
        except QMPError as exc:
            raise self._error(f"the source's machine type: {exc}") from exc
        machine = str(qom).removesuffix("-machine")
        src_bin = qemu_binary(self.src_vm.spec, self.src_vm.host)
        dst_bin = qemu_binary(self.src_vm.spec, self.dst_host)
        self.result.machine = machine
        self.result.qemu = {
            "src": {"host": self.src_vm.host.name, "binary": src_bin, "version": version},
            "dst": {"host": self.dst_host.name, "binary": dst_bin, "version": None}}
        self.dst_vm.spec = dataclasses.replace(self.dst_vm.spec, machine=machine)
        if self.dst_host is self.src_vm.host and dst_bin == src_bin:
            return                      # the very same QEMU: it has the type the source runs
        try:
            dst_version, types = await machine_types(self.dst_host, dst_bin,
                                                     self.config.timeouts.qmp_probe_s)
        except HostError as exc:
            raise self._error(str(exc)) from exc
        self.result.qemu["dst"]["version"] = dst_version
        if machine not in types:
            raise self._error(
                f"{self.dst_host.name}'s QEMU {dst_version} has no machine type {machine}, "
                f"which {self.src_vm.name} runs as on {self.src_vm.host.name}'s QEMU "
                f"{version}: pin vms.{self.src_vm.name}.machine to a type both have",
                f"{self.src_vm.name} runs on {self.src_vm.host.name}, nothing started on "
                f"{self.dst_host.name}")

    async def _configure(self, src, dst) -> None:
        # the disk copy's last writes are sent with the guest stopped, before its devices
        caps = [{"capability": k, "state": v} for k, v in (
            self.params.capabilities() | {"pause-before-switchover": self.copies_disk}).items()]
        for side in (src, dst):
            await side.execute("migrate-set-capabilities", {"capabilities": caps})
        await src.execute("migrate-set-parameters", self.params.source_parameters())
        if self.params.destination_parameters():
            await dst.execute("migrate-set-parameters", self.params.destination_parameters())
        if self.params.tls:
            await self._configure_tls(src, dst)
        log.info("[vm=%s] capabilities %s, source parameters %s", self.src_vm.name,
                 self.params.capabilities(), self.params.source_parameters())

    async def _configure_tls(self, src, dst) -> None:
        """x509 credentials on both ends (the destination the server, the source the client,
        each verifying its peer) and ``tls-creds`` / ``tls-hostname``. The source QEMU may
        hold the object from an earlier migration (a rollback, or it came in as a
        destination): it is replaced.

        :raise MigrationError: a host without ``tls_dir``, or QEMU refused the credentials
            (a missing or unreadable file: QEMU's message names it).
        """
        for side, host, endpoint in ((src, self.src_vm.host, "client"),
                                     (dst, self.dst_host, "server")):
            if not getattr(host, "tls_dir", None):
                raise self._error(f"migration.tls: {host.name} has no tls_dir in the "
                                  "inventory (its x509 credentials)")
            with contextlib.suppress(QMPError):
                await side.execute("object-del", {"id": TLS_CREDS_ID})
            try:
                await side.execute("object-add", {
                    "qom-type": "tls-creds-x509", "id": TLS_CREDS_ID, "dir": host.tls_dir,
                    "endpoint": endpoint, "verify-peer": True})
            except QMPError as exc:
                raise self._error(f"TLS credentials of {host.name} ({host.tls_dir}) refused "
                                  f"by QEMU: {exc}") from exc
        await src.execute("migrate-set-parameters", {
            "tls-creds": TLS_CREDS_ID,
            "tls-hostname": self.params.tls_hostname or self.dst_address})
        await dst.execute("migrate-set-parameters", {"tls-creds": TLS_CREDS_ID})

    async def _listen(self, dst) -> int:
        """The destination binds port 0 itself and reports the port: no probe-then-bind race."""
        await dst.execute("migrate-incoming", {"uri": f"tcp:{self.dst_address}:0"})
        info = await dst.execute("query-migrate")
        addresses = info.get("socket-address") or []
        if not addresses:
            raise self._error(f"destination did not report its listening port: {info}")
        port = int(addresses[0]["port"])
        self.result.port = port
        return port

    async def _migrate(self, src, dst, port: int) -> None:
        src.events.clear()
        dst.events.clear()
        # the destination's migration state, as it announces it: postcopy recovery cannot
        # ask for it (see _recover_postcopy); the source's wakes the loop at each change
        # (completed, pre-switchover: a guest stopped for the disk's switchover waits on
        # nothing but this loop)
        with dst.listener("MIGRATION") as dst_migration, \
                src.listener("MIGRATION") as src_migration:
            waker = asyncio.ensure_future(self._wake_on(src_migration))
            try:
                await self._migrate_loop(src, dst, port, dst_migration)
            finally:
                waker.cancel()
                await asyncio.wait([waker])

    async def _wake_on(self, events) -> None:
        """Wake the progress loop at every event of ``events`` (until cancelled)."""
        async for _event in events:
            self._pulse()

    async def _migrate_loop(self, src, dst, port: int, dst_migration) -> None:
        timeouts, policy = self.config.timeouts, self.params.policy
        self._src_qmp = src
        await self._start_policy()
        await src.execute("migrate", {"uri": f"tcp:{self.dst_address}:{port}"})
        self._set_phase(Phase.MIGRATING)
        info: dict = {}
        moved, moved_at = -1, time.monotonic()
        async with asyncio.timeout(self._transfer_deadline()):
            while True:
                if self._cancel_requested:
                    raise self._error(f"cancelled: {self._cancel_requested}")
                info = await src.execute("query-migrate")
                status = info.get("status", "?")
                self._record(info)
                if status == "completed":
                    if self._mirror is not None and not self._mirror.completed:
                        raise self._error("QEMU completed the migration without pausing for "
                                          "the disk's switchover (pause-before-switchover)")
                    break
                if status == "pre-switchover" and not self._switched_over:
                    self._switched_over = True          # migrate-continue is sent once
                    await self._switch_disk_over(src)
                    continue
                now = time.monotonic()
                stalled = False
                if self.records[-1].transferred != moved:
                    moved, moved_at = self.records[-1].transferred, now
                elif now - moved_at >= policy.stall_s:
                    stalled = True
                if (stalled or status == "postcopy-paused") and self.phase is Phase.POSTCOPY \
                        and self.result.postcopy_recoveries < self.params.postcopy_recoveries:
                    # the source can no longer take the VM back: recover the link instead
                    await self._recover_postcopy(src, dst, dst_migration, "no bytes moved for "
                                                 f"{policy.stall_s:g} s"
                                                 if stalled else "QEMU paused postcopy")
                    moved_at = time.monotonic()
                    continue
                if stalled:
                    raise self._error(f"stalled: no bytes moved for "
                                      f"{policy.stall_s:g} s at {moved} bytes "
                                      "(link blocked or destination hung?)")
                if status in ("failed", "cancelled"):
                    raise self._error(f"QEMU reports {status}: "
                                      f"{info.get('error-desc', 'no reason given')}")
                if (self.params.postcopy_after_s is not None and self.phase is Phase.MIGRATING
                        and time.monotonic() - self._t_migrate >= self.params.postcopy_after_s):
                    await self._start_postcopy()
                await self._apply_policy()
                try:
                    await wait_for(self._changed.wait(), timeouts.progress_interval_s)
                except TimeoutError:
                    pass
        self.result.wall_s = time.monotonic() - self._t_migrate
        # QEMU 7.2 flipped to 'completed' before filling in the figures: re-read until set
        for _ in range(40):
            if info.get("total-time"):
                break
            await asyncio.sleep(timeouts.progress_interval_s)
            info = await src.execute("query-migrate")
        self._set_phase(Phase.COMPLETED)
        self._final_figures(info)
        if self._mirror is not None:    # no client since the switchover: not the VM's fate
            try:
                await self._mirror.stop_export()
            except QMPError as exc:
                log.warning("[vm=%s] the destination's NBD export was not stopped: %s "
                            "(it ends with its QEMU)", self.src_vm.name, exc)

    async def _set_downtime(self, ms: int) -> None:
        await self._src_qmp.execute("migrate-set-parameters", {"downtime-limit": ms})

    async def _set_throttle(self, parameters: dict[str, int]) -> None:
        await self._src_qmp.execute("migrate-set-parameters", parameters)

    async def _start_postcopy(self) -> None:
        src = self._src_qmp
        try:
            await src.execute("migrate-start-postcopy")
            self._set_phase(Phase.POSTCOPY)
        except QMPError:
            # precopy may have converged a moment before the switch: then QEMU refuses it
            # and the migration completes as precopy
            if (await src.execute("query-migrate"))["status"] not in (
                    "completed", "device", "pre-switchover"):
                raise

    async def _pause_guest(self) -> None:
        await self._src_qmp.execute("stop")

    async def _recover_postcopy(self, src, dst, dst_migration, why: str) -> None:
        """QEMU's postcopy recovery: both sides paused (``migrate-pause``), the destination
        listening again on a port it picks (``migrate-recover``), the source resuming there
        (``migrate`` with ``resume``). The old connection is abandoned, so a link that broke
        for that connection only (a dropped port, a dead NAT entry) is healed.

        The destination is driven out of band only (``exec-oob``; QEMU allows both commands
        there): while its pages cannot arrive, its main thread may be blocked behind a vCPU
        that faulted on a missing page holding the big QEMU lock (TCG delivers an interrupt
        that way: the IDT and the guest's stack are read under the lock), and then no in-band
        command, ``query-migrate`` included, is answered until the link is back. Its state
        comes from its MIGRATION events (``dst_migration``, listened to since the migration
        started), its new port from its listening sockets on the host.

        :raise MigrationError: the recovery itself failed (the caller reports SPLIT).
        """
        timeouts = self.config.timeouts
        log.warning("[vm=%s %s->%s] postcopy stuck (%s): recovering", self.src_vm.name,
                    self.src_vm.host.name, self.dst_host.name, why)
        self.result.postcopy_recoveries += 1
        seen = {"source": "?", "destination": "?"}
        for event in dst_migration.clear():
            seen["destination"] = event["data"]["status"]
        step = "pausing"

        async def source_status() -> str:
            seen["source"] = (await src.execute("query-migrate"))["status"]
            return seen["source"]

        async def destination_status() -> str:
            seen["destination"] = (await dst_migration.get())["data"]["status"]
            return seen["destination"]
        try:
            async with asyncio.timeout(timeouts.migration_setup_s):
                if await source_status() != "postcopy-paused":
                    await src.execute("migrate-pause", oob=True)
                if seen["destination"] != "postcopy-paused":
                    try:
                        await dst.execute("migrate-pause", oob=True)
                    except ExecuteError as exc:      # it paused itself meanwhile
                        log.info("[vm=%s] destination migrate-pause: %s", self.src_vm.name,
                                 exc)
                step = "waiting for both sides to be postcopy-paused"
                while (now := await source_status()) != "postcopy-paused":
                    if now in ("completed", "failed", "cancelled"):
                        if now == "completed":       # the pause came too late: done
                            return
                        raise self._error(f"postcopy recovery: the source went {now!r} "
                                          "instead of pausing")
                    await asyncio.sleep(timeouts.progress_interval_s)
                while seen["destination"] != "postcopy-paused":
                    if await destination_status() in ("completed", "failed", "cancelled"):
                        raise self._error(f"postcopy recovery: the destination went "
                                          f"{seen['destination']!r} instead of pausing")
                step = "recovering"
                await dst.execute("migrate-recover", {"uri": f"tcp:{self.dst_address}:0"},
                                  oob=True)
                new = await self._listening_ports(self.dst_vm)
                new = [p for p in new if p != self.result.port]
                if not new:
                    raise self._error("postcopy recovery: the destination listens on no new "
                                      "port")
                await src.execute("migrate", {"uri": f"tcp:{self.dst_address}:{new[0]}",
                                              "resume": True})
        except TimeoutError:
            raise self._error(f"postcopy recovery stuck {step} for "
                              f"{timeouts.migration_setup_s:g} s (source {seen['source']}, "
                              f"destination {seen['destination']})") from None
        log.warning("[vm=%s] postcopy resumed on port %d", self.src_vm.name, new[0])
        self.result.port = new[0]

    async def _listening_ports(self, vm) -> list[int]:
        """The TCP ports ``vm``'s QEMU listens on at the migration address.

        :raise MigrationError: the host could not be asked.
        """
        try:
            return await storage.listening_ports(vm.host, self.dst_address, vm.pid,
                                                 self.config.timeouts.host_cleanup_s)
        except RuntimeError as exc:
            raise self._error(f"postcopy recovery: {exc}") from None

    def _record(self, info: dict) -> None:
        ram = info.get("ram", {})
        record = ProgressRecord(
            t=time.monotonic() - self._t_migrate, status=info.get("status", "?"),
            transferred=ram.get("transferred", 0), remaining=ram.get("remaining", 0),
            total=ram.get("total", 0), dirty_pages_rate=ram.get("dirty-pages-rate", 0),
            mbps=ram.get("mbps", 0.0), iteration=ram.get("dirty-sync-count", 0),
            expected_downtime_ms=info.get("expected-downtime", 0),
            cpu_throttle=info.get("cpu-throttle-percentage", 0))
        self._add_record(record)

    def _final_figures(self, info: dict) -> None:
        ram = info.get("ram", {})
        r = self.result
        r.status = "completed"
        r.total_time_ms = info.get("total-time")
        r.downtime_ms = info.get("downtime")
        r.setup_time_ms = info.get("setup-time")
        r.transferred_bytes = ram.get("transferred")
        r.throughput_mbps = ram.get("mbps")
        r.iterations = ram.get("dirty-sync-count")
        r.postcopy_requests = ram.get("postcopy-requests")
        if self.params.xbzrle_cache_mib is not None and "xbzrle-cache" in info:
            r.xbzrle = {k.replace("-", "_"): v for k, v in info["xbzrle-cache"].items()}

    async def _verify(self, src, dst) -> None:
        """Destination running (waited for), source postmigrate; downtime from the events.
        A guest the policy paused arrives paused (QEMU carries the run state over): it is
        resumed on the destination, and its downtime runs from the pause."""
        if self._policy is not None and self._policy.paused:
            await self._wait_run_state(dst, "destination", "paused",
                                       ("inmigrate", "postmigrate", "finish-migrate"))
            await dst.execute("cont")
        await self._wait_run_state(dst, "destination", "running",
                                   ("inmigrate", "paused", "postmigrate", "finish-migrate"))
        # QEMU reports 'completed' a moment before the source leaves 'finish-migrate' (the
        # migration thread's cleanup sets 'postmigrate'), multifd especially: wait for it
        await self._wait_run_state(src, "source", "postmigrate", ("finish-migrate",))

        def ts(ev):
            return ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
        src_events = src.events.clear()
        stops = [ts(e) for e in src_events if e["event"] == "STOP"]
        if self.params.may_postcopy:
            self.result.postcopy_switched = any(
                e["event"] == "MIGRATION" and e["data"].get("status") == "postcopy-active"
                for e in src_events)
        resumes = [ts(e) for e in dst.events.clear() if e["event"] == "RESUME"]
        if stops and resumes:
            self.result.downtime_events_ms = round((resumes[0] - stops[-1]) * 1000, 1)
        self._set_phase(Phase.VERIFIED)

    async def _wait_run_state(self, qmp, side: str, target: str,
                              passing: tuple[str, ...]) -> None:
        """Wait (at most ``migration_setup_s``) until ``side``'s run state is ``target``,
        through the states in ``passing``.

        :raise MigrationError: another state was reached, or the wait timed out.
        """
        timeouts = self.config.timeouts
        status = "?"
        try:
            async with asyncio.timeout(timeouts.migration_setup_s):
                while (status := (await qmp.execute("query-status"))["status"]) != target:
                    if status not in passing:
                        raise self._error(f"{side} is {status!r} after completion, "
                                          f"not {target!r}")
                    await asyncio.sleep(timeouts.progress_interval_s)
        except TimeoutError:
            raise self._error(f"{side} still {status!r} {timeouts.migration_setup_s:g} s "
                              f"after completion, not {target!r}") from None

    # -- failure ------------------------------------------------------------------------------------

    async def _states(self) -> tuple[str, str]:
        """As the base class says; a destination still 'inmigrate' while the source says the
        migration completed is loading the last of the state and about to run the guest by
        itself: waited for (``migration_cancel_s`` for all), so that a source is never
        resumed beside it."""
        timeouts = self.config.timeouts
        async with asyncio.timeout(timeouts.migration_cancel_s):
            states = []
            for vm in (self.src_vm, self.dst_vm):
                states.append(await vm.status() if await vm.is_alive() else "absent")
            while states[1] == "inmigrate" and states[0] == "postmigrate" \
                    and (await (await self.src_vm.qmp()).execute("query-migrate")).get(
                        "status") == "completed":
                await asyncio.sleep(timeouts.progress_interval_s)
                states[1] = await self.dst_vm.status()
            return states[0], states[1]

    def _source_can_resume(self, src_state: str) -> bool:
        return src_state in ("postmigrate", "finish-migrate", "paused", "running")

    async def _postcopy_never_began(self) -> bool:
        """QEMU takes ``migrate-start-postcopy`` as a request its migration thread acts on at
        its next pass: one stuck in a write to a dead link never switches, and its status
        stays ``active``. Such a migration is cancelled here (then True: the destination
        never ran the guest); ``device`` and later are the switch under way or done."""
        timeouts = self.config.timeouts
        try:
            async with asyncio.timeout(timeouts.migration_cancel_s):
                src = await self.src_vm.qmp()
                if (await src.execute("query-migrate")).get("status") not in ("setup",
                                                                               "active"):
                    return False
                status = await self._cancel_precopy(src)
        except (Exception, TimeoutError) as exc:  # noqa: BLE001 - unknown: not rolled back
            log.info("[vm=%s] did the postcopy begin? unknown (%s)", self.src_vm.name, exc)
            return False
        if status in ("cancelled", "failed"):
            log.warning("[vm=%s] the switch to postcopy was asked for but never made (QEMU "
                        "stayed in precopy): migration %s, the source takes the VM back",
                        self.src_vm.name, status)
            return True
        return False

    async def _finish_postcopy(self) -> bool:
        """Stopped on purpose after the switchover: let a healthy postcopy complete (it moves
        on without the controller; bounded by the migration's timeout, and given up when no
        byte moves for the policy's ``stall_s`` or QEMU leaves postcopy-active), then
        verify."""
        if not self._stop_asked():
            return False        # broken (recovery was tried meanwhile): SPLIT or LOST
        timeouts, policy = self.config.timeouts, self.params.policy
        log.warning("[vm=%s %s->%s] stopped after the postcopy switchover, which cannot be "
                    "undone: finishing the postcopy", self.src_vm.name, self.src_vm.host.name,
                    self.dst_host.name)
        try:
            async with asyncio.timeout(policy.completion_for(self.src_vm.spec.mem_mib)):
                src = await self.src_vm.qmp()
                moved, moved_at = -1, time.monotonic()
                while (info := await src.execute("query-migrate"))["status"] != "completed":
                    # "setup" or "active": the switch is asked for (with postcopy_after_s=0
                    # already while QEMU sets up) and QEMU makes it at its next pass
                    if info["status"] not in ("setup", "active", "postcopy-active", "device",
                                              "wait-unplug"):
                        log.warning("[vm=%s] postcopy not finished: QEMU went %r",
                                    self.src_vm.name, info["status"])
                        return False
                    self._record(info)
                    if self.records[-1].transferred != moved:
                        moved, moved_at = self.records[-1].transferred, time.monotonic()
                    elif time.monotonic() - moved_at >= policy.stall_s:
                        log.warning("[vm=%s] postcopy not finished: no bytes moved for %g s",
                                    self.src_vm.name, policy.stall_s)
                        return False
                    await asyncio.sleep(timeouts.progress_interval_s)
                self.result.wall_s = time.monotonic() - self._t_migrate
                self._set_phase(Phase.COMPLETED)
                self._final_figures(info)
                await self._verify(src, await self.dst_vm.qmp())
                return True
        except (Exception, TimeoutError) as exc:  # noqa: BLE001 - not finished: said so
            log.warning("[vm=%s] postcopy not finished: %s: %s", self.src_vm.name,
                        type(exc).__name__, exc)
            return False

    async def _clean_source(self) -> str:
        try:
            await self.src_vm.stop()
            return f"the source QEMU on {self.src_vm.host.name} was stopped"
        except Exception as exc:  # noqa: BLE001 - reported
            return f"SOURCE QEMU NOT STOPPED on {self.src_vm.host.name} ({exc})"

    async def _cancel_precopy(self, src) -> str:
        """``migrate_cancel``, then QEMU's migration status once it has left precopy:
        ``cancelled`` or ``failed``, or ``completed`` / ``postcopy-*`` when QEMU got there
        first. Unbounded: the caller bounds it."""
        await src.execute("migrate_cancel")
        while (status := str((await src.execute("query-migrate")).get("status"))) in ACTIVE \
                and not status.startswith("postcopy"):
            await asyncio.sleep(self.config.timeouts.progress_interval_s)
        return status

    async def _stopped_where(self, why: str) -> str:
        """Before a rollback from MIGRATING, where QEMU's migration really is: one still
        running is cancelled here, and one QEMU completed or switched to postcopy meanwhile
        (the stop came as it did) moves the phase on (COMPLETED, POSTCOPY), so that the
        rollback settles it as such rather than resuming a source whose guest the
        destination already runs. Returns ``why``, saying so when that happened. Never
        raises: a source that does not answer is left to the rollback, which says so."""
        timeouts = self.config.timeouts
        try:
            async with asyncio.timeout(timeouts.migration_cancel_s):
                src = await self.src_vm.qmp()
                status = (await src.execute("query-migrate")).get("status")
                if status in ACTIVE and not str(status).startswith("postcopy"):
                    status = await self._cancel_precopy(src)
                    self._cancelled_in_qemu = status == "cancelled"
        except (Exception, TimeoutError) as exc:  # noqa: BLE001 - the rollback tries again
            log.info("[vm=%s] where the migration stopped: unknown (%s)", self.src_vm.name, exc)
            return why
        if status == "completed":
            log.warning("[vm=%s] QEMU completed the migration before it could be stopped",
                        self.src_vm.name)
            self._set_phase(Phase.COMPLETED)
            return f"{why} (QEMU completed the migration before it could be stopped)"
        if str(status).startswith("postcopy"):
            log.warning("[vm=%s] QEMU switched to postcopy before the migration could be "
                        "stopped (%s)", self.src_vm.name, status)
            self._set_phase(Phase.POSTCOPY)
            return f"{why} (QEMU had switched to postcopy: {status})"
        return why

    async def _rollback(self, why: str) -> str:
        """Keep the VM on the source, remove the destination; return what was done.

        Every step is bounded by ``migration_cancel_s`` / ``qemu_stop_s``; a step that fails
        is reported in the outcome, and the remaining steps still run. After completion the
        sides are asked first (:meth:`_settle_after_completion`).
        """
        if self.phase is Phase.MIGRATING:
            why = await self._stopped_where(why)
        settled = await self._settle_after_completion(why)
        if settled is not None:
            return settled
        lost = await self._source_lost()
        if lost is not None:
            return lost
        self._set_phase(Phase.ROLLING_BACK)
        self.result.status = "cancelled" if self._cancel_requested else "failed"
        notes = ["migration cancelled"] if self._cancelled_in_qemu else []
        timeouts = self.config.timeouts
        source_runs = False
        try:
            async with asyncio.timeout(timeouts.migration_cancel_s):
                src = await self.src_vm.qmp()
                info = await src.execute("query-migrate")
                if info.get("status") in ACTIVE:
                    await src.execute("migrate_cancel")
                    while (await src.execute("query-migrate")).get("status") in ACTIVE:
                        await asyncio.sleep(timeouts.progress_interval_s)
                    notes.append("migration cancelled")
                status = (await src.execute("query-status"))["status"]
                if status != "running":
                    await src.execute("cont")
                    notes.append(f"source resumed from {status!r}")
                status = (await src.execute("query-status"))["status"]
                if status != "running":
                    notes.append(f"SOURCE NOT RUNNING ({status!r})")
                source_runs = status == "running"
        except (Exception, TimeoutError) as exc:  # noqa: BLE001 - reported, rollback goes on
            notes.append(f"could not check the source ({type(exc).__name__}: {exc})")
        dst_state = None
        if not source_runs:
            dst_state = await self._destination_state()
            if dst_state in (None, "running"):
                # nobody saw the source take the VM back, and the destination may run it
                self._set_phase(Phase.UNRESOLVED)
                outcome = (f"the source on {self.src_vm.host.name} could not be confirmed "
                           f"running and the destination on {self.dst_host.name} "
                           f"{'runs the VM' if dst_state else 'cannot be asked'}: both sides "
                           "were kept as they are; " + ", ".join(notes))
                log.error("[vm=%s] not rolled back (%s): %s", self.src_vm.name, why, outcome)
                return outcome
        if self._mirror is not None:        # before the export it writes to goes away
            notes += await self._mirror.abort(timeouts.migration_cancel_s,
                                              timeouts.progress_interval_s)
        try:
            await self.dst_vm.stop()
            notes.append(f"destination removed from {self.dst_host.name}")
            notes += await self._remove_destination_disk()
        except Exception as exc:  # noqa: BLE001 - reported
            notes.append(f"DESTINATION NOT REMOVED ({exc})")
        if not source_runs:         # the destination never ran it, the source not seen to
            self._set_phase(Phase.UNRESOLVED)
            outcome = (f"VM NOT CONFIRMED RUNNING on {self.src_vm.host.name} (its QEMU holds "
                       f"it; the destination never ran it: {dst_state!r}); " + ", ".join(notes))
            log.error("[vm=%s] rolled back, the source unconfirmed (%s): %s",
                      self.src_vm.name, why, outcome)
            return outcome
        self._set_phase(Phase.ROLLED_BACK)
        outcome = f"VM running on {self.src_vm.host.name}; " + ", ".join(notes)
        log.warning("[vm=%s] rolled back (%s): %s", self.src_vm.name, why, outcome)
        return outcome

    async def _destination_state(self) -> str | None:
        """The destination QEMU's run state ('absent' when it is gone), None when it cannot
        say (within ``migration_cancel_s``)."""
        try:
            async with asyncio.timeout(self.config.timeouts.migration_cancel_s):
                return await self.dst_vm.status() if await self.dst_vm.is_alive() else "absent"
        except (Exception, TimeoutError) as exc:  # noqa: BLE001 - unknown
            log.info("[vm=%s] the destination's state: unknown (%s)", self.src_vm.name, exc)
            return None

