"""The VMs of one scenario instance: declared in config, started on demand, tracked wherever
they run (``self.env.get_vm(name)``)."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import time
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Callable

from ..blocking import BlockingInWorkers
from ..config import Config, Inventory, VMSettings
from ..errors import ConfigError, ScenarioError
from .pools import AddressRange
from ..hosts import SSHHost, quote
from ..hypervisor import GuestVM, VMSpec, make_vm
from .gates import HostGates

if TYPE_CHECKING:
    from .context import RunContext

log = logging.getLogger(__name__)

#: undeclared names of this form are lab guests of the default size
DEFAULT_VM_NAME = re.compile(r"^vm[0-9]{1,3}$")
#: the lab guest prints TICK n on its second serial port with this
LAB_GUEST_ARGS = "lab.out=ttyS1"


class Env(BlockingInWorkers):
    """VM specs and VM objects of one scenario instance.

    A VM's identity (its *key*) is its name, unique in the instance
    (:class:`~.multihost.MultihostMigration`); with ``per_host`` it is ``HOST/NAME``, the
    host it was started on and its name, so ``vm0`` may run on every host
    (:class:`~.tasks.ParallelVMTasks`). The key names its overlay on shared storage, its
    ``auto`` MAC and its journal records; a name is still unique *on a host* (its run
    directory, its libvirt domain): :meth:`place` refuses a second.

    :param run_dir: the per-run directory on hosts holding VM sockets (``<run_dir>/<vm>/``).
    :param disk_dir: per-run directory for the VMs' overlays: on shared storage, or with
        ``local_disks`` the same path on each host's own storage (``migration.storage``
        copy-*: a VM's overlay is made on the host it starts on, and moves with it).
    :param gates: the run's per-host start bounds (default: this Env's own).
    """

    def __init__(self, config: Config, inventory: Inventory, run_dir: str,
                 disk_dir: str | None, record: Callable[..., None] | None = None,
                 say: Callable[[str], None] | None = None, *, per_host: bool = False,
                 gates: HostGates | None = None, local_disks: bool = False):
        self.config, self.inventory = config, inventory
        self.run_dir, self.disk_dir = run_dir, disk_dir
        self.local_disks = local_disks
        self.per_host = per_host
        self.gates = gates or HostGates(config.limits)
        self._record = record or (lambda event, **fields: None)   # the run's journal
        self._say = say or (lambda line: log.info("%s", line))
        #: what ``vm.migrate(dst)`` calls for the VMs started here (set by the framework)
        self.migrate_hook = None
        self._vms: dict[str, GuestVM] = {}
        self._busy: dict[str, str] = {}
        #: (host, VM name) -> the key of the VM that holds that name on that host
        self._placed: dict[tuple[str, str], str] = {}
        #: the instance's claimed address range (``network.pools``), and which index of it
        #: each VM (by key) took: kept for the run, wherever the VM runs or reboots
        self.address_range: AddressRange | None = None
        self._address_index: dict[str, int] = {}
        for name in config.vms:
            self.spec(name)          # every declared VM must be bootable: fail before start

    def key(self, name: str, host: str) -> str:
        """The identity of VM ``name`` started on ``host``: ``name``, or ``host/name`` with
        ``per_host``."""
        return f"{host}/{name}" if self.per_host else name

    def overlay_path(self, key: str) -> str:
        return str(PurePosixPath(self.disk_dir or "/") / f"{key}.qcow2")

    def spec(self, name: str, key: str | None = None, decl: VMSettings | None = None) -> VMSpec:
        """The spec of VM ``name`` (identity ``key``, default ``name``), from ``decl`` or
        else its declaration under ``vms``.

        :raise ConfigError: an undeclared name that is not ``vmN``, or a VM that cannot boot
            (no kernel and no image, image without storage for its overlay).
        """
        key = key or name
        decl = decl or self.config.vms.get(name)
        if decl is None and not DEFAULT_VM_NAME.match(name):
            raise ConfigError(f"unknown VM {name!r}: declare it under 'vms' in the config "
                              "(undeclared names vm1, vm2, ... are default lab guests)")
        guest = self.inventory.guest
        mem = decl.mem_mib if decl else self.config.lab.guest_mem_mib
        kernel = decl.kernel if decl and decl.kernel else (guest.kernel if guest else None)
        initrd = decl.initrd if decl and decl.initrd else (guest.initrd if guest else None)
        append = decl.append if decl and decl.append else \
            (f"{guest.append} {LAB_GUEST_ARGS}" if guest else "")
        disk = None
        if decl and decl.image:
            if self.disk_dir is None:
                raise ConfigError(
                    f"VM {name!r} has an image but the inventory has no "
                    + ("local_dir for its overlay (migration.storage "
                       f"{self.config.migration.storage})"
                       if self.config.migration.storage != "shared"
                       else "shared_dir for its overlay (without shared storage: local_dir "
                            "and migration.storage: copy-all)"))
            disk = self.overlay_path(key)
        if not kernel and not disk:
            raise ConfigError(f"VM {name!r}: no kernel and no image (the inventory has no "
                              "guest section; declare one for it)")
        mac = decl.mac if decl else None
        nic = self._nic(name, decl)
        index = self._pool_index(key, decl)
        if mac == "auto":
            mac = auto_mac(self.run_dir, key) if index is None else self.address_range.mac(index)
        if nic.get("ip") == "auto":
            # before the range is claimed (the checks at start): an address of the right form
            nic["ip"] = (self.address_range.ip(index) if self.address_range is not None
                         else f"{next(iter(self.config.network.pools.values())).base_ip}/32")
        login = decl.login if decl else None
        try:
            return VMSpec(name, mem_mib=mem, vcpus=decl.vcpus if decl else 1, mac=mac, **nic,
                          login_user=login.user if login else None,
                          login_password=login.password if login else None,
                          prompt=login.prompt if login else None,
                          kernel=str(kernel) if kernel else None,
                          initrd=str(initrd) if initrd else None, append=append,
                          accel=self.inventory.accel, disk=disk,
                          extra_args=tuple(decl.extra_args) if decl else (),
                          **({"qemu": decl.qemu} if decl and decl.qemu else {}),
                          **({"machine": decl.machine} if decl and decl.machine else {}),
                          cpu_model=decl.cpu_model if decl else None,
                          cpu_affinity=decl.cpu_affinity if decl else None,
                          hugepages=decl.hugepages if decl else False)
        except ValueError as exc:
            raise ConfigError(f"VM {name!r}: {exc}") from None

    def use_range(self, address_range: AddressRange | None) -> None:
        """The instance's claimed address range: VMs with ``mac: auto`` / ``ip: auto`` take
        the next MAC/IP of it."""
        self.address_range = address_range

    def _pool_index(self, key: str, decl: VMSettings | None) -> int | None:
        """The index of the instance's range VM ``key`` holds (taken at its first start);
        None when it takes nothing from a range.

        :raise ConfigError: the range is used up."""
        wants = decl is not None and (decl.mac == "auto" or decl.ip == "auto")
        if not wants or self.address_range is None:
            return None
        if key not in self._address_index:
            if len(self._address_index) >= self.address_range.size:
                raise ConfigError(f"VM {key!r}: address range {self.address_range.name} is "
                                  f"used up ({self.address_range.size} addresses)")
            self._address_index[key] = len(self._address_index)
        return self._address_index[key]

    def _nic(self, name: str, decl: VMSettings | None) -> dict:
        """The NIC's network, bridge and address of a declared VM (:class:`VMSpec` fields).

        :raise ConfigError: a bridged VM without the inventory's guest network, or an
            address outside its subnet."""
        if decl is None or decl.network is None:
            return {}
        if decl.network != "bridge":
            return {"network": decl.network}
        gn = self.inventory.guest_network
        if gn is None:
            raise ConfigError(f"VM {name!r}: network: bridge needs the inventory's "
                              "guest_network (subnet, bridge)")
        if decl.ip is not None and decl.ip != "auto":
            subnet = ipaddress.ip_network(gn.subnet)
            address = ipaddress.IPv4Interface(decl.ip)
            if address.network != subnet:
                raise ConfigError(f"VM {name!r}: address {decl.ip} is not in the guest "
                                  f"network {subnet}")
            reserved = gn.reserved()
            if address.ip in reserved:
                raise ConfigError(f"VM {name!r}: address {address.ip} is "
                                  f"{reserved[address.ip]} on {subnet}")
        return {"network": "bridge", "bridge": gn.bridge, "ip": decl.ip, "dhcp": decl.dhcp}

    def images(self) -> dict[str, str]:
        """``{vm: base image}`` of the declared VMs that boot from a disk image."""
        return {n: str(d.image) for n, d in self.config.vms.items() if d.image}

    def get_vm(self, name: str, host: str | None = None) -> GuestVM:
        """The VM object of ``name``: it refers to the VM wherever it runs now. With
        ``per_host``, ``host`` says which: the VM started there (its key), else the VM of
        that name running there now; without ``host``, the only VM of that name.

        :raise ScenarioError: the VM has not been started in this run (or, ``host``
            omitted, several VMs have that name).
        """
        if not self.per_host:
            key = name
        elif host is not None:
            key = self.key(name, host)
            if key not in self._vms:
                key = self._placed.get((host, name), key)
        else:
            keys = [k for k, vm in self._vms.items() if vm.name == name]
            if len(keys) > 1:
                raise ScenarioError(f"VM {name!r} runs on several hosts "
                                    f"({', '.join(sorted(keys))}): name the host")
            key = keys[0] if keys else name
        try:
            return self._vms[key]
        except KeyError:
            where = f" on {host}" if host else ""
            raise ScenarioError(f"VM {name!r}{where} is not running in this run "
                                "(migrate() starts VMs on their source)") from None

    def place(self, host: str, name: str, key: str) -> None:
        """VM ``key`` is to hold the name ``name`` on ``host`` (it starts or lands there).

        :raise ScenarioError: another VM of this run holds that name there.
        """
        holder = self._placed.get((host, name))
        if holder is not None and holder != key:
            raise ScenarioError(
                f"{key}: {host} already runs a VM named {name} ({holder}); a VM name is "
                f"unique on its host (its run dir {self.run_dir}/{name}, its libvirt domain "
                f"{name})")
        self._placed[(host, name)] = key

    def unplace(self, host: str, name: str, key: str) -> None:
        """VM ``key`` no longer holds ``name`` on ``host``."""
        if self._placed.get((host, name)) == key:
            del self._placed[(host, name)]

    def key_of(self, vm: GuestVM) -> str:
        """The identity of a VM object of this Env."""
        return next((k for k, v in self._vms.items() if v is vm), vm.name)

    def runs_on(self, name: str, host: SSHHost) -> bool:
        """Whether VM ``name`` runs on ``host`` now (:meth:`ensure_running` then boots
        nothing)."""
        vm = self._vms.get(self.key(name, host.name))
        return vm is not None and vm.pid is not None and vm.host.name == host.name

    async def ensure_running(self, name: str, host: SSHHost,
                             restart_elsewhere: bool = False,
                             decl: VMSettings | None = None) -> GuestVM:
        """The VM ``name`` running on ``host``: started there (and logged in) if it is not
        running yet, within the run's per-host gates (:mod:`.gates`).

        :param restart_elsewhere: when the VM runs on another host, stop it there and boot
            it afresh on ``host`` (Autotest's preparation of a migration's source), instead
            of failing. Said on the run's output and in the journal.
        :param decl: its settings (default: its declaration under ``vms``).
        :raise ScenarioError: the VM runs on another host (and not ``restart_elsewhere``);
            another VM holds that name on ``host``.
        :raise GuestError: it did not start or boot.
        :raise CommandError: its overlay could not be made.
        """
        key = self.key(name, host.name)
        ids = {"key": key} if self.per_host else {}
        vm = self._vms.get(key)
        if vm is not None and vm.pid is not None:
            if vm.host.name == host.name:
                return vm
            if not restart_elsewhere:
                raise ScenarioError(f"VM {name!r} runs on {vm.host.name}, not on {host.name}")
            self._say(f"VM {name} runs on {vm.host.name}: stopped there, to boot afresh on "
                      f"{host.name} (restart_vm_on_source: Autotest's preparation of a "
                      "migration's source)")
            await vm.stop()
            if self.local_disks and vm.spec.disk:
                # its disk there goes with it: it boots afresh from a new one on host
                await vm.host.run(f"rm -f {quote(vm.spec.disk)}", check=True,
                                  timeout=self.config.timeouts.host_cleanup_s)
            self.unplace(vm.host.name, name, key)
            self._record("vm", vm=name, host=vm.host.name, state="stopped", **ids)
        spec = self.spec(name, key, decl)
        self.place(host.name, name, key)
        vm = None
        try:
            vm = make_vm(self.config.driver, spec, host, self.run_dir, self.config)
            vm.migrate_hook = self.migrate_hook
            self._vms[key] = vm
            async with self.gates.boot(host.name):
                image = (decl or self.config.vms.get(name))
                if image is not None and image.image and (self.per_host or self.local_disks):
                    # on the host it starts on (a restart there keeps its disk)
                    await prepare_overlay(host, str(image.image), spec.disk, name,
                                          self.config.timeouts.disk_prepare_s,
                                          keep=self.local_disks and not self.per_host)
                log.info("[vm=%s host=%s] starting", name, host.name)
                self._record("vm", vm=name, host=host.name, state="starting",
                             driver=self.config.driver, run_dir=str(vm.paths.dir),
                             disk=spec.disk, mac=spec.mac, mem_mib=spec.mem_mib, **ids)
                async with self.gates.launch(host.name):
                    await vm.start()
                self._record("vm", vm=name, host=host.name, state="started", pid=vm.pid,
                             **ids)
                booting = time.monotonic()
                await vm.wait_for_login(self.config.timeouts.guest_boot_s)
                log.info("[vm=%s host=%s] booted, logged in after %.3f s", name, host.name,
                         time.monotonic() - booting)
        except BaseException:
            if vm is None or vm.pid is None:        # never ran: the name is free again
                self.unplace(host.name, name, key)
            raise
        return vm

    def claim(self, names: list[str], mig_id: str) -> None:
        """Mark ``names`` as being migrated by ``mig_id``.

        :raise ScenarioError: one of them is already in another migration (or named twice).
        """
        if len(set(names)) != len(names):
            raise ScenarioError(f"{mig_id}: a VM is named twice in {names}")
        for n in names:
            if n in self._busy:
                raise ScenarioError(f"{mig_id}: VM {n!r} is already being migrated by "
                                    f"{self._busy[n]}")
        for n in names:
            self._busy[n] = mig_id

    def holder(self, name: str) -> str | None:
        """The id of the migrate() call that holds VM ``name`` now, if one does."""
        return self._busy.get(name)

    def release(self, names: list[str]) -> None:
        for n in names:
            self._busy.pop(n, None)

    async def stop_all(self) -> list[str]:
        """Stop every VM of this instance; return the problems (never raises)."""
        problems: list[str] = []

        async def stop(key: str, vm: GuestVM) -> None:
            try:
                await vm.stop()
                self.unplace(vm.host.name, vm.name, key)
                self._record("vm", vm=vm.name, host=vm.host.name, state="stopped",
                             **({"key": key} if self.per_host else {}))
            except Exception as exc:  # noqa: BLE001 - cleanup goes on; reported
                problems.append(f"{vm.name} on {vm.host.name}: not stopped ({exc})")
        await asyncio.gather(*(stop(k, vm) for k, vm in self._vms.items()))
        return problems


def instance_run_dir(context: "RunContext") -> str:
    """The run's directory on every host (VM sockets, pid files)."""
    return f"{context.inventory.run_dir}/{context.run_id}"


def instance_env(context: "RunContext", name: str, per_host: bool = False) -> Env:
    """The VMs of scenario instance ``name`` of ``context``'s run.

    :raise ConfigError: a declared VM cannot boot.
    """
    base = disk_base(context.config, context.inventory)
    return Env(context.config, context.inventory, instance_run_dir(context),
               f"{base}/migrator-runs/{context.run_id}/{name}" if base else None,
               record=lambda event, **fields: context.record(event, instance=name, **fields),
               say=lambda line: context.say(f"[{name}] {line}"), per_host=per_host,
               gates=context.gates, local_disks=context.config.migration.storage != "shared")


def disk_base(config: Config, inventory: Inventory) -> str | None:
    """Where a run's disks are: shared storage, or with ``migration.storage`` copy-* each
    host's own (``local_dir``); None: there is none."""
    where = inventory.shared_dir if config.migration.storage == "shared" \
        else inventory.local_dir
    return str(where) if where else None


def auto_mac(run: str, vm: str) -> str:
    """A locally administered unicast MAC (``02:...``) from the run and the VM's name: the
    address pool of a run, unique per VM and run, the same wherever the VM runs."""
    digest = hashlib.sha256(f"{run}/{vm}".encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest[:5])


async def prepare_overlays(host: SSHHost, env: Env, timeout: float) -> None:
    """Create each image-backed VM's qcow2 overlay over its base image, on shared storage.

    :raise CommandError: a base image is missing or qemu-img failed (names the image).
    """
    images = env.images()
    if not images:
        return
    lines = [f"mkdir -p {quote(env.disk_dir)}"]
    for name, base in images.items():
        lines += _overlay_lines(base, env.overlay_path(name), name)
    await host.run(" && ".join(lines), timeout=timeout, check=True)


async def prepare_overlay(host: SSHHost, base: str, path: str, name: str,
                          timeout: float, keep: bool = False) -> None:
    """One VM's overlay ``path`` over ``base`` (its directory made), made on ``host``; with
    ``keep`` one already there is kept (the VM's disk on that host's own storage).

    :raise CommandError: the base image is missing or qemu-img failed (names the image).
    """
    lines = [f"mkdir -p {quote(str(PurePosixPath(path).parent))}",
             *_overlay_lines(base, path, name)]
    script = " && ".join(lines)
    if keep:
        script = f"test -e {quote(path)} || {{ {script}; }}"
    await host.run(script, timeout=timeout, check=True)


def _overlay_lines(base: str, path: str, name: str) -> list[str]:
    why = quote(f"base image {base} of VM {name} is not readable")
    return [f"{{ test -r {quote(base)} || {{ echo {why} >&2; false; }}; }}",
            f"qemu-img create -q -f qcow2 -F qcow2 -b {quote(base)} {quote(path)}"]
