"""``CmdResult``: the record of one command run on a host."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CmdResult:
    """What a command did.

    ============  ===============================================================
    command       the command as given (before migrator's wrapping)
    exit_status   its exit status; -1 when it was ended by a signal
    stdout        standard output (str, UTF-8 with invalid bytes replaced; or bytes when
                  the command was run with ``encoding=None``)
    stderr        standard error, likewise
    duration      wall seconds from sending the command to its end
    aborted       number of the signal that ended it (9 after a timeout), 0 if none
    timed_out     True when migrator ended it because its timeout expired
    host          the host's name
    ============  ===============================================================
    """

    command: str
    exit_status: int
    stdout: str | bytes
    stderr: str | bytes
    duration: float
    aborted: int = 0
    timed_out: bool = False
    host: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and not self.aborted and not self.timed_out

    def __str__(self) -> str:
        def block(text: str | bytes) -> str:
            if isinstance(text, bytes):
                return f"    <{len(text)} bytes>"
            return "\n".join("    " + line for line in text.rstrip("\n").splitlines()) or "    -"
        return (f"* Command on {self.host}: {self.command}\n"
                f"  Exit status: {self.exit_status}\n"
                f"  Aborted by signal: {self.aborted or 'no'}\n"
                f"  Timed out: {'yes' if self.timed_out else 'no'}\n"
                f"  Duration: {self.duration:.3f} s\n"
                f"  stdout:\n{block(self.stdout)}\n"
                f"  stderr:\n{block(self.stderr)}")
