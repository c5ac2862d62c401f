"""A guest used like a host (Autoserv's ``KVMGuest``), over its serial console.

::

    guest = GuestHost(env.get_vm("vm1"))
    r = await guest.run("uname -r")                 # CmdResult: status, stdout, stderr, ...
    await guest.send_file("payload.bin", "/tmp/payload.bin")
    await guest.reboot()                            # returns once a new boot answers
    results = await run_on([guest, host], "nproc")  # next to SSH hosts

Everything goes through the VM's one console session, one user at a time (the console's
lock, shared with everything else that talks to that console), so calls on one guest are
serialised; calls on different guests run concurrently. The VM object follows its VM across
migrations, and so does this.

* ``run``: the command runs in a subshell with stdout and stderr to two files in the guest,
  which are then read base64-encoded (bytes exact, no terminal mangling). A command too long
  for the shell's line editor (or with control characters or newlines) is staged as a
  script first. A command that outlives its timeout is interrupted (Ctrl-C, as a person at
  the console would), the console resynchronised, and the result says ``timed_out`` with
  ``aborted=2`` (SIGINT) and the output so far.
* Files go over the console base64-encoded (streamed into ``base64 -d``, checked with sha256
  on both ends) and are limited to ``limits.console_file_mib``, output of ``run`` too.
* ``is_up``: the VM runs and its console's shell answers within ``timeouts.guest_probe_s``;
  ``reboot`` (needs root in the guest) and ``hardreset`` (the hypervisor's reset) return once
  a new boot id answers.

Errors are :class:`GuestError` naming the VM and its host (``CommandError`` for ``check``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import itertools
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..aio import shielded
from ..blocking import BlockingInWorkers
from ..errors import CommandError, GuestError, HostError
from ..hosts import CmdResult, quote
from .console import ConsoleTimeout

if TYPE_CHECKING:
    from ..hypervisor import GuestVM

log = logging.getLogger(__name__)
_ids = itertools.count(1)
#: longer lines are staged as a script: busybox's line editor keeps about 1022 characters,
#: and run() wraps a command in about 100 more
_LINE_MAX = 800
#: a console moves base64 at least this fast (bytes/s): timeouts of transfers grow with size
_MIN_RATE = 10_000
#: how long the prompt may take to come back after a Ctrl-C, before an empty line is typed
_PROMPT_AFTER_INTERRUPT_S = 2.0
#: bytes sent to the guest per base64 -d (256 KiB encoded: well under the tty's 640 KiB)
_BLOCK = 192 * 1024


class GuestHost(BlockingInWorkers):
    """The guest of ``vm`` with a host's interface."""

    def __init__(self, vm: "GuestVM"):
        self.vm = vm
        self.config = vm.config

    @property
    def name(self) -> str:
        return self.vm.name

    def __repr__(self) -> str:
        return f"<GuestHost {self.vm.name} on {self.vm.host.name}>"

    def _error(self, message: str) -> GuestError:
        return GuestError(self.vm.host.name, self.vm.name, message)

    async def _session(self, timeout: float | None = None):
        return await self.vm.wait_for_login(timeout or self.config.timeouts.guest_boot_s)

    async def _console_lock(self):
        """The VM's console lock (its first session makes it)."""
        if self.vm.console_lock is None:
            await self._session()
        return self.vm.console_lock

    def _transfer_s(self, size: int) -> float:
        return self.config.timeouts.guest_cmd_s + size / _MIN_RATE

    # -- commands -----------------------------------------------------------------------------

    async def run(self, command: str, timeout: float | None = None,
                  check: bool = False) -> CmdResult:
        """Run ``command`` (shell code) in the guest.

        :return: its :class:`CmdResult` (stdout and stderr apart; ``timed_out``,
            ``aborted=2`` and the output so far when it was interrupted at its timeout).
        :raise CommandError: with ``check``, a non-zero exit or a timeout.
        :raise GuestError: the console did not answer (the guest is down, hung, rebooting),
            or the output is over ``limits.console_file_mib``.
        """
        timeout = timeout or self.config.timeouts.guest_cmd_s
        n = next(_ids)
        out, err = f"/tmp/.migrator-out.{n}", f"/tmp/.migrator-err.{n}"
        what = f"run {command[:60]!r}"
        lock = await self._console_lock()
        async with lock:
            session = await self._session()
            line = command
            script = None
            if len(command) > _LINE_MAX or any(ord(c) < 32 for c in command):
                script = f"/tmp/.migrator-cmd.{n}"
                await self._stream(session, command.encode() + b"\n", script, "run")
                line = f". {script}"
            t0 = time.monotonic()
            timed_out = False
            try:
                status, _ = await session.cmd(f"( {line} ) >{out} 2>{err} </dev/null",
                                              timeout, check=False)
            except ConsoleTimeout as exc:
                if not exc.started:     # the shell never took the line: nothing runs
                    raise self._error(f"{what}: the console's shell did not answer within "
                                      f"{timeout:g} s") from None
                await self._interrupt(session)
                status, timed_out = -1, True
            except asyncio.CancelledError:
                # the caller gave up on it (fail_fast, Ctrl-C): it must not run on. The
                # shielded cleanup is a task of its own: it holds the console in our place
                abandon = asyncio.ensure_future(
                    self._abandon(session, f"rm -f {out} {err} {script or ''}"))
                with lock.lent_to(abandon):
                    await shielded(abandon)
                raise
            duration = time.monotonic() - t0
            try:
                sizes = await session.cmd(f"stat -c %s {out} {err}",
                                          self.config.timeouts.guest_cmd_s)
                size_out, size_err = (int(x) for x in sizes.split())
                stdout = await self._read_file(session, out, f"{what}: stdout", size_out)
                stderr = await self._read_file(session, err, f"{what}: stderr", size_err)
            finally:
                await session.cmd(f"rm -f {out} {err} {script or ''}",
                                  self.config.timeouts.guest_cmd_s, check=False)
        result = CmdResult(command, status, stdout.decode(errors="replace"),
                           stderr.decode(errors="replace"), duration,
                           aborted=2 if timed_out else 0, timed_out=timed_out, host=self.name)
        if check and not result.ok:
            raise CommandError(f"{self.name} (a guest on {self.vm.host.name})", result)
        return result

    async def _read_file(self, session, path: str, what: str,
                         size: int | None = None) -> bytes:
        """The bytes of ``path`` in the guest (base64 over the console; size-limited)."""
        if size is None:
            status, out = await session.cmd(f"stat -c %s {quote(path)}",
                                            self.config.timeouts.guest_cmd_s, check=False)
            if status != 0:
                raise self._error(f"{what}: {out.strip() or 'no such file'}")
            size = int(out.split()[0])
        self._check_size(size, what)
        if size == 0:
            return b""
        text = await session.cmd(f"base64 {quote(path)}", self._transfer_s(size))
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            data = b""
        if len(data) != size:
            raise self._error(f"{what}: what came over the console is not the file's "
                              f"{size} bytes (other output on the console? kernel messages "
                              "and the lab guest's TICK lines belong elsewhere: lab.out)")
        return data

    async def _abandon(self, session, tidy: str) -> None:
        """A command whose caller was cancelled: interrupted, its files removed; a console
        that does not answer is only logged (the VM's stop follows)."""
        try:
            await self._interrupt(session)
            await session.cmd(tidy, self.config.timeouts.guest_cmd_s, check=False)
        except Exception as exc:  # noqa: BLE001 - the cancellation is what the caller gets
            log.warning("[vm=%s host=%s] an abandoned command: %s", self.vm.name,
                        self.vm.host.name, exc)

    async def _interrupt(self, session) -> None:
        """Ctrl-C the command in the foreground, then wait until the shell answers again.

        The resync line is typed only once the shell's prompt is back: typed while the
        interrupted command still holds the terminal, a reader of it (the multinode shim's
        ``read`` on /dev/tty, which ends at its SIGINT trap only once its ``read`` returns)
        would take the line, and the shell would never answer it. A prompt that does not come
        gets an empty line: it ends such a ``read``, and an idle shell just prompts again.

        :raise GuestError: it does not (the guest is hung).
        """
        session.buffer = ""             # the command's output is in its files, not needed here
        session.writer.write(b"\x03")
        await session.writer.drain()
        for _ in range(3):
            try:
                await session.read_until(session.prompt, _PROMPT_AFTER_INTERRUPT_S)
                break
            except ConsoleTimeout:
                session.writer.write(b"\n")
                await session.writer.drain()
        try:
            await session.cmd("true", self.config.timeouts.guest_cmd_s)
        except GuestError as exc:
            raise self._error(f"the console did not answer after a command was interrupted "
                              f"at its timeout ({exc.message})") from None

    # -- files --------------------------------------------------------------------------------

    def _check_size(self, size: int, what: str) -> None:
        limit = self.config.limits.console_file_mib * 2**20
        if size > limit:
            raise self._error(f"{what}: {size} bytes is over the console transfer limit of "
                              f"{self.config.limits.console_file_mib:g} MiB "
                              "(limits.console_file_mib)")

    async def _stream(self, session, data: bytes, path: str, what: str) -> None:
        """Write ``data`` to ``path`` in the guest, checked with sha256 (under the lock).

        In blocks of :data:`_BLOCK` bytes, each appended by one ``base64 -d`` that reads the
        console itself: its lines are streamed without echo and a Ctrl-D on a line of its own
        ends them. The guest's serial driver takes whatever comes, and the tty layer drops
        what is over its buffer's limit (640 KiB) when the reader lags: a block stays well
        under it, and the next is sent once the guest has decoded the last one.

        :raise GuestError: the file cannot be written, or its copy differs.
        """
        timeout = self.config.timeouts.guest_cmd_s
        target = quote(path)
        status, out = await session.cmd(f"( : > {target} )", timeout, check=False)
        if status != 0:
            raise self._error(f"{what}: cannot write {path}: {out.strip()}")
        try:
            for i in range(0, len(data), _BLOCK):
                status = await self._stream_block(session, data[i:i + _BLOCK], target)
                if status != "0":
                    raise self._error(f"{what}: base64 -d in the guest exited {status} "
                                      f"at byte {i}")
        except BaseException:
            try:
                await session.cmd(f"stty echo; rm -f {target}", timeout, check=False)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        got = (await session.cmd(f"sha256sum {target}", timeout, check=False))[1].split()[:1]
        digest = hashlib.sha256(data).hexdigest()
        if got != [digest]:
            await session.cmd(f"rm -f {target}", timeout, check=False)
            raise self._error(f"{what}: the copy in the guest differs (sha256 {got} != "
                              f"{digest})")

    async def _stream_block(self, session, block: bytes, target: str) -> str:
        """Append ``block`` to ``target`` through ``base64 -d``; its exit status.

        The ready marker, printed by the same command line, says the shell has read that
        line, so nothing streamed is taken for a command; if ``base64 -d`` stops early (no
        space left), ``cat`` swallows the rest, so no line of it ever reaches the shell.
        """
        timeout = self.config.timeouts.guest_cmd_s
        n = next(_ids) * 1000
        encoded = base64.b64encode(block)
        await session.sendline(f"stty -echo; echo __SR$(({n}+1))__; base64 -d >> {target}; "
                               f"s=$?; [ $s = 0 ] || cat > /dev/null; "
                               f"echo __SE$(({n}+2))_${{s}}__; stty echo")
        try:
            await session.read_until(rf"__SR{n + 1}__\n", timeout)
            # one bound for the block: the writes return once buffers take them, the end
            # marker once the guest has decoded its last line
            whole = self._transfer_s(len(encoded))
            async with asyncio.timeout(whole):
                session.writer.write(b"".join(encoded[j:j + 76] + b"\n"
                                              for j in range(0, len(encoded), 76)) + b"\x04")
                await session.writer.drain()
                match = await session.read_until(rf"__SE{n + 2}_(\d+)__\n", whole)
        except BaseException:
            # end the stream (the reader swallows what is left), bounded
            try:
                session.writer.write(b"\n\x04")
                await session.read_until(rf"__SE{n + 2}_(\d+)__\n", timeout)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        return match.group(1)

    async def send_file(self, src: str | os.PathLike, dest: str) -> None:
        """Copy the local file ``src`` to ``dest`` in the guest (checked with sha256).

        :raise GuestError: over the size limit (before anything is sent), ``dest`` cannot be
            written, or the copy in the guest differs.
        """
        data = Path(src).read_bytes()
        what = f"send_file {src}"
        self._check_size(len(data), what)
        part = f"{dest}.migrator-part"
        async with await self._console_lock():
            session = await self._session()
            await self._stream(session, data, part, what)
            await session.cmd(f"mv {quote(part)} {quote(dest)}",
                              self.config.timeouts.guest_cmd_s)

    async def get_file(self, src: str, dest: str | os.PathLike) -> None:
        """Copy ``src`` in the guest to the local file ``dest`` (checked with sha256).

        :raise GuestError: no such file, over the size limit, or the copy differs.
        """
        what = f"get_file {src}"
        async with await self._console_lock():
            session = await self._session()
            data = await self._read_file(session, src, what)
            digest = (await session.cmd(f"sha256sum {quote(src)}",
                                        self._transfer_s(len(data)))).split()[0]
        if hashlib.sha256(data).hexdigest() != digest:
            raise self._error(f"{what}: what came over the console differs from the file "
                              f"(sha256 {digest})")
        Path(dest).write_bytes(data)

    async def get_tmp_dir(self) -> str:
        """A new directory under the guest's /tmp."""
        r = await self.run("mktemp -d /tmp/migrator.XXXXXX", check=True)
        return r.stdout.strip()

    # -- liveness -----------------------------------------------------------------------------

    async def is_up(self) -> bool:
        """The VM runs and its shell answers within ``timeouts.guest_probe_s`` (logging in
        if it asks)."""
        if self.vm.pid is None:
            return False
        probe = self.config.timeouts.guest_probe_s
        try:
            async with asyncio.timeout(probe):
                session = await self._session(probe)
                await session.cmd("true", probe)
            return True
        except (GuestError, HostError, TimeoutError, OSError):
            return False

    async def wait_up(self, timeout: float | None = None) -> None:
        """:raise GuestError: not up within ``timeout`` (default ``timeouts.guest_boot_s``)."""
        await self._wait_for(True, timeout or self.config.timeouts.guest_boot_s)

    async def wait_down(self, timeout: float | None = None) -> None:
        """:raise GuestError: still up after ``timeout`` (default ``timeouts.guest_boot_s``)."""
        await self._wait_for(False, timeout or self.config.timeouts.guest_boot_s)

    async def _wait_for(self, up: bool, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while await self.is_up() != up:
            if loop.time() > deadline:
                raise self._error(f"not {'up' if up else 'down'} within {timeout:g} s")
            await asyncio.sleep(0.5)

    async def boot_id(self) -> str:
        return (await self.run("cat /proc/sys/kernel/random/boot_id", check=True)).stdout.strip()

    async def reboot(self, timeout: float | None = None) -> None:
        """Reboot the guest from inside (``reboot -f``); return once a new boot's shell
        answers.

        :raise GuestError: not root in the guest, or no new boot within ``timeout`` (default
            ``timeouts.guest_boot_s``).
        """
        r = await self.run("cat /proc/sys/kernel/random/boot_id; id -u", check=True)
        before, uid = r.stdout.split()
        if uid != "0":
            raise self._error(f"reboot: needs root in the guest (logged in as uid {uid})")
        session = await self._session()
        await session.sendline("sync; reboot -f")
        await self._wait_new_boot(before, timeout)

    async def hardreset(self, timeout: float | None = None) -> None:
        """Reset the VM through its hypervisor (a power button, no shutdown); return once a
        new boot's shell answers.

        :raise GuestError: no new boot within ``timeout``.
        """
        before = await self.boot_id()
        await self.vm.hardreset()
        await self._wait_new_boot(before, timeout)

    async def _wait_new_boot(self, before: str, timeout: float | None) -> None:
        """Wait for a shell (logged in again if asked) that reports another boot id."""
        timeout = timeout or self.config.timeouts.guest_boot_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                session = await self.vm.wait_for_login(left)
                status, out = await session.cmd("cat /proc/sys/kernel/random/boot_id",
                                                min(left, self.config.timeouts.guest_probe_s),
                                                check=False)
                if status == 0 and out.strip() not in ("", before):
                    return
            except GuestError:
                pass
            await asyncio.sleep(0.2)
        raise self._error(f"no new boot within {timeout:g} s")

    async def get_num_cpu(self) -> int:
        return int((await self.run("nproc", check=True)).stdout.strip())

    async def close(self) -> None:
        """Nothing of its own to close: the console session is the VM's."""
