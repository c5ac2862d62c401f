"""A live migration in the lab, end to end, with every oracle checked (``migrate-lab migrate``).

Boot the lab guest on SRC, write a memory checksum in it, migrate it to DST while printing
progress, then prove it on DST: QEMU running, the guest's TICK counter past the source's, the
checksum intact (and the dirtier's stale-page count zero when it runs). The guest is stopped
at the end, whatever happened.
"""

from __future__ import annotations

import asyncio
import json
from typing import Callable

from ..config import Config, Inventory
from ..errors import ConfigError, GuestError
from ..hosts.ssh import SSHHost
from ..hypervisor.qemu import QemuVM, VMSpec
from ..migration import Migration, MigrationParams, MigrationResult
from ..migration.oracles import dirtier_report, wait_tick_after
from .lab import Lab


async def migrate_demo(lab: Lab, src: str, dst: str, *, mem_mib: int, dirty_mib: int,
                       params: MigrationParams, config: Config,
                       say: Callable[[str], None]) -> MigrationResult:
    """Run the demo migration; return its result record.

    :raise ConfigError: lab not up, unknown host, src == dst.
    :raise MigrationError: the migration failed (the VM was kept on ``src``).
    :raise GuestError: an oracle failed on the destination.
    """
    if not lab.inventory_path.exists():
        raise ConfigError(f"lab {lab.name} is not up (migrate-lab up --name {lab.name})")
    if src == dst:
        raise ConfigError("source and destination must differ")
    inv = Inventory.load(lab.inventory_path)
    inv.host(src), inv.host(dst)
    extra = " lab.out=ttyS1" + (f" lab.dirty={dirty_mib}" if dirty_mib else "")
    spec = VMSpec("demo", mem_mib=mem_mib, kernel=str(inv.guest.kernel),
                  initrd=str(inv.guest.initrd), append=inv.guest.append + extra,
                  accel=inv.accel)
    async with SSHHost.from_inventory(src, inv, config) as a, \
            SSHHost.from_inventory(dst, inv, config) as b:
        vm = QemuVM(spec, a, str(inv.run_dir), config)
        mig = None
        try:
            await vm.start()
            session = await vm.wait_for_login()
            written = (await session.cmd("memsum write 32 2026")).strip()
            say(f"guest up on {src}: {written}")
            await wait_tick_after(vm, 0, config.timeouts.guest_boot_s)   # ticking for a while

            async def show_progress():
                async for r in mig.progress():
                    if r.status == "active":
                        say(f"  {r.status:<9} iteration {r.iteration:<3} sent "
                            f"{r.transferred / 2**20:7.1f} MiB  remaining "
                            f"{r.remaining / 2**20:6.1f} MiB  {r.mbps:7.0f} Mbit/s")

            src_tick = await vm.last_tick()
            mig = Migration(vm, b, inv.hosts[dst].migration_address or inv.hosts[dst].address,
                            params, config)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(show_progress())
                result = await mig.run()
            there = vm                     # the VM object followed the VM to the destination
            tick = await wait_tick_after(there, src_tick, config.timeouts.guest_boot_s)
            session = await there.wait_for_login()
            verified = (await session.cmd("memsum verify")).strip()
            say(f"on {dst}: QEMU {await there.status()}, TICK {tick} > {src_tick} (source's "
                f"last), {verified}")
            if dirty_mib:
                report = await dirtier_report(there)
                if report is None or report[1] != 0:
                    raise GuestError(dst, "demo", f"dirtier reports {report}")
                say(f"on {dst}: dirtier pass {report[0]}, stale pages {report[1]}")
            return result
        finally:
            # through the objects that own QMP connections (closed before QEMU goes away);
            # after a successful migration both are the same object, on the destination
            if mig is not None:
                await mig.dst_vm.stop()
            await vm.stop()


def summary(result: MigrationResult) -> str:
    r = result
    lines = [
        f"migration {r.vm} {r.src} -> {r.dst}: {r.status} (phase {r.phase})",
        f"  QEMU total time   {r.total_time_ms} ms, downtime {r.downtime_ms} ms (QEMU), "
        f"{r.downtime_events_ms} ms (STOP->RESUME events)",
        f"  transferred       {(r.transferred_bytes or 0) / 2**20:.1f} MiB at "
        f"{r.throughput_mbps or 0:.0f} Mbit/s, {r.iterations} iterations, port {r.port}",
        f"  wall              {r.wall_s:.3f} s from 'migrate' to completed; whole run "
        f"{r.run_s:.3f} s (orchestration overhead {r.overhead_s:.3f} s)",
        "  phases            " + " -> ".join(f"{p}@{t:.3f}s" for p, t, _ in r.phases),
    ]
    return "\n".join(lines) + "\n" + json.dumps(r.to_json(), indent=None)
