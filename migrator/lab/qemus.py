"""Other QEMU builds next to the system's, for cross-version migration: Debian's own
packages, downloaded with apt and extracted into a prefix of their own (nothing installed,
the system's QEMU untouched).

::

    path = install("7.2")        # /var/cache/migrator/qemu/7.2/bin/qemu-system-x86_64

The binary is a small wrapper that points QEMU at its own modules and firmware (``-L``).
Every lab host sees it (the hosts share this machine's file system); give it to a host with
``migrate-lab up --qemu hostA=7.2`` or to a VM with ``vms.X.qemu``.

Known builds (:data:`BUILDS`): ``7.2``, Debian 12's QEMU (bookworm). It loses dirty pages
under TCG (fixed by QEMU commit 03bfc2188f06, in 9.0): what the dirtier's check must catch.

:raise LabError: (:func:`install`) an unknown build, or apt/dpkg-deb failed (their message).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ..errors import LabError
from .image import CACHE_DIR

#: build -> the Debian packages (name=version) it is made of
BUILDS = {
    "7.2": ["qemu-system-x86=1:7.2+dfsg-7+deb12u18+b3",
            "qemu-system-common=1:7.2+dfsg-7+deb12u18+b3",
            "qemu-system-data=1:7.2+dfsg-7+deb12u18", "seabios=1.16.2-1"],
}
WRAPPER = """#!/bin/sh
# QEMU {build} from Debian's packages ({packages}), extracted by migrate-lab
R={root}
export QEMU_MODULE_DIR=$R/usr/lib/x86_64-linux-gnu/qemu
exec $R/usr/bin/qemu-system-x86_64 -L $R/usr/share/qemu -L $R/usr/share/seabios "$@"
"""


def prefix(build: str) -> Path:
    return CACHE_DIR / "qemu" / build


def binary(build: str) -> Path:
    """Where build ``build``'s ``qemu-system-x86_64`` is (installed or not)."""
    return prefix(build) / "bin" / "qemu-system-x86_64"


def installed() -> dict[str, Path]:
    """The builds installed, with their binaries."""
    return {b: binary(b) for b in BUILDS if binary(b).is_file()}


def install(build: str) -> Path:
    """Install ``build`` (idempotent: an installed build is left as it is); its binary.

    :raise LabError: unknown build, or the download or extraction failed.
    """
    if build not in BUILDS:
        raise LabError(f"unknown QEMU build {build!r} (known: {', '.join(BUILDS)})")
    out = binary(build)
    if out.is_file():
        return out
    top = prefix(build)
    work = top.with_name(f".{build}.partial")
    shutil.rmtree(work, ignore_errors=True)
    (work / "debs").mkdir(parents=True)
    (work / "bin").mkdir()
    try:
        _run(["apt-get", "download", "-q", *BUILDS[build]], work / "debs")
        for deb in sorted((work / "debs").glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(work / "root")], work)
        wrapper = work / "bin" / "qemu-system-x86_64"
        wrapper.write_text(WRAPPER.format(build=build, packages=", ".join(BUILDS[build]),
                                          root=top / "root"))
        wrapper.chmod(0o755)
        shutil.rmtree(work / "debs")
        shutil.rmtree(top, ignore_errors=True)
        work.rename(top)                  # whole or not at all
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _run([str(out), "--version"], top)   # it runs
    return out


def _run(argv: list[str], cwd: Path) -> str:
    try:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{argv[0]}: {exc}") from exc
    if r.returncode != 0:
        detail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or ["?"]
        raise LabError(f"{' '.join(argv[:3])}: exit {r.returncode}: {detail[0]}")
    return r.stdout


__all__ = ["BUILDS", "binary", "install", "installed", "prefix"]
