"""The lab guest image: a Debian kernel and a busybox initramfs, built once and cached.

Build steps (:func:`ensure_image`):

1. The kernel: the package that ``linux-image-amd64`` depends on is downloaded with
   ``apt-get download`` (never installed) and its ``/boot/vmlinuz-*`` extracted. The xz payload
   of that bzImage is decompressed into the ELF ``vmlinux``, which QEMU boots through PVH and
   which skips ~3 s of in-guest decompression under TCG (recipe pitfall 2).
2. The guest tools (``labtools.c``: the checking dirtier and the memory checksum) are compiled
   statically with gcc.
3. The initramfs (newc cpio, gzip) is written here in Python with fixed owners and times, so the
   same inputs give byte-identical images: busybox-static with its applet links, the tools and
   ``init.sh``.

The cache is content-addressed: ``/var/cache/migrator/guest/<key>/``, where the key hashes the
kernel package version, the busybox binary and the two sources. A changed input makes a new
image; an unchanged one is reused in milliseconds.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..config import GUEST_KERNEL_APPEND
from ..errors import LabError
from .system import run

CACHE_DIR = Path(os.environ.get("MIGRATOR_CACHE", "/var/cache/migrator"))
BUSYBOX = Path("/bin/busybox")
BUILDER_VERSION = "5"
#: kernel modules the guest loads at boot (with their dependencies): Debian builds virtio as
#: modules; a disk on shared storage is a virtio-blk device, a NIC (VMSpec.mac) virtio-net
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_net")
#: modules taken from the kernel package besides drivers/virtio and drivers/block
_NET_MODULES = {"virtio_net.ko", "net_failover.ko", "failover.ko"}


@dataclass(frozen=True)
class GuestImage:
    """A built image. ``kernel`` is the PVH ``vmlinux``; ``bzimage`` the original ``vmlinuz``."""

    dir: Path
    kernel: Path
    bzimage: Path
    initrd: Path
    kernel_package: str
    key: str
    built: bool
    """True if this call built it, False if it came from the cache."""
    seconds: float


def _source(name: str) -> bytes:
    return resources.files("migrator.lab").joinpath("guestsrc", name).read_bytes()


async def _kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel that linux-image-amd64 currently depends on."""
    for attempt in (1, 2):
        deps = await run("apt-cache", "depends", "linux-image-amd64", check=False)
        pkg = next((line.split()[-1] for line in deps.stdout.splitlines()
                    if "Depends: linux-image-" in line), None)
        if pkg:
            show = await run("apt-cache", "show", "--no-all-versions", pkg, what="apt-cache show")
            version = next(line.split(None, 1)[1] for line in show.stdout.splitlines()
                           if line.startswith("Version:"))
            return pkg, version
        if attempt == 1:  # package lists missing on a fresh machine
            await run("apt-get", "update", "-qq", what="apt-get update")
    cached = sorted((CACHE_DIR / "kernels").glob("*/vmlinuz")) if (CACHE_DIR / "kernels").is_dir() else []
    if cached:
        pkg, version = cached[-1].parent.name.split("_", 1)
        return pkg, version
    raise LabError("cannot find the Debian kernel package (apt-cache depends linux-image-amd64 "
                   "found nothing): run 'apt-get update' and retry")


async def _kernel(pkg: str, version: str) -> tuple[Path, Path]:
    """Download and unpack the kernel once; returns (vmlinuz, vmlinux) in the kernel cache.

    The package's virtio modules are unpacked next to them (``modules/``)."""
    kdir = CACHE_DIR / "kernels" / f"{pkg}_{version}"
    vmlinuz, vmlinux = kdir / "vmlinuz", kdir / "vmlinux"
    if vmlinuz.is_file() and vmlinux.is_file() and (kdir / "modules" / "virtio_net.ko").is_file():
        return vmlinuz, vmlinux
    kdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kdir) as tmp:
        os.chmod(tmp, 0o755)  # apt's _apt sandbox user must be able to write the .deb here
        await run("sh", "-c", f'cd "{tmp}" && apt-get download -q "{pkg}={version}"',
                  what=f"apt-get download {pkg}")
        deb = next(Path(tmp).glob("*.deb"))
        tar_bytes = (await run_bytes("dpkg-deb", "--fsys-tarfile", str(deb)))
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            member = next((m for m in tar.getmembers()
                           if m.name.startswith("./boot/vmlinuz-") and m.isfile()), None)
            if member is None:
                raise LabError(f"{deb.name} has no /boot/vmlinuz-*")
            data = tar.extractfile(member).read()
            mods = kdir / "modules"
            mods.mkdir(exist_ok=True)
            for m in tar.getmembers():
                name = m.name.rsplit("/", 1)[-1]
                if m.isfile() and name.endswith(".ko") and ("/drivers/virtio/" in m.name
                                                            or "/drivers/block/" in m.name
                                                            or name in _NET_MODULES):
                    (mods / name).write_bytes(tar.extractfile(m).read())
    elf = _pvh_vmlinux(data)
    _atomic_write(vmlinux, elf)
    _atomic_write(vmlinuz, data)
    return vmlinuz, vmlinux


async def run_bytes(*args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise LabError(f"{args[0]} failed: {err.decode(errors='replace').strip()}")
    return out


def _pvh_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage (xz payload), bootable through PVH."""
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise LabError("kernel bzImage has no xz payload; cannot extract vmlinux")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    if not elf.startswith(b"\x7fELF"):
        raise LabError("decompressed kernel payload is not an ELF image")
    return elf


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class _Cpio:
    """A newc cpio archive with fixed owner 0:0 and mtime 0 (reproducible)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(header + name.encode() + b"\0")
        self.buf.write(b"\0" * (-(len(header) + len(name) + 1) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))
        self.ino += 1

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _module_closure(mods: Path, wanted: tuple[str, ...]) -> list[Path]:
    """``wanted`` modules and their dependencies, dependencies first.

    Dependencies come from each .ko's ``depends=`` modinfo field (a .deb ships no
    modules.dep: depmod makes it at install time).

    :raise LabError: when a module or a dependency is not in the package.
    """
    order: list[Path] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        path = mods / f"{name.replace('-', '_')}.ko"
        if path in order:
            return
        if not path.is_file():
            raise LabError(f"kernel module {name} (needed by {' <- '.join(chain) or 'the guest'})"
                           " is not in the kernel package")
        data = path.read_bytes()
        i = data.find(b"\0depends=")
        deps = data[i + 9:data.index(b"\0", i + 9)].decode().split(",") if i >= 0 else []
        for dep in filter(None, deps):
            visit(dep, chain + (name,))
        order.append(path)

    for name in wanted:
        visit(name, ())
    return order


async def _initramfs(tools: bytes, init: bytes, modules: list[Path] | None = None) -> bytes:
    applets = (await run(str(BUSYBOX), "--list-full", what="busybox --list-full")).stdout.split()
    archive = _Cpio()
    dirs = {"bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "root", "etc"}
    for d in sorted(dirs):
        archive.dir(d)
    archive.file("bin/busybox", BUSYBOX.read_bytes())
    for path in sorted(set(applets)):
        if path != "bin/busybox" and path.split("/")[0] in ("bin", "sbin", "usr"):
            archive.symlink(path, "/bin/busybox")
    archive.dir("lib")
    archive.dir("lib/modules")
    for path in modules or []:
        archive.file(f"lib/modules/{path.name}", path.read_bytes(), 0o644)
    archive.file("lib/modules/load.order",
                 "".join(f"{p.name}\n" for p in modules or []).encode(), 0o644)
    archive.file("bin/labtools", tools)
    archive.symlink("bin/dirtier", "labtools")
    archive.symlink("bin/memsum", "labtools")
    archive.symlink("bin/diskcheck", "labtools")
    archive.symlink("usr/bin/nohup", "/bin/labtools")
    archive.file("init", init)
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


async def ensure_image(refresh: bool = False, rebuild: bool = False) -> GuestImage:
    """Return the cached guest image, building what is missing.

    ``refresh`` asks apt again which kernel linux-image-amd64 points to (otherwise the last
    answer is reused, so a lab comes up without touching apt); ``rebuild`` rebuilds even if the
    image is cached.

    :raise LabError: when a tool is missing (busybox-static, gcc, apt) or the kernel cannot be
        fetched; the message says which and what to install.
    """
    t0 = time.monotonic()
    if not BUSYBOX.is_file():
        raise LabError(f"{BUSYBOX} not found: install busybox-static (make setup)")
    if shutil.which("gcc") is None:
        raise LabError("gcc not found: install gcc and libc6-dev (make setup)")
    tools_src, init = _source("labtools.c"), _source("init.sh")
    local = hashlib.sha256()
    for part in (BUILDER_VERSION.encode(), hashlib.sha256(BUSYBOX.read_bytes()).digest(),
                 tools_src, init):
        local.update(hashlib.sha256(part).digest())
    # the last kernel resolved for these local inputs; apt is asked again only on refresh
    latest = CACHE_DIR / "guest" / f"latest-{local.hexdigest()[:16]}.json"
    if not refresh and not rebuild and latest.is_file():
        known = json.loads(latest.read_text())
        out = CACHE_DIR / "guest" / known["key"]
        if (out / "manifest.json").is_file():
            return _image(out, known, built=False, t0=t0)
    pkg, version = await _kernel_package()
    h = local.copy()
    h.update(f"{pkg}={version}".encode())
    key = h.hexdigest()[:16]
    out = CACHE_DIR / "guest" / key
    manifest = out / "manifest.json"
    if manifest.is_file() and not rebuild:
        known = json.loads(manifest.read_text())
        _atomic_write(latest, json.dumps(known).encode())
        return _image(out, known, built=False, t0=t0)

    vmlinuz, vmlinux = await _kernel(pkg, version)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        src = Path(tmp, "labtools.c")
        src.write_bytes(tools_src)
        binary = Path(tmp, "labtools")
        await run("gcc", "-O2", "-static", "-Wall", "-o", str(binary), str(src),
                  what="gcc labtools.c (static; needs libc6-dev)")
        initrd = await _initramfs(binary.read_bytes(), init,
                                  _module_closure(vmlinuz.parent / "modules", GUEST_MODULES))
    _atomic_write(out / "initrd.img", initrd)
    for name, src_path in (("vmlinux", vmlinux), ("vmlinuz", vmlinuz)):
        tmp_link = out / f".{name}.tmp"
        tmp_link.unlink(missing_ok=True)
        os.link(src_path, tmp_link)  # same cache filesystem: no copy
        os.replace(tmp_link, out / name)
    known = {"key": key, "kernel_package": pkg, "kernel_version": version,
             "busybox": str(BUSYBOX), "append": GUEST_KERNEL_APPEND,
             "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _atomic_write(manifest, json.dumps(known, indent=2).encode())
    _atomic_write(latest, json.dumps(known).encode())
    return _image(out, known, built=True, t0=t0)


def _image(out: Path, manifest: dict, built: bool, t0: float) -> GuestImage:
    return GuestImage(out, out / "vmlinux", out / "vmlinuz", out / "initrd.img",
                      f"{manifest['kernel_package']} {manifest['kernel_version']}",
                      manifest["key"], built, time.monotonic() - t0)


def clean_cache() -> list[Path]:
    """Remove every cached image and kernel; returns what was removed."""
    removed = []
    for sub in ("guest", "kernels"):
        d = CACHE_DIR / sub
        if d.exists():
            shutil.rmtree(d)
            removed.append(d)
    return removed
