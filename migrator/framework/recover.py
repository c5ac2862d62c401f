"""Resolve runs whose controller died: each VM to exactly one running copy, the rest removed.

::

    report = await recover(config)                  # every dead run in the index
    report = await recover(config, "20261129-...")  # one run
    print(report.table()); sys.exit(0 if report.ok else 1)

For each dead run (its lock free: the controller is provably gone; a live run is refused,
and two recoveries of one run never overlap — the second is refused, naming the first):

1. **Where is each VM?** On every host of the run, ``<run_dir>/<run-id>/<vm>/`` and the
   hypervisor say whether a copy of the VM lives there (QEMU: the pid *and* start time of
   ``qemu.id``, then QMP ``query-status``/``query-migrate``; libvirt: the domain, its state
   and job).
2. **Settle what is in flight.** A precopy migration still running is cancelled (the source
   goes on); a postcopy migration is waited for (the destination already runs the VM and
   needs the source's pages until it completes); a paused postcopy is left alone and
   reported (only postcopy recovery can finish it).
3. **Choose the copy.** The destination when the migration completed (the source is in
   ``postmigrate``), otherwise the source, resumed if it is paused. The other copy is stopped.
   Nothing is ever chosen by guess: an incoming copy alone (its memory never arrived), a
   completed source whose destination is gone, or two running copies are reported as
   *unresolved*, naming host, VM and why, and left as they are.
4. **Remove the rest**: the other copies' run dirs, the run's dir on hosts that keep
   nothing, the run's disk overlays when no VM of it is kept. With ``stop=True`` the kept
   copies are stopped too (what the run's own cleanup would have done) and nothing of the run
   is left. The run's sync participants still alive on its hosts (hung, or orphaned with
   their SSH session) are killed.

A dead run whose hosts are gone for good (reinstalled, decommissioned) cannot be recovered
and would hold back every new run on hosts of those names: :func:`forget` drops it from the
index without touching any host, after saying what its journal says may still be there.

Errors: :class:`RecoverError` (a :class:`ConfigError`: exit 2) for a run that does not exist
or is alive; problems met on hosts go into the report, never raised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, DhcpServer, Inventory
from ..errors import ConfigError, MigratorError
from ..hosts import SSHHost, quote
from ..hypervisor import VMSpec, make_vm
from ..hypervisor.qemu import alive_test, remove_taps
from ..migration import storage
from ..migration.engine import FINAL as FINAL_PHASES
from . import dhcp_leases, slots
from .pools import release_command
from .journal import (RunEntry, RunJournal, RunLock, RunLocked, controller_identity,
                      find_run, hosts_of, last_phases, list_runs, owner_file,
                      process_start_time, vm_records)

log = logging.getLogger(__name__)

#: QEMU's migration states of a source still sending (cancel them)
PRECOPY_ACTIVE = {"setup", "active", "device", "pre-switchover", "wait-unplug", "cancelling"}


class RecoverError(ConfigError):
    """The run cannot be recovered by this process: unknown, alive, or being recovered."""


@dataclass
class Copy:
    """One copy of a VM on one host, as its hypervisor reports it."""

    host: str
    status: str                  #: running, paused, inmigrate, postmigrate, ...
    migration: str = "none"      #: none, active, postcopy-active, completed, failed, ...
    probe: Any = None            #: the driver's probe (to cancel, resume, stop)


@dataclass
class VMOutcome:
    run_id: str
    vm: str
    kept: str | None = None       #: host of the copy left running
    state: str = ""               #: its state when recovery ended
    actions: list[str] = field(default_factory=list)
    problem: str | None = None    #: why it is unresolved (None: resolved)
    owned: bool = True            #: the run started it (False: a drained VM: never stopped)


@dataclass
class RecoverReport:
    outcomes: list[VMOutcome] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.problem is None for o in self.outcomes)

    def table(self) -> str:
        """What was found and done: one row per VM."""
        if not self.runs:       # what was found instead (recovered already, held) said too
            return "\n".join(["recover: no dead run found", *self.notes])
        cols = ["run", "vm", "result", "host", "state", "done"]
        rows = [[o.run_id, o.vm, "UNRESOLVED" if o.problem else "resolved", o.kept or "-",
                 o.state or "-", "; ".join(o.actions + ([o.problem] if o.problem else []))
                 or "-"] for o in self.outcomes]
        rows += [[r, "-", "resolved", "-", "-", "nothing of it was running"]
                 for r in self.runs if not any(o.run_id == r for o in self.outcomes)]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols[:-1])]
        lines = []
        for r in [cols] + rows:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1])
        return "\n".join(lines + self.notes)


# -- driver probes ------------------------------------------------------------------------------

class _NoCopy(Exception):
    """The probe looked and there is no live copy on that host."""


class _QemuProbe:
    """A QEMU copy found through its run dir's ``qemu.id`` (pid and start time)."""

    def __init__(self, host: SSHHost, vm: str, run_dir: str, config: Config):
        self.host, self.vm_name = host, vm
        self.vm = make_vm("qemu", _spec(vm), host, run_dir, config)
        self.config = config

    async def find(self) -> Copy | None:
        """The live QEMU of this run dir: the pid and start time of ``qemu.id``; without it
        (the controller died between QEMU's start and that write), QEMU's own pidfile, if
        that process's command line names this very pidfile — then ``qemu.id`` is written,
        so stopping it is as safe as ever. None only when the host says there is none.

        :raise _Unresolved: the host or QEMU could not be asked.
        """
        from ..hypervisor.qemu import _STARTTIME, identity_file
        paths = self.vm.paths
        ident, pidfile = quote(identity_file(paths)), quote(paths.pidfile)
        r = await self.host.run(
            f"if read p start < {ident} 2>/dev/null; then {_STARTTIME}; "
            f"[ \"$st\" = \"$start\" ] || exit 3; "
            f"elif read p < {pidfile} 2>/dev/null && tr '\\0' '\\n' < /proc/$p/cmdline "
            f"2>/dev/null | grep -qxF -- {pidfile}; then {_STARTTIME}; "
            f"echo \"$p $st\" > {ident}; else exit 3; fi; "
            f"{alive_test('$p')} || exit 3; echo $p",
            timeout=self.config.timeouts.host_cleanup_s)
        if r.exit_status == 3 and not r.timed_out:
            return None
        if not r.ok:
            raise _Unresolved(f"{self.host.name}: cannot look for QEMU: "
                              f"{r.stderr.strip() or r}")
        self.vm.pid = int(r.stdout.split()[-1])
        qmp = await self.vm.qmp()
        status = (await qmp.execute("query-status"))["status"]
        migration = (await qmp.execute("query-migrate")).get("status", "none")
        return Copy(self.host.name, status, migration, self)

    async def cancel(self) -> None:
        await (await self.vm.qmp()).execute("migrate_cancel")

    async def start_postcopy(self) -> None:
        await (await self.vm.qmp()).execute("migrate-start-postcopy")

    async def resume(self) -> None:
        await (await self.vm.qmp()).execute("cont")

    async def stop(self) -> None:
        await self.vm.stop()

    async def tidy(self) -> list[str]:
        """The kept copy: what a disk copy left in its QEMU removed (the qemu driver's
        mirror, NBD node and export; see :mod:`migrator.migration.storage`)."""
        return await storage.undo_in_qemu(await self.vm.qmp(), self.config.timeouts.qmp_probe_s,
                                          self.config.timeouts.progress_interval_s)

    async def close(self) -> None:
        await self.vm.disconnect()


class _LibvirtProbe:
    """The libvirt domain named after the VM, on a host where this run has the VM's run dir
    (domain names are per host: the run dir tells it is this run's). Which copy is the
    incoming one comes from the journal.

    With its client gone, libvirt's own view of a migration can be stale for good: a managed
    (migrate3) source whose client died during postcopy is marked paused/postcopy-failed and
    keeps its job although QEMU goes on and completes (libvirt 11.3's
    ``qemuMigrationAnyConnectionClosed``). So the source's migration is asked of its QEMU
    (``query-migrate`` through ``qemu-monitor-command``: the outgoing job allows queries);
    the destination's, which holds an incoming job that allows none, is read from its state
    and reason (running/postcopy: still receiving; running/migrated: done;
    running/postcopy-failed: the link broke)."""

    def __init__(self, host: SSHHost, vm: str, run_dir: str, config: Config,
                 incoming: bool):
        self.host, self.vm_name, self.incoming = host, vm, incoming
        self.vm = make_vm("libvirt", _spec(vm), host, run_dir, config)

    async def find(self) -> Copy | None:
        """The active domain in the common vocabulary (``inmigrate`` for the incoming copy
        not started yet, ``postmigrate`` for a source whose vCPUs moved on). An inactive
        definition (a persistent copy that never ran, or a source that completed) is
        undefined: it is no copy.

        :raise LibvirtError: the daemon could not be asked.
        """
        import libvirt
        dom = await self.vm.domain()
        if dom is None:
            return None
        if not await self.vm.call("isActive", dom.isActive):
            await self.vm.call("undefine", dom.undefine)
            return None
        state, reason = await self.vm.call("state", dom.state)
        self.vm.pid = await self.vm.read_pid()
        running = state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED)
        if self.incoming:
            if running and reason == libvirt.VIR_DOMAIN_RUNNING_POSTCOPY:
                return Copy(self.host.name, "running", "postcopy-active", self)
            if running and reason == libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED:
                return Copy(self.host.name, "running", "postcopy-paused", self)
            return Copy(self.host.name, "running" if running else "inmigrate", "none", self)
        try:
            migration = await self._qemu_migration(dom)
        except Exception:
            # a source whose migration completed is shut off by libvirt at any moment,
            # between the state read above and this question too: then it is no copy
            again = await self.vm.domain()           # a transient one is gone altogether
            if again is None:
                return None
            if await self.vm.call("isActive", again.isActive):
                raise
            await self.vm.call("undefine", again.undefine)
            return None
        if state == libvirt.VIR_DOMAIN_PAUSED and reason in (
                libvirt.VIR_DOMAIN_PAUSED_POSTCOPY, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED):
            status = "postmigrate"       # its vCPUs run on the destination since the switch
        elif migration == "completed" and not running:
            status = "postmigrate"
        else:
            status = await self.vm.status()
        return Copy(self.host.name, status, migration, self)

    async def _qemu_migration(self, dom) -> str:
        """QEMU's own migration status (``none`` when there never was one)."""
        import json
        import libvirt_qemu
        reply = await self.vm.call("qemu-monitor-command query-migrate",
                                   libvirt_qemu.qemuMonitorCommand, dom,
                                   '{"execute": "query-migrate"}', 0)
        return json.loads(reply).get("return", {}).get("status", "none")

    async def cancel(self) -> None:
        dom = await self.vm.domain()
        await self.vm.call("abortJob", dom.abortJob)

    async def start_postcopy(self) -> None:
        dom = await self.vm.domain()
        await self.vm.call("migrateStartPostCopy", dom.migrateStartPostCopy, 0)

    async def resume(self) -> None:
        dom = await self.vm.domain()
        await self.vm.call("resume", dom.resume)

    async def stop(self) -> None:
        await self.vm.stop()

    async def close(self) -> None:
        await self.vm.close()


def _spec(vm: str) -> VMSpec:
    """A spec that only names the VM: recovery never starts one."""
    return VMSpec(vm, kernel="(not started by recovery)")


#: a migration the controller had switched to postcopy, or was switching
POSTCOPY_STATES = {"postcopy-active"}
#: postcopy that cannot go on by itself: only postcopy recovery can finish it
POSTCOPY_STUCK = {"postcopy-paused", "postcopy-recover", "postcopy-recover-setup"}


# -- one run ------------------------------------------------------------------------------------

class _RunRecovery:
    """Resolve one dead run, instance by instance (each instance's VMs on its own hosts:
    pairs of one run may both have a ``vm1``)."""

    def __init__(self, entry: RunEntry, events: list[dict[str, Any]], config: Config,
                 stop: bool):
        head = events[0]
        self.entry, self.events, self.stop_kept = entry, events, stop
        self.run_id = entry.run_id
        try:
            self.inventory = Inventory.model_validate(head["inventory"])
            self.config = Config.model_validate(head["config"]).model_copy(
                update={"journal": config.journal})
            self.driver = head["driver"]
            self.run_root = head["run_root"]
            self.run_dir = f"{self.run_root}/{self.run_id}"
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"journal {entry.journal_path}: its head cannot be read by this "
                              f"migrator ({str(exc).splitlines()[0]})") from None
        self.hosts = {name: SSHHost.from_inventory(name, self.inventory, self.config)
                      for name in hosts_of(events) if name in self.inventory.hosts}
        self.outcomes: list[VMOutcome] = []
        self.notes: list[str] = []
        #: VMs the run adopted, not started (a drain's): name -> its ``vm`` record
        #: (``run_dir``: where its run dir is on every host). Kept running, never stopped.
        self.adopted = {e["vm"]: e for e in vm_records(events) if e.get("owned") is False}
        self._instance: str | None = None       # the instance being resolved (None: all)
        self._key: str | None = None            # the VM's identity, when not its name

    def _last_phase(self, vm: str) -> dict[str, Any]:
        return last_phases(self.events, self._instance).get(self._key or vm, {})

    def instances(self) -> dict[str, list[str]]:
        """instance -> its hosts (one group of all hosts for a journal without them)."""
        groups = {e["instance"]: e["hosts"] for e in self.events
                  if e.get("event") == "instance"}
        return groups or {"main": list(self.hosts)}

    def vm_names(self, instance: str, only_one: bool) -> list[str]:
        names: list[str] = []
        for e in vm_records(self.events):
            if (only_one or e.get("instance") == instance) and e["vm"] not in names:
                names.append(e["vm"])
        return names

    @property
    def per_host(self) -> set[str]:
        """The instances whose VMs are identified by (host, name)."""
        return {e["instance"] for e in self.events
                if e.get("event") == "instance" and e.get("per_host")}

    def vm_keys(self, instance: str, only_one: bool) -> dict[str, tuple[str, set[str]]]:
        """VMs whose identity is (host, name) (parallel VM tasks: ``vm0`` on every host):
        key -> (name, the hosts that may hold a copy of it now, from its last records: where
        it started, or both ends of its last migration until that ended)."""
        keys: dict[str, tuple[str, set[str]]] = {}
        for e in self.events:
            if e.get("event") not in ("vm", "phase") or "key" not in e:
                continue
            if not (only_one or e.get("instance") == instance):
                continue
            name, hosts = keys.setdefault(e["key"], (e["vm"], set()))
            if e["event"] == "vm":
                now = set() if e.get("state") == "stopped" else {e["host"]}
            elif e.get("phase") == "PREPARING_DEST":
                now = {e["src"], e["dst"]}
            elif e.get("phase") in ("CLEANED", "LANDED"):
                now = {e["dst"]}
            elif e.get("phase") == "ROLLED_BACK":
                now = {e["src"]}
            else:
                now = hosts | {e["src"], e["dst"]}
            hosts.clear()
            hosts.update(now)
        return keys

    async def run(self) -> list[VMOutcome]:
        try:
            reachable = await self._connect()
            found = await self._run_dirs(reachable)
            groups = self.instances()
            for instance, names in groups.items():
                hosts = {n: reachable[n] for n in names if n in reachable}
                lost = [n for n in names if n not in reachable]
                keyed = self.vm_keys(instance, len(groups) == 1)
                if keyed or instance in self.per_host:
                    # each (host, name) VM on the hosts its last records name
                    plan = [(key, name, {h: hosts[h] for h in sorted(where) if h in hosts})
                            for key, (name, where) in keyed.items()]
                    claimed = {(h, name) for _k, name, where in plan for h in where}
                    # run dirs no record accounts for (a journal rebuilt from the hosts): a
                    # name on one host is that host's VM; a name on several may be one VM
                    # caught mid-migration, so those are resolved by name across them (two
                    # running copies are then left alone, unresolved: never stopped)
                    loose: dict[str, list[str]] = {}
                    for h in hosts:
                        for v in found.get(h, []):
                            if (h, v) not in claimed:
                                loose.setdefault(v, []).append(h)
                    for v, where in sorted(loose.items()):
                        if len(where) == 1:
                            plan.append((f"{where[0]}/{v}", v, {where[0]: hosts[where[0]]}))
                        else:
                            plan.append((None, v, {h: hosts[h] for h in where}))
                else:
                    vms = self.vm_names(instance, len(groups) == 1)
                    vms += sorted({v for n in hosts for v in found.get(n, [])} - set(vms))
                    plan = [(None, vm, hosts) for vm in vms]
                for key, vm, its_hosts in plan:
                    if lost:        # a copy may be there: deciding without it could make two
                        self.outcomes.append(VMOutcome(
                            self.run_id, key or vm, problem=f"{key or vm}: "
                            f"{', '.join(lost)} unreachable: it may hold a copy; nothing was "
                            "touched"))
                        continue
                    self._instance = instance if len(groups) > 1 else None
                    self._key = key
                    self.outcomes.append(await self._resolve(vm, its_hosts, found))
                self._key = None
            await self._end_participants(reachable)
            await self._tidy(reachable)
        finally:
            await asyncio.gather(*(h.close() for h in self.hosts.values()))
        return self.outcomes

    async def _connect(self) -> dict[str, SSHHost]:
        async def one(h: SSHHost):
            try:
                await h.connect()
                return h
            except MigratorError as exc:
                self.notes.append(f"run {self.run_id}: host {h.name} unreachable: {exc}")
                return None
        got = await asyncio.gather(*(one(h) for h in self.hosts.values()))
        return {h.name: h for h in got if h is not None}

    async def _run_dirs(self, hosts: dict[str, SSHHost]) -> dict[str, list[str]]:
        """The VM run dirs of this run on each host."""
        async def ls(h: SSHHost) -> list[str]:
            r = await h.run(f"cd {quote(self.run_dir)} 2>/dev/null || exit 0; for d in */; do "
                            f"[ -d \"$d\" ] && echo \"${{d%/}}\"; done; true",
                            timeout=self.config.timeouts.host_cleanup_s, check=True)
            return r.stdout.split()
        dirs = await asyncio.gather(*(ls(h) for h in hosts.values()))
        return dict(zip(hosts, dirs))

    async def _copies(self, vm: str, hosts: dict[str, SSHHost],
                      found: dict[str, list[str]]) -> list[Copy]:
        """The live copies of ``vm`` on the hosts that have its run dir.

        :raise _Unresolved: a host or hypervisor could not be asked (copies found so far
            are closed).
        """
        last = self._last_phase(vm)
        arrived = last.get("phase") in ("CLEANED", "LANDED")
        adopted = self.adopted.get(vm)
        copies: list[Copy] = []
        for name, h in hosts.items():
            if adopted is not None:
                # no run dir of this run: the journal says where it can be (a domain of
                # that name elsewhere is not this run's business)
                if name not in {adopted["host"], last.get("src"), last.get("dst")}:
                    continue
            elif vm not in found.get(name, ()):
                continue                           # no run dir: nothing of this run there
            if self.driver == "libvirt":
                probe = _LibvirtProbe(h, vm, adopted["run_dir"] if adopted else self.run_dir,
                                      self.config,
                                      incoming=name == last.get("dst") and not arrived)
            else:
                probe = _QemuProbe(h, vm, self.run_dir, self.config)
            # libvirt's calls have their own bound (libvirt_call_s) and run in threads
            limit = self.config.timeouts.qmp_probe_s if self.driver == "qemu" else None
            try:
                async with asyncio.timeout(limit):
                    c = await probe.find()
            except Exception as exc:  # noqa: BLE001 - named in the report
                await probe.close()
                for other in copies:
                    await other.probe.close()
                if isinstance(exc, _Unresolved):
                    raise
                if isinstance(exc, TimeoutError):
                    raise _Unresolved(f"{name}: the hypervisor does not say where {vm} stands "
                                      f"within {limit:g} s (QEMU's main thread blocked: a "
                                      "postcopy destination waiting for pages?); left as it "
                                      "is") from None
                raise _Unresolved(f"{name}: cannot ask the hypervisor: {exc}") from exc
            if c is None:
                await probe.close()
            else:
                copies.append(c)
        return copies

    async def _resolve(self, vm: str, hosts: dict[str, SSHHost],
                       found: dict[str, list[str]]) -> VMOutcome:
        adopted = self.adopted.get(vm)
        out = VMOutcome(self.run_id, self._key or vm, owned=adopted is None)
        copies: list[Copy] = []
        try:
            copies = await self._copies(vm, hosts, found)
            copies = await self._settle(vm, copies, hosts, found, out)
            keep = self._choose(copies)
            if keep is not None and keep.status in RESUMABLE:
                await keep.probe.resume()
                out.actions.append(f"resumed on {keep.host} (was {keep.status})")
                keep.status = "running"
            for c in copies:
                if c is not keep:
                    await c.probe.stop()
                    out.actions.append(f"{c.status} copy on {c.host} stopped")
            if keep is not None and hasattr(keep.probe, "tidy"):
                out.actions += await keep.probe.tidy()
            out.actions += await self._disk_copy_tidy(vm, keep, hosts)
            if keep is not None:
                out.kept, out.state = keep.host, keep.status
                if adopted is not None:
                    out.actions.append(f"left running on {keep.host} (not the run's: "
                                       "drained)")
                    await self._adopted_tidy(vm, adopted, keep.host, hosts)
                elif self.stop_kept:
                    await keep.probe.stop()
                    out.actions.append(f"stopped on {keep.host} (--stop)")
                    out.state = "stopped"
                else:
                    out.actions.append(f"left running on {keep.host}")
            else:
                out.state = "not running"
            for name in hosts:                    # run dirs of copies that are gone
                if vm in found.get(name, ()) and (keep is None or name != keep.host
                                                  or self.stop_kept):
                    vm_dir = f"{self.run_dir}/{vm}"
                    await hosts[name].run(f"{remove_taps(vm_dir)}; rm -rf {quote(vm_dir)}",
                                          check=True)
                    found[name].remove(vm)
        except _Unresolved as exc:
            out.problem = f"{vm}: {exc}"
        except Exception as exc:  # noqa: BLE001 - QMP, libvirt, SSH: named in the report
            out.problem = f"{vm}: {type(exc).__name__}: {exc}"
        finally:
            for c in copies:
                await c.probe.close()
        if out.problem:
            log.error("[run=%s vm=%s] unresolved: %s", self.run_id, vm, out.problem)
        return out

    async def _disk_copy_tidy(self, vm: str, keep: Copy | None,
                              hosts: dict[str, SSHHost]) -> list[str]:
        """The VM's last migration was copying its disk when the controller died (its
        ``disk_copy`` record, written right before the destination's disk was made, and no
        final phase after it): the copy of the disk not kept is removed, the destination's
        when the source is kept, the source's when the destination is kept. When no copy
        runs, the destination's only if the migration had not completed (until then the
        source's disk is the VM's; after, the destination's may be the only one)."""
        last = self._last_phase(vm)
        if last.get("phase") in {p.value for p in FINAL_PHASES}:
            return []               # the migration ended: its own cleanup did this
        records = [e for e in self.events if e.get("event") == "resource"
                   and e.get("kind") == "disk_copy" and e.get("vm") == vm
                   and e.get("mig_id") == last.get("mig_id")
                   and e.get("key") == self._key
                   and (self._instance is None or e.get("instance") == self._instance)]
        if not records:
            return []
        rec = records[-1]
        if keep is None and last.get("phase") in ("COMPLETED", "VERIFIED"):
            return []
        if keep is None or keep.host == rec["src"]:
            drop = rec["host"]
        elif keep.host == rec["host"]:
            drop = rec["src"]
        else:
            return []
        h = hosts.get(drop)
        if h is None:
            return [f"disk copy {rec['path']} on {drop} NOT REMOVED (host not reached)"]
        await h.run(f"rm -f {quote(rec['path'])}", check=True,
                    timeout=self.config.timeouts.host_cleanup_s)
        return [f"disk copy {rec['path']} removed from {drop}"]

    async def _adopted_tidy(self, vm: str, adopted: dict[str, Any], kept: str,
                            hosts: dict[str, SSHHost]) -> None:
        """An adopted VM settled on ``kept``: its run dir elsewhere (the other end of its
        migration) removed, its fleet record told where it runs."""
        from .fleet import Fleet
        last = self._last_phase(vm)
        vm_dir = quote(f"{adopted['run_dir']}/{vm}")
        for name in {adopted["host"], last.get("src"), last.get("dst")} - {kept, None}:
            if name in hosts:
                await hosts[name].run(f"rm -rf {vm_dir}; rmdir {quote(adopted['run_dir'])} "
                                      "2>/dev/null; true", check=True)
        Fleet(self.config).moved(vm, kept, f"recover {self.run_id}")

    async def _settle(self, vm: str, copies: list[Copy], hosts: dict[str, SSHHost],
                      found: dict[str, list[str]], out: VMOutcome) -> list[Copy]:
        """Finish what is in flight: a precopy migration is cancelled (the source goes on),
        unless the controller had decided to switch to postcopy (the journal's last phase is
        POSTCOPY): then the switch is made, if QEMU had not made it yet, and the migration
        waited for. Return the copies once nothing is in flight.

        :raise _Unresolved: a postcopy that cannot go on by itself, or a migration that does
            not end within its timeout.
        """
        timeouts = self.config.timeouts
        declared = self.config.vms.get(vm)
        mem = declared.mem_mib if declared else self.config.lab.guest_mem_mib
        for e in vm_records(self.events):       # its size as started (task lists, groups)
            if e.get("mem_mib") and e.get("key", e["vm"]) == (self._key or vm):
                mem = e["mem_mib"]
        postcopy_decided = self._last_phase(vm).get("phase") == "POSTCOPY"
        acted = False
        deadline = None
        while True:
            stuck = [c for c in copies if c.migration in POSTCOPY_STUCK]
            if stuck:
                if len(copies) > 1:
                    raise _Unresolved(f"postcopy {stuck[0].migration} on {stuck[0].host}: "
                                      "only postcopy recovery can finish it; both copies left "
                                      "as they are")
                raise _Unresolved(f"postcopy {stuck[0].migration} on {stuck[0].host} and no "
                                  "other copy: the VM's state is split or was never taken "
                                  "over, and the hypervisor will not resume this copy; left "
                                  "as it is")
            sending = _sending(copies)
            postcopy = [c for c in copies if c.migration in POSTCOPY_STATES]
            if not sending and not postcopy:
                return copies
            if deadline is None:
                limit = self.config.migration.policy.completion_for(mem) \
                    if postcopy or postcopy_decided \
                    else timeouts.migration_cancel_s
                deadline = time.monotonic() + limit
            elif time.monotonic() > deadline:
                busy = (sending + postcopy)[0]
                raise _Unresolved(f"the migration on {busy.host} is still {busy.migration} "
                                  f"after {limit:g} s")
            if not acted:
                acted = True
                for c in sending:
                    if postcopy_decided:
                        try:
                            await c.probe.start_postcopy()
                        except Exception as exc:  # noqa: BLE001 - already switching
                            log.info("[vm=%s] postcopy switch: %s", vm, exc)
                        out.actions.append(f"postcopy switch on {c.host} finished")
                    else:
                        await c.probe.cancel()
                        out.actions.append(f"migration from {c.host} cancelled")
                if postcopy and not sending:
                    out.actions.append("postcopy waited for")
            await asyncio.sleep(0.2)
            for c in copies:
                await c.probe.close()
            copies = await self._copies(vm, hosts, found)

    @staticmethod
    def _choose(copies: list[Copy]) -> Copy | None:
        """The copy to keep (None: there is none); see the module docstring.

        :raise _Unresolved: no copy can be chosen without guessing.
        """
        running = [c for c in copies if c.status == "running"]
        if len(running) == 1:
            return running[0]       # a destination that completed, or a source that went on
        if len(running) > 1:
            raise _Unresolved("running on " + " and ".join(c.host for c in running)
                              + ": left as they are")
        resumable = [c for c in copies if c.status in RESUMABLE]
        if len(resumable) == 1:
            return resumable[0]
        if not copies:
            return None
        what = ", ".join(f"{c.status} on {c.host}" for c in copies)
        if len(resumable) > 1:
            raise _Unresolved(f"paused copies on {what}: left as they are")
        if all(c.status == "inmigrate" for c in copies):
            raise _Unresolved(f"only an incoming copy ({what}) whose memory never arrived; "
                              "the source is gone")
        if any(c.status == "postmigrate" for c in copies):
            raise _Unresolved(f"the migration completed but the destination is gone ({what}); "
                              "the source holds the VM as it was at switchover: left paused")
        raise _Unresolved(f"no copy can run ({what})")

    async def _end_participants(self, hosts: dict[str, SSHHost]) -> None:
        """SIGKILL the run's sync participants still alive (one ends by itself when its SSH
        session does; a stopped or hung one does not): found by the run id in their
        environment (``MIGRATE_SYNC_RUN=<run-id>.<instance>``)."""
        marker = quote(f"MIGRATE_SYNC_RUN={self.run_id}.")
        # this host's processes only: on one machine with namespace hosts (the lab) pgrep
        # sees every host's; the network namespace tells them apart (on a real host: all)
        script = (f"me=$(readlink /proc/$$/ns/net); "
                  f"for p in $(pgrep -f 'migrate-sync.* member'); do "
                  f"[ \"$(readlink /proc/$p/ns/net 2>/dev/null)\" = \"$me\" ] && "
                  f"tr '\\0' '\\n' < /proc/$p/environ 2>/dev/null | grep -q ^{marker} && "
                  f"kill -KILL $p && echo $p; done; true")

        async def one(name: str, h: SSHHost) -> None:
            try:
                r = await h.run(script, timeout=self.config.timeouts.host_cleanup_s,
                                check=True)
            except MigratorError as exc:
                self.notes.append(f"run {self.run_id}: {name}: participants not checked: "
                                  f"{exc}")
                return
            if r.stdout.split():
                self.notes.append(f"run {self.run_id}: sync participant(s) "
                                  f"{', '.join(r.stdout.split())} on {name} killed")
        await asyncio.gather(*(one(n, h) for n, h in hosts.items()))

    async def _tidy(self, hosts: dict[str, SSHHost]) -> None:
        """The run's dir on hosts that keep nothing of it; its overlays when nothing is
        kept. Failures become notes (and the run stays in the index)."""
        kept = {o.kept for o in self.outcomes if o.kept and o.owned and not self.stop_kept}
        unresolved = any(o.problem for o in self.outcomes) or len(hosts) < len(self.hosts)
        if unresolved:
            return
        try:
            owner = owner_file(self.run_root, self.run_id)
            for name, h in hosts.items():
                if name not in kept:
                    await h.run(f"{remove_taps(self.run_dir)}; rm -rf {quote(self.run_dir)} "
                                f"{quote(owner)}", check=True)
            overlays = [e for e in self.events if e.get("event") == "resource"
                        and e.get("kind") == "overlays"]
            for o in overlays if not self.config.report.keep_disks else []:
                # and the run's dir of overlays once it is empty
                rm = (f"rm -rf {quote(o['path'])}; rmdir --ignore-fail-on-non-empty "
                      f"{quote(str(Path(o['path']).parent))} 2>/dev/null; true")
                if o.get("local"):     # on each host's own storage: where no VM is kept
                    for name, h in hosts.items():
                        if name not in kept:
                            await h.run(rm, check=True)
                elif not kept:
                    first = hosts.get(o["host"])
                    if first is not None:
                        await first.run(rm, check=True)
            claims = [e for e in self.events if e.get("event") == "resource"
                      and e.get("kind") == "pool_claim"]
            for claim in claims if not kept else []:    # a kept VM keeps its address
                h = hosts.get(claim["host"])
                if h is None:
                    self.notes.append(f"run {self.run_id}: address range claim "
                                      f"{claim['path']} not released ({claim['host']} "
                                      "not reached)")
                    continue
                await h.run(release_command(claim["path"], self.run_id), check=True)
            # the migrations are over: their slots too (by the run's id: also when the
            # journal is lost and the run was rebuilt from the hosts)
            home = slots.slots_home(self.inventory)
            for h in list(hosts.values())[:1] if self.inventory.shared_dir else hosts.values():
                await h.run(slots.release_all_command(home, self.run_id), check=True)
            leases = [e for e in self.events if e.get("event") == "resource"
                      and e.get("kind") == "dhcp_hosts"]
            for lease in leases if not kept else []:
                if f".{self.run_id}." not in Path(lease["path"]).name:
                    continue                      # never another run's
                problem = dhcp_leases.withdraw(
                    DhcpServer(hosts_dir=Path(lease["path"]).parent,
                               pid_file=Path(lease["pid_file"]) if lease.get("pid_file")
                               else None), lease["path"])
                if problem:
                    self.notes.append(f"run {self.run_id}: {problem}")
        except MigratorError as exc:
            self.outcomes.append(VMOutcome(self.run_id, "-", problem=f"not cleaned: {exc}"))


class _Unresolved(Exception):
    pass


#: a copy that holds the VM but is paused (resumed when it is the one kept); a source left
#: paused by a migration yields to a destination that runs
RESUMABLE = {"paused", "suspended", "paused-migration"}


def _sending(copies: list[Copy]) -> list[Copy]:
    """Sources with a precopy migration in flight (a destination reports its incoming
    migration's state too: it is the copy in ``inmigrate``)."""
    return [c for c in copies if c.migration in PRECOPY_ACTIVE and c.status != "inmigrate"]


# -- entry points -------------------------------------------------------------------------------

def dead_runs(config: Config, hosts: list[str] | None = None,
              include_recovered: bool = False) -> list[RunEntry]:
    """Runs of the index whose controller is provably gone (lock free), optionally only
    those touching ``hosts``."""
    out = []
    for entry in list_runs(config.journal.state_dir):
        if entry.is_alive() or (entry.recovered and not include_recovered):
            continue
        if hosts is not None and not set(entry.info.get("hosts", [])) & set(hosts):
            continue
        out.append(entry)
    return out


async def recover(config: Config, run_id: str | None = None, *, stop: bool = False,
                  hosts: list[str] | None = None,
                  include_recovered: bool | None = None) -> RecoverReport:
    """Recover one run (``run_id``) or every dead run (touching ``hosts``, if given).

    :param stop: also stop the copies kept (the run's own cleanup, done for it).
    :param include_recovered: also runs recovered earlier whose kept copies still run
        (default: with ``stop``).
    :raise RecoverError: ``run_id`` is unknown, alive, or being recovered by another process.
    """
    if include_recovered is None:
        include_recovered = stop
    report = RecoverReport()
    if run_id is not None:
        entry = find_run(config.journal.state_dir, run_id)
        if entry is None:
            raise RecoverError(f"no run {run_id} in {config.journal.state_dir}/runs")
        entries = [entry]
    else:
        entries = dead_runs(config, hosts, include_recovered=include_recovered)
    for entry in entries:
        lock = entry.lock("recover")
        try:
            lock.acquire()
        except FileNotFoundError:            # ended, or recovered, since it was listed
            report.notes.append(f"run {entry.run_id}: already resolved by another process")
            continue
        except RunLocked as exc:
            if run_id is not None:
                raise RecoverError(f"run {entry.run_id} is alive or being recovered: "
                                   f"held by {exc.holder}") from None
            report.notes.append(f"run {entry.run_id}: skipped, held by {exc.holder}")
            continue
        try:
            await _recover_entry(entry, lock, config, stop, report)
        finally:
            lock.release()
    return report


async def _recover_entry(entry: RunEntry, lock: RunLock, config: Config, stop: bool,
                         report: RecoverReport) -> None:
    """One run, its lock held. Problems go into ``report``, never raised."""
    entry = find_run(config.journal.state_dir, entry.run_id) or entry   # fresh run.json
    if entry.recovered and not entry.info.get("problems") and not stop:
        report.notes.append(f"run {entry.run_id}: recovered already, kept "
                            f"{', '.join(entry.info.get('kept', [])) or 'nothing'} "
                            "(--stop stops them)")
        return
    try:
        events = entry.events()
        if not events or events[0].get("event") != "run":
            raise ConfigError(f"journal {entry.journal_path} has no head record")
        if events[-1].get("event") == "end" and not (entry.info.get("leftovers")
                                                     or events[-1].get("leftovers")):
            entry.remove()                   # it ended cleanly: only its entry was left
            return
        rec = _RunRecovery(entry, events, config, stop)
    except ConfigError as exc:
        report.runs.append(entry.run_id)
        report.outcomes.append(VMOutcome(entry.run_id, "-", problem=str(exc)))
        return
    outcomes = await rec.run()
    report.notes += rec.notes
    report.runs.append(entry.run_id)
    report.outcomes += outcomes
    # a drained VM kept is not the run's: nothing of the run is left for a later --stop
    kept = [f"{o.vm}@{o.kept}" for o in outcomes if o.kept and o.owned and not stop]
    problems = [o.problem for o in outcomes if o.problem]
    _append(entry, lock, "recovered", kept=kept, problems=problems, stopped=stop)
    if problems:                   # looked at again by the next recover and the next run
        entry.update(recovered=False, kept=kept, problems=problems)
    elif kept:
        entry.update(recovered=True, kept=kept, problems=[])
    else:
        entry.remove()


async def adopt_from_hosts(config: Config, inventory: Inventory,
                           host_names: list[str]) -> list[str]:
    """For a controller whose disk (journal and index) is lost: find the runs the hosts hold
    (``<run_dir>/<run-id>.owner.json``) and give each an index entry whose journal is
    rebuilt from the hosts, for :func:`recover`. Returns the run ids adopted.

    Only a controller on this machine can be proven dead (its pid and start time are gone);
    a run whose controller ran elsewhere, or is alive, is refused.

    :raise RecoverError: such a run (named, with its controller), or an unknown host.
    """
    hosts = [SSHHost.from_inventory(n, inventory, config) for n in host_names]
    owners: dict[str, dict[str, Any]] = {}
    try:
        for h in hosts:
            r = await h.run(f"for f in {quote(str(inventory.run_dir))}/*.owner.json; do "
                            f"[ -f \"$f\" ] && cat \"$f\" && echo; done; true", check=True,
                            timeout=config.timeouts.host_cleanup_s)
            for line in r.stdout.splitlines():
                try:
                    owner = json.loads(line)
                    known = owners.setdefault(str(owner["run_id"]), owner)
                except (ValueError, KeyError, TypeError):
                    continue                       # empty or torn: nothing to adopt from it
                known.setdefault("instances", {})[owner.get("instance", "main")] = \
                    owner.get("hosts", [])
                if owner.get("per_host"):
                    known.setdefault("per_host_instances", set()).add(owner.get("instance", "main"))
    finally:
        await asyncio.gather(*(h.close() for h in hosts))
    me = controller_identity()["machine"]
    adopted = []
    for run_id, owner in sorted(owners.items()):
        if find_run(config.journal.state_dir, run_id) is not None:
            adopted.append(run_id)                 # the index knows it: recovered as usual
            continue
        ctl = owner.get("controller", {})
        if ctl.get("machine") != me:
            raise RecoverError(f"run {run_id}: its controller ran on {ctl.get('machine')}, "
                               f"not on this machine ({me}): it cannot be proven dead here")
        if ctl.get("pid") and process_start_time(ctl["pid"]) == ctl.get("start"):
            raise RecoverError(f"run {run_id} is alive: its controller pid {ctl['pid']} runs")
        names = sorted({n for hs in owner["instances"].values() for n in hs})
        head = {"hosts": {n: inventory.host(n).address for n in names
                          if n in inventory.hosts},
                "driver": owner.get("driver", config.driver),
                "run_root": str(inventory.run_dir),
                "inventory": inventory.model_dump(mode="json"),
                "config": config.model_dump(mode="json"), "rebuilt_from_hosts": True}
        journal = RunJournal.create(run_id, config.journal.state_dir, None, head)
        for instance, members in sorted(owner["instances"].items()):
            journal.record("instance", instance=instance, hosts=members,
                           **({"per_host": True} if instance in owner.get("per_host_instances", ())
                              else {}))
        journal.detach()
        adopted.append(run_id)
    return adopted


def forget(config: Config, run_id: str) -> list[str]:
    """Drop dead run ``run_id`` from the index without touching any host (its journal stays
    where it is, with a ``forgotten`` record). Returns what the journal says may still be on
    its hosts: one line per VM not recorded stopped, per host with a run dir.

    :raise RecoverError: the run is unknown, or alive, or being recovered (named).
    """
    entry = find_run(config.journal.state_dir, run_id)
    if entry is None:
        raise RecoverError(f"no run {run_id} in {config.journal.state_dir}/runs")
    lock = entry.lock("forget")
    try:
        lock.acquire()
    except FileNotFoundError:
        raise RecoverError(f"run {run_id} was resolved by another process meanwhile") from None
    except RunLocked as exc:
        raise RecoverError(f"run {run_id} is alive or being recovered: held by "
                           f"{exc.holder}") from None
    try:
        try:
            events = entry.events()
        except ConfigError:
            events = []
        hosts = hosts_of(events) or {h: "?" for h in entry.info.get("hosts", [])}
        run_root = (events[0].get("run_root") if events else None) or "<run dir>"
        state: dict[tuple[str, str], dict[str, Any]] = {}
        for rec in vm_records(events):
            state[(rec.get("host", "?"), rec.get("vm", "?"))] = rec
        left = [f"{host}: VM {vm} ({rec.get('state')}, pid {rec.get('pid', '?')})"
                for (host, vm), rec in sorted(state.items()) if rec.get("state") != "stopped"]
        left += [f"{rec.get('src')} -> {rec.get('dst')}: migration of VM {vm} last recorded "
                 f"{rec.get('phase')}" for vm, rec in sorted(last_phases(events).items())
                 if rec.get("phase") not in ("CLEANED", "ROLLED_BACK", "LOST")]
        left += [f"{host} ({addr}): {run_root}/{run_id}/, {owner_file(run_root, run_id)}"
                 for host, addr in sorted(hosts.items())]
        _append(entry, lock, "forgotten", controller=controller_identity(), left=left)
        entry.remove()
    finally:
        lock.release()
    return left


def _append(entry: RunEntry, lock: RunLock, event: str, **fields: Any) -> None:
    """One record into a dead run's journal (its lock held by ``lock``); a journal that
    cannot be written is logged, not raised: what recovery did is in its report either way."""
    try:
        journal = RunJournal.reopen(entry, lock)
    except OSError as exc:
        log.warning("run %s: journal %s not updated: %s", entry.run_id, entry.journal_path,
                    exc.strerror)
        return
    try:
        journal.record(event, **fields)
    except OSError as exc:
        log.warning("run %s: journal %s not updated: %s", entry.run_id, entry.journal_path,
                    exc.strerror)
    finally:
        journal.close()


__all__ = ["RecoverError", "RecoverReport", "VMOutcome", "adopt_from_hosts", "dead_runs",
           "forget", "recover"]
