"""``SSHHost``: one host reached over SSH (asyncssh), with host keys always verified.

::

    async with SSHHost.from_inventory("hostA") as host:
        result = await host.run("uname -r", check=True)

One connection per host, opened on first use and reused by every command; ``close()`` (or
leaving the ``async with``) closes it. Library errors are translated into :class:`HostError`
naming the host, chained to the original.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Iterable

import asyncssh

from ..config import Config, Inventory, load_inventory
from ..errors import CommandError, HostError
from .result import CmdResult

log = logging.getLogger(__name__)


def quote(arg: object) -> str:
    """Quote one argument for the remote POSIX shell."""
    return shlex.quote(str(arg))


def join(args: Iterable[object]) -> str:
    """A remote shell command line from separate arguments, each quoted."""
    return " ".join(quote(a) for a in args)


class SSHHost:
    """A host reached over SSH. Cheap to build; connects on first use.

    :param name: the host's name, as the user typed it (used in every message).
    :param address: where to connect (default: ``name``).
    :param known_hosts: known_hosts file to verify the host key against; required unless
        ``insecure_no_host_key_check`` is set (which logs a warning on every connect).
    """

    def __init__(self, name: str, address: str | None = None, *, user: str = "root",
                 port: int = 22, known_hosts: str | os.PathLike | None = None,
                 client_keys: list[str | os.PathLike] | None = None,
                 config: Config | None = None, insecure_no_host_key_check: bool = False):
        if known_hosts is None and not insecure_no_host_key_check:
            known_hosts = Path("~/.ssh/known_hosts").expanduser()
        self.name = name
        self.address = address or name
        self.user = user
        self.port = port
        self.known_hosts = None if insecure_no_host_key_check else str(known_hosts)
        self.client_keys = [str(k) for k in client_keys] if client_keys else None
        self.config = config or Config()
        self._insecure = insecure_no_host_key_check
        self._conn: asyncssh.SSHClientConnection | None = None
        self._connecting = asyncio.Lock()

    @classmethod
    def from_inventory(cls, name: str, inventory: Inventory | str | os.PathLike | None = None,
                       config: Config | None = None) -> "SSHHost":
        """The host ``name`` of ``inventory`` (default: the running lab's).

        :raise ConfigError: unknown host (the message lists the known ones).
        :raise InventoryError: no inventory found.
        """
        inv = inventory if isinstance(inventory, Inventory) else load_inventory(inventory)
        entry = inv.host(name)
        ssh = inv.ssh_for(name)
        return cls(name, entry.address, user=ssh.user, port=ssh.port,
                   known_hosts=ssh.known_hosts,
                   client_keys=[ssh.identity_file] if ssh.identity_file else None,
                   config=config)

    def __repr__(self) -> str:
        state = "connected" if self._conn is not None else "idle"
        return f"<SSHHost {self.name} {self.user}@{self.address}:{self.port} {state}>"

    async def __aenter__(self) -> "SSHHost":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> asyncssh.SSHClientConnection:
        """Open the connection if it is not open (and not closed by the peer).

        :raise HostError: naming the host and the reason: refused, unreachable, timeout,
            authentication failed, host key not verifiable.
        """
        async with self._connecting:
            if self._conn is not None and not self._conn.is_closed():
                return self._conn
            if self._insecure:
                log.warning("[host=%s] host key verification is OFF", self.name)
            timeout = self.config.timeouts.ssh_connect_s
            try:
                self._conn = await asyncssh.connect(
                    self.address, port=self.port, username=self.user,
                    known_hosts=self.known_hosts, client_keys=self.client_keys,
                    agent_path=None, config=None, connect_timeout=timeout,
                    keepalive_interval=max(1.0, timeout / 3), keepalive_count_max=3)
            except asyncssh.HostKeyNotVerifiable as exc:
                raise HostError(self.name, f"host key not verifiable against "
                                f"{self.known_hosts}: refusing to connect ({exc.reason})") from exc
            except asyncssh.PermissionDenied as exc:
                raise HostError(self.name, f"authentication failed for {self.user}@"
                                f"{self.address}: {exc.reason}") from exc
            except (asyncio.TimeoutError, TimeoutError) as exc:
                raise HostError(self.name, f"no SSH connection to {self.address}:{self.port} "
                                f"within {timeout:g} s") from exc
            except ConnectionRefusedError as exc:
                raise HostError(self.name, f"connection refused by {self.address}:{self.port} "
                                "(sshd down?)") from exc
            except (OSError, asyncssh.Error) as exc:
                raise HostError(self.name, f"cannot connect to {self.address}:{self.port}: "
                                f"{exc}") from exc
            log.debug("[host=%s] connected to %s:%s", self.name, self.address, self.port)
            return self._conn

    async def close(self) -> None:
        """Close the connection; safe to call in any state, more than once."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            await conn.wait_closed()

    async def run(self, command: str, *, check: bool = False, timeout: float | None = None,
                  stdin: str | bytes | None = None) -> CmdResult:
        """Run ``command`` in the remote shell and wait for it.

        Arguments built from variables must be quoted (:func:`quote`, :func:`join`).

        :param timeout: seconds before the command is abandoned: the channel is closed and the
            result comes back with ``aborted="TIMEOUT"``.
        :raise CommandError: with ``check=True`` when it fails in any way (carries the result).
        :raise HostError: when the host cannot be reached.
        """
        conn = await self.connect()
        t0 = time.monotonic()
        try:
            done = await conn.run(command, input=stdin, timeout=timeout, check=False,
                                  encoding=None)
            stdout, stderr = done.stdout or b"", done.stderr or b""
            status = done.exit_status if done.exit_status is not None else -1
            aborted = done.exit_signal[0] if done.exit_signal else ""
        except asyncssh.TimeoutError as exc:
            stdout, stderr, status, aborted = exc.stdout or b"", exc.stderr or b"", -1, "TIMEOUT"
        except (asyncssh.Error, OSError) as exc:
            raise HostError(self.name, f"lost the connection running {command!r}: {exc}") from exc
        result = CmdResult(command, status, _text(stdout), _text(stderr),
                           time.monotonic() - t0, aborted, self.name)
        if check and not result.ok:
            raise CommandError(self.name, result)
        return result

    async def open_unix_connection(self, path: str):
        """A (reader, writer) byte stream pair to the UNIX socket ``path`` on the host.

        :raise HostError: when the socket cannot be opened (named in the message).
        """
        conn = await self.connect()
        try:
            return await conn.open_unix_connection(path, encoding=None)
        except (asyncssh.Error, OSError) as exc:
            raise HostError(self.name, f"cannot open unix socket {path}: {exc}") from exc

    async def forward_unix_socket(self, local_path: str, remote_path: str):
        """Listen on ``local_path`` here; each connection is forwarded to ``remote_path``.

        Returns the listener; close it with ``listener.close()``.
        """
        conn = await self.connect()
        try:
            return await conn.forward_local_path(local_path, remote_path)
        except (asyncssh.Error, OSError) as exc:
            raise HostError(self.name, f"cannot forward to {remote_path}: {exc}") from exc


def _text(data: str | bytes) -> str:
    return data if isinstance(data, str) else data.decode("utf-8", errors="replace")
