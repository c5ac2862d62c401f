"""Installables: something to ship to hosts, fetched once, installed on many.

::

    tool = Installable.get("bench/tools/mytool")        # a local file or directory
    note = Installable.get("hello\\n", name="note.txt")  # or the content itself
    paths = await tool.install_on(hosts)                 # in parallel, one path per host

``get`` takes a local file or directory path, a file-like object, or the content itself (a
``str`` that is not an existing path, or ``bytes``). The content is read **once**, at ``get``
(a directory is packed into an in-memory tar), so every host receives the same bytes even if
the source changes afterwards. ``install(host)`` places it in a fresh tmp dir of the host
(removed when the host is closed) and returns its path; installing twice on the same host
returns the first path as long as that tmp dir exists.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import BinaryIO, Sequence, TextIO

from .parallel import parallel
from .ssh import SSHHost, quote


class Installable:
    """Content to install on hosts. Build with :meth:`get`."""

    def __init__(self, name: str, data: bytes, mode: int, is_dir: bool):
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad installable name {name!r}")
        self.name = name
        self.data = data
        self.mode = mode
        self.is_dir = is_dir
        self.sha256 = hashlib.sha256(data).hexdigest()
        self._installed: dict[int, tuple[SSHHost, str]] = {}

    def __repr__(self) -> str:
        kind = "dir" if self.is_dir else "file"
        return f"<Installable {self.name} {kind} {len(self.data)} bytes sha256={self.sha256[:12]}>"

    @classmethod
    def get(cls, location: str | os.PathLike | bytes | BinaryIO | TextIO,
            name: str | None = None, mode: int | None = None) -> "Installable":
        """Fetch ``location`` once.

        :param location: a path to a local file or directory; a file-like object; or the
            content itself (``bytes``, or a ``str`` that is not an existing path).
        :param name: file name on the host (default: the path's or file object's base name;
            required for content).
        :raise ValueError: when no name can be derived.
        :raise OSError: when a path cannot be read.
        """
        if isinstance(location, (str, os.PathLike)) and not isinstance(location, bytes) \
                and os.path.exists(location):
            path = Path(location)
            if path.is_dir():
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as tar:
                    tar.add(path, arcname=name or path.name)
                return cls(name or path.name, buf.getvalue(), path.stat().st_mode & 0o7777, True)
            return cls(name or path.name, path.read_bytes(),
                       mode if mode is not None else path.stat().st_mode & 0o7777, False)
        if hasattr(location, "read"):
            data = location.read()
            data = data.encode() if isinstance(data, str) else data
            base = name or os.path.basename(getattr(location, "name", "") or "")
            if not base:
                raise ValueError("name= is required for a file object without a name")
            return cls(base, data, mode if mode is not None else 0o644, False)
        if name is None:
            raise ValueError(f"name= is required for content ({str(location)[:40]!r} is not "
                             "an existing path)")
        data = location.encode() if isinstance(location, str) else bytes(location)
        return cls(name, data, mode if mode is not None else 0o644, False)

    async def install(self, host: SSHHost) -> str:
        """Place the content in a tmp dir of ``host``; return the installed path.

        :raise HostError: when the host cannot be reached or the files cannot be written.
        """
        known = self._installed.get(id(host))
        if known is not None and known[0] is host and host.owns_tmp_dir(os.path.dirname(known[1])):
            return known[1]
        if self.is_dir:
            tmp = await host.get_tmp_dir()
            dest = f"{tmp}/{self.name}"
            archive = f"{tmp}/.{self.name}.tar"
            await host.write_file(archive, self.data, 0o600)
            await host.run(f"tar -xf {quote(archive)} -C {quote(tmp)} && rm -f {quote(archive)}",
                           check=True)
        else:                   # the directory and the file in one round trip
            dest = await host.write_tmp_file(self.name, self.data, self.mode)
        self._installed[id(host)] = (host, dest)
        return dest

    async def install_on(self, hosts: Sequence[SSHHost], limit: int | None = None) -> list[str]:
        """Install on every host at once; paths in the order of ``hosts``.

        :raise HostError: the first failure (the other installs are cancelled).
        """
        return await parallel((self.install(h) for h in hosts), limit=limit, fail_fast=True)
