"""What every kind of run does on its hosts before and after its VMs: the run directory
claimed (owner file for ``recover``), shared storage proven shared, one migration run with
its journal records, progress lines and report record, and the hosts tidied at the end.

Shared by :class:`~.multihost.MultihostMigration` and :class:`~.tasks.ParallelVMTasks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import TYPE_CHECKING, Callable, Sequence

from ..aio import shielded
from ..config import Config
from ..errors import ConfigError, HostError, MigratorError
from ..hosts import SSHHost, quote
from ..hypervisor.qemu import emulator_version, machine_types, remove_taps
from ..hypervisor.vm import DEFAULT_QEMU, qemu_binary
from ..migration import BaseMigration, MigrationResult, Phase, make_migration
from ..migration.blackout import BlackoutProbe, GuestPingProbe, switchover_time
from . import pools
from .context import MigrationRecord, RunContext
from .data import MigrationData
from .failures import first_of
from .dirtier import watch_dirtier
from .journal import controller_identity, owner_file
from .progress import Progress

if TYPE_CHECKING:
    from ..hypervisor import GuestVM
    from .env import Env

log = logging.getLogger(__name__)


async def claim_run_dirs(ctx: RunContext, hosts: Sequence[SSHHost], instance: str,
                         run_dir: str, per_host: bool = False) -> None:
    """``<run_dir>/<run-id>.owner.json`` on every host, naming the run and its controller:
    the hosts' own copy of whose VMs they hold (see :mod:`.journal`); and the journal's
    records of it. ``per_host``: the instance's VMs are identified by (host, name), so
    ``recover`` resolves a VM on the hosts its records name, not on every host.

    :raise CommandError: a host's run directory cannot be written.
    :raise HostError: a host cannot be reached.
    """
    config = ctx.config
    owner = json.dumps({"run_id": ctx.run_id, "instance": instance,
                        "hosts": [h.name for h in hosts], "driver": config.driver,
                        "controller": controller_identity(),
                        "journal": str(ctx.journal.path) if ctx.journal else None,
                        "state_dir": str(config.journal.state_dir),
                        **({"per_host": True} if per_host else {})})
    ctx.record("instance", instance=instance, hosts=[h.name for h in hosts],
               **({"per_host": True} if per_host else {}))
    for h in hosts:
        ctx.record("resource", kind="run_dir", host=h.name, path=run_dir)
    root = str(ctx.inventory.run_dir)
    path = owner_file(root, ctx.run_id)

    async def claim(h: SSHHost) -> None:
        await h.run(f"mkdir -p {quote(root)} && cat > {quote(path)}", stdin=owner,
                    check=True, timeout=config.timeouts.host_cleanup_s)
    await asyncio.gather(*(claim(h) for h in hosts))


async def probe_versions(ctx: RunContext, hosts: Sequence[SSHHost]) -> None:
    """Each host's kernel, QEMU and libvirt versions into ``ctx.versions`` (the report's),
    the two slow probes (0.1-0.2 s each: a QEMU and a libvirtd started to say their
    version) side by side, a line each. Nothing waits for them but the report: run it
    beside what a VM's start needs. Never raises: a host that does not answer within
    ``host_cleanup_s`` has no versions (said in the log), a probe that fails says ""."""
    async def probe(h: SSHHost) -> None:
        qemu = h.qemu or DEFAULT_QEMU
        try:
            r = await h.run(
                f"{{ echo \"qemu $({quote(qemu)} --version 2>/dev/null | head -1)\" & "
                "echo \"libvirt $(libvirtd --version 2>/dev/null | head -1)\" & "
                "echo \"kernel $(uname -r)\"; wait; }",
                timeout=ctx.config.timeouts.host_cleanup_s)
        except Exception as exc:        # (a report without them, not a failed run)
            log.warning("[host=%s] versions not probed: %s", h.name, exc)
            return
        ctx.versions.setdefault(h.name, host_versions(r.stdout, qemu))
    await asyncio.gather(*(probe(h) for h in hosts if h.name not in ctx.versions))


def host_versions(probe: str, qemu: str) -> dict:
    """A host's versions from :func:`probe_versions`' lines: kernel, QEMU (binary and
    ``--version``'s version), libvirt (``libvirtd --version``'s); None where a probe said
    nothing."""
    said = dict(line.partition(" ")[::2] for line in probe.splitlines() if " " in line)
    version = emulator_version(said.get("qemu", ""))
    libvirt = said.get("libvirt", "").strip().rpartition(" ")[2]
    return {"kernel": said.get("kernel", "").strip() or None,
            "qemu": {"binary": qemu, "version": version},
            "libvirt": libvirt or None}


async def probe_destination(env: "Env", dst: SSHHost, names: Sequence[str]) -> None:
    """Ask ``dst`` now what a QEMU-driver migration of VMs ``names`` to it asks before it
    starts (its QEMU's version and machine types: :func:`.qemu.machine_types`, kept per
    host and binary): called while the source's guests boot, so the migration finds the
    answer at hand rather than waiting for two QEMU start-ups on its own path.
    Never raises: a probe that fails is not kept, and the migration asks again and says
    why."""
    if env.config.driver != "qemu":
        return
    try:
        binaries = {qemu_binary(env.spec(n), dst) for n in names}
        await asyncio.gather(*(machine_types(dst, b, env.config.timeouts.qmp_probe_s)
                               for b in binaries))
    except Exception as exc:  # noqa: BLE001 - asked again, and reported, by the migration
        log.debug("[host=%s] destination probe ahead: %s", dst.name, exc)


async def check_guest_bridges(ctx: RunContext, hosts: Sequence[SSHHost],
                              decls: Sequence = ()) -> None:
    """Every host has the guest network's bridge, when a VM of the run needs it
    (``network: bridge``; the config's VMs and ``decls``): checked before any VM starts.

    :raise ConfigError: naming the hosts without it and the bridge.
    """
    if not any(d.network == "bridge" for d in [*ctx.config.vms.values(), *decls]):
        return
    gn = ctx.inventory.guest_network
    if gn is None:
        raise ConfigError("VMs with network: bridge need the inventory's guest_network "
                          "(subnet, bridge)")
    path = quote(f"/sys/class/net/{gn.bridge}/bridge")
    found = await asyncio.gather(*(h.run(f"test -d {path}") for h in hosts))
    missing = [h.name for h, r in zip(hosts, found) if not r.ok]
    if missing:
        raise ConfigError(f"no bridge {gn.bridge} on {', '.join(missing)} (guest_network."
                          "bridge: VMs with network: bridge join it on every host)")


async def release_range(ctx: RunContext, host: SSHHost | None,
                        claim: "pools.Claim | None", vms_stopped: bool) -> list[str]:
    """Give an instance's address range back at cleanup, through ``host``; the problems met
    (never raises). Kept claimed, for ``recover`` to free, when a VM of it may still run
    (``vms_stopped`` false: it keeps its address) or no host answers."""
    if claim is None:
        return []
    if not vms_stopped or host is None:
        return [f"address range {claim.range.name} kept claimed at {claim.path} (a VM was "
                "not stopped, or no host answers: migrate-run recover frees it)"]
    try:
        await pools.release(host, claim, ctx.run_id, ctx.config.timeouts.host_cleanup_s)
    except Exception as exc:  # noqa: BLE001 - reported, recover frees it later
        return [f"address range {claim.range.name} not released at {claim.path} ({exc})"]
    problem = pools.withdraw_leases(ctx.inventory, claim)
    return [problem] if problem else []


async def check_storage(ctx: RunContext, hosts: Sequence[SSHHost], token: str,
                        needed: bool) -> None:
    """The run's disk storage is what ``migration.storage`` says: shared storage
    (``shared_dir``) seen by every host, or each host's own (``local_dir``) seen by none of
    the others (a disk copied there onto a file the source still uses would destroy it). A
    token written on the first host is looked for on every host.

    :param needed: the run's VMs boot from images (their overlays live there).
    :raise ConfigError: the storage is missing (when needed), or not what the setting says:
        one line saying which setting fits these hosts.
    """
    inv, mode = ctx.inventory, ctx.config.migration.storage
    where = inv.shared_dir if mode == "shared" else inv.local_dir
    if where is None:
        if not needed:
            return
        if mode == "shared":
            raise ConfigError("VMs with images need the inventory's shared_dir (hosts without "
                              "shared storage: local_dir, with migration.storage: copy-all)")
        raise ConfigError(f"migration.storage {mode} needs the inventory's local_dir (each "
                          "host's own storage for the VMs' disks)")
    probe = f"{where}/.migrator-probe-{token}"
    first = hosts[0]
    r = await first.run(f"mkdir -p {quote(str(where))} && printf %s {quote(token)} > "
                        f"{quote(probe)}")
    if not r.ok:
        raise ConfigError(f"{'shared' if mode == 'shared' else 'local'} storage {where} is not "
                          f"writable on {first.name}: {r.stderr.strip()}")
    try:
        reads = await asyncio.gather(*(h.run(f"cat {quote(probe)} 2>/dev/null")
                                       for h in hosts[1:]))
        seen = [h.name for h, r in zip(hosts[1:], reads) if r.stdout == token]
        unseen = [h.name for h, r in zip(hosts[1:], reads) if r.stdout != token]
        if mode == "shared" and unseen:
            raise ConfigError(f"shared storage {where} is not shared: a file written on "
                              f"{first.name} is not seen on {', '.join(unseen)} (hosts without "
                              "shared storage: set migration.storage: copy-all to copy each "
                              "disk with its VM, and the inventory's local_dir)")
        if mode != "shared" and seen:
            raise ConfigError(f"local_dir {where} is shared: a file written on {first.name} is "
                              f"seen on {', '.join(seen)}; migration.storage {mode} copies "
                              "disks between hosts that each have their own: use "
                              "migration.storage: shared here")
    finally:
        await first.run(f"rm -f {quote(probe)}")


async def stop_vms(env: "Env", config: Config) -> list[str]:
    """Stop every VM of ``env``, bounded (``host_cleanup_s`` + ``qemu_stop_s``); return the
    problems met (never raises)."""
    limit = config.timeouts.host_cleanup_s + config.timeouts.qemu_stop_s
    try:
        async with asyncio.timeout(limit):
            return await env.stop_all()
    except TimeoutError:
        return [f"stopping the VMs took over {limit:g} s"]


async def tidy_hosts(ctx: RunContext, hosts: Sequence[SSHHost], run_dir: str,
                     disk_dir: str | None) -> list[str]:
    """Remove the run directory and owner file on every host, and ``disk_dir`` (the run's
    overlays, unless ``report.keep_disks``: on shared storage through the first host, on
    each host's own storage on every host); close the hosts. Return the problems met (never
    raises)."""
    problems: list[str] = []
    owner = owner_file(str(ctx.inventory.run_dir), ctx.run_id)
    keep = ctx.config.report.keep_disks
    local = ctx.config.migration.storage != "shared"

    async def tidy(h: SSHHost, first: bool) -> None:
        cmd = f"{remove_taps(run_dir)}; rm -rf {quote(run_dir)} {quote(owner)}"
        if (first or local) and disk_dir and not keep:  # and the run's dir once empty
            cmd += (f" {quote(disk_dir)}; rmdir --ignore-fail-on-non-empty "
                    f"{quote(os.path.dirname(disk_dir))}")
        try:
            r = await h.close(cmd)          # the host's tmp dirs too, in the same command
            if not r.ok:
                problems.append(f"{h.name}: {cmd!r} failed: {r.stderr.strip()}")
        except HostError as exc:
            problems.append(f"{h.name}: not cleaned up ({exc.message})")
    await asyncio.gather(*(tidy(h, i == 0) for i, h in enumerate(hosts)))
    return problems


def check_probe_from(config: Config, inventory) -> None:
    """``network.probe_from`` names something the run has: a host of the inventory, or a
    declared VM with an address (``vm:NAME``). :raise ConfigError: one line."""
    where = config.network.probe_from
    if where == "controller":
        return
    if where.startswith("vm:"):
        decl = config.vms.get(where[3:])
        if decl is None or decl.ip is None:
            raise ConfigError(f"network.probe_from {where}: no declared VM {where[3:]!r} with "
                              "network: bridge and an ip (vms.<name>)")
        return
    if where not in inventory.hosts:
        raise ConfigError(f"network.probe_from {where!r}: not a host of the inventory "
                          f"({', '.join(inventory.hosts)}), controller or vm:NAME")


@contextlib.asynccontextmanager
async def _prober(ctx: RunContext, vm: "GuestVM", peer: "Callable[[str], GuestVM] | None"):
    """``(probe, why not)``: the probe of ``vm`` from where ``network.probe_from`` says (not
    entered), or None when it is not probed — without a reason when nothing is to be probed
    (no address, probing off, the controller not on the guest network, the VM is the peer
    itself), with one when the peer guest is not running."""
    settings, gn = ctx.config.network, ctx.inventory.guest_network
    where = settings.probe_from
    if not (settings.probe and vm.spec.address and gn is not None):
        yield None, None
    elif where == "controller":
        yield (BlackoutProbe(vm.spec.address, settings.probe_interval_ms,
                             settings.probe_tcp_port) if gn.controller_address else None), None
    elif where.startswith("vm:"):
        try:
            other = peer(where[3:]) if peer is not None else None
        except MigratorError as exc:
            yield None, f"the peer guest {where[3:]} to probe from is not running ({exc})"
            return
        if other is None or other is vm:
            yield None, None
        else:
            yield GuestPingProbe(other, vm.spec.address, settings.probe_interval_ms), None
    else:
        host = SSHHost.from_inventory(where, ctx.inventory, ctx.config)  # connects at spawn
        try:
            yield BlackoutProbe(vm.spec.address, settings.probe_interval_ms,
                                settings.probe_tcp_port, host=host), None
        finally:
            await shielded(host.close())


@contextlib.asynccontextmanager
async def blackout_probe(ctx: RunContext, vm: "GuestVM", mig: BaseMigration,
                         peer: "Callable[[str], GuestVM] | None" = None):
    """Around one migration of a VM with an address, when ``network.probe`` is on: the
    blackout probe (:mod:`migrator.migration.blackout`) from where ``network.probe_from``
    says — the controller (when it is on the guest network: ``guest_network.
    controller_address``), a host over SSH, or a peer guest (``vm:NAME``, found by
    ``peer``) — its report in the migration's result (``blackout_ms``, ``blackout``, which
    says where it was probed from). A probe that cannot start or report is a warning and
    ``blackout.error`` in the record, never the migration's failure."""
    where = ctx.config.network.probe_from
    async with _prober(ctx, vm, peer) as (probe, why_not):
        if probe is None:
            if why_not:
                mig.result.blackout = {"error": why_not, "probed_from": where}
                ctx.warn(f"{vm.name}: no blackout measured: {why_not}")
            yield
            return
        try:
            await probe.__aenter__()
        except Exception as exc:  # noqa: BLE001 - a measurement, never the migration's failure
            mig.result.blackout = {"error": str(exc), "probed_from": where}
            ctx.warn(f"{vm.name}: no blackout measured: {exc}")
            yield
            return
        try:
            yield
        finally:
            try:
                await probe.__aexit__(None, None, None)
                report = probe.report(switchover_time(mig.result.phases or [
                    (p.value, 0.0, wall) for p, _m, wall in mig.history],
                    mig.result.postcopy_switched))
                mig.result.blackout_ms = report.blackout_ms
                mig.result.blackout = report.to_json() | {"probed_from": where}
            except Exception as exc:  # noqa: BLE001 - as above
                mig.result.blackout = {"error": str(exc), "probed_from": where}
                ctx.warn(f"{vm.name}: no blackout measured: {exc}")


async def migrate_one(ctx: RunContext, instance: str, md: MigrationData, vm: "GuestVM",
                      dst_address: str, key: str | None = None,
                      peer: "Callable[[str], GuestVM] | None" = None,
                      tails: asyncio.TaskGroup | None = None) -> MigrationResult:
    """Migrate ``vm`` to ``md.dst`` through the engine: a journal record before each phase
    (``recover`` reads them; with ``key``, the VM's identity when it is not its name), progress
    lines, and the run's :class:`MigrationRecord` whatever the outcome. The migration waits
    for its slot (``queue.*`` limits, :mod:`.slots`) in phase QUEUED. ``tails``: the group
    that owns what completes the record after the migration returned (the dirtier's check
    of the guest's memory and its series, :mod:`.dirtier`); without it, that waits here.

    :return: the result (status ``completed``).
    :raise MigrationError: the migration failed (rolled back; its record says how).
    :raise asyncio.CancelledError: cancelled (rolled back or, past the postcopy switchover,
        finished first).
    """
    mig = make_migration(vm, md.dst, dst_address, md.params, ctx.config)
    md._track(mig)
    reporter = Progress(ctx, md, mig)

    def journal(m: BaseMigration, phase: Phase) -> None:   # before the step it names
        extra = {"port": m.result.port} if phase is Phase.LISTENING else {}
        if key is not None:
            extra["key"] = key
        ctx.record("phase", instance=instance, mig_id=md.mig_id, vm=vm.name,
                   src=md.src.name, dst=md.dst.name, phase=phase.value, **extra)

    def disk_copy() -> None:       # right before the destination's disk is made
        ctx.record("resource", kind="disk_copy", instance=instance, mig_id=md.mig_id,
                   vm=vm.name, src=md.src.name, host=md.dst.name, path=vm.spec.disk,
                   **({"key": key} if key is not None else {}))
    mig.on_disk_copy = disk_copy
    mig.observers += [journal, reporter.on_phase]
    ctx.live[(md.mig_id, vm.name)] = (md, mig)
    try:
        try:
            # the dirtier series outside the slot: it may wait a second after the move
            async with watch_dirtier(ctx, vm, mig, md.mig_id, tails), \
                    ctx.slots.ticket(md.src, md.dst.name, vm.name, md.mig_id,
                                     md.priority) as ticket, \
                    blackout_probe(ctx, vm, mig, peer), asyncio.TaskGroup() as tg:
                mig.slot, mig.slot_first = ticket, not ctx.config.queue.prepare_while_queued
                shower = tg.create_task(reporter.follow())
                try:
                    result = await mig.run()
                finally:
                    shower.cancel()
        except BaseExceptionGroup as eg:    # the migration's error as itself, as documented
            raise first_of(eg) from None
        md.results[vm.name] = result
        return result
    finally:
        ctx.live.pop((md.mig_id, vm.name), None)
        r = mig.result
        md.results.setdefault(vm.name, r)
        ctx.add_migration(MigrationRecord(instance, md.mig_id, vm.name, md.src.name,
                                          md.dst.name, r.status, r.error, r.to_json()))
