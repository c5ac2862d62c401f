"""VM groups (LAVA's ``vm_group`` jobs): a host and VMs by role, a test shell per role, the
host waiting for the VMs, a second host shell after the VMs closed, and the multinode API
between them. Run by ``migrate-run JOB.yaml -m HOSTS``.

::

    job_name: vm-groups basic test case
    timeout: 300                       # the whole job, seconds
    vm_group:
      host: {role: host}               # the first host of -m (or on: hostB)
      auto_start_vms: true             # false: the host shell starts them with start-vms
      vms:
        - {role: server}
        - {role: client, count: 2}     # client-1, client-2; any vms.<name> key (mem_mib...)
    actions:                           # in order, per role
      - test_shell: {role: host, commands: ["migrate-sync wait server.ready", wait-vms]}
      - test_shell: {role: server, commands: ["migrate-sync send server.ready=yes"]}
      - test_shell: {role: client, commands: ["migrate-sync wait server.ready"]}
      - migrate: {role: server, to: hostB}
      - test_shell: {role: host, commands: ['test -z "$(ls $MIGRATE_RUN_DIR)"']}

How it runs (LAVA's rules):

* Members: the host (its role's name) and each VM, ``ROLE-N`` (``server-1``, ``client-1``,
  ``client-2``); each member's actions are its role's, in file order (a ``test_shell``
  without ``role`` is every role's).
* ``auto_start_vms: true``: the VMs start at once, in parallel (the run's per-host gates);
  ``false``: when the host's first shell runs ``start-vms`` (which returns once they are up,
  exit 1 if one failed; a second call is a no-op). A VM's actions begin once it is up.
* The host's first shell runs its commands, then the host waits until every VM's actions
  ended (``wait-vms`` in a shell waits for the same, exit 1 when a VM's shell failed). Then
  the VMs are closed (stopped), and the host's later shells run: clean-up checks.
* Shells run each command in turn and go on after one that fails (the shell then fails);
  a ``script`` (a file, relative to the job) runs as one command. ``timeout``: each
  command's, else ``timeouts.guest_cmd_s`` in VMs and no own bound on the host; never past
  the job's ``timeout``.
* The multinode API, the same spelling on the host and in VMs: ``migrate-sync sync NAME``
  (every member), ``migrate-sync send KEY=VALUE``, ``migrate-sync wait KEY``; on the host
  through the run's sync server, in VMs over their serial console (:mod:`..guest.multinode`).
  A member whose actions ended is gone: a ``sync`` waiting for it fails at once, naming it.
* ``migrate: {role, to}``: each VM of the role live-migrates when its actions get there;
  its later shells run where it landed.

Results: one task per shell and migration (``tasks.json``, the task table, JUnit); the job
passes when every one passed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from syncserver.protocol import SyncError
from syncserver.zipapp import build_bytes

from ..aio import shielded
from ..config import VMSettings
from ..errors import ConfigError, HostError, MigratorError
from ..guest import multinode
from ..hosts import Installable, SSHHost, quote
from .context import InstanceRecord, RunContext
from .failures import describe, first_of
from .tasks import CommandResult, ParallelVMTasks, TaskResult

if TYPE_CHECKING:
    from syncserver.client import SyncClient

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HostRole(_Strict):
    role: str = Field(min_length=1)
    on: str | None = None
    device_type: str | None = None           #: LAVA's; accepted, not used


class VMRole(VMSettings):
    role: str = Field(min_length=1)
    count: int = Field(1, ge=1)
    shell_prompt: str | None = None
    launch_with: list[str] = []
    """Commands run on the host before each VM of the role starts (LAVA's; its last command
    there attached the console, which here is QEMU's socket: not needed)."""
    device_type: str | None = None           #: LAVA's; accepted, not used


class Group(_Strict):
    host: HostRole
    auto_start_vms: bool = True
    vms: list[VMRole] = Field(min_length=1)


class GroupJob(_Strict):
    job_name: str | None = None
    timeout: float = Field(3600.0, gt=0)
    logging_level: str | None = None          #: LAVA's; accepted, not used
    vm_group: Group
    actions: list[dict[str, Any]] = Field(min_length=1)


class TestShell(_Strict):
    role: str | None = None
    commands: list[str] | None = None
    script: str | None = None
    timeout: float | None = Field(None, gt=0)


class Migrate(_Strict):
    role: str
    to: str


_VM_ONLY = {"role", "count", "shell_prompt", "device_type", "launch_with"}


def _one_line(exc: pydantic.ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


class VMGroupRun:
    """One VM group job over ``hosts`` (see the module docstring). Everything is checked
    here, before anything starts.

    :raise ConfigError: one line naming the job file and what is wrong.
    """

    def __init__(self, path: Path, data: dict[str, Any], hosts: Sequence[str],
                 ctx: RunContext):
        self.path, self.context, self.config = path, ctx, ctx.config
        where = str(path)
        if "vm_group" in data and isinstance(data["vm_group"], dict) \
                and not isinstance(data["vm_group"].get("host"), dict):
            raise ConfigError(f"{where}: a job needs vm_group.host.role: the host the VMs "
                              "run on")
        try:
            job = GroupJob.model_validate(data)
        except pydantic.ValidationError as exc:
            raise ConfigError(f"{where}: {_one_line(exc)}") from None
        self.job = job
        self.name = job.job_name or path.stem
        hosts = list(hosts)
        group_host = job.vm_group.host.on or hosts[0]
        if group_host not in hosts:
            raise ConfigError(f"{where}: vm_group.host.on {group_host!r} is not a host of -m "
                              f"({', '.join(hosts)})")
        self.group_host = group_host
        self.host_member = job.vm_group.host.role
        # members: the host, then ROLE-N per VM
        self.vm_roles: dict[str, VMRole] = {}
        self.members: dict[str, str] = {self.host_member: self.host_member}
        for role in job.vm_group.vms:
            if role.role == self.host_member:
                raise ConfigError(f"{where}: VM role {role.role!r} is the host's role")
            for i in range(1, role.count + 1):
                name = f"{role.role}-{i}"
                if name in self.members:
                    raise ConfigError(f"{where}: two members are named {name} (roles and "
                                      "counts must give distinct names)")
                self.members[name] = role.role
                self.vm_roles[name] = role
        roles = {self.host_member} | {r.role for r in job.vm_group.vms}
        self.tasks = ParallelVMTasks(hosts, context=ctx, name="group", base_dir=path.parent)
        self.record = self.tasks.record
        self.hosts = self.tasks.hosts
        self.starts: dict[str, TaskResult] = {}
        for vm, role in self.vm_roles.items():
            decl = role.model_dump(exclude=_VM_ONLY, exclude_unset=True)
            if role.shell_prompt:
                decl["login"] = {**(decl.get("login") or {}), "prompt": role.shell_prompt}
            try:
                self.starts[vm] = self.tasks.add("start", {"name": vm, "host": group_host,
                                                           "virt_params": decl})
            except ConfigError as exc:
                raise ConfigError(f"{where}: vm_group.vms ({role.role}): {exc}") from None
        # actions, per member in order
        self.timelines: dict[str, list[TaskResult]] = {vm: [] for vm in self.vm_roles}
        self.host_shells: list[TaskResult] = []
        where_now = {vm: group_host for vm in self.vm_roles}
        for n, action in enumerate(job.actions, 1):
            at = f"{where}: actions[{n}]"
            if not isinstance(action, dict) or len(action) != 1:
                raise ConfigError(f"{at}: an action is a mapping of one of test_shell, migrate")
            ((kind, body),) = action.items()
            if kind == "test_shell":
                shell = self._model(TestShell, body, at)
                if (shell.commands is None) == (shell.script is None):
                    raise ConfigError(f"{at}: test_shell takes commands or script (one)")
                if shell.role is not None and shell.role not in roles:
                    raise ConfigError(f"{at}: unknown role {shell.role!r} (roles: "
                                      f"{', '.join(sorted(roles))})")
                commands = shell.commands or [self._script(shell.script, at)]
                if not commands:
                    raise ConfigError(f"{at}: test_shell has no commands")
                for member, role in self.members.items():
                    if shell.role not in (None, role):
                        continue
                    if member == self.host_member:
                        self.host_shells.append(self._host_shell(len(self.host_shells) + 1,
                                                                 commands, shell.timeout))
                    else:
                        self.timelines[member].append(self._vm_shell(member, commands,
                                                                     shell.timeout, at))
            elif kind == "migrate":
                mig = self._model(Migrate, body, at)
                if mig.role not in roles - {self.host_member}:
                    raise ConfigError(f"{at}: unknown VM role {mig.role!r} (VM roles: "
                                      f"{', '.join(sorted(roles - {self.host_member}))})")
                if mig.to not in hosts:
                    raise ConfigError(f"{at}: migrate to {mig.to!r}, not a host of -m "
                                      f"({', '.join(hosts)})")
                for vm, role in self.vm_roles.items():
                    if role.role != mig.role:
                        continue
                    if where_now[vm] == mig.to:
                        raise ConfigError(f"{at}: {vm} is on {mig.to} by then already")
                    try:
                        self.timelines[vm].append(self.tasks.add("migration", {
                            "name": vm, "host": group_host, "to": mig.to}))
                    except ConfigError as exc:
                        raise ConfigError(f"{at}: {exc}") from None
                    where_now[vm] = mig.to
            elif kind in ("deploy_linaro_image", "deploy", "lava_test_shell"):
                raise ConfigError(f"{at}: {kind}: use vms' image/kernel keys for what to boot "
                                  "and test_shell for tests")
            else:
                raise ConfigError(f"{at}: unknown action {kind!r} (test_shell, migrate)")
        if not self.host_shells and not job.vm_group.auto_start_vms:
            raise ConfigError(f"{where}: auto_start_vms is false and the host has no "
                              "test_shell to run start-vms")
        self._t0 = 0.0
        self._clients: dict[str, SyncClient] = {}
        self._sync_run = f"{ctx.run_id}.group"
        #: migrations a host shell asked for (migrate-vm), in the order asked
        self.asked: list[TaskResult] = []

    # -- loading helpers -------------------------------------------------------------------------

    def _model(self, cls, body: Any, at: str):
        try:
            return cls.model_validate(body if body is not None else {})
        except pydantic.ValidationError as exc:
            raise ConfigError(f"{at}: {_one_line(exc)}") from None

    def _script(self, script: str, at: str) -> str:
        path = Path(script)
        path = path if path.is_absolute() else self.path.parent / path
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not text"
            raise ConfigError(f"{at}: script {path}: {why}") from None

    def _host_shell(self, n: int, commands: list[str], timeout: float | None) -> TaskResult:
        task = TaskResult(0, "test_shell", self.group_host, self.host_member,
                          instance=self.tasks.name)
        task.commands = [CommandResult(i, c, "", timeout or 0.0)
                         for i, c in enumerate(commands, 1)]
        task.spec = {"shell": n}
        return task

    def _vm_shell(self, vm: str, commands: list[str], timeout: float | None,
                  at: str) -> TaskResult:
        t = timeout or self.config.timeouts.guest_cmd_s
        try:
            task = self.tasks.add("cmd", {"name": vm, "host": self.group_host,
                                          "commands": commands, "expects": [""] * len(commands),
                                          "timeouts": [t] * len(commands)})
        except ConfigError as exc:
            raise ConfigError(f"{at}: {exc}") from None
        task.spec["keep_going"] = True              # LAVA: a shell goes on after a failure
        return task

    # -- running --------------------------------------------------------------------------------

    async def execute(self) -> InstanceRecord:
        """Run the job; always clean up. Returns the record (``passed`` when every shell,
        start and migration passed)."""
        ctx = self.context
        self._t0 = time.monotonic()
        try:
            try:
                async with asyncio.timeout(self.job.timeout):
                    await self._run()
            except TimeoutError:
                running = [f"{t.host}/{t.vm} #{t.index} {t.action}" for t in self._all()
                           if t.status == "running"]
                self._expire()
                raise MigratorError(
                    f"job {self.name!r}: its timeout of {self.job.timeout:g} s expired"
                    + (f"; running: {', '.join(running)}" if running else "")) from None
        except (MigratorError, SyncError, BaseExceptionGroup) as exc:
            leaf = first_of(exc) if isinstance(exc, BaseExceptionGroup) else exc
            if isinstance(leaf, (asyncio.CancelledError, KeyboardInterrupt)) or \
                    not isinstance(leaf, (MigratorError, SyncError)):
                raise
            self.record.status, self.record.error = "failed", describe(leaf)
            self.record.error_type = type(leaf).__name__
            ctx.say(f"[{self.name}] FAILED: {describe(leaf)}")
        except asyncio.CancelledError:
            self.record.status = self.record.error = "interrupted"
            raise
        finally:
            try:
                await shielded(self._close_clients())
            finally:
                try:
                    await self.tasks.close()
                finally:
                    self._finalise()
                    self._publish()
        return self.record

    def _all(self) -> list[TaskResult]:
        return [*self.starts.values(), *(t for tl in self.timelines.values() for t in tl),
                *self.asked,
                *self.host_shells]

    def _publish(self) -> None:
        """The job's tasks in the run's report (host shells are not ParallelVMTasks')."""
        last = max(t.index for t in self.tasks.results().all())
        for n, t in enumerate(self.host_shells, 1):
            t.index = last + n
        ctx = self.context
        ctx.tasks[:] = [t for t in ctx.tasks if t.instance != self.tasks.name] + \
            sorted(self._all(), key=lambda t: t.index)
        bad = [t for t in self._all() if t.status != "passed"]
        if self.record.status != "interrupted" and self.record.error is None:
            if bad:
                first = next((t for t in bad if t.status == "failed"), bad[0])
                self.record.status, self.record.error_type = "failed", "TaskFailed"
                self.record.error = (f"{len(bad)} of {len(self._all())} tasks did not pass; "
                                     f"first: {first.error}")
            else:
                self.record.status = "passed"

    def _finalise(self) -> None:
        """Every task ends with one final status, however the job ended."""
        why = self.record.error or "the job ended first"
        for t in self._all():
            if t.status == "pending":
                t.status = "skipped"
                t.error = t.error or f"{t.host}/{t.vm} {t.action}: skipped ({why})"
            elif t.status == "running":
                t.status = "cancelled"
                t.error = t.error or f"{t.host}/{t.vm} {t.action}: cancelled ({why})"
            for c in t.commands:
                if c.status == "running":
                    c.status, c.error = "cancelled", t.error

    def _expire(self) -> None:
        for t in self._all():
            if t.status in ("pending", "running"):
                t.status = "skipped" if t.status == "pending" else "cancelled"
                t.error = t.error or (f"{t.host}/{t.vm} {t.action}: job timeout "
                                      f"{self.job.timeout:g} s expired")

    async def _run(self) -> None:
        ctx = self.context
        host = self.tasks._by_name[self.group_host]
        await self.tasks._prepare()
        if self.group_host in self.tasks._host_errors:
            raise HostError(self.group_host, self.tasks._host_errors[self.group_host])
        started = asyncio.Event()
        start_error: list[str] = []
        controller = await self._client("group-controller", persistent=False)
        bin_dir, env = await self._install_host_bin(host)

        async def start_vms() -> None:
            ready = [t for vm, t in self.starts.items()
                     if await self._launch_with(host, vm, t)]
            await self.tasks.run_tasks(ready)
            bad = [t for t in self.starts.values() if not t.passed]
            if bad:
                start_error.append(f"{len(bad)} VM(s) did not start, first: {bad[0].error}")
            ctx.say(f"[{self.name}] VMs {'started' if not bad else 'NOT all started'}: "
                    f"{', '.join(self.starts)}")
            started.set()
            await controller.send("group.vms-started",
                                  "ok" if not bad else f"failed: {start_error[0]}")

        async def start_when_asked() -> None:
            await controller.wait("group.start-vms", self.job.timeout)
            await start_vms()

        async def timeline(vm: str) -> None:
            tasks = self.timelines[vm]
            try:
                await started.wait()
                if not self.starts[vm].passed:
                    for t in tasks:
                        self.tasks._skip(t, f"{vm} did not start")
                    return
                if tasks:
                    try:
                        await self._attach_multinode(vm)
                    except (MigratorError, SyncError) as exc:
                        why = f"{self.group_host}/{vm}: multinode shim: {describe(exc)}"
                        for t in tasks:
                            t.status, t.error = "failed", why
                        return
                    await self.tasks.run_tasks(tasks)
            finally:
                # its actions ended: it is gone (a sync still waiting for it fails now,
                # naming it); a member that never connected is made gone the same way
                await shielded(self._gone(vm))

        async def first_host_shell() -> None:
            if self.host_shells:
                await self._run_host_shell(host, self.host_shells[0], bin_dir, env)
            await shielded(self._gone(self.host_member))

        async def vms_done(vms: list[asyncio.Task]) -> None:
            """Every VM's actions ended: said to wait-vms (the host's shells)."""
            await asyncio.gather(*vms)
            failed = [t for tl in self.timelines.values() for t in tl if not t.passed]
            await controller.send(
                "group.vms-done", "ok" if not failed and not start_error else
                f"failed: {(failed[0].error if failed else start_error[0])}")

        async def serve_migrate_vm() -> None:
            """``migrate-vm NAME HOST`` from a host shell: request N is key
            ``group.migrate.N`` (``NAME HOST``), answered at ``group.migrated.N``."""
            for n in itertools.count(1):
                asked = await controller.wait(f"group.migrate.{n}", self.job.timeout)
                answer = await self._migrate_asked(str(asked), started)
                await controller.send(f"group.migrated.{n}", answer)

        async with asyncio.TaskGroup() as tg:
            migrations = tg.create_task(serve_migrate_vm(), name="migrate-vm")
            if self.job.vm_group.auto_start_vms:
                tg.create_task(start_vms(), name="start-vms")
            else:
                asker = tg.create_task(start_when_asked(), name="start-vms (asked)")
            shell1 = tg.create_task(first_host_shell(), name="host shell 1")
            vms = [tg.create_task(timeline(vm), name=f"timeline {vm}") for vm in self.timelines]
            tg.create_task(vms_done(vms), name="vms done")
            await shell1
            if not self.job.vm_group.auto_start_vms and not started.is_set():
                asker.cancel()
                why = ("auto_start_vms is false and the host's first shell ended without "
                       f"start-vms: {', '.join(self.starts)} never started")
                for t in self.starts.values():
                    self.tasks._skip(t, why)
                started.set()
                ctx.say(f"[{self.name}] {why}")
            # LAVA: the host's first shell, done, waits until every VM's actions ended
            await asyncio.gather(*vms)
            migrations.cancel()             # no host shell can ask any more
        # the VMs closed; then the host's later shells (clean-up checks)
        problems = await self.tasks.env.stop_all()
        ctx.say(f"[{self.name}] VMs closed" + (f": {'; '.join(problems)}" if problems else ""))
        for shell in self.host_shells[1:]:
            await self._run_host_shell(host, shell, bin_dir, env)

    async def _launch_with(self, host: SSHHost, vm: str, start: TaskResult) -> bool:
        """Run the role's ``launch_with`` commands on the host before ``vm`` starts; False
        (its start failed, naming the command) when one fails."""
        for cmd in self.vm_roles[vm].launch_with:
            try:
                r = await host.run(cmd, timeout=self._left_s(), env={
                    "MIGRATE_VM": vm, "MIGRATE_ROLE": self.members[vm],
                    "MIGRATE_RUN_DIR": self.tasks.run_dir})
                why = None if r.ok else (f"exit status {r.exit_status}: "
                                         f"{(r.stderr or r.stdout).strip()[-200:]}")
            except HostError as exc:
                why = str(exc)
            if why is not None:
                start.status = "failed"
                start.error = f"{host.name}/{vm} start: launch_with {cmd!r}: {why}"
                self.context.say(f"[{self.name}] {start.error}")
                return False
        return True

    async def _migrate_asked(self, asked: str, started: asyncio.Event) -> str:
        """Run one ``migrate-vm NAME HOST``; the answer for the host shell (``ok`` or why
        not)."""
        name, _, to = asked.partition(" ")
        if name not in self.vm_roles:
            return (f"{name!r} is not a VM of this job ({', '.join(self.vm_roles)})")
        if not started.is_set() or not self.starts[name].passed:
            return f"{name} is not running (start-vms first)"
        try:
            task = self.tasks.add("migration", {"name": name, "host": self.group_host,
                                                "to": to.strip()}, at_run_time=True)
        except ConfigError as exc:
            return str(exc)
        self.asked.append(task)
        await self.tasks.run_tasks([task])
        return "ok" if task.passed else f"{task.error}"

    # -- members --------------------------------------------------------------------------------

    async def _client(self, member: str, persistent: bool = True) -> SyncClient:
        await self.context.server_started()
        from syncserver.client import SyncClient      # aiohttp: imported by then
        client = SyncClient(self.context.sync_url, token=self.context.token, member=member,
                            run_id=self._sync_run, persistent=persistent,
                            heartbeat_s=self.config.sync.heartbeat_s,
                            connect_timeout_s=self.config.timeouts.ssh_connect_s)
        await client.connect()
        self._clients[member] = client
        return client

    async def _gone(self, member: str) -> None:
        """``member``'s part has ended: its persistent connection closes (a member that never
        had one connects once), so the sync server counts it as gone."""
        client = self._clients.pop(member, None)
        try:
            if client is None:
                client = await self._client(member)
                self._clients.pop(member, None)
        except (SyncError, OSError) as exc:
            log.warning("[%s] member %s: %s", self.name, member, exc)
            return
        await client.close()

    async def _close_clients(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    def _left_s(self) -> float:
        return max(1.0, self.job.timeout - (time.monotonic() - self._t0))

    async def _handle(self, vm: str, op: str, args: list[str]) -> tuple[bool, str]:
        """A multinode request from VM ``vm``'s console."""
        client = self._clients[vm]
        try:
            if op == "send":
                for pair in args:
                    key, eq, value = pair.partition("=")
                    if not eq:
                        return False, f"migrate-sync: send {pair!r}: KEY=VALUE expected"
                    await client.send(key, value)
                return True, ""
            if op == "wait" and len(args) == 1:
                value = await client.wait(args[0], self._left_s())
                return True, (value if isinstance(value, str) else str(value)) + "\n"
            if op == "sync" and len(args) == 1:
                await client.barrier(f"sync.{args[0]}", list(self.members), self._left_s())
                return True, ""
        except SyncError as exc:
            return False, f"migrate-sync: {exc}"
        return False, f"migrate-sync: usage: sync NAME | send KEY=VALUE... | wait KEY ({op})"

    async def _attach_multinode(self, vm: str) -> None:
        """The shim in VM ``vm``, its console's requests answered as member ``vm``."""
        await self._client(vm)
        guest = self.tasks.guest(self.group_host, vm)
        nonce = multinode.new_nonce()
        await multinode.install(guest, nonce, {
            "MIGRATE_SYNC_MEMBER": vm, "MIGRATE_ROLE": self.members[vm],
            "MIGRATE_SYNC_GROUP": ",".join(self.members)})
        session = await guest._session()

        async def handler(op: str, args: list[str]) -> tuple[bool, str]:
            return await self._handle(vm, op, args)
        multinode.serve(session, nonce, handler)

    # -- the host -------------------------------------------------------------------------------

    async def _install_host_bin(self, host: SSHHost) -> tuple[str, dict[str, str]]:
        """``migrate-sync``, ``start-vms``, ``wait-vms`` in a directory on the host; the
        environment its shells get."""
        pyz = await Installable.get(build_bytes(), name="migrate-sync.pyz").install(host)
        token = await Installable.get(self.context.token.encode(), name="sync-token",
                                      mode=0o600).install(host)
        bin_dir = await host.get_tmp_dir()
        scripts = {
            "migrate-sync": f'exec python3 {quote(pyz)} "$@"\n',
            "start-vms": ('migrate-sync send group.start-vms=1 >/dev/null || exit $?\n'
                          'v=$(migrate-sync wait group.vms-started) || exit $?\n'
                          '[ "$v" = ok ] || { echo "start-vms: $v" >&2; exit 1; }\n'),
            "wait-vms": ('v=$(migrate-sync wait group.vms-done) || exit $?\n'
                         '[ "$v" = ok ] || { echo "wait-vms: $v" >&2; exit 1; }\n'),
            "migrate-vm": (
                '[ $# = 2 ] || { echo "usage: migrate-vm VM HOST" >&2; exit 2; }\n'
                f'seq={quote(bin_dir)}/.seq\n'
                'n=$(flock "$seq.lock" sh -c \'n=$(( $(cat "$1" 2>/dev/null || echo 0) + 1 ))'
                '; echo $n > "$1"; echo $n\' sh "$seq") || exit 3\n'
                'migrate-sync send "group.migrate.$n=$1 $2" >/dev/null || exit $?\n'
                'v=$(migrate-sync wait "group.migrated.$n") || exit $?\n'
                '[ "$v" = ok ] || { echo "migrate-vm: $v" >&2; exit 1; }\n'),
        }
        lines = [f"cat > {quote(bin_dir + '/' + name)} <<'MIGRATOR_EOF'\n#!/bin/sh\n{body}"
                 f"MIGRATOR_EOF\nchmod 755 {quote(bin_dir + '/' + name)}"
                 for name, body in scripts.items()]
        await host.run("\n".join(lines), check=True)
        env = {"MIGRATE_SYNC_URL": self.context.sync_url, "MIGRATE_SYNC_RUN": self._sync_run,
               "MIGRATE_SYNC_MEMBER": self.host_member, "MIGRATE_SYNC_TOKEN_FILE": token,
               "MIGRATE_SYNC_GROUP": ",".join(self.members), "MIGRATE_ROLE": self.host_member,
               "MIGRATE_RUN_DIR": self.tasks.run_dir}
        await self._client(self.host_member)         # the host is a member while shell 1 runs
        return bin_dir, env

    async def _run_host_shell(self, host: SSHHost, task: TaskResult, bin_dir: str,
                              env: dict[str, str]) -> None:
        """One host test shell: each command in turn, going on after a failure."""
        task.status, t0 = "running", time.monotonic()
        task.started_s = t0 - self._t0
        label = f"{host.name}/{self.host_member} shell #{task.spec['shell']}"
        try:
            for c in task.commands:
                left = self._left_s()
                timeout = min(c.timeout_s, left) if c.timeout_s else left
                env_now = {**env, "MIGRATE_SYNC_TIMEOUT": f"{left:.0f}"}
                try:
                    r = await host.run(f'export PATH={quote(bin_dir)}:"$PATH"\n{c.command}',
                                       timeout=timeout, env=env_now)
                except HostError as exc:
                    c.status, c.error = "error", f"{label} cmd #{c.index} {c.command!r}: {exc}"
                    continue
                c.exit_status, c.stdout, c.stderr, c.duration_s = \
                    r.exit_status, r.stdout, r.stderr, r.duration
                last = ((r.stderr or r.stdout).strip().splitlines() or [""])[-1][:100]
                if r.timed_out:
                    c.status = "timed_out"
                    c.error = f"{label} cmd #{c.index} {c.command!r}: timed out ({timeout:g} s)"
                elif r.exit_status != 0:
                    c.status = "failed"
                    c.error = (f"{label} cmd #{c.index} {c.command!r}: exit status "
                               f"{r.exit_status}, last line {last!r}")
                else:
                    c.status = "passed"
        finally:
            task.duration_s = time.monotonic() - t0
            task.output = "".join(c.stdout + c.stderr for c in task.commands)
            failed = [c for c in task.commands if c.status not in ("passed", "skipped")]
            unrun = [c for c in task.commands if c.status == "skipped"]
            if task.status == "running":
                task.status = "failed" if failed else ("cancelled" if unrun else "passed")
            if task.status == "cancelled" and not failed:
                task.error = f"{label}: cancelled (the job ended first)"
            if failed:
                task.error = failed[0].error + (
                    f" (and {len(failed) - 1} more commands did not pass)"
                    if len(failed) > 1 else "")
            self.context.say(f"[{self.name}] {label} {task.status} in {task.duration_s:.1f} s"
                             + (f": {task.error}" if task.error else ""))


def load_group_job(path: Path, data: dict[str, Any], hosts: Sequence[str],
                   ctx: RunContext) -> VMGroupRun:
    """The VM group job of ``path`` over ``hosts``, checked. :raise ConfigError: one line."""
    return VMGroupRun(path, data, hosts, ctx)
