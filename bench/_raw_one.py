#!/usr/bin/env python3
"""The raw side of bench/run_vs_raw.py: one migration of a lab guest with nothing but QMP.

Boots vm1 on SRC (waiting for its shell, as migrate-run does), starts the destination with
-incoming defer, then: events capability, bandwidth cap lifted, migrate-incoming on a fixed
port, migrate, poll query-migrate every 50 ms until completed, stop both QEMUs.

usage: _raw_one.py INVENTORY SRC DST
"""

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrator.config import Config, Inventory  # noqa: E402
from migrator.hosts import SSHHost  # noqa: E402
from migrator.hypervisor.qemu import QemuVM, VMSpec  # noqa: E402
from migrator.migration.params import UNCAPPED_BYTES_S  # noqa: E402


async def main(inv_path: str, src: str, dst: str) -> None:
    inv, config = Inventory.load(inv_path), Config()
    spec = VMSpec("rawvm", kernel=str(inv.guest.kernel), initrd=str(inv.guest.initrd),
                  append=f"{inv.guest.append} lab.out=ttyS1")
    run_dir = f"{inv.run_dir}/raw"
    async with SSHHost.from_inventory(src, inv) as a, SSHHost.from_inventory(dst, inv) as b:
        vm = QemuVM(spec, a, run_dir, config)
        there = QemuVM(spec, b, run_dir, config)
        try:
            await vm.start()
            booting = time.monotonic()
            await vm.wait_for_login()
            print(f"raw: booted, logged in after {time.monotonic() - booting:.3f} s")
            await there.start(incoming=True)
            sq, dq = await vm.qmp(), await there.qmp()
            for q in (sq, dq):
                await q.execute("migrate-set-capabilities",
                                {"capabilities": [{"capability": "events", "state": True}]})
            await sq.execute("migrate-set-parameters", {"max-bandwidth": UNCAPPED_BYTES_S})
            addr = inv.hosts[dst].address
            await dq.execute("migrate-incoming", {"uri": f"tcp:{addr}:4444"})
            await sq.execute("migrate", {"uri": f"tcp:{addr}:4444"})
            while (info := await sq.execute("query-migrate"))["status"] != "completed":
                if info["status"] in ("failed", "cancelled"):
                    raise SystemExit(f"raw migration {info['status']}")
                await asyncio.sleep(0.05)
            print(f"raw: completed, QEMU total {info.get('total-time')} ms")
        finally:
            await vm.stop()
            await there.stop()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
