"""The run journal: what a run owns, written before each step, so that a run whose controller
died can be found and resolved (``migrate-run recover``).

::

    journal = RunJournal.create(run_id, state_dir, path, inventory, config)  # takes the lock
    journal.record("vm", vm="vm1", host="hostA", state="starting")
    ...
    journal.finish("passed", leftovers=[])       # the index entry goes; the lock is released

Three places hold it:

* **the journal** (``journal.jsonl``: under the run's results dir for ``migrate-run``, else in
  the index entry): one JSON object per line, written, flushed and fsynced before the step it
  announces. The first line (``run``) holds everything recovery needs without the run's files:
  the inventory, the config, the hosts, the controller's identity.
* **the index of live runs** (``<journal.state_dir>/runs/<run-id>/``): ``run.json`` (where
  the journal is, the controller's pid, start time and machine) and ``lock``, which the
  controller holds (``flock``) for as long as it lives. A lock that can be taken proves the
  controller is gone — the kernel drops it with the process — and whoever takes it (the
  controller, or one ``recover``) is the only one that may drive or resolve the run.
* **the hosts**: every host of the run has ``<run_dir>/<run-id>.owner.json`` naming the run
  and its controller, next to the run's dir holding the VMs it has (``<run-id>/<vm>/``, with
  QEMU's ``qemu.id``), so a controller whose disk is lost can still be recovered from the
  hosts.

Event records (``event`` key): ``run``, ``vm`` (``state``: starting, started, stopped),
``phase`` (one migration's phase: ``mig_id``, ``vm``, ``src``, ``dst``, ``phase``),
``resource`` (``kind``, ``host``, ``path``), ``end`` (``status``), and ``recovered``.
Later parts of migrator (networking, storage migration, drain) add their resources here.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError

log = logging.getLogger(__name__)

INDEX = "runs"


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks after boot), None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def controller_identity() -> dict[str, Any]:
    """This process as a run's controller: machine, pid, start time."""
    return {"machine": socket.gethostname(), "pid": os.getpid(),
            "start": process_start_time(os.getpid())}


class RunLocked(Exception):
    """The run's lock is held: its controller, or another recovery, is alive."""

    def __init__(self, run_id: str, holder: str):
        super().__init__(f"run {run_id} is held by {holder}")
        self.run_id, self.holder = run_id, holder


class RunLock:
    """The ``flock`` of one run's index entry (exclusive, never blocking).

    :raise RunLocked: (from :meth:`acquire`) someone alive holds it; ``holder`` says who.
    """

    def __init__(self, entry: Path, role: str):
        self.path = entry / "lock"
        self.role = role
        self._fd: int | None = None

    def acquire(self, create: bool = False) -> "RunLock":
        """Take the lock (``create``: make the entry first, for a new run).

        :raise RunLocked: someone alive holds it.
        :raise FileNotFoundError: the entry is gone (the run ended, or was recovered, and
            its entry removed) and ``create`` is false.
        """
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600) if create \
            else _open_existing(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunLocked(self.path.parent.name, self.holder() or "a live process") from None
        if not create and not _still_named(fd, self.path):
            os.close(fd)        # the holder removed the entry, then let go: the run is gone
            raise FileNotFoundError(self.path)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"role": self.role, **controller_identity()}).encode())
        self._fd = fd
        return self

    def holder(self) -> str | None:
        """Who wrote the lock last (``controller pid 123 on host``), for messages."""
        try:
            who = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return None
        return who and f"{who.get('role', '?')} pid {who.get('pid')} on {who.get('machine')}"

    def is_held(self) -> bool:
        """Whether a live process holds the lock now. Read from ``/proc/locks`` (the kernel's
        list of flocks by device and inode), so looking never takes the lock: a recovery
        starting at the same moment is never told the run is alive because of a look."""
        if self._fd is not None:
            return True
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as locks:
            return any(f[1] == "FLOCK" and f[5] == key
                       for f in (line.split() for line in locks) if len(f) > 5)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)                   # closing the descriptor drops the flock


def _open_existing(path: Path) -> int:
    """Open the lock of an existing entry (made with it); never (re)creates one: a lock
    file made in an entry being removed would leave that entry behind without its run.
    :raise FileNotFoundError: the entry is gone, or going."""
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def _still_named(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file ``fd`` is open on. An entry is removed with its
    lock held, then the lock released: one who opened the lock before the removal gets the
    flock then, on a file no longer in the index."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


@dataclass
class RunEntry:
    """One run of the index (``<state_dir>/runs/<run-id>/``)."""

    run_id: str
    dir: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def journal_path(self) -> Path:
        return Path(self.info.get("journal") or self.dir / "journal.jsonl")

    @property
    def recovered(self) -> bool:
        return bool(self.info.get("recovered"))

    def lock(self, role: str) -> RunLock:
        return RunLock(self.dir, role)

    def is_alive(self) -> bool:
        """Whether a process holds the run (its controller, or a recovery)."""
        return self.lock("probe").is_held()

    def events(self) -> list[dict[str, Any]]:
        """The journal's records (a torn last line, from a kill mid-write, is skipped).

        :raise ConfigError: the journal is missing.
        """
        return read_journal(self.journal_path)

    def update(self, **info: Any) -> None:
        self.info.update(info)
        write_atomic(self.dir / "run.json", json.dumps(self.info, indent=1))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def read_journal(path: Path) -> list[dict[str, Any]]:
    """:raise ConfigError: the journal cannot be read."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"journal {path}: {exc.strerror}") from None
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError:
            if i != len(lines) - 1:
                raise ConfigError(f"journal {path}: line {i + 1} is not JSON") from None
    return out


def _drop_torn_record(path: Path) -> None:
    """Cut ``path`` after its last newline, durably (nothing to do when it ends with one).
    :raise OSError: it cannot be read or written."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1
        log.warning("journal %s: its last record was torn (%d bytes): removed before "
                    "appending", path, size - keep)
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def index_dir(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir).expanduser() / INDEX


def list_runs(state_dir: str | os.PathLike) -> list[RunEntry]:
    """Every run in the index, oldest first (live, dead and recovered)."""
    root = index_dir(state_dir)
    entries = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            info = json.loads((d / "run.json").read_text())
        except (OSError, ValueError):
            info = {}
        entries.append(RunEntry(d.name, d, info))
    return entries


def find_run(state_dir: str | os.PathLike, run_id: str) -> RunEntry | None:
    return next((e for e in list_runs(state_dir) if e.run_id == run_id), None)


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a reader never sees half of it), durably."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunJournal:
    """The journal of the run this process drives, and its index entry and lock.

    :meth:`record` raises ``OSError`` when the journal cannot be written: the step it
    announces does not start unrecorded.
    """

    def __init__(self, entry: RunEntry, lock: RunLock, path: Path,
                 stop_after: str | None = None):
        self.entry, self._lock, self.path = entry, lock, path
        self._file = open(path, "a", buffering=1)
        self.closed = False
        self._stop = _StopPoint(stop_after) if stop_after else None

    @classmethod
    def reopen(cls, entry: RunEntry, lock: RunLock) -> "RunJournal":
        """The journal of a dead run, for the process that took its lock (``recover``):
        :meth:`record` appends to it, :meth:`detach` releases the lock.

        A record torn by the controller's death (a last line without its newline: never
        complete, so its step never began) is removed first; appended to, it would hide the
        next record and then stand in the middle of the journal, which no reader accepts.

        :raise OSError: the journal cannot be opened for appending.
        """
        _drop_torn_record(entry.journal_path)
        return cls(entry, lock, entry.journal_path)

    @classmethod
    def create(cls, run_id: str, state_dir: str | os.PathLike, path: str | os.PathLike | None,
               head: dict[str, Any], stop_after: str | None = None) -> "RunJournal":
        """Make the run's index entry, take its lock, write the ``run`` record.

        :param path: where the journal goes (default: inside the index entry).
        :param head: what recovery needs: ``hosts``, ``inventory``, ``config``...
        :param stop_after: fault injection (``journal.stop_after`` in the config).
        :raise ConfigError: the state dir cannot be written.
        """
        entry_dir = index_dir(state_dir) / run_id
        try:
            lock = RunLock(entry_dir, "controller").acquire(create=True)
        except OSError as exc:
            raise ConfigError(f"journal.state_dir {state_dir}: {exc.strerror}") from None
        except RunLocked as exc:
            raise ConfigError(f"run {run_id} exists already ({exc})") from None
        journal_path = Path(path) if path else entry_dir / "journal.jsonl"
        journal_path.parent.mkdir(parents=True, exist_ok=True)
        entry = RunEntry(run_id, entry_dir, {
            "run_id": run_id, "journal": str(journal_path.resolve()),
            "controller": controller_identity(), "started": time.time(),
            "hosts": list(head.get("hosts", {}))})
        entry.update()
        journal = cls(entry, lock, journal_path, stop_after)
        journal.record("run", run_id=run_id, controller=controller_identity(), **head)
        return journal

    def record(self, event: str, **fields: Any) -> None:
        """Append one record and make it durable before returning."""
        if self.closed:
            return
        line = json.dumps({"event": event, "t": round(time.time(), 3), **fields},
                          default=str)
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._stop is not None and self._stop.reached(event, fields):
            log.warning("journal.stop_after %s reached: stopping this process (SIGSTOP)",
                        self._stop.spec)
            os.kill(os.getpid(), signal.SIGSTOP)

    def close(self) -> None:
        """Stop writing; the lock stays with whoever holds it."""
        if not self.closed:
            self.closed = True
            self._file.close()

    def detach(self) -> None:
        """Stop writing and release the lock, keeping the index entry (a run left for
        ``recover``: e.g. one whose journal was rebuilt from the hosts)."""
        if not self.closed:
            self.close()
            self._lock.release()

    def finish(self, status: str, leftovers: list[str]) -> None:
        """The run ended (its cleanup done): record it; drop the index entry unless something
        of the run is left on a host (then ``recover`` finds it); release the lock."""
        if self.closed:
            return
        self.record("end", status=status, leftovers=leftovers)
        self.closed = True
        self._file.close()
        if leftovers:
            self.entry.update(ended=status, leftovers=leftovers)
        else:
            self.entry.remove()
        self._lock.release()


class _StopPoint:
    """``EVENT:VALUE[@N]``: the Nth record of EVENT whose main field (``phase``, ``name``,
    ``state`` or ``kind``) starts with VALUE."""

    def __init__(self, spec: str):
        self.spec = spec
        what, _, nth = spec.partition("@")
        self.event, _, self.value = what.partition(":")
        self.left = int(nth or 1)

    def reached(self, event: str, fields: dict[str, Any]) -> bool:
        if event != self.event:
            return False
        main = next((str(fields[k]) for k in ("phase", "name", "state", "kind")
                     if k in fields), "")
        if not main.startswith(self.value):
            return False
        self.left -= 1
        return self.left == 0


def owner_file(run_root: str, run_id: str) -> str:
    """The hosts' copy of who owns run ``run_id``: next to its run dir, not in it (scenarios
    list a run dir to prove a VM left nothing there)."""
    return f"{run_root}/{run_id}.owner.json"


def hosts_of(events: list[dict[str, Any]]) -> dict[str, str]:
    head = events[0] if events and events[0].get("event") == "run" else {}
    return dict(head.get("hosts", {}))


def last_phases(events: list[dict[str, Any]],
                instance: str | None = None) -> dict[str, dict[str, Any]]:
    """The last ``phase`` record of each VM (its latest migration), of one instance if
    given (the pairs of a run may each have a ``vm1``), by the VM's identity: its ``key``
    (``HOST/NAME``, parallel VM tasks) where the record has one, else its name."""
    out: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("event") == "phase" and (instance is None or e.get("instance") == instance):
            out[e.get("key", e["vm"])] = e
    return out


def vm_records(events: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (e for e in events if e.get("event") == "vm")


__all__ = ["owner_file", "RunEntry", "RunJournal", "RunLock", "RunLocked", "controller_identity",
           "find_run", "hosts_of", "index_dir", "last_phases", "list_runs",
           "process_start_time", "read_journal", "vm_records", "write_atomic"]
