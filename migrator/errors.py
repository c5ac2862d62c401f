"""The root of every error migrator raises, and the tree below it.

::

    MigratorError                 root; str() is one line meant for a user
     +-- ConfigError              bad input, found before anything starts (exit status 2)
     |    +-- InventoryError      inventory file missing, unreadable or invalid
     +-- HostError(host)          something failed on one named host
     |    +-- HostConnectError    no SSH connection: refused, unreachable, DNS, timeout
     |    |    +-- HostAuthError  the host refused our credentials
     |    |    +-- HostKeyError   the host's key is not the one in known_hosts (refused)
     |    +-- CommandError        a command failed; carries the whole CmdResult
     +-- LabError                 the one-machine lab could not be built, checked or removed
     +-- GuestError(host, vm)     a guest did not boot or did not answer on its console
     +-- MigrationError           one migration failed: src, dst, vm, phase, and the cause
     +-- BarrierError             hosts did not meet at a framework barrier (names who)
     +-- ScenarioError            a scenario run failed as a whole (cancelled, sibling failed)

``asyncio.CancelledError`` is never wrapped. Errors that wrap a library error keep it as
``__cause__`` (raised ``from``), so the original is never lost.
"""

from __future__ import annotations


class MigratorError(Exception):
    """Root of migrator's errors. ``str()`` is a single line that says what to do."""


class ConfigError(MigratorError):
    """Bad input from the user, detected before anything is started or changed."""


class InventoryError(ConfigError):
    """The inventory is missing, unreadable, or does not validate."""


class HostError(MigratorError):
    """Something failed on a host. ``host`` is the host's name as the user typed it."""

    def __init__(self, host: str, message: str):
        super().__init__(f"{host}: {message}")
        self.host = host
        self.message = message


class HostConnectError(HostError):
    """No SSH connection could be made (refused, unreachable, name unknown, timeout)."""


class HostAuthError(HostConnectError):
    """The host refused the credentials (public key not accepted)."""


class HostKeyError(HostConnectError):
    """The host presented a key that known_hosts does not vouch for; nothing was sent."""


class CommandError(HostError):
    """A command failed on a host (non-zero exit, signal, or timeout); ``result`` holds it all."""

    def __init__(self, host: str, result):  # result: migrator.hosts.result.CmdResult
        if result.timed_out:
            why = f"timed out after {result.duration:.1f} s, killed by signal {result.aborted}"
        elif result.aborted:
            why = f"killed by signal {result.aborted}"
        else:
            why = f"exit status {result.exit_status}"
        out = result.stderr or result.stdout or ""
        if isinstance(out, bytes):
            out = out.decode("utf-8", errors="replace")
        tail = out.strip().splitlines()[-1:] or [""]
        super().__init__(host, f"command failed ({why}): {result.command!r} {tail[0]}".rstrip())
        self.result = result


class LabError(MigratorError):
    """The lab could not be built, checked or torn down."""


class GuestError(MigratorError):
    """A guest did not boot, or did not answer on its serial console."""

    def __init__(self, host: str, vm: str, message: str):
        super().__init__(f"{vm} on {host}: {message}")
        self.host = host
        self.vm = vm
        self.message = message


class MigrationError(MigratorError):
    """A migration failed, timed out or was cancelled.

    ``src``/``dst`` (host names), ``vm``, ``phase`` (where it was), ``outcome`` (what was
    done about it, e.g. "VM running on hostA, destination removed") and the original error as
    ``__cause__``.
    """

    def __init__(self, src: str, dst: str, vm: str, phase: str, message: str,
                 outcome: str = ""):
        text = f"{vm} {src}->{dst} [{phase}]: {message}"
        super().__init__(text + (f"; {outcome}" if outcome else ""))
        self.src, self.dst, self.vm, self.phase = src, dst, vm, phase
        self.message, self.outcome = message, outcome


class BarrierError(MigratorError):
    """Hosts did not meet at a barrier: ``barrier``, and ``hosts`` (the ones to blame: missing,
    lost or unreachable)."""

    def __init__(self, barrier: str, hosts: list[str], message: str):
        super().__init__(f"barrier {barrier!r}: {message}")
        self.barrier, self.hosts, self.message = barrier, hosts, message


class ScenarioError(MigratorError):
    """A scenario step could not run: e.g. a migration cancelled because a sibling failed, or
    a VM asked for where it is not."""
