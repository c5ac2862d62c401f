"""Drain a host: migrate every libvirt domain running on it to other hosts with room.

::

    plan = await plan_drain(config, inventory, "hostA", targets=["hostB", "hostC"])
    print(plan.table())                       # what goes where, and what cannot be placed
    report = await drain(ctx, plan)           # ctx: the drain's RunContext (journal open)
    print(report.table()); sys.exit(0 if report.empty else 1)

**What drains.** Every domain active on the host, started by migrator (``migrate-run vm
start``) or not: operators' VMs are libvirt domains, so the driver is ``libvirt`` whatever the
config says. A domain migrates with its own definition (``migrate3`` without a new XML), so
its disks must be where the target sees them (shared storage).

**Placement.** Targets come from the inventory's declared ``capacity`` (``{cpus, mem_mib}``):
lab hosts share one machine, so what a host reports free is not its own. A target's room is
its capacity less the domains running on it now and those the plan sends it. VMs are placed
largest first (memory, then vCPUs, then name), each on the target that keeps the most memory
free after it (spreading the load; ties: the order of ``--to``). A target without a declared
capacity takes nothing. A VM no target has room for stays and is listed with the reason.

**Running it.** At most ``max_parallel`` migrations at once (the drain's own per-source
limit), and always within the ``queue.*`` limits (slots shared with every other run on the
hosts): the others wait in phase QUEUED, in plan order; each migration runs
through the engine with its journal records, progress lines and report record like any
run's. One VM that fails stays on the drained host (the engine rolls it back) and the others
go on. The drain's journal names each VM as *adopted* (``owned: false``): ``migrate-run
recover`` of an interrupted drain finishes or rolls back what was in flight and leaves every
VM running on exactly one host, never stopping one.

Errors: :class:`~migrator.errors.ConfigError` before anything starts (an unknown host, the
drained host among the targets, no target, ``max_parallel`` < 1, no capacity declared for
any target, no libvirt on the hosts); ``LibvirtError`` when a host's daemon cannot be asked
for its domains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

from ..config import Config, Inventory
from ..errors import ConfigError, MigratorError
from ..hosts import SSHHost
from ..hypervisor.libvirt import DomainInfo
from ..migration import MigrationParams
from ..report.table import text_table
from . import hostprep
from .context import InstanceRecord, RunContext
from .data import MigrationData
from .fleet import Fleet, find_domains, fleet_run_dir, fleet_vm

log = logging.getLogger(__name__)

#: the drain's instance name in its journal and records
INSTANCE = "drain"


@dataclass
class Placement:
    """One VM of the drained host: where the plan sends it, or why it stays."""

    vm: str
    mem_mib: int
    vcpus: int
    target: str | None = None
    why_not: str = ""        #: why it is not placed (target None)


@dataclass
class DrainPlan:
    """What a drain will do (printed first; all of ``--dry-run``)."""

    host: str
    targets: list[str]
    placements: list[Placement]
    #: each target's free room before the drain (cpus, mem_mib), None: no capacity declared
    free: dict[str, tuple[float, int] | None]
    max_parallel: int
    #: what limits the parallelism below ``max_parallel`` (a ``queue.*`` limit), if anything
    limited_by: str | None = None

    @property
    def placed(self) -> list[Placement]:
        return [p for p in self.placements if p.target is not None]

    @property
    def unplaced(self) -> list[Placement]:
        return [p for p in self.placements if p.target is None]

    def table(self) -> str:
        lines = [f"drain {self.host}: {len(self.placements)} VM(s), to "
                 f"{', '.join(self.targets)}; at most {self.max_parallel} at once"
                 + (f" (limited by {self.limited_by})" if self.limited_by else "")]
        lines += text_table(("vm", "MiB", "vCPUs", "to", "note"),
                            [(p.vm, str(p.mem_mib), str(p.vcpus), p.target or "-",
                              p.why_not or "") for p in self.placements])
        lines.append("room before (free vCPUs / MiB): " + "; ".join(
            f"{t} " + (f"{f[0]:g} / {f[1]}" if f is not None else "no capacity declared")
            for t, f in self.free.items()))
        return "\n".join(lines)


@dataclass
class DrainOutcome:
    vm: str
    target: str | None
    result: str                   #: moved | failed | not placed | cancelled
    total_s: float | None = None
    downtime_ms: float | None = None
    queued_s: float | None = None
    why: str = ""


@dataclass
class DrainReport:
    host: str
    outcomes: list[DrainOutcome] = field(default_factory=list)
    #: the domains still running on the drained host when the drain ended
    left: list[str] = field(default_factory=list)
    makespan_s: float = 0.0

    @property
    def empty(self) -> bool:
        """The drained host runs no domain any more (the exit status says it)."""
        return not self.left

    def table(self) -> str:
        lines = text_table(
            ("vm", "to", "result", "total", "downtime", "queued", "why"),
            [(o.vm, o.target or "-", o.result,
              f"{o.total_s:.2f} s" if o.total_s is not None else "-",
              f"{o.downtime_ms:.0f} ms" if o.downtime_ms is not None else "-",
              f"{o.queued_s:.2f} s" if o.queued_s else "-", o.why or "")
             for o in self.outcomes])
        lines.append(f"drain {self.host}: {sum(o.result == 'moved' for o in self.outcomes)} "
                     f"of {len(self.outcomes)} moved in {self.makespan_s:.1f} s; "
                     + ("the host is empty" if self.empty else
                        f"still running there: {', '.join(self.left)}"))
        return "\n".join(lines)


def check_drain(config: Config, inventory: Inventory, host: str,
                targets: Sequence[str] | None, max_parallel: int | None) -> tuple[list[str], int]:
    """The targets and parallelism of a drain, checked before anything is asked of a host.

    :raise ConfigError: see the module docstring.
    """
    inventory.host(host)
    if config.migration.storage != "shared":
        raise ConfigError(f"migration.storage {config.migration.storage}: a drain moves "
                          "domains whose disks are on shared storage (copying disks is for "
                          "a run's own VMs, migrate-run)")
    if "libvirt" not in inventory.drivers:
        raise ConfigError("drain moves libvirt domains, and the inventory's hosts have no "
                          f"libvirt (drivers: {', '.join(inventory.drivers)})")
    if targets:
        for t in targets:
            inventory.host(t)
        if host in targets:
            raise ConfigError(f"--to {','.join(targets)}: {host} is the host being drained")
        if len(set(targets)) != len(targets):
            raise ConfigError(f"--to {','.join(targets)}: a host is named twice")
        chosen = list(targets)
    else:
        chosen = [h for h in inventory.hosts if h != host]
        if not chosen:
            raise ConfigError(f"no host to drain {host} to: the inventory has no other")
    if max_parallel is not None and max_parallel < 1:
        raise ConfigError(f"--max-parallel {max_parallel}: at least 1")
    if not any(inventory.hosts[t].capacity for t in chosen):
        raise ConfigError(f"no capacity declared for {', '.join(chosen)}: a drain places VMs "
                          "by the inventory's hosts.<name>.capacity ({cpus, mem_mib}), as lab "
                          "hosts share one machine")
    return chosen, max_parallel or config.queue.per_source


def place(host: str, domains: Sequence[DomainInfo], targets: Sequence[str],
          inventory: Inventory, max_parallel: int, config: Config) -> DrainPlan:
    """The drain's plan from what runs where (no host is asked here)."""
    free: dict[str, tuple[float, int] | None] = {}
    for t in targets:
        cap = inventory.hosts[t].capacity
        if cap is None:
            free[t] = None
            continue
        there = [d for d in domains if d.host == t]
        free[t] = (cap.cpus - sum(d.vcpus for d in there),
                   cap.mem_mib - sum(d.mem_mib for d in there))
    room = dict(free)
    moving = sorted((d for d in domains if d.host == host),
                    key=lambda d: (-d.mem_mib, -d.vcpus, d.name))
    placements = []
    for d in moving:
        fits = [t for t in targets if room[t] is not None
                and room[t][0] >= d.vcpus and room[t][1] >= d.mem_mib]
        if not fits:
            best = max((t for t in targets if room[t] is not None),
                       key=lambda t: room[t][1])
            placements.append(Placement(d.name, d.mem_mib, d.vcpus, why_not=(
                f"no target has room for {d.mem_mib} MiB and {d.vcpus} vCPU (most free: "
                f"{best}, {room[best][0]:g} vCPUs / {room[best][1]} MiB)")))
            continue
        target = max(fits, key=lambda t: (room[t][1] - d.mem_mib, -targets.index(t)))
        room[target] = (room[target][0] - d.vcpus, room[target][1] - d.mem_mib)
        placements.append(Placement(d.name, d.mem_mib, d.vcpus, target))
    q = config.queue
    limits = [(q.per_source, f"queue.per_source {q.per_source}"),
              (q.per_cluster, f"queue.per_cluster {q.per_cluster}")]
    limited_by = next((why for n, why in sorted(limits) if n < max_parallel), None)
    return DrainPlan(host, list(targets), placements, free, max_parallel, limited_by)


async def plan_drain(config: Config, inventory: Inventory, host: str,
                     targets: Sequence[str] | None = None,
                     max_parallel: int | None = None) -> DrainPlan:
    """Check the drain and plan it from the domains running on the host and the targets.

    :raise ConfigError: see the module docstring (before any host is asked).
    :raise LibvirtError: a daemon could not be asked.
    """
    chosen, parallel = check_drain(config, inventory, host, targets, max_parallel)
    domains = await find_domains(config, inventory, [host, *chosen])
    return place(host, domains, chosen, inventory, parallel, config)


async def drain(ctx: RunContext, plan: DrainPlan,
                params: MigrationParams | None = None) -> DrainReport:
    """Carry out ``plan`` in ``ctx``'s run (its journal open, its driver libvirt).

    :return: what happened to each VM, and what still runs on the drained host.
    :raise asyncio.CancelledError: when cancelled, after every migration in flight was rolled
        back (or, past a postcopy switchover, finished).
    """
    config, inventory = ctx.config, ctx.inventory
    params = params or MigrationParams(**config.migration.model_dump())
    report = DrainReport(plan.host)
    hosts = [plan.host, *plan.targets]
    record = InstanceRecord(INSTANCE, hosts, started=time.time())
    ctx.instances.append(record)
    ctx.record("instance", instance=INSTANCE, hosts=hosts, kind="drain")
    report.outcomes = [DrainOutcome(p.vm, None, "not placed", why=p.why_not)
                       for p in plan.unplaced]
    # at most max_parallel at once: the drain's migrations all leave one host, so this is
    # its per-source limit (its claims count against every other run's slots as ever, and a
    # migration beyond it waits QUEUED, visible to migrate-run status, cancellable)
    queue = config.queue
    ctx.config = config = config.model_copy(update={"queue": queue.model_copy(
        update={"per_source": min(queue.per_source, plan.max_parallel)})})
    t0 = time.monotonic()
    fleet = Fleet(config)
    async with contextlib.AsyncExitStack() as stack:
        conns = {h: await stack.enter_async_context(
                 SSHHost.from_inventory(h, inventory, config)) for h in hosts}

        async def move(i: int, p: Placement) -> DrainOutcome:
            md = MigrationData([p.vm], conns[plan.host], conns[p.target],
                               f"{INSTANCE}-{i}", params)
            ctx.cancellers[md.mig_id] = md.cancel
            vm = fleet_vm(config, inventory, conns[plan.host], p.vm, p.mem_mib, p.vcpus)
            out = DrainOutcome(p.vm, p.target, "waiting")
            outcomes.append(out)
            try:
                ctx.record("vm", instance=INSTANCE, vm=p.vm, host=plan.host, state="adopted",
                           owned=False, run_dir=fleet_run_dir(inventory), mem_mib=p.mem_mib)
                entry = inventory.host(p.target)
                result = await hostprep.migrate_one(
                    ctx, INSTANCE, md, vm, entry.migration_address or entry.address)
                out.result = "moved"
                fleet.moved(p.vm, p.target, f"drain {ctx.run_id}")
                out.total_s = result.run_s
                out.downtime_ms = result.downtime_ms
                out.queued_s = result.queued_s
            except MigratorError as exc:
                out.why = str(exc)
                out.result = "cancelled" if md.stop_asked else "failed"
                r = md.results.get(p.vm)
                out.queued_s = r.queued_s if r else None
            except asyncio.CancelledError:
                out.result, out.why = "interrupted", "the drain was interrupted"
                raise
            finally:
                ctx.cancellers.pop(md.mig_id, None)
                await vm.close()
            return out
        outcomes: list[DrainOutcome] = []
        try:
            async with asyncio.TaskGroup() as tg:
                for i, p in enumerate(plan.placed):
                    tg.create_task(move(i + 1, p))
        except BaseException:
            record.status = "interrupted"
            raise
        finally:
            report.makespan_s = time.monotonic() - t0
            record.duration_s = report.makespan_s
            report.outcomes = outcomes + report.outcomes
    try:
        left = await find_domains(config, inventory, [plan.host])
        report.left = [d.name for d in left]
    except MigratorError as exc:
        report.left = [f"(unknown: {exc})"]
    record.status = "passed" if report.empty else "failed"
    if not report.empty:
        record.error = f"still running on {plan.host}: {', '.join(report.left)}"
    return report


__all__ = ["DrainOutcome", "DrainPlan", "DrainReport", "Placement", "check_drain", "drain",
           "place", "plan_drain"]
