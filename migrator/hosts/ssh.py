"""``SSHHost``: one host reached over SSH (asyncssh), with host keys always verified.

::

    async with SSHHost.from_inventory("hostA") as host:
        result = await host.run("uname -r", check=True)

* One connection per host, opened on first use, reused by every command, and reopened
  transparently when it was dropped (sshd restarted, host rebooted). At most
  ``config.limits.ssh_channels_per_host`` commands/SFTP sessions run on it at once.
* Commands run through the login shell with ``eval``; each reports its process group first
  (on stderr, stripped from the result) so a timeout can kill the whole group on the host,
  not just close the channel.
* Errors name the host and, for commands, the command: :class:`HostConnectError`
  (refused, unreachable, unknown name, timeout), :class:`HostAuthError`,
  :class:`HostKeyError`, :class:`CommandError` (with the whole :class:`CmdResult`).
* Secrets never reach logs or results: keys are passed by path to asyncssh, and commands and
  their output are logged only at DEBUG.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import signal
import time
from pathlib import Path
from typing import Iterable, Mapping

import asyncssh

from ..aio import shielded, wait_for
from ..blocking import BlockingInWorkers, on_loop
from ..config import Config, Inventory, load_inventory
from ..errors import (CommandError, HostAuthError, HostConnectError, HostError, HostKeyError)
from .result import CmdResult

log = logging.getLogger(__name__)

_PGID_MARK = re.compile(rb"^MIGRATOR-PGID=(\d+)\n")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def quote(arg: object) -> str:
    """Quote one argument for the remote POSIX shell."""
    return shlex.quote(str(arg))


def join(args: Iterable[object]) -> str:
    """A remote shell command line from separate arguments, each quoted."""
    return " ".join(quote(a) for a in args)


def _signal_number(name: str) -> int:
    try:
        return int(signal.Signals[f"SIG{name}"])
    except KeyError:
        return -1


class SSHHost(BlockingInWorkers):
    """A host reached over SSH. Cheap to build; connects on first use.

    :param hostname: the host's name, as the user typed it (used in every message); also the
        address to connect to unless ``address`` is given.
    :param known_hosts: known_hosts file the host key is verified against (default
        ``~/.ssh/known_hosts``). Verification is off only with
        ``insecure_no_host_key_check=True``, which logs a warning on every connection.
    :param client_keys: private key files to authenticate with (default: asyncssh's
        ``~/.ssh/id_*``). No agent is used unless ``use_agent=True``.
    :param reboot_command: what :meth:`reboot` runs (default ``reboot``).
    """

    def __init__(self, hostname: str, address: str | None = None, *, user: str = "root",
                 port: int = 22, known_hosts: str | os.PathLike | None = None,
                 client_keys: list[str | os.PathLike] | None = None,
                 config: Config | None = None, insecure_no_host_key_check: bool = False,
                 use_agent: bool = False, reboot_command: str = "reboot"):
        self.name = hostname
        self.address = address or hostname
        self.user = user
        self.port = port
        if insecure_no_host_key_check:
            self.known_hosts = None
        else:
            self.known_hosts = str(known_hosts or Path("~/.ssh/known_hosts").expanduser())
        self.client_keys = [str(k) for k in client_keys] if client_keys else ()
        self.config = config or Config()
        self.reboot_command = reboot_command
        self._insecure = insecure_no_host_key_check
        self._use_agent = use_agent
        self._conn: asyncssh.SSHClientConnection | None = None
        self._connecting = asyncio.Lock()
        self._channels = asyncio.Semaphore(self.config.limits.ssh_channels_per_host)
        self._tmp_dirs: list[str] = []
        #: where the host keeps its x509 credentials for migration over TLS (the
        #: inventory's ``tls_dir``); None: none
        self.tls_dir: str | None = None
        #: this host's QEMU binary (the inventory's ``qemu``); None: the VM's, or PATH's
        self.qemu: str | None = None

    @classmethod
    def from_inventory(cls, name: str, inventory: Inventory | str | os.PathLike | None = None,
                       config: Config | None = None) -> "SSHHost":
        """The host ``name`` of ``inventory`` (a loaded one, a path, or None for the usual
        lookup: ``$MIGRATOR_INVENTORY``, else the running lab's).

        :raise ConfigError: unknown host (the message lists the known ones).
        :raise InventoryError: no inventory found, or it is invalid.
        """
        inv = inventory if isinstance(inventory, Inventory) else load_inventory(inventory)
        entry = inv.host(name)
        ssh = inv.ssh_for(name)
        host = cls(name, entry.address, user=ssh.user, port=ssh.port,
                   known_hosts=ssh.known_hosts,
                   client_keys=[ssh.identity_file] if ssh.identity_file else None,
                   config=config)
        host.tls_dir = str(entry.tls_dir) if entry.tls_dir else None
        host.qemu = entry.qemu
        return host

    def __repr__(self) -> str:
        state = "connected" if self.connected else "idle"
        return f"<SSHHost {self.name} {self.user}@{self.address}:{self.port} {state}>"

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def __aenter__(self) -> "SSHHost":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- connection ----------------------------------------------------------------------------

    async def _open_connection(self, timeout: float) -> asyncssh.SSHClientConnection:
        if self._insecure:
            log.warning("[host=%s] host key verification is OFF for %s:%s", self.name,
                        self.address, self.port)
        try:
            return await asyncssh.connect(
                self.address, port=self.port, username=self.user,
                known_hosts=self.known_hosts, client_keys=self.client_keys or None,
                agent_path=() if self._use_agent else None, config=None,
                connect_timeout=timeout, keepalive_interval=max(1.0, timeout / 3),
                keepalive_count_max=3)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise HostKeyError(self.name, f"host key not verifiable against "
                               f"{self.known_hosts}: refusing to connect") from exc
        except asyncssh.PermissionDenied as exc:
            raise HostAuthError(self.name, f"authentication failed for {self.user}@"
                                f"{self.address}:{self.port}") from exc
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise HostConnectError(self.name, f"no SSH connection to {self.address}:"
                                   f"{self.port} within {timeout:g} s") from exc
        except ConnectionRefusedError as exc:
            raise HostConnectError(self.name, f"connection refused by {self.address}:"
                                   f"{self.port} (sshd not running?)") from exc
        except OSError as exc:
            raise HostConnectError(self.name, f"cannot connect to {self.address}:{self.port}:"
                                   f" {exc.strerror or exc}") from exc
        except asyncssh.Error as exc:
            raise HostConnectError(self.name, f"SSH to {self.address}:{self.port} failed: "
                                   f"{exc.reason}") from exc

    async def connect(self) -> asyncssh.SSHClientConnection:
        """Open the connection unless one is open and alive; return it.

        :raise HostConnectError: (or its subclasses) naming the host and the reason.
        """
        async with self._connecting:
            if not self.connected:
                self._conn = await self._open_connection(self.config.timeouts.ssh_connect_s)
                log.debug("[host=%s] connected to %s:%s", self.name, self.address, self.port)
            return self._conn

    async def close(self, last: str | None = None) -> CmdResult | None:
        """Remove this host's tmp dirs (best effort) and close the connection; with
        ``last``, run that shell command first, in the same round trip, and return its
        result (the tmp dirs are removed whatever it does).

        Safe in any state and more than once (without ``last``, it runs nothing on a host
        whose connection is closed already).

        :raise HostError: ``last`` could not be run (the connection is closed all the same).
        """
        dirs, self._tmp_dirs = self._tmp_dirs, []
        try:
            if dirs and (last or self.connected):
                rm = f"rm -rf -- {join(dirs)}"
                # a subshell: an ``exit`` in ``last`` ends it, not the removal
                cmd = f"( {last}\n); s=$?; {rm}; exit $s" if last else rm
                try:
                    result = await self.run(cmd, timeout=self.config.timeouts.host_cleanup_s)
                except HostError as exc:
                    log.warning("[host=%s] could not remove tmp dirs %s: %s", self.name,
                                dirs, exc)
                    if last:
                        raise
                    return None
                if result.timed_out:
                    log.warning("[host=%s] tmp dirs %s may be left: the command removing "
                                "them timed out", self.name, dirs)
                return result if last else None
            if last:
                return await self.run(last, timeout=self.config.timeouts.host_cleanup_s)
            return None
        finally:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
                await conn.wait_closed()

    # -- commands ------------------------------------------------------------------------------

    async def _start(self, wrapped: str, stdin: bytes, command: str, *, in_slot: bool,
                     end_on_cancel: bool = True,
                     keep_stdin: bool = False) -> asyncssh.SSHClientProcess:
        """Open a session channel running ``wrapped``; reconnect once if the connection died.

        Once its exec request is sent the command may run on the host whether its caller
        waits or not: a cancellation then waits for the channel (``host_cleanup_s`` at most)
        and ends the command (:meth:`_end_cancelled`) before it is delivered, unless
        ``end_on_cancel`` is false (the kill commands themselves). ``in_slot``: the caller
        holds one of the ``ssh_channels_per_host`` slots (:meth:`run`).
        """
        for attempt in (1, 2):
            conn = await self.connect()
            creating = asyncio.ensure_future(
                conn.create_process(wrapped, input=stdin or None, encoding=None))
            try:
                proc = await asyncio.shield(creating)
            except asyncio.CancelledError:
                if end_on_cancel:
                    await shielded(self._end_creating(creating, command, in_slot))
                else:
                    creating.cancel()
                raise
            except (asyncssh.ChannelOpenError, asyncssh.ConnectionLost, asyncssh.DisconnectError,
                    BrokenPipeError, ConnectionResetError) as exc:
                if attempt == 2:
                    raise HostConnectError(self.name, f"cannot open a channel: {exc}") from exc
                log.info("[host=%s] connection lost (%s); reconnecting", self.name, exc)
                self._conn = None
                continue
            if not stdin and not keep_stdin:  # asyncssh sends EOF only after non-empty input
                proc.stdin.write_eof()
            return proc
        raise AssertionError("unreachable")

    async def run(self, command: str, timeout: float | None = None, check: bool = False,
                  stdin: str | bytes | None = None, env: Mapping[str, str] | None = None,
                  encoding: str | None = "utf-8") -> CmdResult:
        """Run ``command`` on the host and wait for it.

        The command is one string for the remote login shell; quote values built from
        variables with :func:`quote` / :func:`join`. ``env`` values are quoted for you.
        A cancelled run ends its command on the host (its process group killed, within
        ``host_cleanup_s``) before the cancellation goes on: nothing it started keeps acting
        for a caller that stopped (background processes that left its group excepted).

        :param timeout: seconds before the command's whole process group on the host is
            killed (SIGKILL); the result then has ``timed_out=True`` and ``aborted=9`` and
            holds the output received until then.
        :param stdin: sent to the command's standard input, which is then closed (without
            it the command sees an empty stdin).
        :param encoding: decode output with this encoding; ``None`` returns bytes.
        :raise CommandError: with ``check=True``, on a non-zero exit, a signal or a timeout.
        :raise HostError: when the host cannot be reached or the connection drops mid-way.
        """
        data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        log.debug("[host=%s] run: %s", self.name, command)
        async with self._channels:
            result = await self._run_in_slot(command, _wrap(command, env), data, timeout,
                                             encoding)
        log.debug("[host=%s] done in %.3f s: status %s", self.name, result.duration,
                  result.exit_status)
        if check and not result.ok:
            raise CommandError(self.name, result)
        return result

    async def _run_in_slot(self, command: str, wrapped: str, data: bytes,
                           timeout: float | None, encoding: str | None,
                           end_on_cancel: bool = True) -> CmdResult:
        """:meth:`run`'s work, in a channel slot its caller holds. A timed-out or cancelled
        command's group is killed through that same slot, its own channel closed first: runs
        cancelled together never wait for each other's slots."""
        t0 = time.monotonic()
        proc = await self._start(wrapped, data, command, in_slot=True,
                                 end_on_cancel=end_on_cancel)
        pgid: int | None = None
        try:
            # the shell's first line names its process group: known before anything else,
            # so that a cancelled command can be ended on the host
            mark = await wait_for(proc.stderr.readline(), timeout)
            pgid = _pgid(mark)
            left = None if timeout is None else max(0.0, t0 + timeout - time.monotonic())
            # (not proc.wait(timeout=): the asyncio.wait_for under it can drop a cancellation
            # that lands as the command ends; see migrator.aio.wait_for)
            out, err = await wait_for(proc.communicate(), left)
        except TimeoutError:
            out, err = proc.collect_output()
            if pgid is None:                # (the deadline came before the shell's first line)
                pgid = _pgid(err)
                err = _PGID_MARK.sub(b"", err, count=1)
            await self._end(proc, pgid, command, "timed-out", in_slot=True)
            return CmdResult(command, -1, _decode(out, encoding), _decode(err, encoding),
                             time.monotonic() - t0, int(signal.SIGKILL), True, self.name)
        except (asyncssh.Error, OSError) as exc:
            proc.close()
            raise HostError(self.name, f"connection lost while running {command!r}: "
                            f"{exc}") from exc
        except asyncio.CancelledError:
            if end_on_cancel:
                await shielded(self._end_cancelled(proc, pgid, command, in_slot=True))
            else:
                proc.close()
            raise
        proc.close()
        if pgid is None:
            err = mark + err
        status = proc.exit_status if proc.exit_status is not None else -1
        aborted = _signal_number(proc.exit_signal[0]) if proc.exit_signal else 0
        return CmdResult(command, status, _decode(out, encoding), _decode(err, encoding),
                         time.monotonic() - t0, aborted, False, self.name)

    async def spawn(self, command: str, env: Mapping[str, str] | None = None) -> "RemoteProcess":
        """Start a long-running ``command`` whose standard input stays open.

        The process lives until it exits, :meth:`RemoteProcess.stop` closes its stdin (a
        well-behaved process leaves then) and, after ``host_cleanup_s``, kills its group, or
        the connection dies. Its channel does not count against ``ssh_channels_per_host``:
        keep such processes few (OpenSSH allows 10 sessions per connection). A spawn
        cancelled before it returned ends the process (its group killed).

        :raise HostError: when the host cannot be reached.
        """
        log.debug("[host=%s] spawn: %s", self.name, command)
        proc = await self._start(_wrap(command, env), b"", command, in_slot=False,
                                 keep_stdin=True)
        try:
            mark = await wait_for(proc.stderr.readline(), self.config.timeouts.ssh_connect_s)
        except (TimeoutError, asyncssh.Error, OSError) as exc:
            proc.close()
            raise HostError(self.name, f"{command!r} did not start: {exc}") from exc
        except asyncio.CancelledError:
            await shielded(self._end_cancelled(proc, None, command, in_slot=False))
            raise
        pgid = _pgid(mark)
        if pgid is None:
            proc.close()
            raise HostError(self.name, f"{command!r} did not start (said {mark!r})")
        return RemoteProcess(self, command, proc, pgid)

    # -- ending commands (never raise, bounded by host_cleanup_s) --------------------------------

    async def _end_creating(self, creating: "asyncio.Future[asyncssh.SSHClientProcess]",
                            command: str, in_slot: bool) -> None:
        """A channel whose opener was cancelled: waited for, then its command ended."""
        try:
            proc = await wait_for(creating, self.config.timeouts.host_cleanup_s)
        except Exception as exc:            # (nothing started, or nothing to reach it by)
            log.debug("[host=%s] cancelled %r: its channel did not open (%s)", self.name,
                      command, exc or type(exc).__name__)
            return
        await self._end_cancelled(proc, None, command, in_slot)

    async def _end_cancelled(self, proc: asyncssh.SSHClientProcess, pgid: int | None,
                             command: str, in_slot: bool) -> None:
        """A command whose caller was cancelled: its process group read if not yet known,
        its channel closed, the group killed."""
        if pgid is None:
            try:
                pgid = _pgid(await wait_for(proc.stderr.readline(),
                                            self.config.timeouts.host_cleanup_s))
            except (TimeoutError, asyncssh.Error, OSError):
                pass
        await self._end(proc, pgid, command, "cancelled", in_slot)

    async def _end(self, proc: asyncssh.SSHClientProcess, pgid: int | None, command: str,
                   why: str, in_slot: bool) -> None:
        proc.close()
        await self._kill_group(pgid, command, why, in_slot)

    async def _kill_group(self, pgid: int | None, command: str, why: str = "timed-out",
                          in_slot: bool = False) -> None:
        """Kill a command's process group on the host: through the caller's channel slot
        when it holds one (``in_slot``), else in a slot of its own."""
        if pgid is None:
            log.warning("[host=%s] %s command %r never reported its process group; it "
                        "may still run", self.name, why, command)
            return
        kill = f"kill -KILL -- -{pgid} 2>/dev/null; true"
        limit = self.config.timeouts.host_cleanup_s
        try:                # (bounded as a whole: a host that stopped answering opens no channel)
            if in_slot:
                await wait_for(self._run_in_slot(kill, _wrap(kill, None), b"", limit, "utf-8",
                                                 end_on_cancel=False), limit)
            else:
                async with self._channels:
                    await wait_for(self._run_in_slot(kill, _wrap(kill, None), b"", limit,
                                                     "utf-8", end_on_cancel=False), limit)
        except (HostError, TimeoutError) as exc:
            log.warning("[host=%s] could not kill the process group %d of %s command %r: %s",
                        self.name, pgid, why, command, exc or "no answer within "
                        "host_cleanup_s")

    # -- files ---------------------------------------------------------------------------------

    async def send_file(self, src: str | os.PathLike, dest: str) -> None:
        """Copy a local file or directory (recursively) to ``dest`` on the host, keeping modes
        and times. :raise HostError: naming the path when it cannot be read or written."""
        await self._sftp("put", str(src), dest)

    async def get_file(self, src: str, dest: str | os.PathLike) -> None:
        """Copy a file or directory (recursively) from the host to local ``dest``, keeping
        modes and times. :raise HostError: naming the path."""
        await self._sftp("get", src, str(dest))

    async def _sftp(self, op: str, src: str, dest: str) -> None:
        async with self._channels:
            conn = await self.connect()
            try:
                async with conn.start_sftp_client() as sftp:
                    await getattr(sftp, op)(src, dest, preserve=True, recurse=True)
            except (asyncssh.SFTPError, OSError) as exc:
                what = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
                raise HostError(self.name, f"sftp {op} {src} -> {dest} failed: {what}") from exc
            except asyncssh.Error as exc:
                raise HostError(self.name, f"sftp {op} failed: {exc.reason}") from exc

    @staticmethod
    def _writing(dest: str, mode: int) -> str:
        """The shell that writes its stdin to ``dest``: created private (umask 077), then
        given ``mode``, so a secret is never readable by others, not even for a moment."""
        return f"(umask 077 && cat > {dest}) && chmod {mode & 0o7777:o} {dest}"

    async def write_file(self, dest: str, data: bytes, mode: int = 0o644) -> None:
        """Write ``data`` to the file ``dest`` on the host, with ``mode``: one command with
        the data on its stdin (one round trip; SFTP takes five).

        :raise HostError: the file cannot be written (the host's reason), or the host cannot
            be reached.
        """
        r = await self.run(self._writing(quote(dest), mode), stdin=data,
                           timeout=self.config.timeouts.host_cleanup_s)
        if not r.ok:
            raise HostError(self.name, f"cannot write {dest}: "
                            f"{r.stderr.strip() or f'status {r.status}'}")

    async def get_tmp_dir(self) -> str:
        """Make a new private directory on the host; it is removed when the host is closed."""
        result = await self.run("mktemp -d /tmp/migrator.XXXXXXXX", check=True)
        path = result.stdout.strip()
        self._tmp_dirs.append(path)
        return path

    async def write_tmp_file(self, name: str, data: bytes, mode: int = 0o644) -> str:
        """A new private directory (as :meth:`get_tmp_dir`) holding ``data`` as ``name``,
        with ``mode``, in one round trip; returns the file's path.

        :raise HostError: the directory or the file cannot be made (a directory made is
            removed with the others when the host is closed), or the host cannot be reached.
        """
        r = await self.run('d=$(mktemp -d /tmp/migrator.XXXXXXXX) && echo "$d" && '
                           + self._writing(f'"$d"/{quote(name)}', mode), stdin=data,
                           timeout=self.config.timeouts.host_cleanup_s)
        made = r.stdout.strip()
        if made.startswith("/tmp/migrator."):
            self._tmp_dirs.append(made)
        if not r.ok:
            raise HostError(self.name, f"cannot write {name} in a new directory of /tmp: "
                            f"{r.stderr.strip() or f'status {r.status}'}")
        return f"{made}/{name}"

    def owns_tmp_dir(self, path: str) -> bool:
        return path in self._tmp_dirs

    # -- liveness ------------------------------------------------------------------------------

    async def is_up(self) -> bool:
        """True if a *new* SSH connection to the host works now (an old one may outlive sshd).

        Never raises for an unreachable host.
        """
        try:
            conn = await self._open_connection(self.config.timeouts.ssh_connect_s)
        except HostError:
            return False
        try:
            done = await conn.run("true", timeout=self.config.timeouts.ssh_connect_s)
            return done.exit_status == 0
        except (asyncssh.Error, OSError, asyncio.TimeoutError):
            return False
        finally:
            conn.close()
            await conn.wait_closed()

    async def wait_up(self, timeout: float | None = None) -> None:
        """Wait until :meth:`is_up`. :raise HostConnectError: naming the host on timeout."""
        await self._wait_for(True, timeout)

    async def wait_down(self, timeout: float | None = None) -> None:
        """Wait until the host no longer accepts SSH connections.

        :raise HostError: naming the host on timeout.
        """
        await self._wait_for(False, timeout)

    async def _wait_for(self, up: bool, timeout: float | None) -> None:
        timeout = timeout if timeout is not None else self.config.timeouts.host_wait_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.05
        while await self.is_up() != up:
            if loop.time() >= deadline:
                state = "up" if up else "down"
                raise HostConnectError(self.name, f"not {state} within {timeout:g} s "
                                       f"({self.address}:{self.port})")
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 2.0)

    async def boot_id(self) -> str:
        """The host's boot id (changes at every boot)."""
        return (await self.run(f"cat {BOOT_ID}", check=True)).stdout.strip()

    async def reboot(self, timeout: float | None = None) -> None:
        """Reboot the host and wait until it is back with a new boot id.

        Steps: read the boot id; run the reboot command; see the host go down (this
        connection is closed by the host); wait until SSH works again; check the boot id
        changed. On a lab host ``reboot`` restarts all of the host's processes with a fresh
        /run and /tmp and a new boot id (see :mod:`migrator.lab.hostinit`).

        :raise HostError: when a step does not happen within ``timeout`` (default
            ``config.timeouts.host_reboot_s``), naming the step.
        """
        timeout = timeout if timeout is not None else self.config.timeouts.host_reboot_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        old = await self.boot_id()
        conn = await self.connect()
        try:
            await self.run(self.reboot_command, timeout=self.config.timeouts.host_cleanup_s)
        except HostError:
            pass  # the host may cut the connection before the command's status arrives
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                await conn.wait_closed()
        except TimeoutError:
            raise HostError(self.name, f"did not go down within {timeout:g} s after "
                            f"{self.reboot_command!r}") from None
        self._conn = None
        self._tmp_dirs = []  # a reboot wipes /tmp
        await self.wait_up(max(0.0, deadline - loop.time()))
        new = await self.boot_id()
        if new == old:
            raise HostError(self.name, f"came back with the same boot id {old}: not rebooted")
        log.info("[host=%s] rebooted (boot id %s -> %s)", self.name, old, new)

    async def get_num_cpu(self) -> int:
        """Number of online CPUs on the host."""
        return int((await self.run("getconf _NPROCESSORS_ONLN", check=True)).stdout)

    # -- sockets -------------------------------------------------------------------------------

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


class RemoteProcess(BlockingInWorkers):
    """A long-running command started by :meth:`SSHHost.spawn`."""

    def __init__(self, host: SSHHost, command: str, proc: asyncssh.SSHClientProcess, pgid: int):
        self.host, self.command, self.pgid = host, command, pgid
        self._proc = proc

    def __repr__(self) -> str:
        return f"<RemoteProcess {self.command!r} on {self.host.name} pgid={self.pgid}>"

    async def readline(self) -> str:
        """The next line of its standard output ('' at the end, also when the connection
        was lost: :meth:`wait` then says why)."""
        try:
            return (await self._proc.stdout.readline()).decode(errors="replace")
        except (asyncssh.Error, OSError):
            return ""

    @on_loop
    def write(self, text: str) -> None:
        """Send ``text`` to its standard input.

        :raise HostError: the process or the connection is gone.
        """
        try:
            self._proc.stdin.write(text.encode())
        except (asyncssh.Error, OSError, BrokenPipeError) as exc:
            raise HostError(self.host.name, f"{self.command!r} does not take input: "
                                            f"{exc}") from exc

    def close_input(self) -> None:
        """Close its standard input (a well-behaved process leaves then); its output can
        still be read to the end. Never raises."""
        try:
            self._proc.stdin.write_eof()
        except (asyncssh.Error, OSError, BrokenPipeError):
            pass

    async def wait(self) -> str:
        """Wait until it ends; return why, in words (exit status, signal, or connection lost).
        Never raises for the process's own failure."""
        try:
            done = await self._proc.wait(check=False)
        except (asyncssh.Error, OSError) as exc:
            return f"the SSH connection to {self.host.name} was lost ({exc})"
        err = (done.stderr or b"").decode(errors="replace").strip().splitlines()
        if done.exit_signal:
            why = f"killed by {done.exit_signal[0]}"
        elif done.exit_status is None:
            why = f"the SSH connection to {self.host.name} was lost"
        else:
            why = f"exited with status {done.exit_status}"
        return why + (f": {err[-1]}" if err else "")

    async def finish(self, timeout: float) -> tuple[str, str, str]:
        """Close its stdin (its signal to end) and collect the rest of its output:
        ``(stdout, stderr, why it ended)``. If it has not ended within ``timeout``, its
        process group is killed.

        :raise HostError: it did not end in time (killed), or the connection was lost.
        """
        try:
            self._proc.stdin.write_eof()
            done = await wait_for(self._proc.wait(check=False), timeout)
        except TimeoutError:
            await self.host._kill_group(self.pgid, self.command)
            self._proc.close()
            raise HostError(self.host.name, f"{self.command[:60]!r} did not end within "
                                            f"{timeout:g} s (killed)") from None
        except (asyncssh.Error, OSError, BrokenPipeError) as exc:
            self._proc.close()
            raise HostError(self.host.name, f"the SSH connection was lost ({exc})") from exc
        self._proc.close()
        why = (f"killed by {done.exit_signal[0]}" if done.exit_signal else
               f"exited with status {done.exit_status}")
        return ((done.stdout or b"").decode(errors="replace"),
                (done.stderr or b"").decode(errors="replace"), why)

    async def stop(self) -> None:
        """Close its stdin; if it has not left within ``host_cleanup_s``, kill its process
        group. Idempotent; never raises (a lost host is logged). Output not read yet is
        dropped: to keep it, :meth:`close_input` and :meth:`readline` to the end first."""
        try:
            self._proc.stdin.write_eof()
        except (asyncssh.Error, OSError, BrokenPipeError):
            pass
        try:
            await wait_for(self._proc.wait(check=False),
                                   self.host.config.timeouts.host_cleanup_s)
        except (TimeoutError, asyncssh.Error, OSError):
            await self.host._kill_group(self.pgid, self.command)
        finally:
            self._proc.close()


def _wrap(command: str, env: Mapping[str, str] | None) -> str:
    """``command`` for the login shell: report the process group first, then ``env``."""
    exports = ""
    for key, value in (env or {}).items():
        if not _ENV_NAME.match(key):
            raise ValueError(f"bad environment variable name {key!r}")
        exports += f"export {key}={quote(value)}; "
    return f"printf 'MIGRATOR-PGID=%s\\n' \"$$\" >&2; {exports}eval {quote(command)}"


def _pgid(mark: bytes) -> int | None:
    """The process group in the wrapper's first line (see :func:`_wrap`), or None."""
    match = _PGID_MARK.match(mark)
    return int(match.group(1)) if match else None


def _decode(data: bytes, encoding: str | None) -> str | bytes:
    return data if encoding is None else data.decode(encoding, errors="replace")
