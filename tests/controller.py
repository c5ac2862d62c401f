"""``migrate-run`` as a child process that a test or a bench stops, signals and kills.

One harness for ``tests/test_recover.py`` and the fault matrix's controller rows
(``bench/_controller_faults.py``): :data:`SCENARIO` (vm1 from the first host to the second,
holding a 32 MiB memsum pattern), :class:`Controller` (one run of it) and :func:`recover_cli`.

Landing a fault exactly: with ``-p journal.stop_after=KIND:NAME`` the controller stops itself
(SIGSTOP) right after that journal record is durable, before the step the record names;
:meth:`Controller.wait_stopped` sees it stopped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from migrator.framework.journal import find_run, list_runs, read_journal

BIN = Path(sys.executable).parent

SCENARIO = '''
from migrator import MultihostMigration


class Crash(MultihostMigration):
    """vm1 from the first host to the second, holding a memory pattern (memsum)."""

    async def migration_scenario(self):
        async def worker(md):
            for vm in md.vms:
                await (await vm.wait_for_login()).cmd("memsum write 32 7")
        await self.migrate_wait(["vm1"], self.hosts[0], self.hosts[1], worker=worker)
'''


class Controller:
    """One ``migrate-run`` of :data:`SCENARIO` (or of ``scenario``, a file: a task list...)
    in ``tmp`` (its state dir, results, output).

    It runs in a session of its own, so a signal meant for the test or the bench (a Ctrl-C
    at the terminal) never reaches it, and only the signals sent here do.
    """

    def __init__(self, tmp: Path, inventory_path: Path, driver: str, args: list[str],
                 machines: str = "hostA,hostB", scenario: Path | None = None):
        self.state = tmp / "state"
        self.results = tmp / "results"
        if scenario is None:                      # the default: SCENARIO
            scenario = tmp / "crash.py"
            scenario.write_text(SCENARIO)
        self.scenario = scenario
        self.log = tmp / "controller.out"
        self.argv = [str(BIN / "migrate-run"), "-i", str(inventory_path), "-o",
                     str(self.results), "-m", machines, "-p", f"driver={driver}",
                     "-p", f"journal.state_dir={self.state}", *args, str(self.scenario)]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdout=out, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def run_id(self) -> str | None:
        """The run's id: from the state dir while it runs (or died), from its results after
        it ended by itself (its state entry is then gone)."""
        runs = list_runs(self.state)
        if runs:
            return runs[0].run_id
        done = list(self.results.glob("*/run.json"))
        return done[0].parent.name if done else None

    def journal(self) -> list[dict]:
        """The run's journal records so far: from its state entry, or from its results once
        it ended."""
        runs = list_runs(self.state)
        if runs:
            entry = find_run(self.state, runs[0].run_id)
            if entry is not None and entry.journal_path.exists():
                return read_journal(entry.journal_path)
        found = list(self.results.glob("*/journal.jsonl"))
        return read_journal(found[0]) if found else []

    def _ended(self, before: str) -> str:
        return f"migrate-run ended ({self.proc.returncode}) before {before}:\n" \
            + self.output()[-4000:]

    async def wait_for(self, match, timeout: float = 180, count: int = 1) -> dict:
        """The ``count``-th journal record ``match`` accepts (polled every 5 ms).

        Raises AssertionError if the run ends first, TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            while True:
                hits = [rec for rec in self.journal() if match(rec)]
                if len(hits) >= count:
                    return hits[count - 1]
                assert self.proc.returncode is None, self._ended("the record")
                await asyncio.sleep(0.005)

    async def wait_stopped(self, timeout: float = 180) -> None:
        """Wait until the controller stopped itself at ``journal.stop_after``.

        Raises AssertionError if the run ends first, TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            while True:
                assert self.proc.returncode is None, self._ended("its stop point")
                stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] == "T":
                    return
                await asyncio.sleep(0.01)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    async def wait(self, timeout: float = 600) -> int:
        """Wait for the run to end by itself; its exit status."""
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def killed_at_stop_point(self) -> None:
        """Start, and SIGKILL once it stopped itself at ``journal.stop_after``."""
        await self.start()
        try:
            await self.wait_stopped()
            await self.kill()
        finally:
            await self.stop()

    async def killed_while_migrating(self) -> None:
        """Start, and SIGKILL once the journal says MIGRATING (the caller caps bandwidth so
        that it lasts)."""
        await self.start()
        try:
            await self.wait_for(lambda r: r.get("event") == "phase" and r["phase"] == "MIGRATING")
            await self.kill()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Kill it if it still runs (stopped or not)."""
        if self.proc is not None and self.proc.returncode is None:
            await self.kill()


async def recover_cli(ctl: Controller, *args: str, timeout: float = 300):
    """``migrate-run recover ARGS`` on ``ctl``'s state dir: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "recover", "-p", f"journal.state_dir={ctl.state}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()
