"""Boot the lab guest on a lab host, run a command on its serial console, stop it.

Everything goes through SSH, as it would on a real host: QEMU is started by a remote command,
its QMP and serial sockets (in the host's private /run) are reached through SSH unix-socket
channels. QEMU starts paused (``-S``) and is resumed over QMP only after the console is
attached, so no boot output is ever missed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

from ..config import Config, Inventory
from ..errors import ConfigError
from ..hosts.ssh import SSHHost
from ..hypervisor.qemu import QemuVM, VMSpec
from .lab import Lab


@dataclass
class BootResult:
    host: str
    vm: str
    start_s: float           # remote QEMU start (SSH command until sockets listen)
    boot_to_shell_s: float   # QMP 'cont' until the shell prompt on the console
    ready_uptime_s: float    # the guest's own uptime when it printed LAB-READY
    command_s: float
    exit_status: int
    output: str


async def boot_and_run(lab: Lab, host: str, command: str, mem_mib: int, config: Config,
                       progress: Callable[[str], None] | None = None,
                       vm_name: str | None = None) -> BootResult:
    """Boot a guest on ``host`` of ``lab``, run ``command`` on its console, stop the guest.

    :raise ConfigError: the lab is not up or has no such host.
    :raise GuestError: the guest did not boot or answer in time (it is stopped anyway).
    :raise HostError: the host could not be reached.
    """
    say = progress or (lambda _m: None)
    if not lab.inventory_path.exists():
        raise ConfigError(f"lab {lab.name} is not up (migrate-lab up --name {lab.name})")
    inv = Inventory.load(lab.inventory_path)
    if inv.guest is None:
        raise ConfigError(f"inventory {inv.source} names no guest image")
    timeouts = config.timeouts
    name = vm_name or f"boot{os.getpid()}"
    spec = VMSpec(name=name, mem_mib=mem_mib, kernel=str(inv.guest.kernel),
                  initrd=str(inv.guest.initrd), append=inv.guest.append + " lab.tick=0",
                  accel=inv.accel)
    async with SSHHost.from_inventory(host, inv, config) as h:
        vm = QemuVM(spec, h, str(inv.run_dir), config)
        t0 = time.monotonic()
        await vm.start(paused=True)
        start_s = time.monotonic() - t0
        say(f"QEMU {vm.pid} started on {host} (paused, {inv.accel}, {mem_mib} MiB) in "
            f"{start_s:.2f} s")
        try:
            console = await vm.console()
            t1 = time.monotonic()
            await (await vm.qmp()).execute("cont")
            ready = await console.read_until(r"LAB-READY uptime=([0-9.]+)",
                                             timeouts.guest_boot_s)
            await console.read_until(console.prompt, timeouts.guest_boot_s)
            boot_s = time.monotonic() - t1
            say(f"guest answered: LAB-READY at guest uptime {ready.group(1)} s, shell "
                f"prompt {boot_s:.2f} s after 'cont'")
            t2 = time.monotonic()
            status, output = await console.cmd(command, timeouts.guest_cmd_s, check=False)
            cmd_s = time.monotonic() - t2
            console.close()
        finally:
            await vm.stop()
    return BootResult(host, name, start_s, boot_s, float(ready.group(1)), cmd_s, status, output)
