"""A guest's serial console as a session: wait for patterns, send lines, run commands.

The console is any (reader, writer) byte-stream pair: for remote hosts, a unix-socket channel
over SSH to QEMU's serial socket. Terminal escape sequences (busybox ash asks for the cursor
position with ``ESC[6n`` before each prompt) and carriage returns are stripped from what is
read.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from typing import Awaitable, Callable, Iterator

import asyncssh

from ..blocking import BlockingInWorkers
from ..errors import GuestError

_CSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\r")
#: a shell prompt at the start of a line ("/ # "); not anchored at the end of what was read,
#: since asynchronous output (job notices, TICK lines) may follow it at once
DEFAULT_PROMPT = re.compile(r"(^|\n)[^\n]*[#$] ")
_counter = itertools.count(1)


#: the first line of a guest kernel's report of its own failure, at a line's start or right
#: after a shell prompt (the kernel writes over an idle shell's line), after printk's
#: timestamp and caller fields where it prints them: what Autotest's ``verify_kernel_crash``
#: looked for on the console
KERNEL_FAULT = re.compile(r"(?:^|[#$] )(?:\[[^\]]*\]\s*)*((?:Kernel panic - not syncing:|Oops:|"
                          r"BUG:|general protection fault\b|kernel BUG at\b).*)$")
#: the kernel's reports kept (a panic's is a few lines, a storm's thousands): the first ones
#: of the session, and the first ones not yet said by a check
KERNEL_FAULTS_KEPT = 8

#: what a getty prints when it wants a user name, and ``login`` for the password
LOGIN_PROMPT = re.compile(r"(^|\n)[^\n]*login: $")
PASSWORD_PROMPT = re.compile(r"(^|\n)[^\n]*[Pp]assword: $")
_LOGIN_REFUSED = re.compile(r"Login incorrect|Authentication failure|Permission denied")


class ConsoleTimeout(GuestError):
    """Nothing the console waited for came in time (the guest is busy, hung or down).

    ``started``: for a command, whether the shell had begun it (its begin marker came):
    False means the shell never took the line, so nothing runs that could be interrupted."""

    started = False


class ConsoleLock:
    """One user of a console at a time (a command's line and its output must not interleave
    with another's). The task that holds it may take it again: a sequence of commands holds
    it across them, and each command takes it too."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task | None = None
        self._depth = 0

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if self._owner is task and task is not None:
            self._depth += 1
            return
        await self._lock.acquire()
        self._owner, self._depth = task, 1

    async def __aexit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()

    @contextlib.contextmanager
    def lent_to(self, helper: asyncio.Task) -> Iterator[None]:
        """While the holder awaits ``helper`` (a cleanup run as a task of its own, e.g.
        under :func:`migrator.aio.shielded`), ``helper`` holds the lock in its place: it
        may take it (and no one else can) without waiting for the holder that waits for
        it."""
        holder = self._owner
        self._owner = helper
        try:
            yield
        finally:
            self._owner = holder


class ConsoleCommandError(GuestError):
    """A console command exited non-zero; ``status`` and ``output`` carry what it did."""

    def __init__(self, host: str, vm: str, command: str, status: int, output: str):
        last = output.strip().splitlines()[-1:] or [""]
        super().__init__(host, vm, f"command {command!r} exited {status}: {last[0]}")
        self.command, self.status, self.output = command, status, output


class SerialConsole(BlockingInWorkers):
    """A session on one serial console. ``host``/``vm`` name it in errors."""

    def __init__(self, reader, writer, *, host: str, vm: str,
                 prompt: re.Pattern[str] = DEFAULT_PROMPT, lock: ConsoleLock | None = None):
        self.reader, self.writer = reader, writer
        self.host, self.vm, self.prompt = host, vm, prompt
        #: the console's one user at a time (shared by every session its VM opens)
        self.lock = lock or ConsoleLock()
        self.buffer = ""
        """What was read and not yet consumed by a ``read_until``."""
        self.transcript: list[str] = []
        #: the guest kernel's reports of its own failure seen on this console (their first
        #: lines, at most :data:`KERNEL_FAULTS_KEPT`): an oops, a BUG, a panic
        self.kernel_faults: list[str] = []
        self._unsaid_faults: list[str] = []     # ... not yet said by a check
        self._partial_line = ""                 # the end of what was read, not a line yet
        #: (pattern of a request line, its answerer): lines the guest prints to ask the
        #: controller something (:mod:`.multinode`) are cut from what is read and answered
        #: (the answerer returns the bytes to type back, or None for a line not meant for it)
        self.requests: tuple[re.Pattern[str],
                             Callable[[re.Match[str]], Awaitable[bytes | None]]] | None = None
        #: following the VM through a migration (see :meth:`moving`): set when it ends
        self._move: asyncio.Event | None = None
        #: (reader, writer, host) of the destination's console, connected ahead
        self._ahead: tuple | None = None
        #: after the switchover: (the destination's reader, taken when the source's ends;
        #: the source's writer and host)
        self._next_reader = None

    # -- following the VM through a migration ------------------------------------------------
    #
    # The source's console ends when its QEMU does; the guest goes on printing on the
    # destination's console, which keeps nothing for a client that is not connected yet.
    # So the destination's console is connected ahead (``connect_ahead``, before the
    # switchover), writes go there from the switchover on (``switch_ahead``), and the
    # reader reads the source's console to its end (what the guest printed before the
    # switchover) and then goes on with the destination's: nothing is lost in between.

    @contextlib.contextmanager
    def moving(self) -> Iterator[None]:
        """While the VM migrates: the console closing is the source's QEMU ending, not the
        guest gone; a read that meets it waits for the migration's end, then goes on on the
        destination's console (or, when the VM did not move there, raises as usual)."""
        self._move = move = asyncio.Event()
        try:
            yield
        finally:
            self._move = None
            self.drop_ahead()
            move.set()

    @property
    def moving_now(self) -> bool:
        """Whether the VM is migrating (inside :meth:`moving`)."""
        return self._move is not None

    def connect_ahead(self, reader, writer, *, host: str) -> None:
        """The destination's console, connected before the switchover (its output is not
        read until the source's console ends)."""
        self.drop_ahead()
        self._ahead = (reader, writer, host)

    def drop_ahead(self) -> None:
        """Forget a destination console connected ahead (the VM did not move)."""
        if self._ahead is not None:
            self._ahead[1].close()
            self._ahead = None

    def switch_ahead(self) -> bool:
        """The switchover happened: type on the destination's console from now on, read the
        source's to its end and then the destination's. False when nothing was connected
        ahead (the caller re-attaches)."""
        if self._ahead is None:
            return False
        reader, writer, host = self._ahead
        self._ahead = None
        old_writer, old_host = self.writer, self.host
        self.writer, self.host = writer, host
        self._next_reader = (reader, old_writer, old_host)
        return True

    def switch_back(self) -> None:
        """The switchover did not happen after all (a switch to postcopy asked for, never
        made: the source keeps the VM): type on the source's console again, forget the
        destination's. Nothing to do when no switch was made."""
        if self._next_reader is None:
            return
        _reader, src_writer, src_host = self._next_reader
        self._next_reader = None
        dst_writer, self.writer, self.host = self.writer, src_writer, src_host
        dst_writer.close()

    def _end_move(self) -> None:
        """Close what following a migration holds besides the current console: a destination
        console connected ahead, and the source's writer kept until its reader ends."""
        self.drop_ahead()
        if self._next_reader is not None:
            self._next_reader[1].close()
            self._next_reader = None

    def _take_next_reader(self) -> None:
        reader, old_writer, _host = self._next_reader
        self._next_reader = None
        self.reader = reader
        self.forget_partial_line()          # the source's console ended there
        old_writer.close()

    async def _read_more(self) -> None:
        reader = self.reader
        lost = False
        try:
            data = await reader.read(65536)
        except (OSError, EOFError, asyncssh.Error):
            lost, data = True, b""
        if not data:
            if self.reader is not reader:
                return          # re-attached meanwhile (the VM migrated): read on from there
            if self._next_reader is None and self._move is not None:
                await self._move.wait()         # the migration ends: moved or not
                if self.reader is not reader:
                    return
            if self._next_reader is not None:
                self._take_next_reader()        # the source's console read to its end
                return
            raise GuestError(self.host, self.vm, self._with_faults(
                f"serial console {'lost' if lost else 'closed'} (guest gone?)"))
        text = _CSI.sub(b"", data).decode("utf-8", errors="replace")
        self.buffer += text
        self.transcript.append(text)
        self._scan_for_faults(text)

    def _scan_for_faults(self, text: str) -> None:
        """Keep the kernel's failure reports among the complete lines read so far."""
        *lines, self._partial_line = (self._partial_line + text).split("\n")
        for line in lines:
            match = KERNEL_FAULT.search(line.strip())
            if match is None:
                continue
            fault = match.group(1)[:200]
            if len(self.kernel_faults) < KERNEL_FAULTS_KEPT:
                self.kernel_faults.append(fault)
            if len(self._unsaid_faults) < KERNEL_FAULTS_KEPT:
                self._unsaid_faults.append(fault)

    def take_kernel_faults(self) -> list[str]:
        """The guest kernel's failure reports seen since the last call: a check says them
        (each once). An error named them too, but may have been caught by its caller."""
        faults, self._unsaid_faults = self._unsaid_faults, []
        return faults

    def forget_partial_line(self) -> None:
        """The console changed (another one of the guest, after a migration): the old one's
        unfinished last line is not the start of the new one's."""
        self._partial_line = ""

    def _with_faults(self, message: str) -> str:
        faults = self._unsaid_faults
        return message + (f"; the guest's kernel reported a failure: {faults!r}" if faults
                          else "")

    async def read_until(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Read until ``pattern`` matches; consume up to the end of the match.

        :raise GuestError: on timeout (with the last output seen) or when the console closes.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        try:
            async with asyncio.timeout(timeout):
                while True:
                    match = regex.search(self.buffer)
                    # the guest's requests printed before the match are answered (and cut from
                    # the output) first; one printed after it is not this read's: its answer
                    # may wait long (a key nobody sends), and the match is here already
                    if self.requests is not None and await self._answer_requests(
                            before=match.start() if match is not None else None):
                        continue                  # the buffer changed: look again
                    if match is not None:
                        break
                    await self._read_more()
        except TimeoutError:
            tail = self.buffer.strip().splitlines()[-3:]
            raise ConsoleTimeout(self.host, self.vm, self._with_faults(
                f"no {regex.pattern!r} on the serial console within {timeout:g} s; last "
                f"output: {tail!r}")) from None
        self.buffer = self.buffer[match.end():]
        return match

    async def _answer_requests(self, before: int | None = None) -> bool:
        """Cut each complete request line out of the buffer (those that start before
        ``before`` when given) and type its answer; whether any was cut."""
        pattern, answer = self.requests
        pos, cut = 0, False
        while (m := pattern.search(self.buffer, pos)) is not None and (
                before is None or m.start() < before):
            # cut first: a request whose answer is cancelled (the command's timeout, which
            # then interrupts the asker) is not asked again by the next read
            self.buffer = self.buffer[:m.start()] + self.buffer[m.end():]
            reply = await answer(m)
            if reply is None:                     # not ours: it stays in the output
                self.buffer = self.buffer[:m.start()] + m.group(0) + self.buffer[m.start():]
                pos = m.end()
                continue
            pos, cut = m.start(), True
            if before is not None:
                before -= m.end() - m.start()
            self.writer.write(reply)
            await self.writer.drain()
        return cut

    async def sendline(self, line: str = "") -> None:
        async with self.lock:
            self.writer.write((line + "\n").encode())
            await self.writer.drain()

    async def wait_for_shell(self, timeout: float, user: str | None = None,
                             password: str | None = None) -> None:
        """Wait for the shell prompt, poking the console once so an idle shell re-prompts;
        log in on the way if the console asks (``login:``, then ``Password:``).

        :raise GuestError: the console asks for a login and no ``user`` is given, or the
            login is refused (wrong password?).
        :raise ConsoleTimeout: no prompt within ``timeout``.
        """
        async with self.lock:
            await self._wait_for_shell(timeout, user, password)

    async def _wait_for_shell(self, timeout: float, user: str | None,
                              password: str | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        either = re.compile(f"(?P<login>{LOGIN_PROMPT.pattern})|(?P<shell>{self.prompt.pattern})")
        # a prompt still unread from before (the one after the last command) says nothing
        # about now: only one printed after this poke counts (after a reboot, the new boot's)
        self.buffer = ""
        await self.sendline()
        match = await self.read_until(either, timeout)
        if match.group("shell") is not None:
            return
        if user is None:
            raise GuestError(self.host, self.vm, "the console asks for a login, and the VM's "
                             "config has none (vms.<vm>.login: {user, password})")
        await self.sendline(user)
        answer = re.compile(f"(?P<password>{PASSWORD_PROMPT.pattern})|"
                            f"(?P<shell>{self.prompt.pattern})")
        match = await self.read_until(answer, max(1.0, deadline - loop.time()))
        if match.group("password") is not None:
            await self.sendline(password or "")
            after = re.compile(f"(?P<refused>{_LOGIN_REFUSED.pattern})|"
                               f"(?P<login>{LOGIN_PROMPT.pattern})|(?P<shell>{self.prompt.pattern})")
            match = await self.read_until(after, max(1.0, deadline - loop.time()))
            if match.group("shell") is None:
                raise GuestError(self.host, self.vm, f"logging in as {user!r}: refused "
                                 "(wrong password?)")

    async def cmd(self, command: str, timeout: float, check: bool = True) -> tuple[int, str]:
        """Run one shell line ``command`` in the guest; return (exit status, output).

        The line is sent as ``echo BEGIN; command; echo END_$?`` where the markers are
        computed by the shell (``$((n+1))``), so the echoed line itself never matches them.
        It is sent as a single line: a second line typed while the first runs would be echoed
        by the tty into the first one's output.

        :raise ConsoleCommandError: when ``check`` and the status is not 0.
        :raise ConsoleTimeout: on timeout (``started`` says whether the shell began it).
        :raise GuestError: a closed console.
        """
        if "\n" in command:
            raise ValueError("console commands are one shell line")
        n = next(_counter) * 1000
        body = command.rstrip()
        sep = " " if body.endswith("&") and not body.endswith("&&") else "; "
        async with self.lock:
            await self.sendline(f"echo __MB$(({n}+1))__; {body}{sep}echo __ME$(({n}+2))_$?__")
            await self.read_until(rf"__MB{n + 1}__\n", timeout)
            try:
                # the marker alone (a literal: one pass over the buffer per read), and the
                # output is what came before it
                match = await self.read_until(rf"__ME{n + 2}_(\d+)__\n", timeout)
            except ConsoleTimeout as exc:
                exc.started = True
                raise
        output, status = match.string[:match.start()], int(match.group(1))
        # The end marker proves the command is done; the prompt that follows is not waited
        # for (it is consumed by the next command's begin marker). The next line sent is
        # typed at a finished shell, so the tty cannot echo it into this command's output.
        if check and status != 0:
            raise ConsoleCommandError(self.host, self.vm, command, status, output)
        return status, output
