"""Local commands and processes for the lab: run a tool, find, signal and reap processes.

Processes are identified by (pid, start time), never by name, so a recycled PID is never
signalled. PID 1 on this machine kind does not reap orphans: a process that exited but was not
reaped shows as a zombie (state ``Z``); :func:`is_alive` counts it as gone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import LabError


@dataclass(frozen=True)
class Proc:
    """A process identity: its PID plus its start time in clock ticks since boot."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> "Proc | None":
        start = _start_time(pid)
        return None if start is None else cls(pid, start)

    def to_json(self) -> dict:
        return {"pid": self.pid, "start": self.start}

    @classmethod
    def from_json(cls, data: dict | None) -> "Proc | None":
        return None if not data else cls(int(data["pid"]), int(data["start"]))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def is_alive(proc: Proc | None) -> bool:
    """True if ``proc`` still runs: same PID and start time, and not a zombie."""
    if proc is None:
        return False
    fields = _stat_fields(proc.pid)
    if fields is None or int(fields[19]) != proc.start:
        return False
    return fields[0] not in ("Z", "X")


def processes_in_netns(netns_path: str | os.PathLike) -> list[Proc]:
    """Every live (non-zombie) process whose network namespace is the one at ``netns_path``."""
    try:
        target = os.stat(netns_path).st_ino
    except FileNotFoundError:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino != target:
                continue
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        proc = Proc.of(pid)
        if proc is not None and is_alive(proc):
            found.append(proc)
    return found


def _signal(proc: Proc, sig: int) -> None:
    if is_alive(proc):
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def _reap(proc: Proc) -> None:
    """Collect the exit status if ``proc`` is our own child (no-op otherwise)."""
    try:
        os.waitpid(proc.pid, os.WNOHANG)
    except ChildProcessError:
        pass


async def stop_processes(procs: list[Proc], timeout_s: float) -> list[Proc]:
    """SIGTERM ``procs``, wait up to ``timeout_s`` for them to go, then SIGKILL the rest.

    Returns the processes still alive after SIGKILL and another ``timeout_s`` (normally none).
    """
    procs = [p for p in procs if is_alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            _signal(p, sig)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delay = 0.002
        while True:
            for p in procs:
                _reap(p)
            procs = [p for p in procs if is_alive(p)]
            if not procs or loop.time() >= deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        if not procs:
            break
    return procs


@dataclass(frozen=True)
class Completed:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


async def run(*args: str, check: bool = True, input: bytes | None = None,
              what: str | None = None) -> Completed:
    """Run a local command to completion and capture its output.

    :raise LabError: if ``check`` and it exits non-zero or cannot be started; the message names
        ``what`` (or the command) and quotes its stderr.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise LabError(f"{what or args[0]}: {args[0]} is not installed "
                       "(run 'make setup' or scripts/setup.sh)") from None
    try:
        out, err = await proc.communicate(input)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    done = Completed(tuple(args), proc.returncode, out.decode(errors="replace"),
                     err.decode(errors="replace"))
    if check and done.returncode != 0:
        msg = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise LabError(f"{what or ' '.join(args)} failed (exit {done.returncode}): "
                       f"{msg[-1] if msg else 'no output'}")
    return done


def tcp_port_open(address: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``address:port`` now."""
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False
