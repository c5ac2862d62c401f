"""Oracles: what proves a migration kept the guest alive and intact.

* the destination QEMU is ``running`` and the source ``postmigrate`` (checked by the engine);
* the guest's TICK counter (ttyS1) advances on the destination beyond the source's last tick;
* the in-guest dirtier reports zero stale pages (``bad=0``);
* a memory checksum written before the migration verifies after it (``memsum verify``).
"""

from __future__ import annotations

import asyncio
import re

from ..errors import GuestError
from ..hypervisor.qemu import QemuVM

#: the lab dirtier's report: guest time, pass, rate in MiB/s, stale pages so far
DIRTY = re.compile(r"DIRTY t=([\d.]+) pass=(\d+) rate=(\d+)MB/s bad=(\d+)")


async def wait_tick_after(vm: QemuVM, after: int | None, timeout: float) -> int:
    """Wait until ``vm``'s guest prints a TICK greater than ``after``; return it.

    :raise GuestError: when none comes within ``timeout`` (the guest is not running there).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        tick = await vm.last_tick()
        if tick is not None and (after is None or tick > after):
            return tick
        if loop.time() >= deadline:
            raise GuestError(vm.host.name, vm.name, f"no TICK after {after} within {timeout:g} s"
                             f" (last seen: {tick})")
        await asyncio.sleep(0.2)


async def dirtier_report(vm: QemuVM) -> tuple[int, int] | None:
    """(passes, stale pages) from the last DIRTY line on ``vm``'s ttyS1, or None."""
    for line in reversed(await vm.status_lines()):
        m = DIRTY.search(line)
        if m:
            return int(m.group(2)), int(m.group(4))
    return None


async def wait_dirtying(vm: QemuVM, timeout: float) -> int:
    """Wait until ``vm``'s dirtier reports its first rate (it allocates and zeroes its memory
    first, which takes seconds under TCG); return that rate in MiB/s.

    :raise GuestError: no report within ``timeout`` (no dirtier runs, or the guest does not).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        for line in reversed(await vm.status_lines()):
            m = DIRTY.search(line)
            if m:
                return int(m.group(3))
        if loop.time() >= deadline:
            raise GuestError(vm.host.name, vm.name, f"the dirtier reported nothing within "
                                                    f"{timeout:g} s")
        await asyncio.sleep(0.2)
