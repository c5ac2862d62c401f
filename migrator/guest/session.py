"""A session on a guest: its serial console as a shell, and the guest used like a host.

::

    session = await vm.wait_for_login(timeout=60)
    out = await session.cmd("uname -r")            # raises ConsoleCommandError if non-zero
    status, out = await session.cmd("false", check=False)
"""

from __future__ import annotations

import re

from ..blocking import on_loop
from ..config import Config
from .console import ConsoleCommandError, SerialConsole


class GuestSession(SerialConsole):
    """A shell on a guest's serial console. Timeouts default to the config's."""

    def __init__(self, reader, writer, *, host: str, vm: str, config: Config | None = None,
                 prompt: str | None = None, lock=None):
        super().__init__(reader, writer, host=host, vm=vm, lock=lock,
                         **({"prompt": re.compile(prompt)} if prompt else {}))
        self.config = config or Config()

    async def cmd(self, command: str, timeout: float | None = None,  # type: ignore[override]
                  check: bool = True):
        """Run one shell line; return its output (``check=True``: raises on non-zero exit
        status, the error carrying status and output) or ``(status, output)``.

        :raise ConsoleCommandError: non-zero exit with ``check=True``.
        :raise GuestError: timeout or closed console.
        """
        status, output = await super().cmd(command, timeout or self.config.timeouts.guest_cmd_s,
                                           check=check)
        return output if check else (status, output)

    async def run(self, command: str, timeout: float | None = None) -> tuple[int, str]:
        """Like a host's ``run``: ``(exit status, output)``, never raising for the status."""
        return await self.cmd(command, timeout, check=False)

    @on_loop
    def close(self) -> None:
        self._end_move()
        self.writer.close()

    def reattach(self, reader, writer, *, host: str) -> None:
        """Continue on another console of the same guest (after a migration), now: what the
        old one had not delivered, and the new one's output before this, are lost (see
        :meth:`connect_ahead`)."""
        self._end_move()
        self.writer.close()
        self.reader, self.writer, self.host = reader, writer, host
        self.buffer = ""
        self.forget_partial_line()


__all__ = ["GuestSession", "ConsoleCommandError"]
