"""VMs that outlive a run (``migrate-run vm start|list|stop``), and what runs on hosts.

::

    fleet = Fleet(config)
    vm = await start_vm(config, inventory, "web1", "hostA", VMSettings(mem_mib=256))
    for d in await find_domains(config, inventory, ["hostA", "hostB"]): print(d.host, d.name)
    await stop_vm(config, inventory, "web1")

Operators' VMs are not a scenario's fixtures: a VM started here runs as a persistent libvirt
domain (driver ``libvirt`` always: a daemon on every host knows what runs there, so drain and
``vm list`` find it) until ``vm stop``, wherever it migrates meanwhile. Its run directory (the
serial console's socket, the lab guest's status file) is ``<run_dir>/vms/<name>/`` on the host
it runs on; an image-backed VM's overlay is ``<shared_dir>/migrator-vms/<name>.qcow2``.

**The record.** ``<journal.state_dir>/vms/<name>.json`` says what migrator started: its spec
figures, where it was last seen to run (updated by every drain and ``recover`` that moves it),
its overlay; ``<journal.state_dir>/vms/history.jsonl`` appends every start, move and stop. The
hosts' libvirt is the truth of where a VM runs now: ``vm list`` asks every host, and names a
record whose domain runs nowhere, or on several hosts.

Errors: :class:`~migrator.errors.ConfigError` for a bad name, an unknown host, a VM that
exists already or is unknown (before anything starts); :class:`~migrator.errors.GuestError`
when the VM does not start or boot (it is removed again); ``LibvirtError`` when a daemon
cannot be asked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from ..aio import shielded
from ..config import Config, Inventory, VMSettings
from ..errors import ConfigError, MigratorError
from ..hosts import SSHHost, quote
from ..hypervisor.libvirt import (DomainInfo, LibvirtVM, open_host_connection,
                                  running_domains)
from .env import Env, prepare_overlay
from .journal import write_atomic

log = logging.getLogger(__name__)

#: the fleet's directory under the inventory's ``run_dir`` (runs use their run id there)
FLEET = "vms"


def fleet_run_dir(inventory: Inventory) -> str:
    """Where fleet VMs' run directories are on every host: ``<run_dir>/vms``."""
    return f"{inventory.run_dir}/{FLEET}"


def fleet_disk_dir(inventory: Inventory) -> str | None:
    """Where fleet VMs' overlays are on shared storage (None: no shared storage)."""
    return f"{inventory.shared_dir}/migrator-vms" if inventory.shared_dir else None


@dataclass
class FleetVM:
    """One VM migrator started to outlive the command (its record)."""

    name: str
    host: str               #: where it was started, or last moved to
    mem_mib: int
    vcpus: int
    started: float          #: time.time()
    disk: str | None = None  #: its overlay on shared storage, if it boots from an image
    state: str = "starting"  #: starting (its start may not have finished) | running


class Fleet:
    """The records of fleet VMs in ``<journal.state_dir>/vms/`` (see the module docstring).

    :raise ConfigError: (every method) the state dir cannot be written.
    """

    def __init__(self, config: Config):
        self.dir = Path(config.journal.state_dir).expanduser() / FLEET

    def records(self) -> dict[str, FleetVM]:
        out = {}
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                out[path.stem] = FleetVM(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("fleet record %s unreadable: %s", path, exc)
        return out

    def get(self, name: str) -> FleetVM | None:
        return self.records().get(name)

    def save(self, vm: FleetVM, event: str, **fields) -> None:
        """Write ``vm``'s record (atomically) and append ``event`` to the history."""
        self._write(self.dir / f"{vm.name}.json", json.dumps(asdict(vm), indent=1))
        self._history(event, vm=vm.name, host=vm.host, **fields)

    def moved(self, name: str, host: str, why: str) -> None:
        """A fleet VM now runs on ``host`` (a drain, a recovery); nothing for other VMs."""
        vm = self.get(name)
        if vm is not None and vm.host != host:
            old, vm.host = vm.host, host
            self.save(vm, "moved", src=old, why=why)

    def remove(self, name: str, **fields) -> None:
        try:
            (self.dir / f"{name}.json").unlink()
        except FileNotFoundError:
            return
        self._history("stopped", vm=name, **fields)

    def _history(self, event: str, **fields) -> None:
        line = json.dumps({"event": event, "t": round(time.time(), 3), **fields})
        with open(self.dir / "history.jsonl", "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _write(self, path: Path, text: str) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(path, text)
        except OSError as exc:
            raise ConfigError(f"journal.state_dir {self.dir.parent}: {exc.strerror}") from None


def fleet_env(config: Config, inventory: Inventory) -> Env:
    """The specs of fleet VMs (kernel, image overlay, NIC as a run's VMs have them)."""
    return Env(config.model_copy(update={"vms": {}}), inventory, fleet_run_dir(inventory),
               fleet_disk_dir(inventory))


def fleet_vm(config: Config, inventory: Inventory, host: SSHHost, name: str,
             mem_mib: int = 128, vcpus: int = 1) -> LibvirtVM:
    """A VM object for domain ``name`` on ``host`` (fleet or not: a drained domain's spec
    only says its name and size; migrations never define it from the spec)."""
    from ..hypervisor import VMSpec
    spec = VMSpec(name, mem_mib=mem_mib, vcpus=vcpus, kernel="(defined by its domain)")
    return LibvirtVM(spec, host, fleet_run_dir(inventory), config)


async def start_vm(config: Config, inventory: Inventory, name: str, host_name: str,
                   decl: VMSettings, say=lambda line: None) -> FleetVM:
    """Start fleet VM ``name`` on ``host_name`` and wait for its guest to log in.

    :raise ConfigError: a bad name, an unknown host, no libvirt on the hosts, or a VM of
        that name recorded or running already (nothing started).
    :raise GuestError: it did not start or boot (nothing of it is left).
    :raise LibvirtError, HostError: a daemon or the host could not be reached.
    """
    from ..hypervisor.vm import _VM_NAME
    if not _VM_NAME.match(name) or name == FLEET:
        raise ConfigError(f"VM name {name!r}: letters, digits, '_', '.', '-' (64 at most), "
                          "starting with a letter or digit")
    inventory.host(host_name)
    if "libvirt" not in inventory.drivers:
        raise ConfigError("VMs that outlive a run are libvirt domains, and the inventory's "
                          "hosts have no libvirt (drivers: "
                          f"{', '.join(inventory.drivers)})")
    fleet = Fleet(config)
    if (known := fleet.get(name)) is not None:
        raise ConfigError(f"VM {name} exists already (started {time.ctime(known.started)} on "
                          f"{known.host}; 'migrate-run vm stop {name}' removes it)")
    env = fleet_env(config, inventory)
    spec = env.spec(name, decl=decl)
    async with SSHHost.from_inventory(host_name, inventory, config) as host:
        taken = [d for d in await find_domains(config, inventory, list(inventory.hosts))
                 if d.name == name]
        if taken:
            raise ConfigError(f"a domain {name} runs on {taken[0].host} already")
        record = FleetVM(name, host_name, spec.mem_mib, spec.vcpus, time.time(), spec.disk)
        fleet.save(record, "starting")
        vm = LibvirtVM(spec, host, fleet_run_dir(inventory), config)
        try:
            if decl.image:
                await prepare_overlay(host, str(decl.image), spec.disk, name,
                                      config.timeouts.disk_prepare_s)
            say(f"{name}: starting on {host_name} ({spec.mem_mib} MiB, {spec.vcpus} vCPU)")
            await vm.start()
            await vm.wait_for_login(config.timeouts.guest_boot_s)
            record.state = "running"
            fleet.save(record, "started", pid=vm.pid)
            return record
        except BaseException:
            await shielded(_remove(config, vm, spec.disk))
            fleet.remove(name, why="did not start")
            raise
        finally:
            vm._close_session()
            await shielded(vm.close())


async def stop_vm(config: Config, inventory: Inventory, name: str,
                  say=lambda line: None) -> str | None:
    """Stop fleet VM ``name`` wherever it runs (destroyed, undefined, its run dir and
    overlay removed) and drop its record; the host it ran on (None: it ran nowhere).

    :raise ConfigError: no such fleet VM; or it runs on several hosts (nothing touched).
    :raise LibvirtError, HostError: a daemon or the host could not be reached (the record
        stays: run it again).
    """
    fleet = Fleet(config)
    record = fleet.get(name)
    if record is None:
        raise ConfigError(f"no VM {name} started by migrator (migrate-run vm list shows them)")
    where = sorted({d.host for d in await find_domains(config, inventory,
                                                        list(inventory.hosts))
                    if d.name == name})
    if len(where) > 1:
        raise ConfigError(f"VM {name} runs on {' and '.join(where)}: nothing stopped ("
                          "migrate-run recover resolves an interrupted migration first)")
    host_name = where[0] if where else record.host
    async with SSHHost.from_inventory(host_name, inventory, config) as host:
        vm = fleet_vm(config, inventory, host, name, record.mem_mib, record.vcpus)
        await _remove(config, vm, record.disk)
    fleet.remove(name, host=host_name)
    say(f"{name}: stopped on {host_name}" if where else
        f"{name}: ran nowhere; its record and files on {host_name} removed")
    return where[0] if where else None


async def _remove(config: Config, vm: LibvirtVM, disk: str | None) -> None:
    """Destroy and undefine the domain, remove its run dir (and the fleet dir, when empty)
    and its overlay."""
    await vm.stop()
    fleet_dir = quote(str(vm.run_dir))
    await vm.host.run(f"rmdir {fleet_dir} 2>/dev/null; "
                      + (f"rm -f {quote(disk)}; rmdir {quote(str(Path(disk).parent))} "
                         "2>/dev/null; " if disk else "") + "true",
                      check=True, timeout=config.timeouts.host_cleanup_s)


async def find_domains(config: Config, inventory: Inventory, hosts: Sequence[str]
                       ) -> list[DomainInfo]:
    """Every domain running on ``hosts`` (asked side by side).

    :raise LibvirtError: a daemon could not be asked (names the host).
    :raise ConfigError: an unknown host.
    """
    for h in hosts:
        inventory.host(h)

    async def one(name: str) -> list[DomainInfo]:
        # libvirt reaches the host over its own SSH transport: no session of ours is opened
        conn = await open_host_connection(SSHHost.from_inventory(name, inventory, config),
                                          config)
        try:
            return await running_domains(conn, config)
        finally:
            await shielded(conn.close(config.timeouts.libvirt_call_s))
    found = await asyncio.gather(*(one(h) for h in hosts), return_exceptions=True)
    errors = [f for f in found if isinstance(f, BaseException)]
    if errors:
        for e in errors:
            if not isinstance(e, MigratorError):
                raise e
        raise errors[0]
    return [d for per_host in found for d in per_host]


__all__ = ["FLEET", "Fleet", "FleetVM", "find_domains", "fleet_disk_dir", "fleet_run_dir",
           "fleet_vm", "start_vm", "stop_vm"]
