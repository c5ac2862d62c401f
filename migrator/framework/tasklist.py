"""A task list in YAML: :class:`~.tasks.ParallelVMTasks` run by ``migrate-run FILE -m HOSTS``.

::

    max_vm: 8                   # tasks at once over all hosts (default: no bound of its own)
    fail_fast: false
    tasks:                      # add()'s dicts, one action each, in order
      - start: {name: [vm0, vm1], host: all}
      - cmd: {name: vm0, host: all, commands: ["uname -s"], expects: ["^Linux$"],
              timeouts: [10]}
      - migration: {name: vm1, dut_id: 0, to_dut_id: 1}

``name``, ``host`` and ``dut_id`` may be lists (and ``host: all``): one task per (host, name),
hosts outermost. ``virt_config`` paths are relative to the file. Everything is checked when
the file is loaded: a bad task is one line naming its place in the file, before anything
starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from ..errors import ConfigError
from .context import RunContext
from .tasks import ACTIONS, ParallelVMTasks

_TOP = {"max_vm", "fail_fast", "tasks", "name"}


def read_yaml_plan(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``. :raise ConfigError: unreadable, not YAML, not a
    mapping."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a YAML file to run is a mapping: a task list ('tasks') "
                          "or a VM group job ('vm_group')")
    return data


def load_task_list(path: Path, hosts: Sequence[str], ctx: RunContext,
                   data: dict[str, Any] | None = None) -> ParallelVMTasks:
    """The tasks of ``path`` over ``hosts``, every one added (so checked).

    :raise ConfigError: one line naming the file and the task.
    """
    data = read_yaml_plan(path) if data is None else data
    unknown = set(data) - _TOP
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (a task "
                          f"list has {', '.join(sorted(_TOP))})")
    entries = data.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: 'tasks' must be a non-empty list")
    max_vm, fail_fast = data.get("max_vm"), data.get("fail_fast", False)
    if not isinstance(fail_fast, bool):
        raise ConfigError(f"{path}: fail_fast must be true or false, not {fail_fast!r}")
    try:
        tasks = ParallelVMTasks(list(hosts), max_vm, fail_fast=fail_fast, context=ctx,
                                name=str(data.get("name") or "tasks"), base_dir=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for n, entry in enumerate(entries, 1):
        where = f"{path}: tasks[{n}]"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"{where}: each task is a mapping of one action "
                              f"({', '.join(ACTIONS)}) to its settings")
        ((action, settings),) = entry.items()
        if not isinstance(settings, dict):
            raise ConfigError(f"{where}: {action}'s settings must be a mapping")
        try:
            for one in _expand(settings, list(hosts)):
                tasks.add(action, one)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return tasks


def _expand(settings: dict[str, Any], hosts: list[str]) -> list[dict[str, Any]]:
    """One settings dict per (host, name): ``host: all`` and lists of hosts, dut_ids and
    names expanded, hosts outermost."""
    host, dut = settings.get("host"), settings.get("dut_id")
    if host == "all":
        targets: list[tuple[str, Any]] = [("host", h) for h in hosts]
    elif isinstance(host, list):
        targets = [("host", h) for h in host]
    elif isinstance(dut, list):
        targets = [("dut_id", d) for d in dut]
    else:
        targets = [(None, None)]
    names = settings.get("name")
    names = names if isinstance(names, list) else [names]
    out = []
    for key, value in targets:
        for name in names:
            one = dict(settings, name=name)
            if key is not None:
                one[key] = value
            out.append(one)
    return out
