"""Parallel VM tasks (DTS's ``MultipleVM``): start VMs and run commands in them, in parallel
across hosts and VMs, with results by host, VM and action.

::

    from migrator import ParallelVMTasks

    async with ParallelVMTasks(["hostA", "hostB"], max_vm=8) as tasks:
        for dut in range(2):
            tasks.add("start", {"name": "vm0", "dut_id": dut,
                                "virt_params": {"mem": [{"size": 256}], "cpu": [{"number": 1}]}})
            tasks.add("cmd", {"name": "vm0", "dut_id": dut, "commands": ["uname -s"],
                              "expects": ["^Linux$"], "timeouts": [10]})
        results = await tasks.run()
    results["hostB"]["vm0"]["cmd"][0].status        # passed | mismatch | failed | ...

A VM's identity is (host, name): ``vm0`` may run on every host. It keeps the host it was
started on as its identity when it migrates (``tasks.add("migration", {"name": "vm1",
"host": "hostA", "to": "hostB"})``); a name is unique *on a host*, so a migration onto a host
that runs a VM of that name is refused (at ``add`` when the list itself starts it there, at
run time otherwise).

How it runs: the tasks of one VM run in the order added (its ``cmd`` runs as soon as its own
start is done, while other VMs still boot); the VMs' chains run concurrently, bounded by
``max_vm`` (tasks at once over all hosts, DTS's pool size) and by the run's per-host gates
(``limits.vm_launches_per_host``, ``limits.vm_boots_per_host``: :mod:`.gates`). Timeouts are
used as written (DTS raised each by ``max_vm / 2`` s; here the gates bound the load instead).

Outcomes, each task exactly one: ``passed``, ``failed`` (its error names host, VM and, for a
command, the command), ``skipped`` (an earlier task of its VM did not pass, or
``fail_fast`` stopped the run before it), ``cancelled`` (``fail_fast`` stopped it while it
ran). A command's own outcome is ``passed`` (exit 0 and its expect found), ``mismatch``
(exit 0, expect not found), ``failed`` (non-zero exit), ``timed_out`` (interrupted at its
timeout), ``error`` (the console did not answer) or ``skipped`` (an earlier command of the
task did not pass: DTS ends a task at its first failing command).

A failing task never stops unrelated VMs unless ``fail_fast``; an unreachable host fails
its own tasks only. ``run()`` never raises for a task (only for cancellation, after which
the tasks that were running say ``cancelled``); VMs stay up after it (more tasks may be
added and run) until :meth:`ParallelVMTasks.close` (or the ``async with``'s end) stops them
and tidies the hosts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import pydantic

from ..aio import cancel_and_wait, shielded
from ..blocking import BlockingInWorkers
from ..config import Config, Inventory, VMSettings, load_inventory
from ..errors import ConfigError, HostError, MigratorError, ScenarioError
from ..guest.host import GuestHost
from ..hosts import SSHHost
from ..hypervisor.qemu_cpu import process_cpu_s
from ..migration import MigrationParams
from . import hostprep, pools
from .context import InstanceRecord, RunContext
from .data import MigrationData
from .env import instance_env, instance_run_dir
from .failures import describe

log = logging.getLogger(__name__)

ACTIONS = ("start", "cmd", "migration")
_KEYS = {
    "start": {"name", "host", "dut_id", "virt_params", "virt_config"},
    "cmd": {"name", "host", "dut_id", "commands", "expects", "timeouts"},
    "migration": {"name", "host", "dut_id", "to", "to_dut_id"},
}
#: DTS's virt_params sections this translates (``vnc``, ``migration``, ``daemon`` ... are not)
VIRT_SECTIONS = ("qemu", "cpu", "mem", "disk", "login", "device")


# -- results -----------------------------------------------------------------------------------

@dataclass
class CommandResult:
    """One command of a ``cmd`` task."""

    index: int
    command: str
    expect: str
    timeout_s: float
    status: str = "skipped"     #: passed | mismatch | failed | timed_out | error | skipped
    exit_status: int | None = None
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class TaskResult:
    """One added task and what became of it."""

    index: int                  #: its place in the order added (from 1)
    action: str
    host: str                   #: the host the VM was started on (its identity)
    vm: str
    status: str = "pending"     #: passed | failed | skipped | cancelled (pending: not run)
    duration_s: float = 0.0
    output: str = ""
    error: str | None = None    #: one line naming host, VM (and command)
    commands: list[CommandResult] = field(default_factory=list)
    cpu_s: float | None = None  #: start: QEMU's CPU seconds when the shell first answered
    to: str | None = None       #: migration: the destination
    started_s: float | None = None  #: seconds after the run's first task began
    instance: str = "tasks"     #: the ParallelVMTasks' name in the run
    #: what add() got, resolved (virt_params as VMSettings, ...), not reported
    spec: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def label(self) -> str:
        return f"#{self.index} {self.action} {self.host}/{self.vm}"

    @property
    def outputs(self) -> list[str]:
        """DTS's shape: each command's output (stdout, then stderr)."""
        return [c.stdout + c.stderr for c in self.commands] if self.commands else [self.output]

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body.pop("spec")
        return body


class TaskResults(Mapping):
    """``results[host][vm][action]`` -> the list of that VM's tasks of that action."""

    def __init__(self, tasks: Sequence[TaskResult]):
        self._all = list(tasks)
        tree: dict[str, dict[str, dict[str, list[TaskResult]]]] = {}
        for t in self._all:
            tree.setdefault(t.host, {}).setdefault(t.vm, {}).setdefault(t.action, []).append(t)
        self._tree = tree

    def __getitem__(self, host: str) -> dict[str, dict[str, list[TaskResult]]]:
        return self._tree[host]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tree)

    def __len__(self) -> int:
        return len(self._tree)

    @property
    def ok(self) -> bool:
        """Every task passed."""
        return all(t.passed for t in self._all)

    def all(self) -> list[TaskResult]:
        """Every task, in the order added."""
        return list(self._all)

    def by_status(self) -> dict[str, list[TaskResult]]:
        """``{"passed": [...], "failed": [...], "skipped": [...], ...}``."""
        out: dict[str, list[TaskResult]] = {}
        for t in self._all:
            out.setdefault(t.status, []).append(t)
        return out

    def by_dut(self) -> dict[str, list[dict[str, Any]]]:
        """DTS's ``get_parallel_result`` shape: per host, one entry per task with
        ``name``, ``action``, ``status`` and ``outputs``."""
        out: dict[str, list[dict[str, Any]]] = {}
        for t in self._all:
            out.setdefault(t.host, []).append({"name": t.vm, "action": t.action,
                                               "status": t.status, "outputs": t.outputs})
        return out

    def table(self) -> str:
        rows = [("task", "host", "vm", "action", "status", "time", "error")]
        for t in self._all:
            rows.append((str(t.index), t.host, t.vm,
                         t.action + (f"->{t.to}" if t.to else ""), t.status,
                         f"{t.duration_s:.1f} s", t.error or ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(line.rstrip() for line in lines)

    def to_json(self) -> list[dict[str, Any]]:
        return [t.to_json() for t in self._all]


# -- virt_params -------------------------------------------------------------------------------

def _section(params: dict, key: str, where: str) -> list[dict]:
    """A DTS section: a list of dicts (``[{"path": ...}]``) or one dict."""
    value = params[key]
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"{where}: virt_params.{key} must be a mapping or a list of "
                          f"mappings, not {value!r}")
    return items


def _one(params: dict, key: str, where: str, allowed: set[str]) -> dict:
    items = _section(params, key, where)
    if len(items) != 1:
        raise ConfigError(f"{where}: virt_params.{key} takes one entry, got {len(items)}")
    unknown = set(items[0]) - allowed
    if unknown:
        raise ConfigError(f"{where}: virt_params.{key}: unknown key(s) "
                          f"{', '.join(sorted(unknown))} (known: {', '.join(sorted(allowed))})")
    return items[0]


def virt_settings(params: dict, base: VMSettings | None, driver: str,
                  where: str) -> VMSettings:
    """DTS's ``virt_params`` as migrator's :class:`VMSettings`, over ``base`` (the VM's
    declaration under ``vms``, if any). Keys of ``vms.<name>`` (``mem_mib``, ``kernel``...)
    are taken as they are, next to DTS's sections.

    :raise ConfigError: an unknown section or key, a value of the wrong kind, a ``device``
        under libvirt, more than one disk.
    """
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: virt_params must be a mapping, not {params!r}")
    fields = set(VMSettings.model_fields)
    unknown = set(params) - set(VIRT_SECTIONS) - fields
    if unknown:
        raise ConfigError(f"{where}: virt_params: unknown section(s) "
                          f"{', '.join(sorted(unknown))} (known: "
                          f"{', '.join(VIRT_SECTIONS)}, or a vms.<name> key)")
    out: dict[str, Any] = base.model_dump(exclude_unset=True) if base else {}
    out.update({k: v for k, v in params.items() if k in fields})
    if "qemu" in params and not isinstance(params["qemu"], str):
        out["qemu"] = _one(params, "qemu", where, {"path"}).get("path")
    if "cpu" in params:
        cpu = _one(params, "cpu", where, {"model", "number", "cpupin"})
        if cpu.get("model"):
            out["cpu_model"] = str(cpu["model"])
        if cpu.get("number") not in (None, ""):
            out["vcpus"] = _int(cpu["number"], where, "cpu.number")
        if cpu.get("cpupin") not in (None, ""):
            out["cpu_affinity"] = ",".join(str(cpu["cpupin"]).split())
    if "mem" in params:
        mem = _one(params, "mem", where, {"size", "hugepage"})
        if mem.get("size") not in (None, ""):
            out["mem_mib"] = _int(mem["size"], where, "mem.size")
        if "hugepage" in mem:
            out["hugepages"] = str(mem["hugepage"]).lower() in ("yes", "true", "1", "on")
    if "disk" in params:
        disk = _one(params, "disk", where, {"file"})
        if disk.get("file"):
            out["image"] = disk["file"]
    if "login" in params:
        login = _one(params, "login", where, {"user", "password", "prompt"})
        out["login"] = {k: v for k, v in login.items() if v is not None}
    if "device" in params:
        if driver == "libvirt":
            raise ConfigError(f"{where}: virt_params.device: extra QEMU devices are not "
                              "supported by the libvirt driver")
        extra = list(out.get("extra_args") or [])
        for dev in _section(params, "device", where):
            if not dev.get("driver"):
                raise ConfigError(f"{where}: virt_params.device: each device needs a driver")
            opts = [str(dev["driver"])] + [
                f"{k[len('opt_'):]}={v}" for k, v in dev.items()
                if k.startswith("opt_") and v not in (None, "")]
            bad = set(dev) - {"driver"} - {k for k in dev if k.startswith("opt_")}
            if bad:
                raise ConfigError(f"{where}: virt_params.device: unknown key(s) "
                                  f"{', '.join(sorted(bad))} (driver, opt_NAME)")
            extra += ["-device", ",".join(opts)]
        out["extra_args"] = extra
    try:
        return VMSettings(**out)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{where}: virt_params: {loc}: {err['msg']}") from None


def _int(value: Any, where: str, key: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: virt_params.{key} must be a number, not {value!r}") \
            from None


def read_virt_config(path: str | Path, where: str) -> dict:
    """A ``virt_config`` file: a YAML mapping in the ``vms.<name>`` vocabulary (or DTS's
    sections). :raise ConfigError: unreadable, not YAML, not a mapping."""
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{where}: virt_config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: virt_config {path} is not YAML: "
                          f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: virt_config {path} must hold a mapping")
    return data


# -- the tasks ---------------------------------------------------------------------------------

class ParallelVMTasks(BlockingInWorkers):
    """DTS's ``MultipleVM`` over migrator's hosts; see the module docstring.

    :param hosts: host names (or :class:`SSHHost` objects); ``dut_id`` is an index into them.
    :param max_vm: tasks running at once over all hosts (None: only the per-host gates bound).
    :param fail_fast: the first task that does not pass stops every other (running ones
        ``cancelled``, later ones ``skipped``).
    :param context: the run it belongs to (default: a run of its own, with a journal).
    :param base_dir: where relative ``virt_config`` paths start (a task file's directory).
    :raise ConfigError: no host, a host twice or unknown, ``max_vm`` < 1.
    """

    def __init__(self, hosts: Sequence[str | SSHHost], max_vm: int | None = None, *,
                 fail_fast: bool = False, config: Config | None = None,
                 inventory: Inventory | None = None, context: RunContext | None = None,
                 name: str = "tasks", base_dir: str | Path | None = None):
        self._own_context = context is None
        if context is None:
            context = RunContext(config or Config(), inventory or load_inventory())
        self.context, self.config, self.inventory = context, context.config, context.inventory
        self.name = name
        names = [h if isinstance(h, str) else h.name for h in hosts]
        if not names:
            raise ConfigError("ParallelVMTasks needs at least one host")
        if len(set(names)) != len(names):
            raise ConfigError(f"a host is named twice in {names}")
        for n in names:
            self.inventory.host(n)                       # unknown host: ConfigError, now
        pools.check_pools(self.config, self.inventory)
        hostprep.check_probe_from(self.config, self.inventory)
        if max_vm is not None and (not isinstance(max_vm, int) or max_vm < 1):
            raise ConfigError(f"max_vm must be a whole number >= 1, not {max_vm!r}")
        self.max_vm, self.fail_fast = max_vm, fail_fast
        self.base_dir = Path(base_dir) if base_dir else Path.cwd()
        self.hosts: list[SSHHost] = [
            h if isinstance(h, SSHHost) else SSHHost.from_inventory(h, self.inventory,
                                                                    self.config)
            for h in hosts]
        self._by_name = {h.name: h for h in self.hosts}
        self.run_dir = instance_run_dir(context)
        self.env = instance_env(context, name, per_host=True)
        self.record = InstanceRecord(name, names)
        self._tasks: list[TaskResult] = []
        #: what the list does to placements, in add order: (host, name) -> key, key -> host
        self._plan_place: dict[tuple[str, str], str] = {}
        self._plan_where: dict[str, str] = {}
        self._host_errors: dict[str, str] = {}
        self._prepared = False
        self._closed = False
        self._abort: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._running = 0                       # run_tasks() calls in progress
        self._preparing: asyncio.Lock | None = None
        self._stop_reason: str | None = None
        self._t0: float | None = None
        self._guests: dict[str, GuestHost] = {}
        self._migrating: dict[str, asyncio.Lock] = {}
        self._migrations = itertools.count(1)
        #: task index -> the MigrationData of its migration in flight (told why when
        #: fail_fast stops it)
        self._moving: dict[int, MigrationData] = {}

    def __repr__(self) -> str:
        return f"<ParallelVMTasks {self.name} {[h.name for h in self.hosts]}>"

    async def __aenter__(self) -> "ParallelVMTasks":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- adding --------------------------------------------------------------------------------

    def _host_of(self, config: dict, where: str, host_key: str = "host",
                 dut_key: str = "dut_id") -> str:
        host, dut = config.get(host_key), config.get(dut_key)
        names = [h.name for h in self.hosts]
        if dut is not None:
            if not isinstance(dut, int) or isinstance(dut, bool) or not 0 <= dut < len(names):
                raise ConfigError(f"{where}: {dut_key} {dut!r} is not a host index "
                                  f"(0..{len(names) - 1}: {', '.join(names)})")
            if host is not None and host != names[dut]:
                raise ConfigError(f"{where}: {host_key} {host!r} and {dut_key} {dut} "
                                  f"({names[dut]}) disagree")
            return names[dut]
        if host is None:
            raise ConfigError(f"{where}: say which host: {host_key} (a name) or {dut_key} "
                              "(an index)")
        if host not in names:
            raise ConfigError(f"{where}: {host_key} {host!r} is not a host of this run "
                              f"({', '.join(names)})")
        return host

    def add(self, action: str, config: dict[str, Any], *,
            at_run_time: bool = False) -> TaskResult:
        """Add a task (checked now; run by the next :meth:`run`). Returns its result
        record (status ``pending`` until it runs).

        * ``start``: ``{"name", "host" | "dut_id", "virt_params": {...} | "virt_config":
          FILE}`` (neither: the VM's ``vms.<name>`` declaration, or a default lab guest);
        * ``cmd``: ``{"name", "host" | "dut_id", "commands": [...], "expects": [...],
          "timeouts": [...]}`` (equal lengths; an expect is a regular expression searched in
          the output, ``""`` expects nothing; timeouts in seconds);
        * ``migration``: ``{"name", "host" | "dut_id", "to" | "to_dut_id"}``.

        :param at_run_time: checked against where the VMs run now, not against where the
            tasks added so far will have put them (a migration asked for while tasks run).
        :raise ConfigError: one line naming the task: unknown action or key, bad host,
            a second start of one VM, a ``cmd`` or ``migration`` of a VM not started,
            unequal lists, a bad expect or timeout, bad ``virt_params``, an unreadable
            ``virt_config``, a migration onto a host that runs a VM of that name.
        """
        index = len(self._tasks) + 1
        where = f"task #{index} {action}"
        if action not in ACTIONS:
            raise ConfigError(f"{where}: unknown action {action!r} (known: "
                              f"{', '.join(ACTIONS)})")
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: its settings must be a mapping, not {config!r}")
        unknown = set(config) - _KEYS[action]
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(sorted(_KEYS[action]))})")
        name = config.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: name (the VM's) is required")
        host = self._host_of(config, where)
        key = self.env.key(name, host)
        where = f"task #{index} {action} {key}"
        task = TaskResult(index, action, host, name, instance=self.name)
        if action == "start":
            self._check_start(task, config, where, key)
        elif key not in self._plan_where and key not in self.env._vms:
            raise ConfigError(f"{where}: {name} is never started on {host} (add a start "
                              "task for it first)")
        if action == "cmd":
            self._check_cmd(task, config, where)
        elif action == "migration":
            self._check_migration(task, config, where, key, at_run_time)
        self._tasks.append(task)
        return task

    def _check_start(self, task: TaskResult, config: dict, where: str, key: str) -> None:
        if key in self._plan_where or key in self.env._vms:
            raise ConfigError(f"{where}: {task.vm} is started on {task.host} already (a VM "
                              "is one (host, name); one start each)")
        if "virt_params" in config and "virt_config" in config:
            raise ConfigError(f"{where}: virt_params or virt_config, not both")
        params = config.get("virt_params")
        if "virt_config" in config:
            path = Path(str(config["virt_config"]))
            params = read_virt_config(path if path.is_absolute() else self.base_dir / path,
                                      where)
        base = self.config.vms.get(task.vm)
        decl = virt_settings(params, base, self.config.driver, where) \
            if params is not None else base
        try:
            self.env.spec(task.vm, key, decl)       # bootable, as far as can be told here
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        holder = self._plan_place.get((task.host, task.vm))
        if holder is not None:
            raise ConfigError(f"{where}: {task.host} runs {holder} there by then; a VM name "
                              "is unique on its host")
        self._plan_place[(task.host, task.vm)] = key
        self._plan_where[key] = task.host
        task.spec = {"decl": decl}

    def _check_cmd(self, task: TaskResult, config: dict, where: str) -> None:
        lists = {}
        for k in ("commands", "expects", "timeouts"):
            value = config.get(k)
            if value is None:
                raise ConfigError(f"{where}: {k} is required (a list)")
            lists[k] = list(value) if isinstance(value, (list, tuple)) else [value]
        counts = {k: len(v) for k, v in lists.items()}
        if len(set(counts.values())) != 1:
            raise ConfigError(f"{where}: {counts['commands']} commands, {counts['expects']} "
                              f"expects, {counts['timeouts']} timeouts: the lists must be of "
                              'equal length ("" expects nothing)')
        if not counts["commands"]:
            raise ConfigError(f"{where}: no commands")
        for i, (cmd, exp, to) in enumerate(zip(*lists.values()), 1):
            if not isinstance(cmd, str) or not cmd.strip():
                raise ConfigError(f"{where}: command {i} must be a non-empty string")
            if not isinstance(exp, str):
                raise ConfigError(f"{where}: expect {i} must be a string (\"\" expects "
                                  f"nothing), not {exp!r}")
            try:
                re.compile(exp)
            except re.error as exc:
                raise ConfigError(f"{where}: expect {i} {exp!r} is not a regular "
                                  f"expression: {exc}") from None
            if isinstance(to, bool) or not isinstance(to, (int, float)) or to <= 0:
                raise ConfigError(f"{where}: timeout {i} must be a number of seconds > 0, "
                                  f"not {to!r}")
        task.commands = [CommandResult(i, c, e, float(t)) for i, (c, e, t) in
                         enumerate(zip(*lists.values()), 1)]

    def _check_migration(self, task: TaskResult, config: dict, where: str, key: str,
                         at_run_time: bool = False) -> None:
        dst = self._host_of(config, where, "to", "to_dut_id")
        if at_run_time and key in self.env._vms:
            now = self.env._vms[key].host.name
            holder = self.env._placed.get((dst, task.vm))
            if holder is not None and holder != key:
                raise ConfigError(f"{where}: cannot migrate to {dst}: {dst} runs a VM named "
                                  f"{task.vm} ({holder}); a VM name is unique on its host")
            if dst == now:
                raise ConfigError(f"{where}: {task.vm} runs on {dst} already")
            task.to = dst
            task.spec = {"params": MigrationParams(**self.config.migration.model_dump())}
            return
        now = self._plan_where.get(key) or self.env.get_vm(task.vm, task.host).host.name
        if dst == now:
            raise ConfigError(f"{where}: {task.vm} is on {dst} by then already")
        holder = self._plan_place.get((dst, task.vm))
        if holder is not None and holder != key:
            raise ConfigError(f"{where}: cannot migrate to {dst}: {dst} runs a VM named "
                              f"{task.vm} ({holder}) by then; a VM name is unique on its "
                              f"host (its run dir, its libvirt domain)")
        self._plan_place.pop((now, task.vm), None)
        self._plan_place[(dst, task.vm)] = key
        self._plan_where[key] = dst
        task.to = dst
        try:
            task.spec = {"params": MigrationParams(**self.config.migration.model_dump())}
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    # -- running -------------------------------------------------------------------------------

    async def run(self) -> TaskResults:
        """Run every task not run yet; return all results (:meth:`results`).

        :raise asyncio.CancelledError: cancelled (the running tasks say ``cancelled``; VMs
            stay until :meth:`close`).
        :raise ScenarioError: called after :meth:`close`.
        """
        await self.run_tasks([t for t in self._tasks if t.status == "pending"])
        return self.results()

    async def run_tasks(self, tasks: Sequence[TaskResult]) -> None:
        """Run these added tasks (those still pending), as :meth:`run` runs all: one chain
        per VM, the chains concurrently. Several calls may run at once (a VM group runs each
        VM's timeline with one).

        :raise asyncio.CancelledError: cancelled (running tasks say ``cancelled``).
        :raise ScenarioError: called after :meth:`close`.
        """
        if self._closed:
            raise ScenarioError(f"{self.name}: run() after close()")
        pending = [t for t in tasks if t.status == "pending"]
        if not pending:
            return
        if self._t0 is None:
            self._t0 = time.monotonic()
            self.record.started = time.time()
            if self.record not in self.context.instances:
                self.context.instances.append(self.record)
        await self._prepare()
        if self._abort is None or not self._running:
            self._abort, self._stop_reason = asyncio.Event(), None
        if self._slots is None and self.max_vm:
            self._slots = asyncio.Semaphore(self.max_vm)
        slots = self._slots
        chains: dict[str, list[TaskResult]] = {}
        for t in pending:
            chains.setdefault(self.env.key(t.vm, t.host), []).append(t)
        self._running += 1
        try:
            async with asyncio.TaskGroup() as tg:
                for key, chain in chains.items():
                    tg.create_task(self._chain(chain, slots), name=f"tasks {key}")
        finally:
            self._running -= 1
            self._conclude()

    def results(self) -> TaskResults:
        """Every task's result so far, by host, VM and action."""
        return TaskResults(self._tasks)

    def vm(self, host: str, name: str):
        """The VM object of ``name`` started on ``host`` (it follows its VM).

        :raise ScenarioError: no such VM started."""
        return self.env.get_vm(name, host)

    def guest(self, host: str, name: str) -> GuestHost:
        """That VM's guest as a host (:class:`~migrator.guest.host.GuestHost`)."""
        key = self.env.key(name, host)
        if key not in self._guests:
            self._guests[key] = GuestHost(self.vm(host, name))
        return self._guests[key]

    async def close(self) -> None:
        """Stop every VM, tidy the hosts (run dirs, overlays), close connections. Safe more
        than once; runs to its end even when cancelled (then delivers the cancellation)."""
        if self._closed:
            return
        self._closed = True
        if self._prepared:
            problems = await shielded(self._cleanup())
            self.record.cleanup_problems = problems
        else:
            await shielded(asyncio.gather(*(h.close() for h in self.hosts)))
        self.record.duration_s = time.monotonic() - self._t0 if self._t0 else 0.0
        if self._own_context:
            self.context.close_journal(self.record.cleanup_problems)

    async def execute(self) -> InstanceRecord:
        """Run the tasks and close: how ``migrate-run`` runs a task list. Returns the
        record (status ``passed`` when every task passed)."""
        try:
            await self.run()
        except asyncio.CancelledError:
            self.record.status = "interrupted"
            self.record.error = "interrupted"
            raise
        finally:
            await self.close()
        return self.record

    # -- inside --------------------------------------------------------------------------------

    async def _prepare(self) -> None:
        """Once: connect every host (an unreachable one fails only its tasks), the journal
        (own run), run dirs claimed, shared storage proven when a VM boots from an image."""
        if self._preparing is None:
            self._preparing = asyncio.Lock()
        async with self._preparing:             # concurrent run_tasks(): prepared once
            if not self._prepared:
                self._prepared = True           # close() tidies whatever was begun
                await self._prepare_once()

    async def _prepare_once(self) -> None:
        ctx = self.context
        if self._own_context and ctx.journal is None:
            ctx.open_journal([h.name for h in self.hosts])

        async def connect(h: SSHHost) -> None:
            try:
                await h.connect()
            except HostError as exc:
                self._host_errors[h.name] = describe(exc)
        await asyncio.gather(*(connect(h) for h in self.hosts))
        up = [h for h in self.hosts if h.name not in self._host_errors]
        if not up:
            return
        # the hosts' versions (the report's) probed beside the checks and claims (it never
        # raises, bounded): awaited with them
        versions = asyncio.ensure_future(hostprep.probe_versions(ctx, up))
        try:
            await hostprep.check_guest_bridges(
                ctx, up, [t.spec["decl"] for t in self._tasks if t.spec.get("decl")])
            await hostprep.claim_run_dirs(ctx, up, self.name, self.run_dir, per_host=True)
            images = any(t.spec.get("decl") is not None and t.spec["decl"].image
                         for t in self._tasks)
            await hostprep.check_storage(ctx, up, f"{ctx.run_id}.{self.name}", images)
            self._claim = await pools.claim_range(ctx, self.name, up[0])
            self.env.use_range(self._claim.range if self._claim else None)
        except MigratorError as exc:
            for h in up:
                self._host_errors.setdefault(h.name, describe(exc))
        except BaseException:
            versions.cancel()           # interrupted: a slow host's probe is not waited for
            raise
        finally:
            try:
                await asyncio.wait([versions])      # (bounded, never raises)
            finally:
                if not versions.done():             # interrupted while waiting for it
                    await cancel_and_wait(versions)

    async def _cleanup(self) -> list[str]:
        problems = await hostprep.stop_vms(self.env, self.config)
        problems += await hostprep.release_range(
            self.context, next((h for h in self.hosts if h.connected), None),
            getattr(self, "_claim", None), vms_stopped=not problems)
        images = any(t.spec.get("decl") is not None and t.spec["decl"].image
                     for t in self._tasks)
        # every host reached (preparation may have failed after claiming its run dir)
        problems += await hostprep.tidy_hosts(
            self.context, [h for h in self.hosts if h.connected],
            self.run_dir, self.env.disk_dir if images else None)
        await asyncio.gather(*(h.close() for h in self.hosts))
        for p in problems:
            log.warning("[%s] cleanup: %s", self.name, p)
        return problems

    async def _chain(self, tasks: list[TaskResult], slots: asyncio.Semaphore | None) -> None:
        """One VM's tasks, in order: each records its outcome, none raises."""
        blocked: str | None = None
        for i, task in enumerate(tasks):
            if self._stop_reason:
                self._skip(task, self._stop_reason)
                continue
            if blocked:
                self._skip(task, blocked)
                continue
            if slots is not None:
                async with slots:
                    await self._guarded(task)
            else:
                await self._guarded(task)
            if not task.passed:
                blocked = f"{task.label} {task.status}"
                if self.fail_fast and not self._stop_reason and task.status != "cancelled":
                    self._stop_reason = f"fail_fast: {task.label} did not pass first"
                    self.context.say(f"[{self.name}] {self._stop_reason}: stopping the others")
                    self._abort.set()

    def _skip(self, task: TaskResult, why: str) -> None:
        task.status = "skipped"
        task.error = f"{task.host}/{task.vm} {task.action}: skipped ({why})"

    async def _guarded(self, task: TaskResult) -> None:
        """Run ``task``; it ends ``cancelled`` when ``fail_fast`` stops the run meanwhile.
        A cancellation of :meth:`run` itself is delivered after the task's record says so."""
        if self._stop_reason:
            self._skip(task, self._stop_reason)
            return
        host_error = self._host_errors.get(task.host) or (
            self._host_errors.get(task.to) if task.to else None)
        task.status = "running"
        task.started_s = time.monotonic() - self._t0
        t0 = time.monotonic()
        self.context.record("task", instance=self.name, index=task.index,
                            action=task.action, host=task.host, vm=task.vm, to=task.to,
                            state="running")
        work = asyncio.create_task(self._perform(task, host_error), name=task.label)
        abort = asyncio.create_task(self._abort.wait())
        try:
            await asyncio.wait({work, abort}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.status, task.error = "cancelled", f"{task.label}: cancelled (run interrupted)"
            raise
        finally:
            abort.cancel()
            if not work.done():
                if self._stop_reason and task.index in self._moving:
                    # its migration's record says why, not only that it was interrupted
                    self._moving[task.index]._interrupting(self._stop_reason)
                work.cancel()
                await asyncio.wait({work})
            task.duration_s = time.monotonic() - t0
            if work.cancelled() and task.status == "running":
                task.status = "cancelled"
                task.error = (f"{task.host}/{task.vm} {task.action}: cancelled "
                              f"({self._stop_reason or 'run interrupted'})")
            if work.cancelled():        # (run() itself cancelled: its command too)
                for c in task.commands:
                    if c.status == "running":
                        c.status, c.error = "cancelled", task.error
            elif not work.cancelled() and work.exception() is not None:
                exc = work.exception()
                task.status = "failed"
                task.error = f"{task.host}/{task.vm} {task.action}: {describe(exc)}"
            self.context.record("task", instance=self.name, index=task.index,
                                action=task.action, host=task.host, vm=task.vm,
                                state=task.status, error=task.error)
            level = "" if task.passed else f": {task.error}"
            self.context.say(f"[{self.name}] {task.label}{'->' + task.to if task.to else ''} "
                             f"{task.status} in {task.duration_s:.1f} s{level}")

    async def _perform(self, task: TaskResult, host_error: str | None) -> None:
        """The task's work; sets ``status`` (an exception it raises is recorded as
        ``failed`` by :meth:`_guarded`)."""
        if host_error:
            raise HostError(task.to if task.to and task.to in self._host_errors
                            else task.host, f"unreachable: {host_error}")
        if task.action == "start":
            await self._start(task)
        elif task.action == "cmd":
            await self._cmd(task)
        else:
            await self._migrate(task)

    async def _start(self, task: TaskResult) -> None:
        host = self._by_name[task.host]
        vm = await self.env.ensure_running(task.vm, host, decl=task.spec.get("decl"))
        task.cpu_s = await process_cpu_s(host, vm.pid) if vm.pid else None
        task.output = f"{task.vm} on {task.host}: QEMU pid {vm.pid}, its shell answers"
        task.status = "passed"

    async def _cmd(self, task: TaskResult) -> None:
        guest = self.guest(task.host, task.vm)
        where = f"{task.host}/{task.vm}"
        if guest.vm.host.name != task.host:
            where += f" (now on {guest.vm.host.name})"
        for c in task.commands:
            c.status = "running"
            try:
                r = await guest.run(c.command, timeout=c.timeout_s)
            except MigratorError as exc:
                c.status, c.error = "error", f"{where} cmd #{c.index} {c.command!r}: {exc}"
                break
            c.exit_status, c.stdout, c.stderr = r.exit_status, r.stdout, r.stderr
            c.duration_s = r.duration
            out = r.stdout + r.stderr
            last = (out.strip().splitlines() or [""])[-1][:80]
            if r.timed_out:
                c.status = "timed_out"
                c.error = (f"{where} cmd #{c.index} {c.command!r}: still running after "
                           f"{c.timeout_s:g} s (interrupted)")
            elif r.exit_status != 0:
                c.status = "failed"
                c.error = (f"{where} cmd #{c.index} {c.command!r}: exit status "
                           f"{r.exit_status}, last line {last!r}")
            elif c.expect and not re.search(c.expect, out, re.M):
                c.status = "mismatch"
                c.error = (f"{where} cmd #{c.index} {c.command!r}: /{c.expect}/ not in its "
                           f"output (exit 0, last line {last!r})")
            else:
                c.status = "passed"
            if not c.passed and not task.spec.get("keep_going"):
                break
        for c in task.commands:
            if c.status in ("skipped", "running"):
                c.status = "skipped"
        task.output = "".join(c.stdout + c.stderr for c in task.commands)
        bad = next((c for c in task.commands if c.status not in ("passed", "skipped")), None)
        if task.spec.get("keep_going") and bad is not None:
            failed = [c for c in task.commands if c.status not in ("passed", "skipped")]
            if len(failed) > 1:
                bad = CommandResult(bad.index, bad.command, bad.expect, bad.timeout_s,
                                    bad.status, error=f"{bad.error} (and {len(failed) - 1} "
                                    "more commands did not pass)")
        if bad is None:
            task.status = "passed"
        else:
            task.status, task.error = "failed", bad.error

    async def _migrate(self, task: TaskResult) -> None:
        key = self.env.key(task.vm, task.host)
        lock = self._migrating.setdefault(key, asyncio.Lock())
        async with lock:                                # one migration of a VM at a time
            await self._migrate_now(task, key)

    async def _migrate_now(self, task: TaskResult, key: str) -> None:
        vm = self.env.get_vm(task.vm, task.host)
        src, dst = vm.host, self._by_name[task.to]
        if src.name == dst.name:                        # (an earlier migration rolled back)
            raise ScenarioError(f"{key}: runs on {dst.name} already: nothing to migrate")
        self.env.place(dst.name, vm.name, key)          # ScenarioError: the name is taken
        mig_id = f"{self.name}-m{next(self._migrations)}"
        md = MigrationData([vm.name], src, dst, mig_id, task.spec["params"])
        md.vms = [vm]
        entry = self.inventory.host(dst.name)
        self._moving[task.index] = md
        try:
            result = await hostprep.migrate_one(self.context, self.name, md, vm,
                                                entry.migration_address or entry.address, key,
                                                peer=self.env.get_vm)
        finally:
            for h in (src.name, dst.name):              # the name is held where it runs
                if h != vm.host.name:
                    self.env.unplace(h, vm.name, key)
            md._end()
            del self._moving[task.index]
        task.output = (f"{key} {src.name}->{dst.name}: {result.status} in "
                       f"{(result.total_time_ms or 0) / 1000:.1f} s")
        task.status = "passed"

    def _conclude(self) -> None:
        """The run's record from the tasks: passed when all passed."""
        bad = [t for t in self._tasks if t.status not in ("passed", "pending")]
        self.context.tasks[:] = [t for t in self.context.tasks if t not in self._tasks] \
            + [t for t in self._tasks if t.status != "pending"]
        if bad:
            first = next((t for t in bad if t.status == "failed"), bad[0])
            self.record.status = "failed"
            self.record.error_type = "TaskFailed"
            self.record.error = (f"{len(bad)} of {len(self._tasks)} tasks did not pass; "
                                 f"first: {first.error}")
        else:
            self.record.status, self.record.error = "passed", None
