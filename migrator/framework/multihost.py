"""``MultihostMigration``: the class scenario authors subclass.

::

    class TestPingPong(MultihostMigration):
        async def migration_scenario(self):
            a, b = self.hosts[0], self.hosts[1]
            await self.migrate_wait(["vm1"], a, b, worker, check_worker)

    await TestPingPong(["hostA", "hostB"], config=config, inventory=inventory).run()

``run()`` prepares (hosts connected, shared storage proven shared, disk overlays made, sync
participants started on every host, all hosts at the "disks_prepared" barrier), runs
``migration_scenario()``, meets at "all_done", and always cleans up: VMs stopped, overlays
removed (unless ``report.keep_disks``), participants ended, run directories removed, SSH
closed; also when the scenario fails and when the task is cancelled (Ctrl-C).

One ``migrate()`` call (a :class:`MigrationHandle`, awaitable) goes::

    VMs started on src if not running -> worker(mig_data) -> before_migration
    -> migrate_vms_src || migrate_vms_dest      (src: one engine migration per VM, concurrent,
                                                 and post_migration while they are in flight)
    -> check_vms_src, check_vms_dst -> check_worker(mig_data) -> pair barrier
       "migration_finished:<mig_id>"

Failure: the first failing migration of the instance cancels every other migration in flight
(each rolls back to its source). Awaiting a handle raises its error, which is never replaced:
an error from a hook or callback keeps its type and gets a note naming the step, the
migration, the hosts and the VMs. A handle's error that the scenario never awaited fails the
run when the scenario ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any, Awaitable, Callable, Sequence

from ..aio import shielded
from ..config import Config, Inventory, load_inventory
from ..errors import ConfigError, HostError, MigrationError, ScenarioError
from ..hosts import SSHHost, quote
from ..migration import BaseMigration, MigrationParams, Phase, make_migration
from .context import InstanceRecord, MigrationRecord, RunContext, local_address_towards
from .data import MigrationData
from .env import Env, prepare_overlays
from .journal import controller_identity, owner_file
from .sync import HostsSync

log = logging.getLogger(__name__)

Callback = Callable[[MigrationData], Awaitable[Any]]


class MigrationHandle:
    """A started ``migrate()`` call. ``await handle`` returns its :class:`MigrationData`
    or raises its error."""

    def __init__(self, mig_data: MigrationData, owner: "MultihostMigration"):
        self.mig_data = mig_data
        self._owner = owner
        self.error: BaseException | None = None
        self.retrieved = False
        #: cancelled because a sibling failed (not a root cause)
        self.collateral = False
        self._done = asyncio.Event()
        self.task: asyncio.Task | None = None

    def __repr__(self) -> str:
        state = "running" if not self._done.is_set() else ("failed" if self.error else "done")
        return f"<MigrationHandle {self.mig_data} {state}>"

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self, reason: str) -> None:
        """Cancel its migrations (they roll back) and mark the call failed with ``reason``."""
        if not self.done():
            self.mig_data.cancel(reason)
            if not self.mig_data.migrations and self.task is not None:
                self.task.cancel(reason)

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self) -> MigrationData:
        await self._done.wait()
        self.retrieved = True
        if self.error is not None:
            self._owner._handled(self)
            raise self.error
        return self.mig_data


class MultihostMigration:
    """Base class of scenarios; see the module docstring.

    :param hosts: host names (or :class:`SSHHost` objects), in the order typed.
    :param context: the run this instance belongs to; default: a run of its own.
    :param name: the instance's name in reports (e.g. ``pair1``).
    """

    def __init__(self, hosts: Sequence[str | SSHHost], *, config: Config | None = None,
                 inventory: Inventory | None = None, context: RunContext | None = None,
                 name: str = "main"):
        self._own_context = context is None
        if context is None:
            context = RunContext(config or Config(), inventory or load_inventory())
        self.context = context
        self.params: Config = context.config
        self.config = self.params
        self.inventory = context.inventory
        self.name = name
        names = [h if isinstance(h, str) else h.name for h in hosts]
        if len(names) < 2:
            raise ConfigError(f"a migration needs at least 2 hosts, got {names}")
        if len(set(names)) != len(names):
            raise ConfigError(f"a host is named twice in {names}")
        for n in names:
            self.inventory.host(n)                      # unknown host: ConfigError, now
        if self.config.driver not in self.inventory.drivers:
            raise ConfigError(f"driver {self.config.driver!r}: the inventory's hosts offer "
                              f"{', '.join(self.inventory.drivers)} (a lab runs libvirtd with "
                              "'migrate-lab up --libvirt')")
        self.hosts: list[SSHHost] = [
            h if isinstance(h, SSHHost) else SSHHost.from_inventory(h, self.inventory,
                                                                    self.config)
            for h in hosts]
        self.login_timeout = self.config.timeouts.guest_boot_s
        self.run_dir = f"{self.inventory.run_dir}/{context.run_id}"
        shared = self.inventory.shared_dir
        self.env = Env(self.config, self.inventory, self.run_dir,
                       f"{shared}/migrator-runs/{context.run_id}/{name}" if shared else None,
                       record=lambda event, **fields: context.record(event, instance=name,
                                                                     **fields))
        self.sync: HostsSync | None = None
        self.record = InstanceRecord(name, names)
        self._handles: list[MigrationHandle] = []
        self._tg: asyncio.TaskGroup | None = None
        self._count = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {[h.name for h in self.hosts]}>"

    # -- the scenario --------------------------------------------------------------------------

    async def migration_scenario(self) -> None:
        """What the scenario does. Override it."""
        raise NotImplementedError(f"{type(self).__name__} does not define migration_scenario()")

    # -- hooks (override as needed) ------------------------------------------------------------

    async def before_migration(self, mig_data: MigrationData) -> None:
        """After the worker, before the migrations start."""

    async def migrate_vms_src(self, mig_data: MigrationData) -> None:
        """Migrate every VM of ``mig_data`` concurrently (and run :meth:`post_migration`
        while they are in flight). The first failure cancels the others."""
        await first_error([*(self._migrate_one(mig_data, vm) for vm in mig_data.vms),
                           self.post_migration(mig_data)])

    async def migrate_vms_dest(self, mig_data: MigrationData) -> None:
        """Runs on the destination's side while :meth:`migrate_vms_src` runs: fault injection
        goes here (e.g. ``await mig_data.wait_phase(Phase.MIGRATING)``, then block a port)."""

    async def post_migration(self, mig_data: MigrationData) -> None:
        """Runs while the migrations are in flight (change speed or downtime here)."""

    async def check_vms_src(self, mig_data: MigrationData) -> None:
        """After the migrations: nothing of the VMs is left on the source (the run directory
        of a VM lives exactly as long as the VM on that host, whatever the driver)."""
        dirs = " ".join(quote(f"{self.run_dir}/{n}") for n in mig_data.vm_names)
        r = await mig_data.src.run(f'for d in {dirs}; do test -e "$d" && echo "$d"; done; true',
                                   check=True)
        if r.stdout.strip():
            raise ScenarioError(f"{mig_data}: the source {mig_data.src.name} still has "
                                f"{r.stdout.split()}")

    async def check_vms_dst(self, mig_data: MigrationData) -> None:
        """After the migrations: each VM runs on the destination and its guest answers."""
        for vm in mig_data.vms:
            if vm.host.name != mig_data.dst.name:
                raise ScenarioError(f"{vm.name} is on {vm.host.name}, not on {mig_data.dst.name}")
            status = await vm.status()
            if status != "running":
                raise ScenarioError(f"{vm.name} on {vm.host.name} is {status!r}, not running")
            session = await vm.wait_for_login(self.login_timeout)
            await session.cmd("true")

    # -- API for scenarios ---------------------------------------------------------------------

    def host(self, host: str | SSHHost) -> SSHHost:
        """The host object of ``host`` (a name or a host object of this instance).

        :raise ConfigError: not a host of this instance.
        """
        name = host if isinstance(host, str) else host.name
        for h in self.hosts:
            if h.name == name:
                return h
        raise ConfigError(f"{name!r} is not a host of {self.name} "
                          f"({', '.join(h.name for h in self.hosts)})")

    def migrate(self, vms: Sequence[str] | str, srchost: str | SSHHost, dsthost: str | SSHHost,
                worker: Callback | None = None, check_worker: Callback | None = None,
                params_append: dict[str, Any] | None = None) -> MigrationHandle:
        """Start migrating ``vms`` from ``srchost`` to ``dsthost`` now; return the handle.

        :param params_append: migration parameters for this call over the run's
            (``{"bandwidth_mibs": 8}``).
        :raise ConfigError: bad VM names, hosts or parameters (before anything starts).
        """
        if self._tg is None:
            raise ScenarioError("migrate() is for migration_scenario(), inside run()")
        names = [vms] if isinstance(vms, str) else list(vms)
        if not names:
            raise ConfigError("migrate() needs at least one VM")
        src, dst = self.host(srchost), self.host(dsthost)
        if src is dst:
            raise ConfigError(f"migrate(): source and destination are both {src.name}")
        for n in names:
            self.env.spec(n)
        settings = self.config.migration.model_dump() | (params_append or {})
        try:
            params = MigrationParams(**settings)
        except ConfigError as exc:
            raise ConfigError(f"migrate(): bad params_append {params_append}: {exc}") from None
        self._count += 1
        mig_id = f"{self.name}-{self._count}"
        mig_data = MigrationData(names, src, dst, mig_id, params)
        handle = MigrationHandle(mig_data, self)
        handle.task = self._tg.create_task(self._run_handle(handle, worker, check_worker),
                                           name=f"migrate {mig_data}")
        self._handles.append(handle)
        return handle

    async def migrate_wait(self, vms: Sequence[str] | str, srchost: str | SSHHost,
                           dsthost: str | SSHHost, worker: Callback | None = None,
                           check_worker: Callback | None = None,
                           params_append: dict[str, Any] | None = None) -> MigrationData:
        """:meth:`migrate` and wait for it."""
        return await self.migrate(vms, srchost, dsthost, worker, check_worker, params_append)

    async def barrier(self, name: str, hosts: Sequence[str | SSHHost] | None = None,
                      timeout: float | None = None) -> None:
        """All ``hosts`` (default: every host of the instance) meet at barrier ``name``.

        :raise BarrierError: naming the hosts that were missing or lost.
        """
        members = [self.host(h) for h in (hosts or self.hosts)]
        self.context.record("barrier", instance=self.name, name=name,
                            hosts=[h.name for h in members])
        await self.sync.barrier(name, members, timeout)

    # -- run -----------------------------------------------------------------------------------

    async def run(self) -> InstanceRecord:
        """Prepare, run the scenario, meet at "all_done", clean up (always).

        :return: the instance's record (status ``passed``).
        :raise: the scenario's first error, unchanged (with notes naming where it happened);
            ``asyncio.CancelledError`` when cancelled, after cleanup.
        """
        ctx = self.context
        own_server = ctx.server is None
        rec = self.record
        rec.started = time.time()
        t0 = time.monotonic()
        ctx.instances.append(rec)
        if self._own_context and ctx.journal is None:
            ctx.open_journal([h.name for h in self.hosts])
        try:
            await self._prepare(own_server)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._scenario(), name=f"scenario {self.name}")
            await self.barrier("all_done")
            rec.status = "passed"
            return rec
        except BaseException as exc:
            # the TaskGroup wraps the scenario's error in a group: raise the error itself
            leaf = _first_of(exc) if isinstance(exc, BaseExceptionGroup) else exc
            rec.status = ("interrupted" if isinstance(leaf, (asyncio.CancelledError,
                                                             KeyboardInterrupt)) else "failed")
            rec.error, rec.error_type = _describe(leaf), type(leaf).__name__
            if leaf is exc:
                raise
            raise leaf
        finally:
            self._tg = None
            try:
                # a second Ctrl-C / SIGTERM while cleaning up must not orphan the cleanup
                rec.cleanup_problems = await shielded(self._cleanup(own_server))
            finally:
                rec.duration_s = time.monotonic() - t0
                if self._own_context:
                    ctx.close_journal(rec.cleanup_problems)

    async def _scenario(self) -> None:
        await self.migration_scenario()
        # migrations the scenario started and never awaited still belong to it
        for handle in list(self._handles):
            await handle._done.wait()
        unseen = [h for h in self._handles if h.error is not None and not h.retrieved]
        if unseen:          # the root cause first, not a sibling it cancelled
            raise next((h for h in unseen if not h.collateral), unseen[0]).error

    async def _prepare(self, own_server: bool) -> None:
        ctx, cfg = self.context, self.config
        timeouts = cfg.timeouts
        async with asyncio.TaskGroup() as tg:               # connect: errors name the host
            for h in self.hosts:
                tg.create_task(h.connect())
        await self._claim_run_dirs()
        await self._check_shared_storage()
        if self.env.images():
            ctx.record("resource", kind="overlays", host=self.hosts[0].name,
                       path=self.env.disk_dir)
            await prepare_overlays(self.hosts[0], self.env, timeouts.disk_prepare_s)
        if own_server:
            first = self.inventory.host(self.hosts[0].name)
            bind = cfg.sync.bind or local_address_towards(first.address,
                                                          (first.ssh or self.inventory.ssh).port)
            await ctx.start_server(bind)
        self.sync = HostsSync(self.hosts, ctx.sync_url, ctx.token,
                              f"{ctx.run_id}.{self.name}", cfg)
        await self.sync.start()
        await self.barrier("disks_prepared", timeout=timeouts.disk_prepare_s)
        ctx.say(f"[{self.name}] hosts {', '.join(h.name for h in self.hosts)} ready "
                f"(sync {ctx.sync_url}, run dir {self.run_dir})")

    async def _claim_run_dirs(self) -> None:
        """``<run_dir>/<run-id>.owner.json`` on every host, naming the run and its
        controller: the hosts' own copy of whose VMs they hold (see :mod:`.journal`)."""
        ctx = self.context
        owner = json.dumps({"run_id": ctx.run_id, "instance": self.name,
                            "hosts": [h.name for h in self.hosts],
                            "driver": self.config.driver,
                            "controller": controller_identity(),
                            "journal": str(ctx.journal.path) if ctx.journal else None,
                            "state_dir": str(self.config.journal.state_dir)})
        ctx.record("instance", instance=self.name, hosts=[h.name for h in self.hosts])
        for h in self.hosts:
            ctx.record("resource", kind="run_dir", host=h.name, path=self.run_dir)
        path = owner_file(str(self.inventory.run_dir), ctx.run_id)
        await asyncio.gather(*(h.run(f"mkdir -p {quote(str(self.inventory.run_dir))} && cat > "
                                     f"{quote(path)}", stdin=owner,
                                     check=True, timeout=self.config.timeouts.host_cleanup_s)
                               for h in self.hosts))

    async def _check_shared_storage(self) -> None:
        """A token written on the first host must be readable on every host.

        :raise ConfigError: shared storage missing (when VMs need it) or not shared.
        """
        shared = self.inventory.shared_dir
        if shared is None:
            if self.env.images():
                raise ConfigError("VMs with images need the inventory's shared_dir")
            return
        token = f"{self.context.run_id}.{self.name}"
        probe = f"{shared}/.migrator-probe-{token}"
        first = self.hosts[0]
        r = await first.run(f"printf %s {quote(token)} > {quote(probe)}")
        if not r.ok:
            raise ConfigError(f"shared storage {shared} is not writable on {first.name}: "
                              f"{r.stderr.strip()}")
        try:
            reads = await asyncio.gather(*(h.run(f"cat {quote(probe)}") for h in self.hosts))
            bad = [h.name for h, r in zip(self.hosts, reads) if r.stdout != token]
            if bad:
                raise ConfigError(f"shared storage {shared} is not shared: a file written on "
                                  f"{first.name} is not seen on {', '.join(bad)}")
        finally:
            await first.run(f"rm -f {quote(probe)}")

    async def _cleanup(self, own_server: bool) -> list[str]:
        """Undo everything; return the problems met (never raises)."""
        problems: list[str] = []
        limit = self.config.timeouts.host_cleanup_s + self.config.timeouts.qemu_stop_s
        try:
            async with asyncio.timeout(limit):
                problems += await self.env.stop_all()
        except TimeoutError:
            problems.append(f"stopping the VMs took over {limit:g} s")
        if self.sync is not None:
            await self.sync.stop()
        disk_dir = self.env.disk_dir if self.env.images() else None
        keep = self.config.report.keep_disks

        owner = owner_file(str(self.inventory.run_dir), self.context.run_id)

        async def tidy(h: SSHHost, first: bool) -> None:
            cmd = f"rm -rf {quote(self.run_dir)} {quote(owner)}"
            if first and disk_dir and not keep:      # and the run's dir once it is empty
                cmd += (f" {quote(disk_dir)}; rmdir --ignore-fail-on-non-empty "
                        f"{quote(os.path.dirname(disk_dir))}")
            try:
                r = await h.run(cmd, timeout=self.config.timeouts.host_cleanup_s)
                if not r.ok:
                    problems.append(f"{h.name}: {cmd!r} failed: {r.stderr.strip()}")
            except HostError as exc:
                problems.append(f"{h.name}: not cleaned up ({exc.message})")
            await h.close()
        await asyncio.gather(*(tidy(h, i == 0) for i, h in enumerate(self.hosts)))
        if own_server:
            await self.context.stop_server()
        for p in problems:
            log.warning("[%s] cleanup: %s", self.name, p)
        return problems

    # -- one migrate() call ---------------------------------------------------------------------

    async def _run_handle(self, handle: MigrationHandle, worker: Callback | None,
                          check_worker: Callback | None) -> None:
        md = handle.mig_data
        claimed = False
        try:
            self.env.claim(md.vm_names, md.mig_id)
            claimed = True
            self.context.say(f"[{md.mig_id}] {','.join(md.vm_names)}: {md.src.name} -> "
                             f"{md.dst.name}")
            md.vms = [await self._step("starting the VMs", md,
                                       self.env.ensure_running(n, md.src))
                      for n in md.vm_names]
            if worker is not None:
                await self._step("worker", md, worker(md))
            await self._step("before_migration", md, self.before_migration(md))
            await self._step("migration", md, first_error([self.migrate_vms_src(md),
                                                           self.migrate_vms_dest(md)]))
            await self._step("check_vms_src", md, self.check_vms_src(md))
            await self._step("check_vms_dst", md, self.check_vms_dst(md))
            if check_worker is not None:
                await self._step("check_worker", md, check_worker(md))
            await self.barrier(f"migration_finished:{md.mig_id}", md.hosts,
                               self.config.timeouts.migration_finished_for(
                                   max(vm.spec.mem_mib for vm in md.vms)))
            self.context.say(f"[{md.mig_id}] done")
        except asyncio.CancelledError as exc:
            why = exc.args[0] if exc.args else "the run was interrupted"
            handle.error = ScenarioError(f"{md}: cancelled ({why})")
            raise
        except Exception as exc:  # noqa: BLE001 - kept for the awaiting scenario
            handle.error = exc
            self.context.say(f"[{md.mig_id}] FAILED: {_describe(exc)}")
            for other in self._handles:
                if other is not handle and not other.done():
                    other.collateral = True
                    other.cancel(f"sibling migration {md.mig_id} failed")
        finally:
            if claimed:
                self.env.release(md.vm_names)
            md._end()
            handle._done.set()

    async def _step(self, step: str, md: MigrationData, aw: Awaitable[Any]) -> Any:
        try:
            return await aw
        except Exception as exc:
            if not isinstance(exc, MigrationError):
                exc.add_note(f"in {step} of migration {md}")
            raise

    async def _migrate_one(self, md: MigrationData, vm) -> None:
        entry = self.inventory.host(md.dst.name)
        mig = make_migration(vm, md.dst, entry.migration_address or entry.address, md.params,
                             self.config)
        md._track(mig)
        reporter = _Progress(self.context, md, mig)

        def journal(m: BaseMigration, phase: Phase) -> None:   # before the step it names
            extra = {"port": m.result.port} if phase is Phase.LISTENING else {}
            self.context.record("phase", instance=self.name, mig_id=md.mig_id, vm=vm.name,
                                src=md.src.name, dst=md.dst.name, phase=phase.value, **extra)
        mig.observers += [journal, reporter.on_phase]
        try:
            async with asyncio.TaskGroup() as tg:
                shower = tg.create_task(reporter.follow())
                try:
                    result = await mig.run()
                finally:
                    shower.cancel()
            md.results[vm.name] = result
        finally:
            r = mig.result
            md.results.setdefault(vm.name, r)
            self.context.migrations.append(MigrationRecord(
                self.name, md.mig_id, vm.name, md.src.name, md.dst.name, r.status, r.error,
                r.to_json()))

    def _handled(self, handle: MigrationHandle) -> None:
        """The scenario received ``handle``'s error: its migrations count as expected."""
        for rec in self.context.migrations:
            if rec.mig_id == handle.mig_data.mig_id:
                rec.handled = True


class _Progress:
    """Progress lines for one migration: every phase, and a progress line at most every
    ``report.progress_interval_s``."""

    def __init__(self, ctx: RunContext, md: MigrationData, mig: BaseMigration):
        self.ctx, self.md, self.mig = ctx, md, mig
        self.tag = f"[{md.mig_id} {mig.src_vm.name} {md.src.name}->{md.dst.name}]"

    def on_phase(self, mig: BaseMigration, phase: Phase) -> None:
        extra = ""
        if phase is Phase.LISTENING:
            extra = f" port {mig.result.port}"
        self.ctx.say(f"{self.tag} {phase.value}{extra}")

    async def follow(self) -> None:
        interval = self.ctx.config.report.progress_interval_s
        last = 0.0
        async for r in self.mig.progress():
            if r.t - last >= interval and r.status == "active":
                last = r.t
                self.ctx.say(f"{self.tag}   {r.t:6.2f} s iteration {r.iteration:<3} sent "
                             f"{r.transferred / 2**20:7.1f} MiB remaining "
                             f"{r.remaining / 2**20:6.1f} MiB {r.mbps:7.0f} Mbit/s"
                             + (f" throttle {r.cpu_throttle}%" if r.cpu_throttle else ""))


async def first_error(aws: Sequence[Awaitable[Any]]) -> list[Any]:
    """Run ``aws`` concurrently in a task group; the first failure cancels the rest and is
    raised as itself (not as an ExceptionGroup); later failures are added as notes."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_as_coro(aw)) for aw in aws]
    except BaseExceptionGroup as eg:
        raise _first_of(eg) from None
    return [t.result() for t in tasks]


async def _as_coro(aw: Awaitable[Any]) -> Any:
    return await aw


def _first_of(eg: BaseExceptionGroup) -> BaseException:
    leaves = _leaves(eg)
    first = leaves[0]
    for other in leaves[1:]:
        first.add_note(f"also failed: {type(other).__name__}: {other}")
    return first


def _leaves(eg: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


def _describe(exc: BaseException) -> str:
    notes = getattr(exc, "__notes__", None) or []
    text = str(exc) or type(exc).__name__
    return "; ".join([f"{type(exc).__name__}: {text}" if not isinstance(exc, MigrationError)
                      else text, *notes])
