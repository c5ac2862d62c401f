"""``CmdResult``: the record of one command run on a host."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CmdResult:
    """What a command did.

    ============  ===============================================================
    command       the command line as sent to the remote shell
    exit_status   its exit status (-1 when it ended by a signal or timeout)
    stdout        standard output, decoded as UTF-8 (invalid bytes replaced)
    stderr        standard error, likewise
    duration      wall seconds from sending the command to its end
    aborted       the signal that ended it (e.g. ``"KILL"`` after a timeout), "" if none
    host          the host's name
    ============  ===============================================================
    """

    command: str
    exit_status: int
    stdout: str
    stderr: str
    duration: float
    aborted: str = ""
    host: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and not self.aborted

    def __str__(self) -> str:
        def block(text: str) -> str:
            return "\n".join("    " + line for line in text.rstrip("\n").splitlines()) or "    -"
        return (f"* Command on {self.host}: {self.command}\n"
                f"  Exit status: {self.exit_status}\n"
                f"  Aborted: {self.aborted or 'no'}\n"
                f"  Duration: {self.duration:.3f} s\n"
                f"  stdout:\n{block(self.stdout)}\n"
                f"  stderr:\n{block(self.stderr)}")
