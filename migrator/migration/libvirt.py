"""One live migration through libvirt (the ``libvirt`` driver), same phases and record as QMP.

::

    mig = LibvirtMigration(src_vm, dst_host, dst_address, MigrationParams(), config)
    result = await mig.run()

Phases: PENDING -> PREPARING_DEST (run dir and connection on the destination) -> CONFIGURED
(max downtime set, events registered) -> MIGRATING (``migrate3``, or ``migrateToURI3`` with
``libvirt.p2p``, running in a thread; libvirt starts the destination QEMU and its listener
inside the call, so there is no LISTENING) [-> POSTCOPY (``migrateStartPostCopy``)] ->
COMPLETED -> VERIFIED (destination running, source domain gone) -> CLEANED.

Progress comes from ``jobStats()`` polls and libvirt's migration-iteration events; the final
figures from the source's job-completed event (``time_elapsed``, ``downtime`` and their
``_net`` variants that exclude libvirt's own RPCs), or the destination's completed job stats.

Failure, ``cancel()``, a stall and cancellation of the caller all abort the job
(``abortJob``, guarded by ``migration_cancel_s``), resume the source if it was left paused, and
remove whatever is left on the destination; when the destination's libvirtd is gone, its
QEMU is killed through libvirt's pidfile over SSH.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

import libvirt

from ..hosts import quote
from ..hypervisor.libvirt import LibvirtError, LibvirtVM
from ..hypervisor.libvirt_uri import remote_uri
from .engine import BaseMigration, Phase, ProgressRecord
from .params import MIB

log = logging.getLogger(__name__)

_EVENTS = (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
           libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION)


class LibvirtMigration(BaseMigration):
    """Migrate the running :class:`LibvirtVM` ``src_vm`` to ``dst_host``."""

    driver = "libvirt"
    src_vm: LibvirtVM
    dst_vm: LibvirtVM

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._job: asyncio.Future | None = None
        self._completed_stats: dict | None = None
        #: (side, kind, event, detail, monotonic time) of libvirt's events for this VM
        self.events: list[tuple[str, str, int, int, float]] = []
        self._callbacks: list[tuple[object, int]] = []    # (LibvirtConnection, id)
        self._p2p_uri = ""          # the destination's URI as the source's libvirtd opens it

    # -- what libvirt is asked ----------------------------------------------------------------

    def flags_and_params(self) -> tuple[int, dict]:
        """``migrate3`` flags and typed parameters for :attr:`params`."""
        p, settings = self.params, self.config.libvirt
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST
                 | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
        params: dict = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{self.dst_address}"}
        if p.bandwidth_mibs is not None:        # unset: libvirt lifts QEMU's cap itself
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = max(1, round(p.bandwidth_mibs))
            if p.postcopy_after_s is not None:  # a cap is a cap, in postcopy too
                params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY] = \
                    max(1, round(p.bandwidth_mibs))
        if p.auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if p.postcopy_after_s is not None:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY
        if p.multifd_channels is not None:
            flags |= libvirt.VIR_MIGRATE_PARALLEL
            params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = p.multifd_channels
        if p.xbzrle_cache_mib is not None:
            flags |= libvirt.VIR_MIGRATE_COMPRESSED
            params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] = "xbzrle"
            params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION_XBZRLE_CACHE] = p.xbzrle_cache_mib * MIB
        if settings.unsafe:
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        if settings.p2p:
            flags |= libvirt.VIR_MIGRATE_PEER2PEER
        return flags, params

    # -- the phases ---------------------------------------------------------------------------

    async def _run_phases(self) -> None:
        timeouts = self.config.timeouts
        src = self.src_vm
        async with asyncio.timeout(timeouts.migration_setup_s):
            self._set_phase(Phase.PREPARING_DEST)
            await self.dst_vm.start(incoming=True)
            sdom = await src.domain()
            if sdom is None:
                raise self._error(f"no domain {src.name} on {src.host.name}")
            dconn = await self.dst_vm.conn()
            flags, params = self.flags_and_params()
            if self.params.downtime_limit_ms is not None:
                await src.call("migrateSetMaxDowntime", sdom.migrateSetMaxDowntime,
                               self.params.downtime_limit_ms, 0)
            if self.config.libvirt.p2p:     # the source's libvirtd opens the destination
                self._p2p_uri = await remote_uri(
                    src.host, src.paths.dir, self.dst_vm.host, self.config.libvirt.transport,
                    timeouts.ssh_connect_s)
            await self._watch(src, sdom)
            await self._watch(self.dst_vm, None)
            self._set_phase(Phase.CONFIGURED)
        try:
            await self._migrate(sdom, dconn, flags, params)
            await self._verify()
        finally:
            await self._unwatch()
        await src.host.run(f"rm -rf {quote(src.paths.dir)}", check=True)   # source's run dir
        await self._follow_to_destination()
        self._set_phase(Phase.CLEANED)

    async def _migrate(self, sdom, dconn, flags: int, params: dict) -> None:
        timeouts = self.config.timeouts
        src_conn = await self.src_vm.connection()
        if self.config.libvirt.p2p:
            job = partial(sdom.migrateToURI3, self._p2p_uri, params, flags)
        else:
            job = partial(sdom.migrate3, dconn, params, flags)
        self._t_migrate = time.monotonic()
        self._job = src_conn.submit(job, also=(await self.dst_vm.connection(),))
        self._job.add_done_callback(self._job_done)     # wakes the loop below
        self._set_phase(Phase.MIGRATING)
        moved, moved_at = -1, time.monotonic()
        async with asyncio.timeout(timeouts.migration_for(self.src_vm.spec.mem_mib)):
            while not self._job.done():
                if self._cancel_requested:
                    raise self._error(f"cancelled: {self._cancel_requested}")
                await self._poll(sdom)
                now = time.monotonic()
                if self.records and self.records[-1].transferred != moved:
                    moved, moved_at = self.records[-1].transferred, now
                elif now - moved_at >= timeouts.migration_stall_s:
                    raise self._error(f"stalled: no bytes moved for "
                                      f"{timeouts.migration_stall_s:g} s at {moved} bytes "
                                      "(link blocked or destination hung?)")
                # QEMU's side of the job must be running (libvirt sets the postcopy
                # capability inside migrate3, after its Begin/Prepare steps)
                if (self.params.postcopy_after_s is not None and self.phase is Phase.MIGRATING
                        and now - self._t_migrate >= self.params.postcopy_after_s
                        and self.records and self.records[-1].transferred > 0):
                    try:
                        await self.src_vm.call("migrateStartPostCopy",
                                               sdom.migrateStartPostCopy, 0)
                        self._set_phase(Phase.POSTCOPY)
                    except LibvirtError:
                        if not self._job.done():  # not "finished as precopy meanwhile"
                            await asyncio.wait([self._job], timeout=timeouts.progress_interval_s)
                            if not self._job.done():
                                raise
                if not self._job.done():
                    try:
                        await asyncio.wait_for(self.wait_changed(), timeouts.progress_interval_s)
                    except TimeoutError:
                        pass
        try:
            ddom = self._job.result()
        except libvirt.libvirtError as exc:
            raise self._error(f"libvirt: {exc.get_error_message() or exc}") from exc
        self.result.wall_s = time.monotonic() - self._t_migrate
        self._set_phase(Phase.COMPLETED)
        stats = self._completed_stats
        if stats is None:           # the event did not come (yet): ask the destination
            ddom = ddom or await self.dst_vm.domain()
            stats = await self.dst_vm.call("completed job stats", ddom.jobStats,
                                           libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        self._final_figures(stats)

    async def _poll(self, sdom) -> None:
        timeouts = self.config.timeouts
        try:
            stats = await self.src_vm.call("jobStats", sdom.jobStats,
                                           timeout=min(timeouts.libvirt_call_s,
                                                       timeouts.migration_stall_s))
        except LibvirtError as exc:
            if exc.code is None and not self._job.done():
                return              # no answer (QEMU's monitor busy): counts as no progress
            # the domain left the source just before the migrate call returned (p2p does
            # this): the job's own result tells how it ended; wait for it a little
            try:
                await asyncio.wait_for(asyncio.shield(self._job),
                                       self.config.timeouts.libvirt_call_s)
            except TimeoutError:
                raise exc from None
            except libvirt.libvirtError:
                pass
            return
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
            return
        if self.result.port is None and stats.get("memory_processed", 0) > 0:
            self.result.port = await self._find_port()
        status = "active"
        if self.phase is Phase.POSTCOPY:
            # asked for is not done: QEMU switches at its next iteration, and libvirt pauses
            # the source with reason post-copy once it did
            state, reason = await self.src_vm.call("state", sdom.state)
            if state == libvirt.VIR_DOMAIN_PAUSED and reason in (
                    libvirt.VIR_DOMAIN_PAUSED_POSTCOPY, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED):
                status = "postcopy-active"
        self._add_record(ProgressRecord(
            t=time.monotonic() - self._t_migrate,
            status=status,
            transferred=stats.get("memory_processed", stats.get("data_processed", 0)),
            remaining=stats.get("memory_remaining", 0), total=stats.get("memory_total", 0),
            dirty_pages_rate=stats.get("memory_dirty_rate", 0),
            mbps=stats.get("memory_bps", 0) * 8 / 1e6,
            iteration=stats.get("memory_iteration", 0), expected_downtime_ms=0,
            cpu_throttle=stats.get("auto_converge_throttle", 0)))

    async def _find_port(self) -> int | None:
        """The destination QEMU's migration port (libvirt picks it inside migrate3): the local
        port of that QEMU's established connection on the destination's migration address."""
        pid = await self.dst_vm.read_pid()
        if pid is None:
            return None
        r = await self.dst_host.run(f"ss -Htnp state established src {quote(self.dst_address)}")
        for line in r.stdout.splitlines():
            fields = line.split()
            if f"pid={pid}," in line and len(fields) >= 4:
                return int(fields[2].rsplit(":", 1)[1])
        return None

    def _final_figures(self, stats: dict) -> None:
        r = self.result
        r.status = "completed"
        r.total_time_ms = stats.get("time_elapsed")
        r.total_time_net_ms = stats.get("time_elapsed_net")
        r.downtime_ms = stats.get("downtime")
        r.downtime_net_ms = stats.get("downtime_net")
        r.setup_time_ms = stats.get("setup_time")
        r.transferred_bytes = stats.get("memory_processed")
        r.throughput_mbps = round(stats.get("memory_bps", 0) * 8 / 1e6, 1)
        r.iterations = stats.get("memory_iteration")
        r.postcopy_requests = stats.get("memory_postcopy_requests")
        r.max_cpu_throttle = max(r.max_cpu_throttle, stats.get("auto_converge_throttle", 0))

    async def _verify(self) -> None:
        """Destination running (waited for), source domain gone; downtime from the events."""
        timeouts = self.config.timeouts
        async with asyncio.timeout(timeouts.migration_setup_s):
            while (status := await self.dst_vm.status()) != "running":
                if status not in ("paused-migration", "paused", "absent"):
                    raise self._error(f"destination ended in state {status!r}")
                await asyncio.sleep(timeouts.progress_interval_s)
        left = await self.src_vm.status()
        if left not in ("absent", "shutoff"):
            raise self._error(f"source domain is {left!r} after completion, not gone")
        self.dst_vm.pid = await self.dst_vm.read_pid()
        suspended = [t for side, kind, ev, _, t in self.events
                     if side == "src" and kind == "lifecycle"
                     and ev == libvirt.VIR_DOMAIN_EVENT_SUSPENDED]
        resumed = [t for side, kind, ev, _, t in self.events
                   if side == "dst" and kind == "lifecycle"
                   and ev == libvirt.VIR_DOMAIN_EVENT_RESUMED]
        if suspended and resumed:
            self.result.downtime_events_ms = round((resumed[-1] - suspended[-1]) * 1000, 1)
        self._set_phase(Phase.VERIFIED)

    # -- events -------------------------------------------------------------------------------

    async def _watch(self, vm: LibvirtVM, dom) -> None:
        """Record lifecycle, iteration and job-completed events of this VM on ``vm``'s host."""
        side = "src" if vm is self.src_vm else "dst"
        conn = await vm.connection()
        loop = asyncio.get_running_loop()

        def note(kind: str, event: int, detail: int) -> None:
            self.events.append((side, kind, event, detail, time.monotonic()))

        def lifecycle(_c, d, event, detail, _o):
            if d.name() == self.src_vm.name:
                loop.call_soon_threadsafe(note, "lifecycle", event, detail)

        def iteration(_c, d, n, _o):
            if d.name() == self.src_vm.name:
                loop.call_soon_threadsafe(note, "iteration", n, 0)

        def completed(_c, d, stats, _o):
            if d.name() == self.src_vm.name:
                loop.call_soon_threadsafe(self._job_completed, stats)

        for event_id, cb in zip(_EVENTS, (lifecycle, completed, iteration)):
            if side == "dst" and event_id != libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE:
                continue
            cbid = await conn.register_event(event_id, cb,
                                             timeout=self.config.timeouts.libvirt_call_s)
            self._callbacks.append((conn, cbid))

    def _job_done(self, job: asyncio.Future) -> None:
        """migrate3 returned or failed: wake whoever waits. Its error is taken here too, so a
        job that ends after the run stopped waiting for it (a SPLIT or UNRESOLVED run whose
        libvirt kept going) is not reported as an exception nobody retrieved."""
        if not job.cancelled() and job.exception() is not None:
            log.info("[vm=%s] migrate3 ended: %s", self.src_vm.name, job.exception())
        self._pulse()

    def _job_completed(self, stats: dict) -> None:
        self._completed_stats = dict(stats)
        self._pulse()

    async def _unwatch(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for conn, cbid in callbacks:
            try:
                await conn.deregister_event(cbid, timeout=self.config.timeouts.libvirt_call_s)
            except LibvirtError as exc:       # the connection's close deregisters it then
                log.debug("%s", exc)

    # -- failure ------------------------------------------------------------------------------

    async def _states(self) -> tuple[str, str]:
        return await self.src_vm.status(), await self.dst_vm.status()

    def _source_can_resume(self, src_state: str) -> bool:
        return False                # libvirt removed the source domain when it completed

    async def _clean_source(self) -> str:
        src = self.src_vm
        try:
            if await src.status() not in ("absent", "shutoff"):
                await src.stop()
                return f"the source domain on {src.host.name} was removed"
            await src.host.run(f"rm -rf {quote(src.paths.dir)}", check=True)
            return f"libvirt had removed the source domain from {src.host.name}"
        except Exception as exc:  # noqa: BLE001 - reported
            return f"SOURCE NOT CLEANED on {src.host.name} ({exc})"

    async def _ask(self, vm: LibvirtVM) -> str | None:
        """``vm``'s domain state, or None when its libvirtd cannot be asked."""
        try:
            return await vm.status()
        except Exception as exc:  # noqa: BLE001 - unknown, said so by None
            log.warning("[vm=%s] state on %s unknown: %s", vm.name, vm.host.name, exc)
            return None

    async def _rollback(self, why: str) -> str:
        """Abort the job, then decide from the job's end and both sides' domain states:

        * job still running after ``migration_cancel_s``: UNRESOLVED, nothing destroyed;
        * source gone and destination running (libvirt finished first): LANDED;
        * source domain present: libvirt's failed job means the destination never ran the
          guest, so the source is resumed and the destination removed: ROLLED_BACK;
        * the source cannot be asked, or runs nothing: UNRESOLVED, nothing destroyed.
        """
        timeouts = self.config.timeouts
        if self.phase is Phase.POSTCOPY and self._job is not None and not self._job.done():
            # libvirt's client side still drives the migration and decides on its own what
            # to do with each side (Finish3 and Confirm3, cancelled): let it end before
            # saying where the VM is (a side it stopped makes the VM LOST, not SPLIT)
            try:
                await asyncio.wait_for(asyncio.shield(self._job), timeouts.migration_cancel_s)
            except (TimeoutError, libvirt.libvirtError):
                pass
        resumed = False
        if self.phase is Phase.POSTCOPY and self._job is not None and self._job.done():
            # the switch is asked for, not known done: a source libvirt resumed never handed
            # the guest over (QEMU had not switched yet, or the destination never started it)
            resumed = await self._ask(self.src_vm) == "running"
        settled = None if resumed else await self._settle_after_completion(why)
        if settled is not None:
            return settled
        self._set_phase(Phase.ROLLING_BACK)
        self.result.status = "cancelled" if self._cancel_requested else "failed"
        notes: list[str] = []
        src = self.src_vm
        job_running = False
        if self._job is not None and not self._job.done():
            try:
                dom = await src.domain()
                await src.call("abortJob", dom.abortJob, timeout=timeouts.migration_cancel_s)
                notes.append("migration job aborted")
            except LibvirtError as exc:
                notes.append(f"abortJob failed ({exc.message})")
            try:
                await asyncio.wait_for(asyncio.shield(self._job), timeouts.migration_cancel_s)
            except TimeoutError:
                job_running = True
                notes.append(f"MIGRATE CALL STILL RUNNING after {timeouts.migration_cancel_s:g}"
                             " s")
            except libvirt.libvirtError:
                pass                          # what an aborted migrate3 returns
        await self._unwatch()
        src_state, dst_state = await self._ask(src), await self._ask(self.dst_vm)
        where = (f"source {src_state or 'unknown'!r} on {src.host.name}, destination "
                 f"{dst_state or 'unknown'!r} on {self.dst_host.name}")
        if src_state in ("absent", "shutoff") and dst_state == "running":
            notes.insert(0, "libvirt had already finished the migration")
            notes.append(await self._clean_source())
            await self._follow_to_destination()
            outcome = (f"NOT rolled back: the VM runs on {self.dst_host.name} and the VM "
                       f"object now refers to it; " + "; ".join(notes))
            self._set_phase(Phase.LANDED)
            log.warning("[vm=%s] %s", src.name, outcome)
            return outcome
        if not job_running and src_state in ("absent", "shutoff") \
                and dst_state in ("absent", "shutoff", "paused-migration"):
            # libvirt's job ended and the destination never ran the guest: no copy holds it
            lost = await self._source_lost()
            if lost is not None:
                return "; ".join(notes + [lost])
        if job_running or src_state is None or src_state in ("absent", "shutoff"):
            notes.append(f"where the VM runs could not be established ({where}): nothing "
                         "was destroyed")
            self._set_phase(Phase.UNRESOLVED)
            outcome = "; ".join(notes)
            log.error("[vm=%s] %s", src.name, outcome)
            return outcome
        try:
            if src_state.startswith("paused"):
                dom = await src.domain()
                await src.call("resume", dom.resume)
                notes.append(f"source resumed from {src_state!r}")
            status = await src.status()
            if status != "running":
                notes.append(f"SOURCE NOT RUNNING ({status!r})")
        except Exception as exc:  # noqa: BLE001 - reported, rollback goes on
            notes.append(f"could not resume the source ({type(exc).__name__}: {exc})")
        try:
            await self.dst_vm.stop()
            notes.append(f"destination removed from {self.dst_host.name}")
        except Exception as exc:  # noqa: BLE001 - reported
            notes.append(f"DESTINATION NOT REMOVED ({exc})")
        self._set_phase(Phase.ROLLED_BACK)
        outcome = f"VM running on {src.host.name}; " + ", ".join(notes)
        log.warning("[vm=%s] rolled back (%s): %s", src.name, why, outcome)
        return outcome


__all__ = ["LibvirtMigration"]
