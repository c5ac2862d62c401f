"""Choosing the accelerator for lab guests: KVM only if it really boots the guest, else TCG.

``/dev/kvm`` existing proves nothing: on this machine kind it is PVM, which runs only guests
built as PVM guests. A stock Debian kernel hangs in its decompressor there, or dies with a KVM
emulation failure after minutes (recipe section 1). So the probe boots the real lab guest with
``-accel kvm -cpu host`` and waits for its ready marker, with a timeout.

The answer is cached per boot of this machine and per guest image (``accel-probe.json`` in the
cache dir), so only the first ``up`` after a reboot pays for it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import GUEST_KERNEL_APPEND
from .image import CACHE_DIR, GuestImage

READY_MARKER = b"LAB-READY"
PROBE_CACHE = CACHE_DIR / "accel-probe.json"


@dataclass(frozen=True)
class AccelChoice:
    accel: str          # "kvm" or "tcg"
    reason: str         # why, in words a user can act on
    probed_s: float     # how long the probe took (0 if cached or not run)
    cached: bool = False


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


async def probe_kvm(image: GuestImage, timeout_s: float) -> tuple[bool, str]:
    """Boot the lab guest under KVM; (True, why) if it printed its ready marker in time."""
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened: {exc.strerror}"
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "128", "-smp", "1",
        "-machine", "pc", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"{GUEST_KERNEL_APPEND} lab.tick=0", "-serial", "stdio",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    seen = b""
    try:
        async with asyncio.timeout(timeout_s):
            while READY_MARKER not in seen:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    break
                seen = (seen + chunk)[-65536:]
    except TimeoutError:
        return False, (f"a KVM guest printed no ready marker within {timeout_s:g} s "
                       "(e.g. a PVM /dev/kvm that cannot run stock kernels)")
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    if READY_MARKER in seen:
        return True, "the lab guest booted under KVM"
    last = seen.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    return False, f"QEMU with -accel kvm exited ({proc.returncode}): {last[0][:200]}"


async def choose_accel(requested: str, image: GuestImage, timeout_s: float,
                       use_cache: bool = True) -> AccelChoice:
    """Resolve ``auto``/``kvm``/``tcg`` into the accelerator the lab will use.

    ``tcg`` is taken as is. ``kvm`` and ``auto`` probe (or reuse this boot's probe); ``kvm``
    then fails if KVM does not work, ``auto`` falls back to TCG.

    :raise ValueError: when ``kvm`` was requested and the probe failed (message says why).
    """
    if requested == "tcg":
        return AccelChoice("tcg", "requested", 0.0)
    key = {"boot_id": _boot_id(), "image": image.key}
    cached = None
    if use_cache and PROBE_CACHE.is_file():
        try:
            data = json.loads(PROBE_CACHE.read_text())
            if data.get("key") == key:
                cached = data
        except (ValueError, OSError):
            cached = None
    if cached is not None:
        ok, why, took, from_cache = cached["kvm_ok"], cached["reason"], 0.0, True
    else:
        t0 = time.monotonic()
        ok, why = await probe_kvm(image, timeout_s)
        took, from_cache = time.monotonic() - t0, False
        PROBE_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = PROBE_CACHE.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "kvm_ok": ok, "reason": why,
                                   "probed_s": round(took, 2)}))
        os.replace(tmp, PROBE_CACHE)
    if ok:
        return AccelChoice("kvm", why, took, from_cache)
    if requested == "kvm":
        raise ValueError(f"--accel kvm: KVM cannot run the lab guest here: {why}; "
                         "use --accel tcg or --accel auto")
    return AccelChoice("tcg", f"KVM probe failed, using TCG: {why}", took, from_cache)


__all__ = ["AccelChoice", "choose_accel", "probe_kvm"]
