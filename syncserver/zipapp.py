"""Build ``migrate-sync.pyz``: the host-side client as one file that runs on any Python >= 3.8.

The archive holds only :mod:`syncserver.protocol` and :mod:`syncserver.hostclient` (standard
library only) under an empty package ``__init__``, so nothing of aiohttp is needed on hosts.
Files get a fixed timestamp: the same sources give the same bytes.
"""

from __future__ import annotations

import io
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
        for mod in ("protocol.py", "hostclient.py"):
            files[f"syncserver/{mod}"] = resources.files("syncserver").joinpath(mod).read_text()
        for name, text in files.items():
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, text)
    return buf.getvalue()


def build(path: str | Path) -> Path:
    """Write the zipapp to ``path`` (mode 0755) and return the path."""
    path = Path(path)
    path.write_bytes(build_bytes())
    path.chmod(0o755)
    return path
