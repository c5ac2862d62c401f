"""``MultihostMigration``: the class scenario authors subclass.

::

    class TestPingPong(MultihostMigration):
        async def migration_scenario(self):
            a, b = self.hosts[0], self.hosts[1]
            await self.migrate_wait(["vm1"], a, b, worker, check_worker)

    await TestPingPong(["hostA", "hostB"], config=config, inventory=inventory).run()

``run()`` prepares what a VM's start needs (hosts connected, run directories claimed, shared
storage proven shared, disk overlays made), runs ``migration_scenario()``, meets at
"all_done", and always cleans up: VMs stopped, overlays removed (unless
``report.keep_disks``), participants ended, run directories removed, SSH closed; also when
the scenario fails and when the task is cancelled (Ctrl-C). The sync (participants started
on every host, all hosts at the "disks_prepared" barrier) starts beside the scenario when
the run's first guest boots, or when something needs it first (a barrier, an exchange, the
scenario's end); every barrier and exchange waits for it, and its failure fails the
instance. A scenario that cuts a host off before either (a fault injected at once) meets
at a barrier first, so that the participants are up.

One ``migrate()`` call (a :class:`MigrationHandle`, awaitable) goes::

    VMs started on src if not running (together) -> worker(mig_data) -> before_migration
    -> migrate_vms_src || migrate_vms_dest      (src: one engine migration per VM, concurrent,
                                                 and post_migration while they are in flight)
    -> check_vms_src, check_vms_dst -> check_worker(mig_data) -> pair barrier
       "migration_finished:<mig_id>"

Failure: the first failing migration of the instance cancels every other migration in flight
(each rolls back to its source). Awaiting a handle raises its error, which is never replaced:
an error from a hook or callback keeps its type and gets a note naming the step, the
migration, the hosts and the VMs. A handle's error that the scenario never awaited fails the
run when the scenario ends.

Plain ``def`` or ``async def``: the scenario, every hook and every callback may be either.
A ``def`` one runs in a worker thread, where the same objects' coroutine methods block
(:mod:`migrator.blocking`): Autotest's ``def worker(mig_data)`` with
``vm.wait_for_login().cmd(...)``, ``mig.join()`` and ``time.sleep()`` run unchanged. In
``async def`` code every call that waits needs ``await``; a ``migrate_wait``, ``join``,
``barrier`` or ``exchange`` that was never awaited fails the run naming its line, and a
blocking call that stalls the event loop is reported naming its line
(``timeouts.loop_stall_warn_s``).

Autotest's constructor ``TestX(test, params, env)`` works in a control file
(:mod:`.controlfile`): such an instance gets Autotest's VM preparation
(:attr:`MultihostMigration.restart_vm_on_source`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from typing import Any, Awaitable, Callable, Mapping, Sequence

from ..aio import first_set, shielded
from ..blocking import BlockingInWorkers, is_async, on_loop, run_in_worker
from ..config import Config, Inventory, load_inventory
from ..errors import ConfigError, MigrationError, ScenarioError
from ..hosts import SSHHost, quote
from ..migration import MigrationParams
from . import hostprep, pools
from .context import InstanceRecord, RunContext
from .data import MigrationData
from .env import Env, instance_env, instance_run_dir, prepare_overlays
from .failures import describe, first_error, first_of
from .handle import MigrationHandle, current_instance, must_await, unawaited
from .params import Params
from .sync import HostsSync

log = logging.getLogger(__name__)

#: a ``def`` or ``async def`` taking the call's MigrationData
Callback = Callable[[MigrationData], Any]

class MultihostMigration(BlockingInWorkers):
    """Base class of scenarios; see the module docstring.

    :param hosts: host names (or :class:`SSHHost` objects), in the order typed; or, in a
        control file, Autotest's ``(test, params, env)`` (:mod:`.controlfile`).
    :param context: the run this instance belongs to; default: a run of its own.
    :param name: the instance's name in reports (e.g. ``pair1``).
    :raise ConfigError: fewer than two hosts, a host twice or unknown, a driver the
        inventory does not offer.
    """

    #: when a ``migrate()`` names a VM that runs on another host than the call's source:
    #: False, the call fails; True, the VM is stopped there and booted afresh on the source
    #: (Autotest's preparation: each migrate() starts from a VM on its source). True for an
    #: instance made by a control file, Autotest's way.
    restart_vm_on_source: bool = False

    def __init__(self, hosts: Sequence[str | SSHHost], *autotest_args: Any,
                 config: Config | None = None, inventory: Inventory | None = None,
                 context: RunContext | None = None, name: str = "main"):
        from .controlfile import ControlTest
        env: Env | None = None
        self._control: ControlTest | None = None
        if isinstance(hosts, ControlTest):              # TestX(test, params, env)
            control = hosts
            env = control.adopt(self, autotest_args)
            hosts, context, name = control.hosts, control.context, control.name
            self._control = control
            self.restart_vm_on_source = True
        elif autotest_args:
            raise ConfigError(f"{type(self).__name__}(hosts, ...): unexpected arguments "
                              f"{autotest_args!r} (Autotest's (test, params, env) form is for "
                              "control files run by migrate-run)")
        self._own_context = context is None
        if context is None:
            context = RunContext(config or Config(), inventory or load_inventory())
        self.context = context
        self.config = context.config
        self.inventory = context.inventory
        self.name = name
        names = [h if isinstance(h, str) else h.name for h in hosts]
        #: the config as Autotest's ``params``: ``self.params.get("hosts")``, dotted keys
        self.params = Params(self.config, names)
        if len(names) < 2:
            raise ConfigError(f"a migration needs at least 2 hosts, got {names}")
        if len(set(names)) != len(names):
            raise ConfigError(f"a host is named twice in {names}")
        for n in names:
            self.inventory.host(n)                      # unknown host: ConfigError, now
        pools.check_pools(self.config, self.inventory)
        hostprep.check_probe_from(self.config, self.inventory)
        if self.config.driver not in self.inventory.drivers:
            raise ConfigError(f"driver {self.config.driver!r}: the inventory's hosts offer "
                              f"{', '.join(self.inventory.drivers)} (a lab runs libvirtd with "
                              "'migrate-lab up --libvirt')")
        own = [n for n in names if self.inventory.host(n).qemu]
        if own and self.config.driver != "qemu":
            raise ConfigError(f"driver {self.config.driver!r}: {', '.join(own)} name their own "
                              "QEMU (the inventory's hosts.X.qemu), which only the qemu driver "
                              "runs (libvirt's domains name their emulator)")
        self.hosts: list[SSHHost] = [
            h if isinstance(h, SSHHost) else SSHHost.from_inventory(h, self.inventory,
                                                                    self.config)
            for h in hosts]
        self.login_timeout = self.config.timeouts.guest_boot_s
        self.run_dir = instance_run_dir(context)
        self.env = env or instance_env(context, name)
        self.env.migrate_hook = self._migrate_vm
        self.sync: HostsSync | None = None
        #: the sync's start (:meth:`_start_sync`), while the instance runs
        self._syncing: asyncio.Task | None = None
        #: something needs the sync (:meth:`_synced`) or the scenario ended: start it
        self._sync_wanted = asyncio.Event()
        #: the hosts' versions probe, started with the hosts' preparation
        self._versions: asyncio.Future | None = None
        self.record = InstanceRecord(name, names)
        self._handles: list[MigrationHandle] = []
        self._tg: asyncio.TaskGroup | None = None
        #: why the scenario is being cancelled, when the instance knows (its sync failed)
        self._interrupt_reason: str | None = None
        self._count = 0
        #: coroutines of calls that must be awaited, with where they were made (only those
        #: of the scenario's own task: see :func:`.handle.must_await`)
        self._must_await: list[tuple[Any, str, str]] = []
        self._scenario_task: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {[h.name for h in self.hosts]}>"

    # -- the scenario --------------------------------------------------------------------------

    async def migration_scenario(self) -> None:
        """What the scenario does. Override it."""
        raise NotImplementedError(f"{type(self).__name__} does not define migration_scenario()")

    # -- hooks (override as needed; each may be a def, run in a worker thread) -----------------

    async def before_migration(self, mig_data: MigrationData) -> None:
        """After the worker, before the migrations start."""

    async def migrate_vms_src(self, mig_data: MigrationData) -> None:
        """Migrate every VM of ``mig_data`` concurrently (and run :meth:`post_migration`
        while they are in flight). The first failure cancels the others."""
        await first_error([*(self._migrate_one(mig_data, vm) for vm in mig_data.vms),
                           self._call(self.post_migration, mig_data, "post_migration")])

    async def migrate_vms_dest(self, mig_data: MigrationData) -> None:
        """Runs on the destination's side while :meth:`migrate_vms_src` runs: fault injection
        goes here (e.g. ``await mig_data.wait_phase(Phase.MIGRATING)``, then block a port)."""

    async def post_migration(self, mig_data: MigrationData) -> None:
        """Runs while the migrations are in flight (change speed or downtime here)."""

    async def check_vms_src(self, mig_data: MigrationData) -> None:
        """After the migrations: nothing of the VMs (:attr:`MigrationData.moved`) is left on
        the source (the run directory of a VM lives exactly as long as the VM on that host,
        whatever the driver)."""
        dirs = " ".join(quote(f"{self.run_dir}/{vm.name}") for vm in mig_data.moved)
        r = await mig_data.src.run(f'for d in {dirs}; do test -e "$d" && echo "$d"; done; true',
                                   check=True)
        if r.stdout.strip():
            raise ScenarioError(f"{mig_data}: the source {mig_data.src.name} still has "
                                f"{r.stdout.split()}")

    async def check_vms_dst(self, mig_data: MigrationData) -> None:
        """After the migrations: each VM (:attr:`MigrationData.moved`) runs on the
        destination and its guest answers."""
        for vm in mig_data.moved:
            if vm.host.name != mig_data.dst.name:
                raise ScenarioError(f"{vm.name} is on {vm.host.name}, not on {mig_data.dst.name}")
            status = await vm.status()
            if status != "running":
                raise ScenarioError(f"{vm.name} on {vm.host.name} is {status!r}, not running")
            await vm.answers(self.login_timeout)

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

    @on_loop
    def migrate(self, vms: Sequence[str] | str, srchost: str | SSHHost, dsthost: str | SSHHost,
                worker: Callback | None = None, check_worker: Callback | None = None,
                params_append: dict[str, Any] | None = None,
                priority: int = 0) -> MigrationHandle:
        """Start migrating ``vms`` from ``srchost`` to ``dsthost`` now; return the handle.
        Beyond the ``queue.*`` limits (migrations at once per source, per destination, per
        cluster, across every run on the hosts) the migration waits (phase QUEUED) and starts
        when a slot frees, higher ``priority`` first, then in order; ``handle.cancel()``
        ends a queued one before it starts.

        :param worker: run on the VMs before the migration (``def`` or ``async def``,
            taking the call's MigrationData); ``check_worker`` after it.
        :param params_append: migration parameters for this call over the run's
            (``{"bandwidth_mibs": 8}``; ``{"policy": {"actions": ["postcopy"]}}`` changes
            only those keys of the run's convergence policy).
        :raise ConfigError: bad VM names, hosts, callbacks or parameters (before anything
            starts).
        """
        names = [vms] if isinstance(vms, str) else list(vms)
        if not names:
            raise ConfigError("migrate() needs at least one VM")
        for what, fn in (("worker", worker), ("check_worker", check_worker)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"migrate({', '.join(names)}): {what} must be a function "
                                  f"(def or async def) or None, not {type(fn).__name__} "
                                  f"{fn!r}")
        if self._tg is None:
            raise ScenarioError("migrate() is for migration_scenario(), inside run()")
        src, dst = self.host(srchost), self.host(dsthost)
        if src is dst:
            raise ConfigError(f"migrate(): source and destination are both {src.name}")
        for n in names:
            self.env.spec(n)
        settings = self.config.migration.model_dump() | (params_append or {})
        if isinstance((params_append or {}).get("policy"), dict):  # over the run's policy
            settings["policy"] = (self.config.migration.policy.model_dump(exclude_unset=True)
                                  | params_append["policy"])
        try:
            params = MigrationParams(**settings)
        except ConfigError as exc:
            raise ConfigError(f"migrate(): bad params_append {params_append}: {exc}") from None
        self._count += 1
        mig_id = f"{self.name}-{self._count}"
        mig_data = MigrationData(names, src, dst, mig_id, params, priority=priority)
        handle = MigrationHandle(mig_data, self)
        self.context.cancellers[mig_id] = handle.cancel     # migrate-run cancel MIG-ID
        handle.task = self._tg.create_task(self._run_handle(handle, worker, check_worker),
                                           name=f"migrate {mig_data}")
        self._handles.append(handle)
        return handle

    @must_await
    async def migrate_wait(self, vms: Sequence[str] | str, srchost: str | SSHHost,
                           dsthost: str | SSHHost, worker: Callback | None = None,
                           check_worker: Callback | None = None,
                           params_append: dict[str, Any] | None = None) -> MigrationData:
        """:meth:`migrate` and wait for it."""
        return await self.migrate(vms, srchost, dsthost, worker, check_worker, params_append)

    @must_await
    async def barrier(self, name: str, hosts: Sequence[str | SSHHost] | None = None,
                      timeout: float | None = None) -> None:
        """All ``hosts`` (default: every host of the instance) meet at barrier ``name``.

        :raise BarrierError: naming the hosts that were missing or lost.
        :raise RuntimeError: outside the instance's run (before ``run()``, after it returned).
        """
        members = [self.host(h) for h in (hosts or self.hosts)]    # (unknown: at once)
        await self._meet(await self._synced(), name, members, timeout)

    async def _meet(self, sync: HostsSync, name: str, members: list[SSHHost],
                    timeout: float | None) -> None:
        """Barrier ``name`` of ``members`` on ``sync``, recorded in the journal."""
        self.context.record("barrier", instance=self.name, name=name,
                            hosts=[h.name for h in members])
        await sync.barrier(name, members, timeout)

    @must_await
    async def exchange(self, name: str, data: Mapping[str | SSHHost, Any],
                       hosts: Sequence[str | SSHHost] | None = None,
                       timeout: float | None = None) -> dict[str, Any]:
        """The sync server's data exchange (Autotest's ``SyncData``): every host of
        ``hosts`` (default: the instance's) arrives at exchange ``name`` through its own
        participant, carrying its piece of ``data`` (``{host: JSON value}``; a host left out
        carries None), and all wait for each other.

        :return: ``{host: value}`` of every member, as the sync server gathered it, in the
            order of ``hosts``.
        :raise ConfigError: ``data`` names a host that is not a member.
        :raise BarrierError: naming the hosts that were missing or lost.
        :raise RuntimeError: outside the instance's run (before ``run()``, after it returned).
        """
        members = [self.host(h) for h in (hosts or self.hosts)]
        pieces = {self.host(h).name: value for h, value in data.items()}
        strangers = sorted(set(pieces) - {m.name for m in members})
        if strangers:
            raise ConfigError(f"exchange {name!r}: data for {', '.join(strangers)}, which "
                              f"is not among its hosts {[m.name for m in members]}")
        sync = await self._synced()
        self.context.record("exchange", instance=self.name, name=name,
                            hosts=[h.name for h in members])
        return await sync.exchange(name, members, pieces, timeout)

    async def host_versions(self) -> dict[str, dict]:
        """Each host's kernel, QEMU (binary, version) and libvirt versions, as the run's
        report has them, once probed (the probe runs beside the hosts' preparation):
        ``{host: {"kernel": ..., "qemu": {"binary": ..., "version": ...}, "libvirt": ...}}``,
        ``{}`` for a host that did not answer it."""
        if self._versions is not None:
            await asyncio.wait([self._versions])    # (not cancelled with this caller)
        return {h.name: self.context.versions.get(h.name, {}) for h in self.hosts}

    # -- run -----------------------------------------------------------------------------------

    def run(self) -> Awaitable[InstanceRecord] | None:
        """Prepare, run the scenario, meet at "all_done", clean up (always): ``await
        mig.run()``.

        In a control file being loaded (Autotest's ``mig.run()`` at its end) this only says
        that the instance is to run, and returns None: ``migrate-run`` runs it.

        :return: (awaited) the instance's record (status ``passed``).
        :raise: (awaited) the scenario's first error, unchanged (with notes naming where it
            happened); ``asyncio.CancelledError`` when cancelled, after cleanup.
        """
        if self._control is not None and self._control.loading:
            self._control.run_asked = True
            return None
        return self._run()

    async def _run(self) -> InstanceRecord:
        async with self.context.loop_watch(self._code_files()), self._libvirt_connections():
            return await self._run_watched()

    def _libvirt_connections(self) -> contextlib.AbstractAsyncContextManager:
        """With the libvirt driver, one connection per host for the whole instance, shared
        by its VMs and migrations (each migration opened one to its destination: an SSH
        handshake per hop), closed when the instance ends."""
        if self.config.driver != "libvirt":
            return contextlib.nullcontext()
        from ..hypervisor.libvirt_pool import shared_connections
        return shared_connections(self.config.timeouts.libvirt_call_s)

    async def _run_watched(self) -> InstanceRecord:
        ctx = self.context
        own_server = not ctx.server_bound
        rec = self.record
        rec.started = time.time()
        t0 = time.monotonic()
        ctx.instances.append(rec)
        if self._own_context and ctx.journal is None:
            ctx.open_journal([h.name for h in self.hosts])
        try:
            await self._prepare_hosts(own_server)
            # the sync (its server served, participants, all hosts at "disks_prepared")
            # starts beside the scenario once its first guest boots (seconds, the
            # controller waiting): its ~0.5 CPU-s on a slow machine are off the path to
            # the guest's start. Whatever needs it waits for it (:meth:`_synced`); its
            # failure fails the instance, the scenario cancelled.
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._syncing = tg.create_task(self._start_sync(), name=f"sync {self.name}")
                tg.create_task(self._scenario(), name=f"scenario {self.name}")
            await self.barrier("all_done")
            rec.status = "passed"
            return rec
        except BaseException as exc:
            # the TaskGroup wraps the scenario's error in a group: raise the error itself
            leaf = first_of(exc) if isinstance(exc, BaseExceptionGroup) else exc
            rec.status = ("interrupted" if isinstance(leaf, (asyncio.CancelledError,
                                                             KeyboardInterrupt)) else "failed")
            rec.error, rec.error_type = describe(leaf), type(leaf).__name__
            self._unhandled(leaf)
            if leaf is exc:
                raise
            raise leaf
        finally:
            self._tg = None
            try:
                # a second Ctrl-C / SIGTERM while cleaning up must not orphan the cleanup
                rec.cleanup_problems = await shielded(self._cleanup(own_server))
            finally:
                self._syncing = None            # barriers after run(): refused by _synced
                rec.duration_s = time.monotonic() - t0
                if self._own_context:
                    ctx.close_journal(rec.cleanup_problems)

    def _code_files(self) -> set[str]:
        """The source files of this scenario's own classes (a blocked loop is reported at
        the line in them)."""
        files = set()
        for cls in type(self).__mro__:
            if cls.__module__.split(".")[0] not in ("migrator", "builtins"):
                try:
                    files.add(inspect.getfile(cls))
                except (TypeError, OSError):
                    pass
        return files

    async def _scenario(self) -> None:
        current_instance.set(self)     # this task's context: its tasks and worker threads
        self._scenario_task = asyncio.current_task()
        try:
            await self._call(self.migration_scenario, None, "migration_scenario")
            self._sync_wanted.set()         # (the instance's end meets at "all_done")
        finally:
            unawaited = self._unawaited()
        if unawaited:
            raise ScenarioError(
                f"[{self.name}] never awaited: {'; '.join(unawaited)}. In an async def "
                "migration_scenario each call that waits needs await (await "
                "self.migrate_wait(...), await handle.join()); or write migration_scenario as "
                "a plain def: it then runs in a worker thread, where these calls block")
        # migrations the scenario started and never awaited still belong to it
        for handle in list(self._handles):
            await handle._done.wait()
        unseen = [h for h in self._handles if h.error is not None and not h.retrieved]
        if unseen:          # the root cause first, not a sibling it cancelled
            raise next((h for h in unseen if not h.collateral), unseen[0]).error

    async def _prepare_hosts(self, own_server: bool) -> None:
        """What a VM's start needs: the sync server's address bound (when the instance
        runs its own: a port in use fails before any host is asked anything), every host
        connected, its guest bridge there, its run directory claimed, the storage what
        ``migration.storage`` says, the address range claimed, the overlays made. The
        hosts' versions (the report's) are probed meanwhile, waited for at cleanup.

        :raise ConfigError: the sync server cannot bind; a bridge, the storage or a pool
            is not what the config says.
        :raise HostError: a host cannot be reached.
        :raise CommandError: a run directory or an overlay cannot be made.
        """
        ctx, cfg = self.context, self.config
        if own_server:
            await ctx.start_server(ctx.sync_bind(self.hosts[0].name),
                                   serve_from=ctx.guest_booting)
        async with asyncio.TaskGroup() as tg:               # connect: errors name the host
            for h in self.hosts:
                tg.create_task(h.connect())
        self._versions = asyncio.ensure_future(hostprep.probe_versions(ctx, self.hosts))
        # the checks and the claim need nothing of each other (each undone by _cleanup)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(hostprep.check_guest_bridges(ctx, self.hosts))
            tg.create_task(hostprep.claim_run_dirs(ctx, self.hosts, self.name, self.run_dir))
            tg.create_task(hostprep.check_storage(ctx, self.hosts, f"{ctx.run_id}.{self.name}",
                                                  bool(self.env.images())))
        self._claim = await pools.claim_range(ctx, self.name, self.hosts[0])
        self.env.use_range(self._claim.range if self._claim else None)
        if self.env.images():
            # on shared storage, all at once; on each host's own, each where its VM starts
            ctx.record("resource", kind="overlays", host=self.hosts[0].name,
                       path=self.env.disk_dir, local=self.env.local_disks)
            if not self.env.local_disks:
                await prepare_overlays(self.hosts[0], self.env, cfg.timeouts.disk_prepare_s)
        ctx.say(f"[{self.name}] hosts {', '.join(h.name for h in self.hosts)} ready "
                f"(sync {ctx.sync_url}, run dir {self.run_dir})")

    async def _start_sync(self) -> None:
        """A sync participant on every host, the controller's client, and all of them at
        barrier "disks_prepared" (:meth:`_synced` waits for this).

        :raise HostError: a participant did not join (e.g. its host cannot reach the sync
            server's address).
        :raise BarrierError: a host did not arrive at "disks_prepared".
        :raise MigratorError: the sync server could not start.
        """
        ctx = self.context
        # begun when a guest of the run boots (the controller waits seconds then) or when
        # something needs it first: a barrier, an exchange, the scenario's end
        await first_set(ctx.guest_booting, self._sync_wanted)
        self.sync = HostsSync(self.hosts, ctx.sync_url, ctx.token,
                              f"{ctx.run_id}.{self.name}", self.config, ctx.server_started)
        try:
            try:
                await self.sync.start()
            except BaseExceptionGroup as group:     # (its TaskGroup's): the error itself, as
                raise first_of(group) from None     # the barrier callers waiting for it expect
            await self._meet(self.sync, "disks_prepared", self.hosts,
                             self.config.timeouts.disk_prepare_s)
        except Exception as exc:
            self._interrupting(f"the sync failed: {describe(exc)}")
            raise

    def _interrupting(self, reason: str) -> None:
        """Say why the scenario is about to be cancelled: the instance's TaskGroup cancels it
        without a reason when the sync fails. The calls in flight then end "cancelled
        (REASON)" and their migrations' records "interrupted: REASON" (also one made before
        the cancellation reaches its call) rather than only that the run was interrupted. Called before the failure leaves the sync's task, so before
        the cancellation."""
        self._interrupt_reason = reason
        for handle in self._handles:
            if not handle.done():
                handle.mig_data._interrupting(reason)

    async def _synced(self) -> HostsSync:
        """The instance's sync, once :meth:`_start_sync` is done.

        :raise: what :meth:`_start_sync` raised (the instance fails with it meanwhile);
            this caller's own cancellation.
        """
        syncing = self._syncing
        if syncing is None:
            raise RuntimeError(f"[{self.name}] barriers and exchanges are for the scenario "
                               "and its callbacks, while the instance runs")
        self._sync_wanted.set()
        await asyncio.wait([syncing])       # (a cancellation of this caller is not the sync's)
        if syncing.cancelled():
            raise asyncio.CancelledError(f"[{self.name}] the sync was cancelled")
        syncing.result()
        assert self.sync is not None
        return self.sync

    async def _cleanup(self, own_server: bool) -> list[str]:
        """Undo everything; return the problems met (never raises)."""
        async def vms_stopped() -> list[str]:
            problems = await hostprep.stop_vms(self.env, self.config)
            return problems + await hostprep.release_range(
                self.context, self.hosts[0], getattr(self, "_claim", None),
                vms_stopped=not problems)

        async def sync_stopped() -> None:
            if self.sync is not None:
                await self.sync.stop()

        async def versions_probed() -> None:
            if self._versions is not None:      # (bounded, never raises: long done, mostly)
                if self.record.status == "interrupted":
                    self._versions.cancel()     # (Ctrl-C: not waited for a slow host)
                await asyncio.wait([self._versions])

        # the participants end while the VMs stop (neither needs the other; both never
        # raise); the hosts are tidied after both (their tmp dirs hold the participants)
        problems, _, _ = await asyncio.gather(vms_stopped(), sync_stopped(),
                                              versions_probed())
        problems += await hostprep.tidy_hosts(
            self.context, self.hosts, self.run_dir,
            self.env.disk_dir if self.env.images() else None)
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
            # booted side by side (the first that fails stops the others), the destination
            # asked meanwhile what the migration will ask it first; only while a guest
            # boots: otherwise the migration asks it itself, in the order it was called
            # (a probe here would reorder calls that queue for a slot)
            ahead = [] if all(self.env.runs_on(n, md.src) for n in md.vm_names) else [
                hostprep.probe_destination(self.env, md.dst, md.vm_names)]
            started = await self._step("starting the VMs", md, first_error([
                *(self.env.ensure_running(n, md.src, self.restart_vm_on_source)
                  for n in md.vm_names), *ahead]))
            md.vms = started[:len(md.vm_names)]
            if worker is not None:
                await self._step("worker", md, self._call(worker, md, "worker"))
            await self._step("before_migration", md,
                             self._call(self.before_migration, md, "before_migration"))
            await self._step("migration", md, first_error([
                self._call(self.migrate_vms_src, md, "migrate_vms_src"),
                self._call(self.migrate_vms_dest, md, "migrate_vms_dest")]))
            # side by side, as Autotest ran them, each on its own host
            await first_error([
                self._step("check_vms_src", md,
                           self._call(self.check_vms_src, md, "check_vms_src")),
                self._step("check_vms_dst", md,
                           self._call(self.check_vms_dst, md, "check_vms_dst"))])
            if check_worker is not None:
                await self._step("check_worker", md, self._call(check_worker, md,
                                                                "check_worker"))
            await self.barrier(f"migration_finished:{md.mig_id}", md.hosts,
                               self.config.migration_finished_for(
                                   max(vm.spec.mem_mib for vm in md.vms)))
            self.context.say(f"[{md.mig_id}] done")
        except asyncio.CancelledError as exc:
            why = exc.args[0] if exc.args else (self._interrupt_reason
                                                 or "the run was interrupted")
            handle.error = ScenarioError(f"{md}: cancelled ({why})")
            raise
        except Exception as exc:  # noqa: BLE001 - kept for the awaiting scenario
            handle.error = exc
            self.context.say(f"[{md.mig_id}] FAILED: {describe(exc)}")
            for other in self._handles if md.stop_asked is None else ():   # asked: not a fault
                if other is not handle and not other.done():
                    other.collateral = True
                    other.cancel(f"sibling migration {md.mig_id} failed")
        finally:
            self.context.cancellers.pop(md.mig_id, None)
            if claimed:
                self.env.release(md.vm_names)
            md._end()
            handle._done.set()

    async def _call(self, fn: Callable, md: MigrationData | None, step: str) -> Any:
        """``fn(md)`` (``fn()`` without ``md``): awaited if it is a coroutine function, else
        run in a worker thread (:func:`migrator.blocking.run_in_worker`)."""
        args = () if md is None else (md,)
        if is_async(fn):
            return await fn(*args)
        where = f"{step} of migration {md}" if md is not None else f"{step} of {self.name}"
        return await run_in_worker(fn, *args, name=where,
                                   grace_s=self.config.timeouts.worker_cancel_s)

    def _unawaited(self) -> list[str]:
        """The calls that had to be awaited and never were (see :mod:`.handle`)."""
        return unawaited(self._must_await)

    async def _migrate_vm(self, vm, dst: str | SSHHost, vm_ports=None):
        """``vm.migrate(dst)``: one VM of the ``migrate()`` call that holds it, now."""
        mig_id = self.env.holder(vm.name)
        handle = next((h for h in self._handles
                       if h.mig_data.mig_id == mig_id and not h.done()), None)
        if handle is None:
            raise ScenarioError(f"vm.migrate(): {vm.name} is in no migrate() call of "
                                f"{self.name} now; vm.migrate() is a step of one (a "
                                f"migrate_vms_src hook): start one with "
                                f"self.migrate([{vm.name!r}], src, dst)")
        md = handle.mig_data
        if self.host(dst).name != md.dst.name:
            raise ConfigError(f"vm.migrate(): {md} goes to {md.dst.name}, not to "
                              f"{self.host(dst).name}")
        if vm_ports and vm_ports.get(vm.name):
            raise ConfigError(f"vm.migrate(): a port for {vm.name} cannot be chosen: the "
                              "destination picks its own when it listens (mig_data.vm_ports "
                              "then shows it)")
        if vm.name in md.migrations:
            raise ScenarioError(f"vm.migrate(): {vm.name} was migrated in {md} already")
        await self._migrate_one(md, vm)
        return md.results[vm.name]

    async def _step(self, step: str, md: MigrationData, aw: Awaitable[Any]) -> Any:
        try:
            return await aw
        except Exception as exc:
            if not isinstance(exc, MigrationError):
                exc.add_note(f"in {step} of migration {md}")
            raise

    async def _migrate_one(self, md: MigrationData, vm) -> None:
        entry = self.inventory.host(md.dst.name)
        await hostprep.migrate_one(self.context, self.name, md, vm,
                                   entry.migration_address or entry.address,
                                   peer=self.env.get_vm, tails=self._tg)

    def _unhandled(self, error: BaseException) -> None:
        """``error`` ended the instance: the migrations whose error it is were not
        handled by the scenario, though it received them (it raised them again)."""
        for handle in self._handles:
            if handle.error is error:
                for rec in self.context.migrations:
                    if rec.mig_id == handle.mig_data.mig_id:
                        rec.handled = False

    def _handled(self, handle: MigrationHandle) -> None:
        """The scenario received ``handle``'s error: its migrations count as expected."""
        for rec in self.context.migrations:
            if rec.mig_id == handle.mig_data.mig_id:
                rec.handled = True
