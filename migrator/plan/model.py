"""A test plan file (seed 004's ``kvm_hosts.cfg`` and test sets, in YAML): hosts and their
queues (parallel pipelines), address ranges assigned to queues, tests, and named test sets
that select tests by name or tag and may assign them to queues by hand.

::

    plan = load_plan(path, inventory, "nightly")     # every check; nothing started
    plan.queues            # ["hostA/1", "hostA/2", "hostB/1"]
    plan.tests             # the set's tests, each with its fixed queues (where/assign)

The file (every key: ``configs/README.md``)::

    hosts:
      hostA: {queues: 2, ranges: [r0, r1]}     # queue hostA/1 owns r0, hostA/2 owns r1
      hostB: {queues: auto}                    # from the inventory's capacity / queue_size
    queue_size: {cpus: 1, mem_mib: 1024}
    ranges:
      r0: {base_mac: "02:6e:00:00:10:00", base_ip: 10.78.0.100, range_size: 8}
    tests:
      pingpong: {scenario: ping_pong, hosts: 2, params: {scenario.rounds: 1}, tags: [quick]}
    sets:
      nightly: {only: [quick], no: [slow], assign: {hostA/1: [pingpong]}}

What can go wrong (each one line naming file, line and key; :class:`ConfigError`, exit 2,
nothing started): not YAML, a key twice, an unknown key or bad value; a host not in the
inventory; ``queues: auto`` without the inventory's ``capacity``; a range unknown, assigned
to two queues, overlapping another (MACs or IPs: the pool code's own check), or outside the
guest network; a test's scenario or config missing, a bad ``-p`` key in its params, more
hosts than the plan has, a ``where``/``assign`` naming an unknown host or queue; a set that
is unknown, names an unknown test or tag, or selects nothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import AddressPool, Config, Inventory, NetworkSettings
from ..errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlanHost(_Strict):
    queues: int | Literal["auto"] = Field(1)
    """Parallel pipelines on the host (``auto``: as many as its inventory ``capacity`` holds
    of the plan's ``queue_size``)."""
    ranges: list[str] = []
    """Address ranges of the plan, one per queue in order (queue 1 the first)."""


class QueueSize(_Strict):
    cpus: float = Field(1.0, gt=0)
    mem_mib: int = Field(1024, gt=0)


class PlanTest(_Strict):
    scenario: str
    """A scenario file, a ready scenario's name, or a task list / VM group job (``.yaml``);
    a relative path is relative to the plan file."""
    hosts: int = Field(2, ge=1)
    """How many hosts it runs over (a queue on each, held at once)."""
    all_hosts: bool = False
    """One instance over all its hosts (``-a all``) instead of pairs."""
    params: dict[str, Any] = {}
    """Config overrides (``-p KEY=VALUE``), dotted keys."""
    config: str | None = None
    """A config file (``-c``), relative to the plan file."""
    tags: list[str] = []
    where: list[str] = []
    """Fixed queues (``HOST/N``) or hosts (``HOST``: its queue that frees first), in the order
    of the test's hosts; the rest are chosen by the scheduler."""
    expected_s: float | None = Field(None, gt=0)
    """The expected duration until earlier runs of it say better."""


class PlanSet(_Strict):
    only: list[str] = []
    """Tests selected by name or tag (empty: all)."""
    no: list[str] = []
    """Tests left out, by name or tag."""
    assign: dict[str, list[str]] = {}
    """Queue (``HOST/N``) or host -> tests (names or tags) that run there (their first host)."""


class PlanFile(_Strict):
    hosts: dict[str, PlanHost]
    queue_size: QueueSize = QueueSize()
    ranges: dict[str, AddressPool] = {}
    tests: dict[str, PlanTest]
    sets: dict[str, PlanSet]


class _Loader(yaml.SafeLoader):
    """YAML 1.2's booleans: only true/false (so the seed's ``no:`` is a key, not False)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


class LocatedYAML:
    """A YAML file's data and the line of each key (``at("tests", "x", "hosts")``)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"plan {path}: {exc.strerror}") from None
        try:
            root = yaml.compose(text, Loader=_Loader)
            self.data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as exc:
            raise ConfigError(f"plan {path} is not YAML: {str(exc).splitlines()[0]}") \
                from None
        self._lines: dict[tuple, int] = {}
        if root is not None:
            self._walk(root, ())

    def _walk(self, node, where: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, value in node.value:
                k = key.value
                line = key.start_mark.line + 1
                if k in seen:
                    raise ConfigError(f"{self.path}:{line}: {'.'.join(map(str, where + (k,)))}"
                                      " is given twice")
                seen.add(k)
                self._lines[where + (k,)] = line
                self._walk(value, where + (k,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._lines[where + (i,)] = item.start_mark.line + 1
                self._walk(item, where + (i,))

    def at(self, *keys) -> str:
        """``FILE:LINE: a.b.c`` for the key path (its longest prefix found in the file)."""
        for n in range(len(keys), 0, -1):
            if keys[:n] in self._lines:
                return f"{self.path}:{self._lines[keys[:n]]}: {_dotted(keys)}"
        return f"{self.path}: {_dotted(keys)}"


def _dotted(keys) -> str:
    return ".".join(f"[{k}]" if isinstance(k, int) else str(k) for k in keys)


@dataclass
class TestEntry:
    """A test of the chosen set, ready to schedule."""

    name: str
    spec: PlanTest
    scenario: str
    """Resolved: an absolute path, or a ready scenario's name."""
    config: Path | None
    fixed: list[str] = field(default_factory=list)
    """Queues or hosts it must take, in the order of its hosts (``where``, else the set's
    ``assign`` for its first host)."""
    needs_range: bool = False
    """Its VMs take addresses from a pool (``ip: auto``): its first queue must own a range."""


@dataclass
class Plan:
    path: Path
    set_name: str
    queues: list[str]
    """Every queue, ``HOST/N``, hosts in the file's order."""
    queue_range: dict[str, str]
    """Queue -> its address range's name."""
    ranges: dict[str, AddressPool]
    tests: list[TestEntry]
    file: PlanFile

    def host_of(self, queue: str) -> str:
        return queue.rsplit("/", 1)[0]

    @property
    def hosts(self) -> list[str]:
        return list(dict.fromkeys(self.host_of(q) for q in self.queues))


def load_plan(path: str | Path, inventory: Inventory, set_name: str) -> Plan:
    """The plan in ``path`` with set ``set_name`` chosen, every check made.

    :raise ConfigError: one line naming file, line and key (see the module's list).
    """
    path = Path(path)
    doc = LocatedYAML(path)
    if not isinstance(doc.data, dict):
        raise ConfigError(f"{path}: a plan is a mapping (hosts, ranges, tests, sets)")
    try:
        plan = PlanFile.model_validate(doc.data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise ConfigError(f"{doc.at(*loc)}: {what}") from None
    base = path.parent
    queues, queue_range = _queues(plan, doc, inventory)
    _check_ranges(plan, doc, inventory)
    if set_name not in plan.sets:
        raise ConfigError(f"{doc.at('sets')}: no set {set_name!r} (the plan has "
                          f"{', '.join(plan.sets) or 'none'})")
    chosen = plan.sets[set_name]
    tests = {name: _test(name, t, doc, base, plan, queues) for name, t in plan.tests.items()}
    selected = _select(chosen, set_name, plan, doc)
    if not selected:
        raise ConfigError(f"{doc.at('sets', set_name)}: set {set_name} selects no test")
    for queue, selectors in chosen.assign.items():
        where = ("sets", set_name, "assign", queue)
        _check_place(queue, plan, queues, doc, where)
        for name in _matching(selectors, plan, doc, where):
            if name in selected and not tests[name].fixed:
                tests[name].fixed = [queue]
    ranged_hosts = {q.rsplit("/", 1)[0] for q in queue_range}
    for name in selected:
        t = tests[name]
        if not t.needs_range:
            continue
        first = t.fixed[0] if t.fixed else None
        if not queue_range or (first and first not in queue_range
                               and ("/" in first or first not in ranged_hosts)):
            raise ConfigError(f"{doc.at('tests', name)}: {name} takes addresses from a pool "
                              f"(ip: auto): its first queue must own a range, and "
                              f"{first or 'no queue'} does not")
    return Plan(path, set_name, queues, queue_range, dict(plan.ranges),
                [tests[n] for n in plan.tests if n in selected], plan)


def _queues(plan: PlanFile, doc: LocatedYAML, inventory: Inventory
            ) -> tuple[list[str], dict[str, str]]:
    queues, queue_range, owner = [], {}, {}
    for host, h in plan.hosts.items():
        if host not in inventory.hosts:
            raise ConfigError(f"{doc.at('hosts', host)}: unknown host {host!r} (the inventory "
                              f"has {', '.join(inventory.hosts)})")
        n = h.queues
        if n == "auto":
            cap = inventory.hosts[host].capacity
            if cap is None:
                raise ConfigError(f"{doc.at('hosts', host, 'queues')}: auto needs the "
                                  f"inventory's capacity of {host} (capacity: {{cpus, mem_mib}})")
            n = max(1, min(math.floor(cap.cpus / plan.queue_size.cpus),
                           cap.mem_mib // plan.queue_size.mem_mib))
        elif n < 1:
            raise ConfigError(f"{doc.at('hosts', host, 'queues')}: at least 1 queue")
        if len(h.ranges) > n:
            raise ConfigError(f"{doc.at('hosts', host, 'ranges')}: {len(h.ranges)} ranges "
                              f"for {n} queue(s)")
        for i in range(n):
            q = f"{host}/{i + 1}"
            queues.append(q)
            if i < len(h.ranges):
                r = h.ranges[i]
                if r not in plan.ranges:
                    raise ConfigError(f"{doc.at('hosts', host, 'ranges', i)}: unknown range "
                                      f"{r!r} (ranges: {', '.join(plan.ranges) or 'none'})")
                if r in owner:
                    raise ConfigError(f"{doc.at('hosts', host, 'ranges', i)}: range {r} is "
                                      f"assigned to {owner[r]} already (a range is one "
                                      "queue's)")
                owner[r], queue_range[q] = q, r
    return queues, queue_range


def _check_ranges(plan: PlanFile, doc: LocatedYAML, inventory: Inventory) -> None:
    """Disjoint (the pool code's own check) and inside the guest network."""
    if not plan.ranges:
        return
    try:
        NetworkSettings(pools=plan.ranges)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"].removeprefix("Value error, ").replace("pools ", "ranges ")
        raise ConfigError(f"{doc.at('ranges')}: {msg}") from None
    from ..framework.pools import check_pools
    for name, pool in plan.ranges.items():
        try:
            check_pools(Config(network=NetworkSettings(pools={name: pool})), inventory)
        except ConfigError as exc:
            raise ConfigError(f"{doc.at('ranges', name)}: "
                              f"{str(exc).removeprefix(f'network.pools.{name}: ')}") from None


def _test(name: str, t: PlanTest, doc: LocatedYAML, base: Path, plan: PlanFile,
          queues: list[str]) -> TestEntry:
    from ..framework.scenario import scenario_path
    where = ("tests", name)
    if t.hosts > len(plan.hosts):
        raise ConfigError(f"{doc.at(*where, 'hosts')}: {name} needs {t.hosts} hosts, the "
                          f"plan has {len(plan.hosts)}")
    if t.hosts == 1 and not t.scenario.endswith((".yaml", ".yml")):
        raise ConfigError(f"{doc.at(*where, 'hosts')}: a scenario needs at least 2 hosts "
                          "(1 host: a task list or VM group job)")
    if t.all_hosts and t.scenario.endswith((".yaml", ".yml")):
        raise ConfigError(f"{doc.at(*where, 'all_hosts')}: a task list or VM group job runs "
                          "over all its hosts already")
    if t.hosts > 2 and t.hosts % 2 and not t.all_hosts \
            and not t.scenario.endswith((".yaml", ".yml")):
        raise ConfigError(f"{doc.at(*where, 'hosts')}: {t.hosts} hosts cannot be paired "
                          "(all_hosts: true for one run over them)")
    scenario = t.scenario
    candidate = base / scenario
    if candidate.suffix or "/" in scenario:
        if not candidate.is_file():
            raise ConfigError(f"{doc.at(*where, 'scenario')}: no file {candidate}")
        scenario = str(candidate.resolve())
    else:
        try:
            scenario_path(scenario)
        except ConfigError as exc:
            raise ConfigError(f"{doc.at(*where, 'scenario')}: {exc}") from None
    config = None
    if t.config is not None:
        config = (base / t.config).resolve()
        if not config.is_file():
            raise ConfigError(f"{doc.at(*where, 'config')}: no file {config}")
    needs_range = False
    try:
        Config.load(config, t.params)
    except ConfigError as exc:
        first = next(iter(plan.ranges.items()), None)
        try:
            if first is None:
                raise
            # addresses from pools (ip: auto): the range of the queue it runs on gives them
            Config.load(config, {**t.params, f"network.pools.{first[0]}":
                                 first[1].model_dump(mode="json")})
            needs_range = True
        except ConfigError:
            raise ConfigError(f"{doc.at(*where, 'params')}: {exc}") from None
    if len(t.where) > t.hosts:
        raise ConfigError(f"{doc.at(*where, 'where')}: {len(t.where)} places for "
                          f"{t.hosts} host(s)")
    hosts_named = []
    for i, place in enumerate(t.where):
        _check_place(place, plan, queues, doc, (*where, "where", i))
        hosts_named.append(place.rsplit("/", 1)[0] if "/" in place else place)
    if len(set(hosts_named)) != len(hosts_named):
        raise ConfigError(f"{doc.at(*where, 'where')}: a host twice (a test's hosts are "
                          "distinct)")
    return TestEntry(name, t, scenario, config, list(t.where), needs_range)


def _check_place(place: str, plan: PlanFile, queues: list[str], doc: LocatedYAML,
                 where: tuple) -> None:
    if place in queues or (place in plan.hosts and "/" not in place):
        return
    raise ConfigError(f"{doc.at(*where)}: unknown queue or host {place!r} (queues: "
                      f"{', '.join(queues)})")


def _matching(selectors: list[str], plan: PlanFile, doc: LocatedYAML, where: tuple
              ) -> list[str]:
    """Tests whose name or a tag is one of ``selectors`` (``a|b``: either), in file order.
    :raise ConfigError: a selector that is no test's name and no tag."""
    names = set()
    tags = {tag for t in plan.tests.values() for tag in t.tags}
    for i, sel in enumerate(selectors):
        for alt in str(sel).split("|"):
            if alt not in plan.tests and alt not in tags:
                raise ConfigError(f"{doc.at(*where, i)}: {alt!r} is no test and no tag")
            names |= {n for n, t in plan.tests.items() if n == alt or alt in t.tags}
    return [n for n in plan.tests if n in names]


def _select(chosen: PlanSet, set_name: str, plan: PlanFile, doc: LocatedYAML) -> set[str]:
    where = ("sets", set_name)
    picked = set(_matching(chosen.only, plan, doc, (*where, "only"))) if chosen.only \
        else set(plan.tests)
    picked -= set(_matching(chosen.no, plan, doc, (*where, "no")))
    return picked


__all__ = ["LocatedYAML", "Plan", "PlanFile", "PlanHost", "PlanSet", "PlanTest", "QueueSize",
           "TestEntry", "load_plan"]
