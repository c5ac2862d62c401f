"""Autotest's style without a lab: def code in worker threads calling migrator's async objects
(migrator.blocking), the blocked-loop warning, ``self.params``, control files, ``-a all``,
awaits that were forgotten and handles of another instance. The same paths with real VMs:
tests/test_seed.py."""

import asyncio
import copy
import inspect
import logging
import sys
import threading
import time
from pathlib import Path

import pytest

from migrator.blocking import BlockingInWorkers, on_loop, run_in_worker
from migrator.cli.run import run_main
from migrator.config import Config, Inventory
from migrator.errors import ConfigError, ScenarioError
from migrator.framework import MigrationData, MigrationHandle, MultihostMigration, RunContext
from migrator.framework.loopwatch import LoopStallWatch
from migrator.framework.handle import current_instance
from migrator.framework.params import Params
from migrator.framework.scenario import make_instances
from migrator.migration import MigrationParams

SEED = Path(__file__).parent / "scenarios" / "autotest_seed.py"
HOSTS = ["hostA", "hostB", "hostC", "hostD"]


def inventory() -> Inventory:
    return Inventory(hosts={h: {"address": f"192.0.2.{i + 1}"} for i, h in enumerate(HOSTS)},
                     guest={"kernel": "/boot/k", "initrd": "/boot/i"})


def line_of(text: str, path: str = __file__) -> int:
    """The line number of the only line of ``path`` containing ``text`` (in this file: a
    marker comment ``# @name``, given as ``"@name"``)."""
    text = "# " + text if text.startswith("@") else text
    (n,) = [i for i, ln in enumerate(Path(path).read_text().splitlines(), 1) if text in ln]
    return n


class Counter(BlockingInWorkers):
    def __init__(self):
        self.n = 0
        self.threads: list[str] = []

    async def add(self, k: int) -> int:
        self.threads.append(threading.current_thread().name)
        await asyncio.sleep(0.001)
        if k < 0:
            raise ValueError(f"negative {k}")
        self.n += k
        return self.n

    @on_loop
    def loop_task(self) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(asyncio.sleep(0))


# -- the bridge -------------------------------------------------------------------------------

async def test_def_code_in_a_worker_gets_results_and_errors_from_the_loop():
    c = Counter()

    def worker(counter):
        got = [counter.add(2), counter.add(3)]
        with pytest.raises(ValueError, match="negative -1"):
            counter.add(-1)
        return got, type(counter.loop_task()).__name__, threading.current_thread().name

    got, task_type, thread = await run_in_worker(worker, c, name="w")
    assert got == [2, 5] and task_type == "Task" and thread.startswith("migrator: w")
    # the coroutine ran on the loop's thread, not in the worker
    assert set(c.threads) == {threading.current_thread().name}
    # on the loop the same method is a coroutine function's call, as defined
    assert inspect.iscoroutine(coro := c.add(1)) and await coro == 6


async def test_a_cancelled_worker_stops_at_its_next_call_and_a_stuck_one_is_named(caplog):
    c = Counter()
    seen: list[BaseException] = []
    started = threading.Event()

    def busy(counter):
        started.set()
        try:
            while True:
                counter.add(0)
        except BaseException as exc:
            seen.append(exc)
            raise

    task = asyncio.ensure_future(run_in_worker(busy, c, name="busy", grace_s=5))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(seen) == 1 and isinstance(seen[0], asyncio.CancelledError)

    release = threading.Event()

    def stuck(counter):
        release.wait(30)                # @stuck: never calls back into migrator

    task = asyncio.ensure_future(run_in_worker(stuck, c, name="stuck", grace_s=0.2))
    await asyncio.sleep(0.05)
    task.cancel()
    with caplog.at_level(logging.WARNING, logger="migrator.blocking"):
        with pytest.raises(asyncio.CancelledError):
            await task
    release.set()
    assert f"{__file__}:{line_of('@stuck')} (stuck)" in caplog.text


async def test_a_cancelled_worker_returns_after_its_call_on_the_loop_has_cleaned_up():
    """A worker blocked in a call (a migration, say) is cancelled: the call's own cleanup
    (a rollback) runs to its end on the loop before the worker is said to be cancelled."""
    steps: list[str] = []

    class Slow(BlockingInWorkers):
        async def work(self):
            steps.append("started")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                await asyncio.sleep(0.3)            # the rollback
                steps.append("cleaned up")
                raise

    def worker(obj):
        try:
            obj.work()
        except asyncio.CancelledError:
            steps.append("worker saw the cancellation")
            raise

    task = asyncio.ensure_future(run_in_worker(worker, Slow(), name="slow"))
    while not steps:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == ["started", "cleaned up", "worker saw the cancellation"]


async def test_what_a_def_raises_never_escapes_into_the_loop():
    def empty(_):
        return next(iter([]))

    def leaves(_):
        sys.exit(3)
    with pytest.raises(RuntimeError, match="^stop raised StopIteration$"):
        await asyncio.wait_for(run_in_worker(empty, None, name="stop"), 10)
    with pytest.raises(ScenarioError, match="^exit raised SystemExit: 3$"):
        await asyncio.wait_for(run_in_worker(leaves, None, name="exit"), 10)


async def test_a_def_override_calls_its_async_base_with_super():
    class Base(BlockingInWorkers):
        async def hook(self, x):
            await asyncio.sleep(0)
            return x + 1

    class Mine(Base):
        def hook(self, x):                          # Autotest's style: a def override
            return super().hook(x) * 10

    assert await run_in_worker(Mine().hook, 1, name="hook") == 20


async def test_a_blocked_event_loop_is_reported_with_the_line_that_blocked_it():
    warnings: list[str] = []
    async with LoopStallWatch(0.2, warnings.append, lambda path: path == __file__) as watch:
        await asyncio.sleep(0.1)
        time.sleep(0.8)                                 # @blocking
        await asyncio.sleep(0.3)
    assert len(warnings) == 1 and len(watch.stalls) == 1, warnings
    assert f"{__file__}:{line_of('@blocking')}" in warnings[0]
    assert 0.7 < watch.stalls[0][0] < 5


async def test_a_loop_that_is_not_blocked_gives_no_warning():
    warnings: list[str] = []
    async with LoopStallWatch(0.2, warnings.append):
        for _ in range(10):
            await asyncio.sleep(0.05)
    assert warnings == []


# -- self.params, control files, -a all -------------------------------------------------------

def test_params_answer_the_autotest_way():
    config = Config.model_validate({"migration": {"bandwidth_mibs": 8},
                                    "scenario": {"rounds": 3, "deep": {"k": "v"}}})
    p = Params(config, ["hostB", "hostA"])
    assert p.get("hosts") == ["hostB", "hostA"]
    assert p.get("migration.bandwidth_mibs") == 8 and p.migration.bandwidth_mibs == 8
    assert p.get("rounds") == 3 and p.get("deep.k") == "v" and p["scenario.rounds"] == 3
    assert p.get("migration.downtime_limit_ms", 300) == 300       # unset: the default
    assert p.get("nope") is None and p.get("nope", "x") == "x" and "nope" not in p
    with pytest.raises(KeyError):
        p["migration.nope"]


def test_a_control_file_is_executed_once_per_instance_with_its_own_names():
    ctx = RunContext(Config(), inventory())
    pairs = make_instances(str(SEED), [HOSTS[:2], HOSTS[2:]], ["pair1", "pair2"], ctx)
    assert [type(i).__name__ for i in pairs] == ["TestMultihostMigration"] * 2
    assert [i.params.get("hosts") for i in pairs] == [HOSTS[:2], HOSTS[2:]]
    assert [[h.name for h in i.hosts] for i in pairs] == [HOSTS[:2], HOSTS[2:]]
    for inst in pairs:
        module = sys.modules[type(inst).__module__]
        # the file's own globals are this instance's: the worker's env.get_vm finds its VMs
        assert module.mig is inst and module.env is inst.env and module.test.name == inst.name
        assert inst.restart_vm_on_source and inst.context is ctx
    all_hosts = make_instances(str(SEED), [HOSTS], ["all"], ctx)
    assert all_hosts[0].params.get("hosts") == HOSTS


def test_a_native_scenario_file_is_executed_once(tmp_path):
    ctx = RunContext(Config(), inventory())
    pairs = make_instances("ping_pong", [HOSTS[:2], HOSTS[2:]], ["pair1", "pair2"], ctx)
    assert type(pairs[0]) is type(pairs[1]) and not pairs[0].restart_vm_on_source
    assert [i.params.get("hosts") for i in pairs] == [HOSTS[:2], HOSTS[2:]]
    assert copy.copy(pairs[0].params).get("hosts") == HOSTS[:2]


def test_a_control_file_that_fails_to_load_names_its_line(tmp_path):
    bad = tmp_path / "typo.py"
    bad.write_text(SEED.read_text().replace("super(TestMultihostMigration, self)",
                                            "super(testMultihostMigration, self)"))
    ctx = RunContext(Config(), inventory())
    with pytest.raises(ConfigError) as err:
        make_instances(str(bad), [HOSTS[:2]], ["pair1"], ctx)
    assert str(err.value) == (
        f"scenario {bad}:{line_of('super(testMultihostMigration, self).__init__', bad)} does not load: "
        "NameError: name 'testMultihostMigration' is not defined")


def test_autoserv_dash_a(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        run_main(["-a", "pairs", "-m", "hostA,hostB", str(SEED)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-a pairs: the only autoserv argument is 'all'" in err
    # -a all is --all: one instance over the hosts, so three hosts are fine (the missing
    # scenario file is what stops it, before anything starts); without it they are not
    inv = str(write_inventory(tmp_path))
    three = ["-m", "hostA,hostB,hostC", "-i", inv, str(tmp_path / "none.py")]
    assert run_main(["-a", "all", *three]) == 2
    assert capsys.readouterr().err == \
        f"migrate-run: error: scenario file {tmp_path / 'none.py'} does not exist\n"
    assert run_main(three) == 2
    assert "3 hosts cannot be paired" in capsys.readouterr().err


def write_inventory(tmp_path: Path) -> Path:
    path = tmp_path / "inv.yaml"
    path.write_text("hosts:\n" + "".join(f"  {h}: {{address: 192.0.2.{i + 1}}}\n"
                                         for i, h in enumerate(HOSTS)))
    return path


# -- mistakes in async scenarios --------------------------------------------------------------

class Nothing(MultihostMigration):
    async def migration_scenario(self):
        pass


async def test_a_wait_that_was_never_awaited_is_named_with_its_line():
    ctx = RunContext(Config(), inventory())
    inst = Nothing(HOSTS[:2], context=ctx)
    inst._scenario_task = asyncio.current_task()        # as if this were its scenario
    inst.migrate_wait(["vm1"], "hostA", "hostB")        # @forgot: no await
    coro = inst.barrier("b")                            # @barrier
    await asyncio.sleep(0)
    left = inst._unawaited()
    assert left == [f"migrate_wait() at {__file__}:{line_of('@forgot')}",
                    f"barrier() at {__file__}:{line_of('@barrier')}"]
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED     # no second warning


async def test_bad_callbacks_and_a_handle_of_another_instance_are_refused():
    ctx = RunContext(Config(), inventory())
    one, two = Nothing(HOSTS[:2], context=ctx, name="one"), \
        Nothing(HOSTS[2:], context=ctx, name="two")
    with pytest.raises(ConfigError, match=r"^migrate\(vm1\): worker must be a function "
                                          r"\(def or async def\) or None, not str 'dd'$"):
        one.migrate(["vm1"], "hostA", "hostB", "dd")
    handle = MigrationHandle(MigrationData(["vm1"], one.hosts[0], one.hosts[1], "one-1",
                                           MigrationParams()), one)

    async def in_two():
        current_instance.set(two)
        await handle.join()
    with pytest.raises(ScenarioError, match=r"^join\(\): migration one-1 \(vm1 hostA->hostB\) "
                                            r"belongs to instance one, not to two$"):
        await asyncio.create_task(in_two())


# -- migrator.aio.shielded ----------------------------------------------------------------------

async def test_a_shielded_step_runs_to_its_end_and_the_cancellation_is_delivered_after():
    """Cancelled while a shielded step runs: the step completes, then CancelledError. If
    the step fails instead, its error is raised and the cancellation is still delivered at
    the caller's next wait (it was lost before: the error went out, the cancel never did)."""
    from migrator.aio import shielded
    release, done = asyncio.Event(), []

    async def step(fail: bool) -> str:
        await release.wait()
        done.append(fail)
        if fail:
            raise OSError("the undo step failed")
        return "undone"

    async def caller(fail: bool) -> list[str]:
        seen = []
        try:
            seen.append(await shielded(step(fail)))
        except OSError as exc:
            seen.append(str(exc))
            await asyncio.sleep(0)                  # the caller's next wait
            seen.append("not cancelled")
        return seen

    for fail, error in ((False, "cancelled while an undo step ran"), (True, None)):
        release.clear()
        task = asyncio.ensure_future(caller(fail))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0)
        release.set()
        with pytest.raises(asyncio.CancelledError, match=error):
            await task
        assert done[-1] is fail                     # the step ran to its end either way
