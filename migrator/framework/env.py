"""The VMs of one scenario instance: declared in config, started on demand, tracked wherever
they run (``self.env.get_vm(name)``)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Callable

from ..blocking import BlockingInWorkers
from ..config import Config, Inventory
from ..errors import ConfigError, ScenarioError
from ..hosts import SSHHost, quote
from ..hypervisor import GuestVM, VMSpec, make_vm

if TYPE_CHECKING:
    from .context import RunContext

log = logging.getLogger(__name__)

#: undeclared names of this form are lab guests of the default size
DEFAULT_VM_NAME = re.compile(r"^vm[0-9]{1,3}$")
#: the lab guest prints TICK n on its second serial port with this
LAB_GUEST_ARGS = "lab.out=ttyS1"


class Env(BlockingInWorkers):
    """VM specs and VM objects of one scenario instance.

    :param run_dir: the per-run directory on hosts holding VM sockets (``<run_dir>/<vm>/``).
    :param disk_dir: per-run directory on shared storage for the VMs' overlays.
    """

    def __init__(self, config: Config, inventory: Inventory, run_dir: str,
                 disk_dir: str | None, record: Callable[..., None] | None = None,
                 say: Callable[[str], None] | None = None):
        self.config, self.inventory = config, inventory
        self.run_dir, self.disk_dir = run_dir, disk_dir
        self._record = record or (lambda event, **fields: None)   # the run's journal
        self._say = say or (lambda line: log.info("%s", line))
        #: what ``vm.migrate(dst)`` calls for the VMs started here (set by the framework)
        self.migrate_hook = None
        self._vms: dict[str, GuestVM] = {}
        self._busy: dict[str, str] = {}
        for name in config.vms:
            self.spec(name)          # every declared VM must be bootable: fail before start

    def overlay_path(self, name: str) -> str:
        return str(PurePosixPath(self.disk_dir or "/") / f"{name}.qcow2")

    def spec(self, name: str) -> VMSpec:
        """The spec of VM ``name``.

        :raise ConfigError: an undeclared name that is not ``vmN``, or a VM that cannot boot
            (no kernel and no image, image without shared storage).
        """
        decl = self.config.vms.get(name)
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
                raise ConfigError(f"VM {name!r} has an image but the inventory has no "
                                  "shared_dir for its overlay")
            disk = self.overlay_path(name)
        if not kernel and not disk:
            raise ConfigError(f"VM {name!r}: no kernel and no image (the inventory has no "
                              "guest section; declare one for it)")
        mac = decl.mac if decl else None
        if mac == "auto":
            mac = auto_mac(self.run_dir, name)
        login = decl.login if decl else None
        try:
            return VMSpec(name, mem_mib=mem, vcpus=decl.vcpus if decl else 1, mac=mac,
                          login_user=login.user if login else None,
                          login_password=login.password if login else None,
                          prompt=login.prompt if login else None,
                          kernel=str(kernel) if kernel else None,
                          initrd=str(initrd) if initrd else None, append=append,
                          accel=self.inventory.accel, disk=disk,
                          extra_args=tuple(decl.extra_args) if decl else ())
        except ValueError as exc:
            raise ConfigError(f"VM {name!r}: {exc}") from None

    def images(self) -> dict[str, str]:
        """``{vm: base image}`` of the declared VMs that boot from a disk image."""
        return {n: str(d.image) for n, d in self.config.vms.items() if d.image}

    def get_vm(self, name: str) -> GuestVM:
        """The VM object of ``name``: it refers to the VM wherever it runs now.

        :raise ScenarioError: the VM has not been started in this run.
        """
        try:
            return self._vms[name]
        except KeyError:
            raise ScenarioError(f"VM {name!r} is not running in this run (migrate() starts "
                                "VMs on their source)") from None

    async def ensure_running(self, name: str, host: SSHHost,
                             restart_elsewhere: bool = False) -> GuestVM:
        """The VM ``name`` running on ``host``: started there (and logged in) if it is not
        running yet.

        :param restart_elsewhere: when the VM runs on another host, stop it there and boot
            it afresh on ``host`` (Autotest's preparation of a migration's source), instead
            of failing. Said on the run's output and in the journal.
        :raise ScenarioError: the VM runs on another host (and not ``restart_elsewhere``).
        :raise GuestError: it did not start or boot.
        """
        vm = self._vms.get(name)
        if vm is not None and vm.pid is not None:
            if vm.host.name == host.name:
                return vm
            if not restart_elsewhere:
                raise ScenarioError(f"VM {name!r} runs on {vm.host.name}, not on {host.name}")
            self._say(f"VM {name} runs on {vm.host.name}: stopped there, to boot afresh on "
                      f"{host.name} (restart_vm_on_source: Autotest's preparation of a "
                      "migration's source)")
            await vm.stop()
            self._record("vm", vm=name, host=vm.host.name, state="stopped")
        vm = make_vm(self.config.driver, self.spec(name), host, self.run_dir, self.config)
        vm.migrate_hook = self.migrate_hook
        self._vms[name] = vm
        log.info("[vm=%s host=%s] starting", name, host.name)
        self._record("vm", vm=name, host=host.name, state="starting",
                     driver=self.config.driver, run_dir=str(vm.paths.dir), disk=vm.spec.disk,
                     mac=vm.spec.mac)
        await vm.start()
        self._record("vm", vm=name, host=host.name, state="started", pid=vm.pid)
        await vm.wait_for_login(self.config.timeouts.guest_boot_s)
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

        async def stop(vm: GuestVM) -> None:
            try:
                await vm.stop()
                self._record("vm", vm=vm.name, host=vm.host.name, state="stopped")
            except Exception as exc:  # noqa: BLE001 - cleanup goes on; reported
                problems.append(f"{vm.name} on {vm.host.name}: not stopped ({exc})")
        await asyncio.gather(*(stop(vm) for vm in self._vms.values()))
        return problems


def instance_run_dir(context: "RunContext") -> str:
    """The run's directory on every host (VM sockets, pid files)."""
    return f"{context.inventory.run_dir}/{context.run_id}"


def instance_env(context: "RunContext", name: str) -> Env:
    """The VMs of scenario instance ``name`` of ``context``'s run.

    :raise ConfigError: a declared VM cannot boot.
    """
    shared = context.inventory.shared_dir
    return Env(context.config, context.inventory, instance_run_dir(context),
               f"{shared}/migrator-runs/{context.run_id}/{name}" if shared else None,
               record=lambda event, **fields: context.record(event, instance=name, **fields),
               say=lambda line: context.say(f"[{name}] {line}"))


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
        why = quote(f"base image {base} of VM {name} is not readable")
        lines.append(f"{{ test -r {quote(base)} || {{ echo {why} >&2; false; }}; }}")
        lines.append(f"qemu-img create -q -f qcow2 -F qcow2 -b {quote(base)} "
                     f"{quote(env.overlay_path(name))}")
    await host.run(" && ".join(lines), timeout=timeout, check=True)
