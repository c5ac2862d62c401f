"""A guest's serial console as a session: wait for patterns, send lines, run commands.

The console is any (reader, writer) byte-stream pair: for remote hosts, a unix-socket channel
over SSH to QEMU's serial socket. Terminal escape sequences (busybox ash asks for the cursor
position with ``ESC[6n`` before each prompt) and carriage returns are stripped from what is
read.
"""

from __future__ import annotations

import asyncio
import itertools
import re

from ..blocking import BlockingInWorkers
from ..errors import GuestError

_CSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\r")
#: a shell prompt at the start of a line ("/ # "); not anchored at the end of what was read,
#: since asynchronous output (job notices, TICK lines) may follow it at once
DEFAULT_PROMPT = re.compile(r"(^|\n)[^\n]*[#$] ")
_counter = itertools.count(1)


class ConsoleCommandError(GuestError):
    """A console command exited non-zero; ``status`` and ``output`` carry what it did."""

    def __init__(self, host: str, vm: str, command: str, status: int, output: str):
        last = output.strip().splitlines()[-1:] or [""]
        super().__init__(host, vm, f"command {command!r} exited {status}: {last[0]}")
        self.command, self.status, self.output = command, status, output


class SerialConsole(BlockingInWorkers):
    """A session on one serial console. ``host``/``vm`` name it in errors."""

    def __init__(self, reader, writer, *, host: str, vm: str,
                 prompt: re.Pattern[str] = DEFAULT_PROMPT):
        self.reader, self.writer = reader, writer
        self.host, self.vm, self.prompt = host, vm, prompt
        self.buffer = ""
        """What was read and not yet consumed by a ``read_until``."""
        self.transcript: list[str] = []

    async def _read_more(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            raise GuestError(self.host, self.vm, "serial console closed (guest gone?)")
        text = _CSI.sub(b"", data).decode("utf-8", errors="replace")
        self.buffer += text
        self.transcript.append(text)

    async def read_until(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Read until ``pattern`` matches; consume up to the end of the match.

        :raise GuestError: on timeout (with the last output seen) or when the console closes.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        try:
            async with asyncio.timeout(timeout):
                while (match := regex.search(self.buffer)) is None:
                    await self._read_more()
        except TimeoutError:
            tail = self.buffer.strip().splitlines()[-3:]
            raise GuestError(self.host, self.vm, f"no {regex.pattern!r} on the serial console "
                             f"within {timeout:g} s; last output: {tail!r}") from None
        self.buffer = self.buffer[match.end():]
        return match

    async def sendline(self, line: str = "") -> None:
        self.writer.write((line + "\n").encode())
        await self.writer.drain()

    async def wait_for_shell(self, timeout: float) -> None:
        """Wait for the shell prompt, poking the console once so an idle shell re-prompts."""
        await self.sendline()
        await self.read_until(self.prompt, timeout)

    async def cmd(self, command: str, timeout: float, check: bool = True) -> tuple[int, str]:
        """Run one shell line ``command`` in the guest; return (exit status, output).

        The line is sent as ``echo BEGIN; command; echo END_$?`` where the markers are
        computed by the shell (``$((n+1))``), so the echoed line itself never matches them.
        It is sent as a single line: a second line typed while the first runs would be echoed
        by the tty into the first one's output.

        :raise ConsoleCommandError: when ``check`` and the status is not 0.
        :raise GuestError: on timeout or a closed console.
        """
        if "\n" in command:
            raise ValueError("console commands are one shell line")
        n = next(_counter) * 1000
        body = command.rstrip()
        sep = " " if body.endswith("&") and not body.endswith("&&") else "; "
        await self.sendline(f"echo __MB$(({n}+1))__; {body}{sep}echo __ME$(({n}+2))_$?__")
        await self.read_until(rf"__MB{n + 1}__\n", timeout)
        match = await self.read_until(rf"(?s)(.*?)__ME{n + 2}_(\d+)__\n", timeout)
        output, status = match.group(1), int(match.group(2))
        # The end marker proves the command is done; the prompt that follows is not waited
        # for (it is consumed by the next command's begin marker). The next line sent is
        # typed at a finished shell, so the tty cannot echo it into this command's output.
        if check and status != 0:
            raise ConsoleCommandError(self.host, self.vm, command, status, output)
        return status, output
