#!/usr/bin/env python3
"""Benchmark the lab guest's boot under TCG: the kernel command line and the devices.

Boots the lab image (the cached one, built if missing) with QEMU on this machine, no lab
needed, in rounds; each round boots every case once, in an order that rotates from round to
round. A case is a kernel command line (the lab's before cryptomgr.notests, and now) and
whether the VM has a virtio NIC. Every case boots the current image, whose init loads the
virtio modules only when the VM has a virtio device: the NIC cases carry that cost (and the
NIC's own probing), the others show what a guest without one is spared. For each boot: the guest's uptime when
it prints LAB-READY (its kernel and init) and the wall time from QEMU's start to that line.
Prints a table of medians and quartiles. Not a test: numbers depend on the machine.

usage: bench/guest_boot.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrator.config import GUEST_KERNEL_APPEND  # noqa: E402
from migrator.lab.image import ensure_image  # noqa: E402

from bench._machine import settle  # noqa: E402

OLD = "console=ttyS0 quiet panic=-1"          # the lab guest's command line before
READY = re.compile(rb"LAB-READY uptime=([0-9.]+)")
NIC = ["-netdev", "user,id=net0,restrict=on", "-device", "virtio-net-pci,netdev=net0"]
CASES = [                    # (name, append, extra QEMU arguments)
    ("old cmdline, no NIC", OLD, []),
    ("new cmdline, no NIC", GUEST_KERNEL_APPEND, []),
    ("old cmdline, virtio NIC", OLD, NIC),
    ("new cmdline, virtio NIC", GUEST_KERNEL_APPEND, NIC),
]


async def boot(image, append: str, extra: list[str], timeout_s: float = 120.0
               ) -> tuple[float, float]:
    """(guest uptime at LAB-READY, wall from QEMU's start to it). QEMU is killed and waited
    for, also when the boot fails or this is cancelled."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64", "-m", "128", "-smp", "1",
        "-machine", "pc", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"{append} lab.tick=0", "-serial", "stdio", *extra,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    seen = b""
    try:
        async with asyncio.timeout(timeout_s):
            while not (m := READY.search(seen)):
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    raise RuntimeError(f"QEMU exited before LAB-READY: {seen[-500:]!r}")
                seen += chunk
        return float(m.group(1)), time.monotonic() - t0
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def quartiles(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return f"{q[1]:5.2f} ({q[0]:.2f}-{q[2]:.2f})"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    image = await ensure_image()
    print(f"image {image.kernel_package} ({image.dir}); {args.rounds} rounds")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in CASES}
    for r in range(args.rounds):
        order = CASES[r % len(CASES):] + CASES[:r % len(CASES)]
        for name, append, extra in order:
            settle()
            results[name].append(await boot(image, append, extra))
    print(f"\n{'case':24} {'uptime s (quartiles)':>24} {'wall s (quartiles)':>24}")
    for name, _, _ in CASES:
        ups, walls = [u for u, _ in results[name]], [w for _, w in results[name]]
        print(f"{name:24} {quartiles(ups):>24} {quartiles(walls):>24}")
    for nic in ("no NIC", "virtio NIC"):
        old = statistics.median(w for _, w in results[f"old cmdline, {nic}"])
        new = statistics.median(w for _, w in results[f"new cmdline, {nic}"])
        print(f"{nic}: wall {old:.2f} -> {new:.2f} s ({new - old:+.2f} s)")
    for cmdline in ("old", "new"):
        bare = statistics.median(w for _, w in results[f"{cmdline} cmdline, no NIC"])
        nic = statistics.median(w for _, w in results[f"{cmdline} cmdline, virtio NIC"])
        print(f"{cmdline} cmdline: a virtio NIC (its modules loaded, probed) {nic - bare:+.2f} s")
    print(f"\nold: {OLD!r}\nnew: {GUEST_KERNEL_APPEND!r}")


if __name__ == "__main__":
    asyncio.run(main())
