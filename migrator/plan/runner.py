"""Running a scheduled plan: each queue a pipeline, queues concurrently.

::

    runs = await PlanRunner(plan, placements, inventory_path, out_dir, ...).run()

Each test is one ``migrate-run`` (a process of its own: its own run id, journal, sync server
and results directory ``<out_dir>/<test>/<run-id>/``), over the hosts of the queues it holds,
with a config of its own written next to it (``<out_dir>/<test>/config.yaml``: the test's
config file and ``params``, and as its only address pool the range of its first queue).

**Which queues, when.** The tests keep the global order the schedule gave them (longest
expected first): whenever queues are free, each pending test in that order takes free queues —
its fixed places (``where``, ``assign``), the rest on other hosts — and starts once it has all
it needs; a test that must still wait keeps the free queues it would take from the tests after
it (so it is never passed over for ever). A test holds no queue while it waits, so tests over
crossing queues never wait on each other: no deadlock. Queues are bound when a test starts,
not when the plan is made: a test takes the queue that really freed first, whatever the
estimates said (``plan.json`` records where each ran; ``--dry-run`` shows the prediction).

A failing test does not stop the other queues; with ``fail_fast`` the first failure stops
the plan: the running tests are interrupted (SIGINT: each rolls back and cleans up as a
single run does) and the rest are skipped. Cancelling :meth:`PlanRunner.run` (Ctrl-C) does
the same, then re-raises. Every child is waited for: none is left behind.

Statuses: ``passed`` (exit 0), ``failed`` (1), ``interrupted`` (130), ``errored`` (any other
exit, e.g. 2: bad input the plan's own checks did not see), ``skipped`` (never started).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from ..aio import shielded
from ..config import Config
from .model import Plan
from .process import interrupt, wait_run
from .schedule import History, Placement

STATUS_OF_EXIT = {0: "passed", 1: "failed", 130: "interrupted"}


@dataclass
class TestRun:
    placement: Placement
    status: str = "pending"
    exit_status: int | None = None
    started_s: float | None = None
    """Seconds from the plan's start."""
    duration_s: float | None = None
    dir: Path | None = None
    """The test's directory: its config, output, and its run's results below."""

    @property
    def name(self) -> str:
        return self.placement.test.name

    def results_dir(self) -> Path | None:
        """The run's results directory (the one holding ``run.json``), if it wrote one."""
        if self.dir is None:
            return None
        found = sorted(p.parent for p in self.dir.glob("*/run.json"))
        return found[-1] if found else None


def config_for(plan: Plan, p: Placement) -> dict:
    """The config the test runs with: its file and params and, when its first queue owns a
    range, that range as its only address pool (a queue without a range leaves the test's
    own pools, if any: claims keep runs apart). :raise ConfigError: (checked when the plan
    loaded)."""
    test = p.test
    rng = plan.queue_range.get(p.queues[0])
    pool = {f"network.pools.{rng}": plan.ranges[rng].model_dump(mode="json")} if rng else {}
    data = Config.load(test.config, {**test.spec.params, **pool}).model_dump(
        mode="json", exclude_unset=True)
    if rng is not None:
        data["network"]["pools"] = {rng: plan.ranges[rng].model_dump(mode="json")}
        Config.model_validate(data)
    return data


class PlanRunner:
    def __init__(self, plan: Plan, placements: list[Placement], inventory: str | Path,
                 out_dir: Path, history: History, *, fail_fast: bool = False,
                 say: Callable[[str], None] = print, stop_timeout_s: float = 600.0):
        self.plan, self.placements = plan, placements
        self.inventory, self.out_dir, self.history = str(inventory), out_dir, history
        self.fail_fast, self.say, self.stop_timeout_s = fail_fast, say, stop_timeout_s
        self.runs = [TestRun(p) for p in placements]
        self.t0 = 0.0
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._stopping = False

    async def run(self) -> list[TestRun]:
        """Run every test (see the module). Returns the runs in the global order.
        :raise asyncio.CancelledError: cancelled (after every child ended)."""
        self.t0 = time.monotonic()
        running: dict[asyncio.Task, TestRun] = {}
        busy: set[str] = set()
        try:
            while True:
                if not self._stopping:
                    for r, queues in self._startable(busy):
                        r.placement.queues = queues
                        busy.update(queues)
                        r.status = "running"
                        running[asyncio.create_task(self._run_one(r))] = r
                if not running:
                    if any(r.status == "pending" for r in self.runs) and not self._stopping:
                        raise RuntimeError("plan: tests pending, none running, none can start")
                    break
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    r = running.pop(task)
                    task.result()                    # a bug in _run_one: raised here
                    busy.difference_update(r.placement.queues)
                    if r.status != "passed" and self.fail_fast and not self._stopping:
                        self.say(f"[plan] {r.name} {r.status}: --fail-fast stops the plan")
                        self._stop()
        except BaseException:
            self._stop()
            if running:
                await shielded(asyncio.wait(running))
            raise
        finally:
            for r in self.runs:
                if r.status == "pending":
                    r.status = "skipped"
        return self.runs

    def _startable(self, busy: set[str]) -> list[tuple[TestRun, list[str]]]:
        """The tests to start now, with their queues: the pending ones in the global order,
        each given free queues (its fixed places, the rest on other hosts). One that cannot
        start yet keeps the free queues it would take from the tests after it, so it is never
        passed over for ever; none holds a queue while it waits."""
        free = [q for q in self.plan.queues if q not in busy]
        out = []
        for r in self.runs:
            if r.status != "pending":
                continue
            chosen, complete = self._pick(r.placement.test, free)
            for q in chosen:
                free.remove(q)
            if complete:
                out.append((r, chosen))
        return out

    def _pick(self, test, free: list[str]) -> tuple[list[str], bool]:
        """The free queues ``test`` would take now (its first one first: the one whose range
        it uses), and whether they are all it needs."""
        host_of, ranged = self.plan.host_of, self.plan.queue_range
        chosen: list[str] = []
        hosts: set[str] = set()
        missing = 0
        for n, place in enumerate(test.fixed):
            want_range = test.needs_range and n == 0
            options = [q for q in free if q not in chosen and (q == place or (
                "/" not in place and host_of(q) == place and (not want_range or q in ranged)))]
            if options:
                chosen.append(options[0])
            else:
                missing += 1
            hosts.add(host_of(place) if "/" in place else place)
        need = test.spec.hosts - len(test.fixed)
        first_needs_range = test.needs_range and not test.fixed
        for q in free:
            if need == 0:
                break
            if q in chosen or host_of(q) in hosts or (first_needs_range and q not in ranged):
                continue
            chosen.append(q)
            hosts.add(host_of(q))
            need -= 1
            first_needs_range = False
        return chosen, missing == 0 and need == 0

    def _stop(self) -> None:
        """No test starts any more; the running ones are interrupted (SIGINT)."""
        self._stopping = True
        for proc in self._procs.values():
            interrupt(proc)

    async def _run_one(self, r: TestRun) -> None:
        p = r.placement
        r.dir = self.out_dir / r.name
        r.dir.mkdir(parents=True, exist_ok=True)
        config_file = r.dir / "config.yaml"
        config_file.write_text(yaml.safe_dump(config_for(self.plan, p), sort_keys=False))
        argv = [sys.executable, "-m", "migrator.cli.run", "-i", self.inventory,
                "-c", str(config_file), "-o", str(r.dir), "-m", ",".join(p.hosts)]
        if p.test.spec.all_hosts:
            argv += ["-a", "all"]
        argv.append(p.test.scenario)
        r.started_s = time.monotonic() - self.t0
        self.say(f"[plan] {r.name} on {' '.join(p.queues)}: started")
        with open(r.dir / "output.log", "wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True)
        self._procs[r.name] = proc
        try:
            r.exit_status = await wait_run(proc, self.stop_timeout_s)
        finally:
            self._procs.pop(r.name, None)
        r.duration_s = time.monotonic() - self.t0 - r.started_s
        r.status = STATUS_OF_EXIT.get(r.exit_status, "errored")
        if r.status in ("passed", "failed"):
            self.history.record(p.test, r.duration_s)
        where = r.results_dir() or r.dir
        self.say(f"[plan] {r.name} on {' '.join(p.queues)}: {r.status} in "
                 f"{r.duration_s:.1f} s ({where})")

__all__ = ["PlanRunner", "TestRun", "config_for"]
