"""Child process of ``test_libvirt_ownership``: churn libvirt connections and domain objects
under event traffic, the way a long run does, with the garbage collector as eager as it gets.

    python tests/_libvirt_churn.py INVENTORY HOST ROUNDS

Each round opens connections through :class:`LibvirtVM` (the way the drivers do), registers
lifecycle callbacks, defines and undefines domains (every define/undefine is an event on
every connection of the host), leaves domain objects in reference cycles (only the cyclic
collector can free them, wherever it happens to run: libvirt's I/O callbacks included), and
closes the connections. ``gc.set_threshold(1)`` makes the collector run on almost every
allocation. Prints ``open connections: N`` and exits 0; a deadlock never returns (the test
kills it after a bound).
"""

from __future__ import annotations

import asyncio
import gc
import sys

import libvirt

from migrator.config import Config, Inventory
from migrator.hosts import SSHHost
from migrator.hypervisor.libvirt import LibvirtVM, open_connections
from migrator.hypervisor.vm import VMSpec

XML = ("<domain type='qemu'><name>{name}</name><memory unit='MiB'>16</memory>"
       "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>")


async def churn(inventory: Inventory, host_name: str, rounds: int) -> int:
    config = Config()
    events: list[int] = []
    garbage: list = []
    async with SSHHost.from_inventory(host_name, inventory, config) as host:
        for r in range(rounds):
            vms = [LibvirtVM(VMSpec(name=f"churn{r}-{i}", kernel="/nonexistent"), host,
                             "/run/migrator/churn", config) for i in range(4)]
            for vm in vms:
                conn = await vm.connection()
                await conn.register_event(libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                          lambda *a: events.append(a[2]),
                                          timeout=30)
            for vm in vms:
                raw = await vm.conn()
                dom = await vm.call("define", raw.defineXML, XML.format(name=vm.name))
                again = await vm.domain()
                cycle: list = [dom, again]
                cycle.append(cycle)                # only the cyclic collector frees these
                garbage.append(cycle)
                await vm.call("undefine", dom.undefine)
            garbage.clear()
            for vm in vms:                         # events may still be arriving
                await vm.close()
            del vms
    left = len(open_connections())
    print(f"events seen: {len(events)}")
    print(f"open connections: {left}")
    return 0


def main() -> int:
    gc.set_threshold(1, 1, 1)
    inventory = Inventory.load(sys.argv[1])
    return asyncio.run(churn(inventory, sys.argv[2], int(sys.argv[3])))


if __name__ == "__main__":
    sys.exit(main())
