"""Build ``migrate-sync.pyz``: the host-side client as one file that runs on any Python >= 3.8.

The archive holds only :mod:`syncserver.protocol` and :mod:`syncserver.hostclient` (standard
library only) under an empty package ``__init__``, so nothing of aiohttp is needed on hosts.
Both come as source and as bytecode of the building Python (unchecked-hash ``.pyc``, PEP
552): a host whose Python has the same bytecode version runs the bytecode (zipimport never
writes any, so otherwise each start compiles them: ~20 ms of a participant's start-up), any
other Python finds the bytecode's magic number foreign and compiles the source. Files get a
fixed timestamp: the same sources and the same building Python give the same bytes.
"""

from __future__ import annotations

import importlib.util
import io
import marshal
import zipfile
from importlib import resources
from pathlib import Path

MAIN = "import sys\nfrom syncserver.hostclient import main\nsys.exit(main())\n"
FIXED_TIME = (2020, 1, 1, 0, 0, 0)


def build_bytes() -> bytes:
    """The zipapp's bytes: shebang line, then a zip archive."""
    buf = io.BytesIO()
    buf.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        files = {"__main__.py": MAIN,
                 "syncserver/__init__.py": '"""migrate-sync (host-side client)."""\n'}
        for mod in ("protocol", "hostclient"):
            source = resources.files("syncserver").joinpath(f"{mod}.py").read_bytes()
            files[f"syncserver/{mod}.py"] = source
            files[f"syncserver/{mod}.pyc"] = _unchecked_pyc(source, f"syncserver/{mod}.py")
        for name, data in files.items():
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
    return buf.getvalue()


def _unchecked_pyc(source: bytes, filename: str) -> bytes:
    """``source`` compiled by this Python, as an unchecked-hash ``.pyc`` (PEP 552: magic
    number, flags 0b01, the source's hash, the code object): valid whatever the archive's
    timestamps, for the Pythons of the same magic number."""
    code = compile(source, filename, "exec", dont_inherit=True)
    return (importlib.util.MAGIC_NUMBER + (0b01).to_bytes(4, "little")
            + importlib.util.source_hash(source) + marshal.dumps(code))


def build(path: str | Path) -> Path:
    """Write the zipapp to ``path`` (mode 0755) and return the path."""
    path = Path(path)
    path.write_bytes(build_bytes())
    path.chmod(0o755)
    return path
