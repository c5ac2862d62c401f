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
import json
import logging
import time
from functools import partial

import libvirt

from ..aio import shielded, wait_for
from ..errors import HostError
from ..hosts import quote
from ..hypervisor.libvirt import LibvirtError, LibvirtVM
from ..hypervisor.libvirt_uri import remote_uri
from ..hypervisor.qemu_cpu import CpuSampler
from . import cpu
from .engine import BaseMigration, Phase, ProgressRecord
from .params import MIB, THROTTLE_HELD
from .policy import PolicyTracker

log = logging.getLogger(__name__)

_EVENTS = (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
           libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION)


_POSTCOPY_FAILED = ((libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED),
                    (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED))


#: libvirt versions whose destination daemon crashes on a postcopy resume, and why. 11.3.0:
#: qemuMigrationDstPrepareResume passes a NULL fd pointer down to qemuProcessIncomingDefNew,
#: which dereferences it (SIGSEGV in libvirt_driver_qemu.so; found in this project's fault
#: matrix on Debian's 11.3.0-2~bpo12+1; upstream later passes the fd by value, -1)
_RESUME_BROKEN = {11_003_000: "libvirt 11.3.0 crashes the destination's libvirtd on a "
                              "postcopy resume (NULL fd in qemuMigrationDstPrepareResume)"}


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
        self._cpu_sampler: CpuSampler | None = None   # the source QEMU's, while it is followed
        self._callbacks: list[tuple[object, int]] = []    # (LibvirtConnection, id)
        self._p2p_uri = ""          # the destination's URI as the source's libvirtd opens it
        self._waiting_out = False   # a postcopy stall this libvirt cannot recover: waited for
        self._dst_version = 0       # the destination's libvirt (getLibVersion)
        self._dst_started = False   # the destination's domain started (its console exists)
        self._console_ahead = False  # ... and the VM's open session connected to it
        self._sdom = None           # the source's domain (set up in PREPARING_DEST)
        self._memory_started = False  # storage copy-*: the memory follows the disk's copy

    # -- what libvirt is asked ----------------------------------------------------------------

    def flags_and_params(self) -> tuple[int, dict]:
        """``migrate3`` flags and typed parameters for :attr:`params`."""
        p, settings = self.params, self.config.libvirt
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST
                 | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
        params: dict = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{self.dst_address}"}
        if p.bandwidth_mibs is not None:        # unset: libvirt lifts QEMU's cap itself
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = max(1, round(p.bandwidth_mibs))
            if p.may_postcopy:                  # a cap is a cap, in postcopy too
                params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY] = \
                    max(1, round(p.bandwidth_mibs))
        if p.auto_converge or p.throttle_held:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if p.throttle_held:     # max-cpu-throttle too, set through QEMU: see _hold_throttle
            params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = \
                THROTTLE_HELD["cpu-throttle-initial"]
            params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = \
                THROTTLE_HELD["cpu-throttle-increment"]
        if p.may_postcopy:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY
        if p.multifd_channels is not None:
            flags |= libvirt.VIR_MIGRATE_PARALLEL
            params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = p.multifd_channels
        if p.xbzrle_cache_mib is not None:
            flags |= libvirt.VIR_MIGRATE_COMPRESSED
            params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] = "xbzrle"
            params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION_XBZRLE_CACHE] = p.xbzrle_cache_mib * MIB
        if p.tls:               # each host's migrate_tls_x509_cert_dir (qemu.conf)
            flags |= libvirt.VIR_MIGRATE_TLS
            if p.tls_hostname is not None:
                params[libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION] = p.tls_hostname
        if self.copies_disk:    # libvirt mirrors it over NBD (TLS too with VIR_MIGRATE_TLS)
            flags |= (libvirt.VIR_MIGRATE_NON_SHARED_DISK if p.storage == "copy-all"
                      else libvirt.VIR_MIGRATE_NON_SHARED_INC)
            params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = ["vda"]
            # its NBD server on the migration address; the port from libvirt's own range
            params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = f"tcp://{self.dst_address}"
        if settings.unsafe:
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        if settings.p2p:
            flags |= libvirt.VIR_MIGRATE_PEER2PEER
        return flags, params

    # -- the phases ---------------------------------------------------------------------------

    async def _record_versions(self, sdom, dconn) -> None:
        """The domain's machine type (libvirt's canonical name) and each side's QEMU
        (``getVersion``) in the result, as the qemu driver records them. A figure that
        cannot be read is logged and left out: never the migration's failure."""
        import xml.etree.ElementTree as ET
        try:
            root = ET.fromstring(await self.src_vm.call("XMLDesc", sdom.XMLDesc))
            node, emulator = root.find("os/type"), root.findtext("devices/emulator")
            self.result.machine = node.get("machine") if node is not None else None
            sconn = await self.src_vm.conn()
            for side, vm, conn in (("src", self.src_vm, sconn), ("dst", self.dst_vm, dconn)):
                v = await vm.call("getVersion", conn.getVersion)
                self.result.qemu[side] = {
                    "host": vm.host.name, "binary": emulator,
                    "version": f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"}
        except (LibvirtError, libvirt.libvirtError, ET.ParseError) as exc:
            log.warning("[vm=%s] versions not recorded: %s", self.src_vm.name, exc)

    async def _run_phases(self) -> None:
        timeouts = self.config.timeouts
        src = self.src_vm
        async with asyncio.timeout(timeouts.migration_setup_s):
            self._set_phase(Phase.PREPARING_DEST)
            if self.copies_disk:        # libvirt makes one only inside its storage pools
                await self._make_destination_disk()
            await self.dst_vm.start(incoming=True)
            sdom = await src.domain()
            if sdom is None:
                raise self._error(f"no domain {src.name} on {src.host.name}")
            dconn = await self.dst_vm.conn()
            self._dst_version = await self.dst_vm.call("getLibVersion", dconn.getLibVersion)
            await self._record_versions(sdom, dconn)
            flags, params = self.flags_and_params()
            self._sdom = sdom
            if self.params.downtime_limit_ms is not None:
                await self._set_downtime(self.params.downtime_limit_ms)
            if self.params.throttle_held:
                await self._qemu_set(THROTTLE_HELD)
            if self.config.libvirt.p2p:     # the source's libvirtd opens the destination
                self._p2p_uri = await remote_uri(
                    src.host, src.paths.dir, self.dst_vm.host, self.config.libvirt.transport,
                    timeouts.ssh_connect_s)
            # the CPU figures' start read meanwhile (off the transfer's path); again at the
            # slot if the migration waited for one
            _, src_cpu = await cpu.alongside(self._watch(src, sdom), cpu.read_side(src))
            await self._watch(self.dst_vm, None)
            self._set_phase(Phase.CONFIGURED)
        try:
            await self._wait_for_slot()
            if self.result.queued_s is not None:
                src_cpu = await cpu.read_side(src)
            # libvirt kills the source QEMU inside migrate3: followed while it runs
            async with CpuSampler(src.host, src.pid, src_cpu,
                                  timeouts.progress_interval_s) as sampler:
                self._cpu_sampler = sampler
                try:
                    await self._migrate(sdom, dconn, flags, params)
                finally:
                    self._cpu_sampler = None
            await self._verify()
            cpu.record(self.result, cpu.spent(src_cpu, sampler.last),
                       cpu.spent(None, await cpu.read_side(self.dst_vm), since_launch=True),
                       "launch")
        finally:
            await shielded(self._unwatch())     # (a second Ctrl-C leaves none registered)
        await src.host.run(f"rm -rf {quote(src.paths.dir)}", check=True)   # source's run dir
        await self._follow_to_destination()
        self._set_phase(Phase.CLEANED)

    async def _migrate(self, sdom, dconn, flags: int, params: dict) -> None:
        timeouts, policy = self.config.timeouts, self.params.policy
        src_conn = await self.src_vm.connection()
        if self.config.libvirt.p2p:
            job = partial(sdom.migrateToURI3, self._p2p_uri, params, flags)
        else:
            job = partial(sdom.migrate3, dconn, params, flags)
        await self._start_policy()
        self._job = src_conn.submit(job, also=(await self.dst_vm.connection(),))
        self._job.add_done_callback(self._job_done)     # wakes the loop below
        self._set_phase(Phase.MIGRATING)
        moved, moved_at = -1, time.monotonic()
        async with asyncio.timeout(self._transfer_deadline()):
            while True:
                if self._job.done():
                    if (not self._job.cancelled() and self._job.exception() is not None
                            and self._can_recover() and await self._postcopy_failed(self.src_vm)
                            and self._resume_blocked() is None):
                        # libvirt saw the link break itself and kept both sides paused
                        await self._recover_postcopy(sdom, dconn, flags, params,
                                                     f"migrate3 failed: {self._job.exception()}")
                        moved, moved_at = -1, time.monotonic()
                        continue
                    break
                if self._cancel_requested:
                    raise self._error(f"cancelled: {self._cancel_requested}")
                if self._dst_started and not self._console_ahead:
                    self._console_ahead = True
                    await self.src_vm.connect_console_ahead(self.dst_vm)
                await self._poll(sdom)
                now = time.monotonic()
                # the disk's copy comes first, inside the same job: it moves bytes too
                if self.records and (self.records[-1].transferred
                                     + self.records[-1].disk_transferred) != moved:
                    moved = self.records[-1].transferred + self.records[-1].disk_transferred
                    moved_at = now
                elif now - moved_at >= policy.stall_s and self._can_recover():
                    # past the switchover the source cannot take the VM back: recover, or
                    # where this libvirt cannot, wait (a link that comes back lets TCP go
                    # on; the migration's timeout bounds the wait)
                    blocked = self._resume_blocked()
                    if blocked is None:
                        await self._recover_postcopy(sdom, dconn, flags, params,
                                                     f"no bytes moved for "
                                                     f"{policy.stall_s:g} s")
                        moved, moved_at = -1, time.monotonic()
                        continue
                    if not self._waiting_out:
                        self._waiting_out = True
                        log.warning("[vm=%s %s->%s] postcopy stalled for %g s; not recovered "
                                    "(%s): waited for until the migration's timeout",
                                    self.src_vm.name, self.src_vm.host.name,
                                    self.dst_host.name, policy.stall_s, blocked)
                elif now - moved_at >= policy.stall_s:
                    raise self._error(f"stalled: no bytes moved for "
                                      f"{policy.stall_s:g} s at {moved} bytes "
                                      "(link blocked or destination hung?)")
                # QEMU's side of the job must be running (libvirt sets the postcopy
                # capability inside migrate3, after its Begin/Prepare steps)
                if (self.params.postcopy_after_s is not None and self.phase is Phase.MIGRATING
                        and now - self._t_migrate >= self.params.postcopy_after_s
                        and self.records and self.records[-1].transferred > 0):
                    await self._start_postcopy()
                if self.records and self.records[-1].transferred > 0 and not self._job.done():
                    await self._apply_policy()
                if not self._job.done():
                    try:
                        await wait_for(self.wait_changed(), timeouts.progress_interval_s)
                    except TimeoutError:
                        pass
        try:
            ddom = self._job.result()
        except libvirt.libvirtError as exc:
            raise self._error(f"libvirt: {exc.get_error_message() or exc}") from exc
        self.result.wall_s = time.monotonic() - self._t_migrate
        self._set_phase(Phase.COMPLETED)
        stats = await self._completed_figures()
        if stats is None:           # the event did not come: ask the destination
            ddom = ddom or await self.dst_vm.domain()
            stats = await self.dst_vm.call("completed job stats", ddom.jobStats,
                                           libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        self._final_figures(stats)

    # -- what the convergence policy does ---------------------------------------------------

    def disk_progress(self) -> tuple[int, int] | None:
        if self.copies_disk and not self._memory_started and self.records \
                and self.phase is Phase.MIGRATING:
            return self.records[-1].disk_transferred, self.records[-1].disk_total
        return None

    async def _set_downtime(self, ms: int) -> None:
        await self.src_vm.call("migrateSetMaxDowntime", self._sdom.migrateSetMaxDowntime, ms, 0)

    async def _qemu_set(self, parameters: dict) -> None:
        """Migration parameters libvirt has no API for (max-cpu-throttle, and the throttle
        during a job), set on the source's QEMU through ``qemu-monitor-command`` (the
        outgoing job allows it; libvirt marks the domain tainted for it)."""
        import libvirt_qemu
        command = json.dumps({"execute": "migrate-set-parameters", "arguments": parameters})
        reply = await self.src_vm.call("qemu-monitor-command migrate-set-parameters",
                                       libvirt_qemu.qemuMonitorCommand, self._sdom, command, 0)
        if "error" in json.loads(reply):
            raise self._error(f"QEMU refused migrate-set-parameters {parameters}: {reply}")

    async def _set_throttle(self, parameters: dict[str, int]) -> None:
        await self._qemu_set(parameters)

    async def _start_postcopy(self) -> None:
        timeouts = self.config.timeouts
        try:
            await self.src_vm.call("migrateStartPostCopy", self._sdom.migrateStartPostCopy, 0)
            self._set_phase(Phase.POSTCOPY)
        except LibvirtError:
            if not self._job.done():  # not "finished as precopy meanwhile"
                await asyncio.wait([self._job], timeout=timeouts.progress_interval_s)
                if not self._job.done():
                    raise

    async def _pause_guest(self) -> None:
        await self.src_vm.call("suspend", self._sdom.suspend)

    # -- postcopy recovery -----------------------------------------------------------------

    def _can_recover(self) -> bool:
        return (self.phase is Phase.POSTCOPY and bool(self.records)
                and self.records[-1].status == "postcopy-active"
                and self.result.postcopy_recoveries < self.params.postcopy_recoveries)

    def _resume_blocked(self) -> str | None:
        """Why this destination's libvirt cannot resume a postcopy, or None when it can."""
        return _RESUME_BROKEN.get(self._dst_version)

    async def _state_reason(self, vm: LibvirtVM) -> tuple[int, int] | None:
        """``vm``'s domain (state, reason); (SHUTOFF, 0) when there is no domain; None when
        its libvirtd cannot be asked."""
        try:
            dom = await vm.domain()
            if dom is None:
                return libvirt.VIR_DOMAIN_SHUTOFF, 0
            return tuple(await vm.call("state", dom.state))
        except Exception as exc:  # noqa: BLE001 - unknown, said so by None
            log.info("[vm=%s] state on %s unknown: %s", vm.name, vm.host.name, exc)
            return None

    async def _postcopy_failed(self, vm: LibvirtVM) -> bool:
        """libvirt marks a domain whose postcopy broke (paused or running) post-copy failed."""
        return await self._state_reason(vm) in _POSTCOPY_FAILED

    async def _recover_postcopy(self, sdom, dconn, flags: int, params: dict, why: str) -> None:
        """libvirt's postcopy recovery (libvirt >= 8.5):

        1. the source paused: ``abortJobFlags(VIR_DOMAIN_ABORT_JOB_POSTCOPY)`` (QMP
           ``migrate-pause``), unless libvirt saw the break itself;
        2. the destination made to notice: libvirt offers no way to pause an incoming
           postcopy and its incoming job keeps the monitor to itself (Finish3 waits there
           with no timeout), so a destination whose QEMU still waits on a dead connection
           (a dropped link breaks nothing until TCP gives up) has that connection closed by
           the kernel (``ss -K``, SOCK_DESTROY): its QEMU pauses itself, libvirt marks it
           running/post-copy failed and migrate3 returns;
        3. ``migrate3`` again with VIR_MIGRATE_POSTCOPY_RESUME: the destination's libvirt
           runs ``migrate-recover`` on a port it allocates anew, and the source resumes.

        :raise MigrationError: a step failed or did not end within ``migration_cancel_s``
            (the caller reports SPLIT, or LOST when a side is gone).
        """
        timeouts = self.config.timeouts
        src, dst = self.src_vm, self.dst_vm
        log.warning("[vm=%s %s->%s] postcopy stuck (%s): recovering", src.name,
                    src.host.name, self.dst_host.name, why)
        self.result.postcopy_recoveries += 1
        step = "pausing the source"
        try:
            async with asyncio.timeout(timeouts.migration_cancel_s):
                if not await self._postcopy_failed(src):
                    await src.call("abortJobFlags", sdom.abortJobFlags,
                                   libvirt.VIR_DOMAIN_ABORT_JOB_POSTCOPY)
                step = "closing the destination's dead migration connection"
                if not self._job.done() and self.result.port is not None:
                    await self.dst_host.run(
                        f"ss -K -tn state established src {quote(self.dst_address)} "
                        f"sport = :{self.result.port}", check=True,
                        timeout=timeouts.migration_cancel_s)
                step = "waiting for the broken migrate3 to end"
                try:
                    await asyncio.shield(self._job)
                except libvirt.libvirtError:
                    pass                # what the broken job returns
                step = "waiting for both sides to be post-copy failed"
                while not (await self._postcopy_failed(src) and await self._postcopy_failed(dst)):
                    await asyncio.sleep(timeouts.progress_interval_s)
        except TimeoutError:
            raise self._error(f"postcopy recovery stuck {step} for "
                              f"{timeouts.migration_cancel_s:g} s") from None
        except (LibvirtError, libvirt.libvirtError, HostError) as exc:
            raise self._error(f"postcopy recovery: {step}: {exc}") from exc
        self.result.port = None                 # a new one: found again by _poll
        resume = flags | libvirt.VIR_MIGRATE_POSTCOPY | libvirt.VIR_MIGRATE_POSTCOPY_RESUME
        if self.config.libvirt.p2p:
            job = partial(sdom.migrateToURI3, self._p2p_uri, params, resume)
        else:
            job = partial(sdom.migrate3, dconn, params, resume)
        self._job = (await src.connection()).submit(job, also=(await dst.connection(),))
        self._job.add_done_callback(self._job_done)
        log.warning("[vm=%s] postcopy resumed (migrate3 with POSTCOPY_RESUME)", src.name)

    async def _poll(self, sdom) -> None:
        timeouts = self.config.timeouts
        try:
            stats = await self.src_vm.call("jobStats", sdom.jobStats,
                                           timeout=min(timeouts.libvirt_call_s,
                                                       self.params.policy.stall_s))
        except LibvirtError as exc:
            if exc.code is None and not self._job.done():
                return              # no answer (QEMU's monitor busy): counts as no progress
            # the domain left the source just before the migrate call returned (p2p does
            # this): the job's own result tells how it ended; wait for it a little
            try:
                await wait_for(asyncio.shield(self._job),
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
            cpu_throttle=stats.get("auto_converge_throttle", 0),
            disk_transferred=stats.get("disk_processed", 0),
            disk_total=stats.get("disk_total", 0)))
        if self.copies_disk and not self._memory_started \
                and stats.get("memory_processed", 0) > 0:
            # libvirt starts the memory once the disk is in sync (its mirror job ready): the
            # convergence policy's clocks start now, as they do for the qemu driver
            self._memory_started = True
            self._policy = PolicyTracker(self.params.policy, self.src_vm.spec.mem_mib,
                                         time.monotonic())
            if self.result.mirror_s is None:        # no READY event seen: within one poll
                self.result.mirror_s = round(self.records[-1].t, 3)

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

    async def _completed_figures(self) -> dict | None:
        """The source's job-completed event's figures, waited for a little
        (``timeouts.libvirt_event_s``): the source libvirtd sends it while it confirms the
        migration, inside migrate3, yet it may reach us after migrate3's answer (seen in the
        suite). None if it did not come: the destination's completed job stats are the
        fallback, and they are not the same figures: libvirt builds them from the migration
        cookie, which has QEMU's figures only, not the disk mirror's (``disk_processed`` 0
        after a storage copy over NBD; libvirt 11.3)."""
        if self._completed_stats is None and not self._callbacks:
            return None             # no longer listening (a rollback finishing a postcopy)
        deadline = time.monotonic() + self.config.timeouts.libvirt_event_s
        while self._completed_stats is None and (left := deadline - time.monotonic()) > 0:
            try:
                await wait_for(self.wait_changed(), left)
            except TimeoutError:
                break
        if self._completed_stats is None:
            log.info("[vm=%s %s->%s] no job-completed event within %g s: the destination's "
                     "figures are taken", self.src_vm.name, self.src_vm.host.name,
                     self.dst_host.name, self.config.timeouts.libvirt_event_s)
        return self._completed_stats

    def _final_figures(self, stats: dict) -> None:
        """The result's final figures from libvirt's completed job stats: the source's
        job-completed event's, or (it did not come) the destination's, whose disk figures
        are not the mirror's: then the disk's bytes are the mirror's count at the last
        progress record."""
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
        if self.copies_disk:
            from_source = self._completed_stats is not None
            r.disk_bytes = stats.get("disk_processed") if from_source else max(
                (rec.disk_transferred for rec in self.records), default=None)
        r.max_cpu_throttle = max(r.max_cpu_throttle, stats.get("auto_converge_throttle", 0))
        if self.params.xbzrle_cache_mib is not None and "compression_cache" in stats:
            r.xbzrle = {name: stats.get(key) for name, key in (
                ("cache_size", "compression_cache"), ("bytes", "compression_bytes"),
                ("pages", "compression_pages"), ("cache_miss", "compression_cache_misses"),
                ("overflow", "compression_overflow"))}

    async def _verify(self) -> None:
        """Destination running (waited for), source domain gone; downtime from the events.
        A guest the policy paused may arrive paused: it is resumed on the destination, and its
        downtime runs from the pause."""
        timeouts = self.config.timeouts
        resumed_here = False
        async with asyncio.timeout(timeouts.migration_setup_s):
            while (status := await self.dst_vm.status()) != "running":
                if status == "paused" and self._policy is not None and self._policy.paused \
                        and not resumed_here:
                    ddom = await self.dst_vm.domain()
                    await self.dst_vm.call("resume", ddom.resume)
                    resumed_here = True
                    log.info("[vm=%s] paused by the policy: resumed on %s", self.src_vm.name,
                             self.dst_host.name)
                    continue
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
        if self.params.may_postcopy:
            self.result.postcopy_switched = any(
                side == "src" and kind == "lifecycle" and ev == libvirt.VIR_DOMAIN_EVENT_SUSPENDED
                and detail == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY
                for side, kind, ev, detail, _t in self.events)
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
            if kind == "lifecycle" and self._cpu_sampler is not None and (
                    (side, event) in (("src", libvirt.VIR_DOMAIN_EVENT_SUSPENDED),
                                      ("dst", libvirt.VIR_DOMAIN_EVENT_RESUMED))):
                # the source paused for the switchover, or its work is done (the destination
                # runs; libvirt kills the source next): its CPU snapshot now, before it goes
                self._cpu_sampler.snapshot_now()
            if (side, kind, event) == ("dst", "lifecycle", libvirt.VIR_DOMAIN_EVENT_STARTED):
                self._dst_started = True        # its console can be connected: wake the loop
                self._pulse()

        def lifecycle(_c, d, event, detail, _o):
            if d.name() == self.src_vm.name:
                loop.call_soon_threadsafe(note, "lifecycle", event, detail)

        def iteration(_c, d, n, _o):
            if d.name() == self.src_vm.name:
                loop.call_soon_threadsafe(note, "iteration", n, 0)

        def completed(_c, d, stats, _o):
            if d.name() == self.src_vm.name:
                loop.call_soon_threadsafe(self._job_completed, stats)

        def block_job(_c, d, _disk, kind, status, _o):
            if d.name() == self.src_vm.name and status == libvirt.VIR_DOMAIN_BLOCK_JOB_READY:
                loop.call_soon_threadsafe(self._disk_ready)

        events = list(zip(_EVENTS, (lifecycle, completed, iteration)))
        if self.copies_disk:        # the disk's mirror in sync: when the memory may start
            events.append((libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, block_job))
        for event_id, cb in events:
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

    def _disk_ready(self) -> None:
        if self.result.mirror_s is None and self._t_migrate is not None:
            self.result.mirror_s = round(time.monotonic() - self._t_migrate, 3)

    def _job_completed(self, stats: dict) -> None:
        self._completed_stats = dict(stats)
        self._pulse()

    async def _unwatch(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for conn, cbid in callbacks:
            try:
                await conn.deregister_event(cbid, timeout=self.config.timeouts.libvirt_call_s)
            except LibvirtError as exc:       # its owner closing it (VM or pool) does
                log.debug("%s", exc)

    # -- failure ------------------------------------------------------------------------------

    async def _states(self) -> tuple[str, str]:
        return await self.src_vm.status(), await self.dst_vm.status()

    def _source_can_resume(self, src_state: str) -> bool:
        return False                # libvirt removed the source domain when it completed

    async def _clean_source(self) -> str:
        src = self.src_vm
        try:
            if await src.status() != "absent":     # a shut-off definition goes too
                await src.stop()
                return f"the source domain on {src.host.name} was removed"
            await src.host.run(f"rm -rf {quote(src.paths.dir)}", check=True)
            return f"libvirt had removed the source domain from {src.host.name}"
        except Exception as exc:  # noqa: BLE001 - reported
            return f"SOURCE NOT CLEANED on {src.host.name} ({exc})"

    def _job_succeeded(self) -> bool:
        job = self._job
        return (job is not None and job.done() and not job.cancelled()
                and job.exception() is None)

    async def _gone(self, vm) -> bool:
        """libvirt stops and undefines the source itself once a postcopy completes: after the
        switchover an absent source proves a loss only when the destination's libvirt says
        the postcopy broke."""
        if vm is self.src_vm and self.phase in (Phase.POSTCOPY, Phase.COMPLETED) \
                and self.params.may_postcopy \
                and await self._state_reason(self.dst_vm) not in _POSTCOPY_FAILED:
            return False
        return await super()._gone(vm)

    async def _split_outcome(self) -> str | None:
        """After the switchover, with migrate3 failed and the destination's libvirtd not
        answering, neither a split nor a loss can be told from a completion (its QEMU goes
        on without its libvirtd): UNRESOLVED, nothing destroyed."""
        if self.phase is Phase.POSTCOPY and not self._job_succeeded() \
                and await self._state_reason(self.dst_vm) is None:
            if await self._state_reason(self.src_vm) == (libvirt.VIR_DOMAIN_SHUTOFF,
                                                         libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED):
                # the source's libvirt saw QEMU complete the postcopy (Confirm3 forces
                # success then) and stopped the source: the destination holds it all
                self._set_phase(Phase.COMPLETED)
                notes = await self._clean_source()
                await self._follow_to_destination()
                self._set_phase(Phase.LANDED)
                self.result.status = "failed"
                return (f"the postcopy completed (the source's libvirt on "
                        f"{self.src_vm.host.name} reports its domain shut off as migrated) "
                        f"but the destination's libvirtd on {self.dst_host.name} cannot be "
                        f"asked: the VM runs on {self.dst_host.name}; {notes}")
            self._set_phase(Phase.UNRESOLVED)
            self.result.status = "failed"
            return (f"failed after the postcopy switchover and the destination's libvirtd on "
                    f"{self.dst_host.name} cannot be asked: whether its QEMU completed the "
                    "postcopy is unknown; both sides were kept as they are (migrate-run "
                    "recover resolves it once that libvirtd answers)")
        return await super()._split_outcome()

    async def _finish_postcopy(self) -> bool:
        """After the switchover migrate3 goes on without the controller: stopped on purpose,
        wait for it (bounded by the migration's timeout); if it completed meanwhile, whatever
        the failure, take that. Then verify as after a completion."""
        job = self._job
        if job is None:
            return False
        if not job.done() and self._stop_asked():
            log.warning("[vm=%s %s->%s] stopped after the postcopy switchover, which cannot "
                        "be undone: waiting for libvirt to finish the postcopy",
                        self.src_vm.name, self.src_vm.host.name, self.dst_host.name)
            try:
                await wait_for(asyncio.shield(job), self.params.policy.completion_for(
                    self.src_vm.spec.mem_mib))
            except (TimeoutError, libvirt.libvirtError):
                pass
        if not self._job_succeeded():
            # migrate3 failed, yet libvirt may have completed the postcopy on both sides
            # (a client-side step failed after QEMU finished): the domains tell
            if not (await self._state_reason(self.dst_vm) == (
                    libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED)
                    and await self._ask(self.src_vm) in ("absent", "shutoff")):
                return False
        try:
            self.result.wall_s = time.monotonic() - self._t_migrate
            self._set_phase(Phase.COMPLETED)
            stats = await self._completed_figures()
            if stats is None:
                try:
                    ddom = (job.result() if self._job_succeeded() else None) \
                        or await self.dst_vm.domain()
                    stats = await self.dst_vm.call("completed job stats", ddom.jobStats,
                                                   libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
                except LibvirtError as exc:     # the figures only: the VM is what counts
                    log.info("[vm=%s] no completed job stats: %s", self.src_vm.name, exc)
            self._final_figures(stats or {})
            await self._verify()
            return True
        except Exception as exc:  # noqa: BLE001 - not finished: said so
            log.warning("[vm=%s] postcopy not verified: %s: %s", self.src_vm.name,
                        type(exc).__name__, exc)
            return False

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
                await wait_for(asyncio.shield(self._job), timeouts.migration_cancel_s)
            except (TimeoutError, libvirt.libvirtError):
                pass
        resumed = False
        if self.phase is Phase.POSTCOPY and self._job is not None and self._job.done():
            # the switch is asked for, not known done: a source libvirt resumed never handed
            # the guest over (QEMU had not switched yet, or the destination never started it)
            resumed = await self._ask(self.src_vm) == "running"
            if resumed:
                self.src_vm.console_switchback()
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
                await wait_for(asyncio.shield(self._job), timeouts.migration_cancel_s)
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
            notes += await self._remove_destination_disk()
        except Exception as exc:  # noqa: BLE001 - reported
            notes.append(f"DESTINATION NOT REMOVED ({exc})")
        self._set_phase(Phase.ROLLED_BACK)
        outcome = f"VM running on {src.host.name}; " + ", ".join(notes)
        log.warning("[vm=%s] rolled back (%s): %s", src.name, why, outcome)
        return outcome


__all__ = ["LibvirtMigration"]
