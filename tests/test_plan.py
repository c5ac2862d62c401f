"""Test plans (seed 004's hosts x queues and test sets, with automatic assignment): every bad
plan is one line naming file, line and key, exit 2, nothing started; the scheduler's
placements (longest first, ranges, crossing pairs in one global order); and real plans on the
session lab: crossing pairs that cannot deadlock, a failing test that stops nothing, one
merged report, and ``--fail-fast`` interrupting what runs."""

from __future__ import annotations

import asyncio
import json
import signal
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from migrator.config import GuestNetwork, HostCapacity, HostEntry, Inventory
from migrator.errors import ConfigError
from migrator.plan import History, load_plan, schedule
from migrator.plan.runner import config_for
from migrator.plan.schedule import makespan, packing_bound

from .test_framework import BIN

STEP = Path(__file__).parent / "scenarios" / "plan_step.py"
HOSTS = ["hostA", "hostB", "hostC", "hostD"]


def fake_inventory(tmp_path: Path) -> Inventory:
    inv = Inventory(hosts={h: HostEntry(address=f"10.77.9.{11 + i}",
                                        capacity=HostCapacity(cpus=4, mem_mib=4096))
                           for i, h in enumerate(HOSTS)},
                    shared_dir=tmp_path, guest_network=GuestNetwork(
                        subnet="10.78.9.0/24", controller_address="10.78.9.1"))
    path = tmp_path / "inventory.yaml"
    inv.dump(path)
    return inv.model_copy(update={"source": path})


GOOD = """\
hosts:
  hostA: {queues: 2, ranges: [r0, r1]}
  hostB: {queues: 1, ranges: [r2]}
  hostC: {queues: auto}
ranges:
  r0: {base_mac: "02:6e:00:00:10:00", base_ip: 10.78.9.100, range_size: 4}
  r1: {base_mac: "02:6e:00:00:11:00", base_ip: 10.78.9.104, range_size: 4}
  r2: {base_mac: "02:6e:00:00:12:00", base_ip: 10.78.9.108, range_size: 4}
tests:
  one: {scenario: ping_pong, tags: [quick]}
  two: {scenario: ping_pong, tags: [quick, slow], expected_s: 300}
  net: {scenario: ping_pong, params: {vms.vm1.network: bridge, vms.vm1.mac: auto,
                                      vms.vm1.ip: auto}}
sets:
  nightly:
    only: [quick|net]
    no: [slow]
"""


def write_plan(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# (what to change in GOOD, what the one line says: its line number and key)
BAD = [
    ("  hostC: {queues: auto}", "  hostZ: {queues: 1}", ":4: hosts.hostZ: unknown host 'hostZ'"),
    ("  hostC: {queues: auto}", "  hostC: {queues: 0}", ":4: hosts.hostC.queues: at least 1"),
    ("ranges: [r2]}", "ranges: [r1]}", ":3: hosts.hostB.ranges.[0]: range r1 is assigned to "
                                       "hostA/2 already"),
    ("ranges: [r2]}", "ranges: [r9]}", ":3: hosts.hostB.ranges.[0]: unknown range 'r9'"),
    ("ranges: [r2]}", "ranges: [r2, r0]}", ":3: hosts.hostB.ranges: 2 ranges for 1 queue"),
    ("base_ip: 10.78.9.104", "base_ip: 10.78.9.102", ":5: ranges: ranges r0 and r1 overlap "
                                                     "in their addresses"),
    ('"02:6e:00:00:12:00"', '"02:6e:00:00:11:02"', ":5: ranges: ranges r1 and r2 overlap in "
                                                   "their MACs"),
    ("base_ip: 10.78.9.108", "base_ip: 10.78.8.108", ":8: ranges.r2: 10.78.8.108..10.78.8.111 "
                                                     "is not inside the guest network"),
    ("  one: {scenario: ping_pong,", "  one: {scenario: no_such,", ":10: tests.one.scenario: "
                                                                   "no scenario 'no_such'"),
    ("  one: {scenario: ping_pong,", "  one: {scenario: ping_pong, hosts: 5,",
     ":10: tests.one.hosts: one needs 5 hosts, the plan has 3"),
    ("  one: {scenario: ping_pong,", "  one: {scenario: ping_pong, where: [hostA/3],",
     ":10: tests.one.where.[0]: unknown queue or host 'hostA/3'"),
    ("  one: {scenario: ping_pong,", "  one: {scenario: ping_pong, params: {frob: 1},",
     ":10: tests.one.params: config: unknown key 'frob'"),
    ("  one: {scenario: ping_pong,", "  one: {scenario: ping_pong, colour: red,",
     ":10: tests.one.colour: unknown key"),
    ("  one: {scenario: ping_pong,", "  one: {scenario: tasks.yaml, all_hosts: true,",
     ":10: tests.one.all_hosts: a task list or VM group job runs over all its hosts already"),
    ("    no: [slow]", "    no: [slwo]", ":17: sets.nightly.no.[0]: 'slwo' is no test and no tag"),
    ("    no: [slow]", "    no: [quick, net]", ":15: sets.nightly: set nightly selects no test"),
    ("    no: [slow]", "    assign: {hostQ/1: [one]}",
     ":17: sets.nightly.assign.hostQ/1: unknown queue or host 'hostQ/1'"),
    ("    no: [slow]", "    no: [slow]\n    only: [one]", ":18: sets.nightly.only is given twice"),
    ("  net: {scenario: ping_pong, params: {", "  net: {scenario: ping_pong, where: [hostC/1], "
                                               "params: {",
     ":12: tests.net: net takes addresses from a pool (ip: auto): its first queue must own a "
     "range, and hostC/1 does not"),
]


@pytest.mark.parametrize("old, new, says", BAD, ids=[b[2].split(": ", 1)[1][:40] for b in BAD])
def test_a_bad_plan_is_one_line_naming_file_line_and_key(tmp_path, old, new, says):
    inv = fake_inventory(tmp_path)
    assert old in GOOD
    path = write_plan(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_plan(path, inv, "nightly")
    assert str(info.value).startswith(f"{path}{says}"), str(info.value)


@pytest.mark.parametrize("old, new, says", [BAD[0], BAD[5]])
async def test_the_command_says_it_in_one_line_exit_2_and_starts_nothing(tmp_path, old, new,
                                                                         says):
    inv = fake_inventory(tmp_path)
    path = write_plan(tmp_path, GOOD.replace(old, new, 1))
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "--plan", str(path), "--set", "nightly", "-i",
        str(inv.source), "-o", str(tmp_path / "results"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 2 and err.decode().count("\n") == 1, err
    assert says in err.decode() and not (tmp_path / "results").exists()


def test_a_set_s_tests_and_queues_and_what_each_runs_with(tmp_path):
    inv = fake_inventory(tmp_path)
    plan = load_plan(write_plan(tmp_path, GOOD), inv, "nightly")
    assert plan.queues == ["hostA/1", "hostA/2", "hostB/1", "hostC/1", "hostC/2", "hostC/3",
                           "hostC/4"]                     # auto: 4 cpus / 1, 4096 / 1024 MiB
    assert plan.queue_range == {"hostA/1": "r0", "hostA/2": "r1", "hostB/1": "r2"}
    assert [t.name for t in plan.tests] == ["one", "net"]  # quick|net, not slow
    (net,) = [t for t in plan.tests if t.name == "net"]
    assert net.needs_range and not plan.tests[0].needs_range
    placed = {p.test.name: p for p in schedule(plan, {"one": 60, "net": 60})}
    assert placed["net"].queues[0] in plan.queue_range      # its addresses from its range
    config = config_for(plan, placed["net"])
    assert list(config["network"]["pools"]) == [plan.queue_range[placed["net"].queues[0]]]
    assert config["vms"]["vm1"]["ip"] == "auto"
    with pytest.raises(ConfigError, match="no set 'weekly' \\(the plan has nightly\\)"):
        load_plan(write_plan(tmp_path, GOOD), inv, "weekly")


def test_longest_first_onto_the_queues_that_free_first_within_the_bound(tmp_path):
    """12 tests (pairs and one triple) of known lengths on 4 hosts x 2 queues: every queue
    runs one test at a time, a test's queues are on distinct hosts and start together, and
    the makespan is within 1.2 x of the packing bound; what the history says is used."""
    inv = fake_inventory(tmp_path)
    lengths = [90, 80, 70, 60, 50, 40, 40, 30, 30, 20, 20, 10]
    tests = "\n".join(f"  t{i}: {{scenario: ping_pong, hosts: {3 if i == 4 else 2}, all_hosts: {str(i == 4).lower()}, "
                      f"expected_s: {d}}}" for i, d in enumerate(lengths))
    plan = load_plan(write_plan(tmp_path, f"""\
hosts: {{hostA: {{queues: 2}}, hostB: {{queues: 2}}, hostC: {{queues: 2}}, hostD: {{queues: 2}}}}
tests:
{tests}
sets: {{all: {{}}}}
"""), inv, "all")
    history = History.load(tmp_path)
    expected = history.expected(plan, 60)
    assert expected == {f"t{i}": d for i, d in enumerate(lengths)}
    placed = schedule(plan, expected)
    for p in placed:
        assert len(set(p.hosts)) == len(p.queues) == p.test.spec.hosts
    for q in plan.queues:
        mine = sorted((p.start, p.end) for p in placed if q in p.queues)
        assert all(a[1] <= b[0] for a, b in zip(mine, mine[1:])), (q, mine)
    assert [p.order for p in placed] == list(range(len(placed)))
    assert makespan(placed) <= 1.2 * packing_bound(placed, len(plan.queues))
    # what the runs took, not what the file guessed, next time (the median of the last ones)
    for seconds in (5, 7, 6):
        history.record(plan.tests[0], seconds)
    assert History.load(tmp_path).expected(plan, 60)["t0"] == 6


# -- real plans on the session lab --------------------------------------------------------------

async def migrate_plan(inventory, results: Path, plan: Path, *args: str, timeout: float = 300):
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "--plan", str(plan), "-i", str(inventory.source),
        "-o", str(results), *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def test_crossing_pairs_a_failure_and_one_merged_report(inventory, tmp_path, no_leaks):
    """Pairs that hold the same two queues in opposite orders run one after the other in the
    plan's one global order (never each holding one and waiting for the other); a failing
    test stops no other queue; the
    plan's JSON, JUnit (a suite per test, with its queues) and table tell each test's truth;
    then ``--fail-fast`` interrupts the test that runs and skips the rest."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""\
hosts: {{hostA: {{queues: 2}}, hostB: {{queues: 1}}, hostC: {{queues: 1}}, hostD: {{queues: 1}}}}
tests:
  cross1: {{scenario: {STEP}, where: [hostA/1, hostB/1], expected_s: 50,
            params: {{scenario.sleep_s: 0}}}}
  cross2: {{scenario: {STEP}, where: [hostB/1, hostA/1], expected_s: 40,
            params: {{scenario.sleep_s: 2}}}}
  auto: {{scenario: {STEP}, expected_s: 30, params: {{scenario.sleep_s: 1}}}}
  bad: {{scenario: {STEP}, where: [hostC/1, hostD/1], expected_s: 5,
         params: {{scenario.fail: true}}}}
  long: {{scenario: {STEP}, where: [hostA/1, hostB/1], expected_s: 100,
          params: {{scenario.sleep_s: 120}}, tags: [ff]}}
  after: {{scenario: {STEP}, where: [hostC/1, hostD/1], expected_s: 1, tags: [ff]}}
  failing: {{scenario: {STEP}, where: [hostC/1, hostD/1], expected_s: 10,
             params: {{scenario.fail: true}}, tags: [ff]}}
sets:
  crossing: {{no: [ff]}}
  failfast: {{only: [ff]}}
""")
    rc, out, err = await migrate_plan(inventory, tmp_path / "r", plan, "--set", "crossing")
    assert rc == 1, out + err                         # bad failed; the others passed
    (out_dir,) = [p for p in (tmp_path / "r").iterdir() if p.is_dir()]
    data = json.loads((out_dir / "plan.json").read_text())
    tests = {t["name"]: t for t in data["tests"]}
    assert {n: t["status"] for n, t in tests.items()} == {
        "cross1": "passed", "cross2": "passed", "auto": "passed", "bad": "failed"}
    assert tests["cross1"]["queues"] == ["hostA/1", "hostB/1"]
    assert tests["cross2"]["queues"] == ["hostB/1", "hostA/1"]
    # the crossing pair ran one after the other, in the global order
    c1, c2 = tests["cross1"], tests["cross2"]
    assert c1["started_s"] + c1["duration_s"] <= c2["started_s"] + 0.5, (c1, c2)
    for t in tests.values():                          # each its own run, own results
        assert Path(t["results"], "run.json").is_file(), t
        run = json.loads(Path(t["results"], "run.json").read_text())
        assert run["hosts"] == t["hosts"]
    assert data["counts"]["passed"] == 3 and data["counts"]["failed"] == 1
    assert data["makespan_s"] > 0 and data["packing_bound_s"] > 0
    suites = ET.parse(out_dir / "junit.xml").getroot().findall("testsuite")
    props = [{p.get("name"): p.get("value") for p in s.iter("property")} for s in suites]
    assert sorted(p["plan.test"] for p in props) == ["auto", "bad", "cross1", "cross2"]
    assert {p["plan.test"]: p["plan.queues"] for p in props}["cross2"] == "hostB/1 hostA/1"
    assert {p["plan.test"]: p["plan.status"] for p in props}["bad"] == "failed"
    table = out.split("results: ")[0]
    assert "hostC/1" in table and "set crossing: 4 tests (3 passed, 1 failed) on 5 queues" \
        in table, out
    assert (tmp_path / "r" / "plan-history.json").is_file()
    # --fail-fast: 'failing' fails while 'long' runs; 'long' is interrupted (its run cleans
    # up and says so), 'after' never starts
    rc, out, err = await migrate_plan(inventory, tmp_path / "ff", plan, "--set", "failfast",
                                      "--fail-fast")
    assert rc == 1, out + err
    (out_dir,) = [p for p in (tmp_path / "ff").iterdir() if p.is_dir()]
    data = json.loads((out_dir / "plan.json").read_text())
    status = {t["name"]: t["status"] for t in data["tests"]}
    assert status == {"long": "interrupted", "failing": "failed", "after": "skipped"}, out
    assert "failing failed: --fail-fast stops the plan" in out
    long = next(t for t in data["tests"] if t["name"] == "long")
    assert long["duration_s"] < 60                    # interrupted, not waited out
    assert json.loads(Path(long["results"], "run.json").read_text())["instances"][0][
        "status"] == "interrupted"


async def test_dry_run_prints_the_assignment_and_the_makespan_and_starts_nothing(tmp_path):
    inv = fake_inventory(tmp_path)
    path = write_plan(tmp_path, GOOD)
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "--plan", str(path), "--set", "nightly", "--dry-run", "-i",
        str(inv.source), "-o", str(tmp_path / "results"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    assert lines[0].split() == ["#", "test", "hosts", "queues", "start", "s", "end", "s",
                                "expected", "s"]
    rows = {ln.split()[1]: ln.split() for ln in lines[2:-1]}
    assert set(rows) == {"one", "net"} and rows["net"][3] in ("hostA/1", "hostA/2", "hostB/1")
    assert lines[-1].startswith("set nightly: 2 tests on 7 queues; predicted makespan 60 s")
    assert not (tmp_path / "results").exists()


async def test_ctrl_c_interrupts_every_running_test_and_skips_the_rest(inventory, tmp_path,
                                                                      no_leaks):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""\
hosts: {{hostA: {{queues: 1}}, hostB: {{queues: 1}}}}
tests:
  first: {{scenario: {STEP}, expected_s: 100, params: {{scenario.sleep_s: 120}}}}
  second: {{scenario: {STEP}, expected_s: 10}}
sets: {{all: {{}}}}
""")
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "--plan", str(plan), "--set", "all", "-i",
        str(inventory.source), "-o", str(tmp_path / "r"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    seen = []
    async with asyncio.timeout(120):               # until its run is under way
        while not any("first on" in ln and ln.rstrip().endswith("started") for ln in seen):
            line = (await proc.stdout.readline()).decode()
            assert line, "".join(seen)
            seen.append(line)
        while not list((tmp_path / "r").glob("plan-*/first/*/journal.jsonl")):
            await asyncio.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 130, "".join(seen) + out.decode() + err.decode()
    assert "plan interrupted" in err.decode()
    (out_dir,) = [p for p in (tmp_path / "r").iterdir() if p.is_dir()]
    data = json.loads((out_dir / "plan.json").read_text())
    assert {t["name"]: t["status"] for t in data["tests"]} == {"first": "interrupted",
                                                               "second": "skipped"}


def test_free_queues_go_to_tests_in_order_and_a_waiting_test_keeps_its_own(tmp_path):
    """The runner's choice at one moment: tests in the global order take free queues; one
    that must wait for a busy queue keeps the free ones it would take from the tests after
    it; tests over crossing queues start one at a time."""
    from migrator.plan.runner import PlanRunner
    inv = fake_inventory(tmp_path)
    plan = load_plan(write_plan(tmp_path, f"""\
hosts: {{hostA: {{queues: 2}}, hostB: {{queues: 1}}, hostC: {{queues: 1}}, hostD: {{queues: 1}}}}
tests:
  x: {{scenario: {STEP}, where: [hostA/1, hostB/1], expected_s: 50}}
  y: {{scenario: {STEP}, where: [hostB/1, hostA/1], expected_s: 40}}
  z: {{scenario: {STEP}, expected_s: 30}}
  w: {{scenario: {STEP}, expected_s: 20}}
  v: {{scenario: {STEP}, expected_s: 5}}
sets: {{all: {{}}}}
"""), inv, "all")
    expected = {"x": 50, "y": 40, "z": 30, "w": 20, "v": 5}
    runner = PlanRunner(plan, schedule(plan, expected), inv.source, tmp_path / "out",
                        History.load(tmp_path))
    assert [r.name for r in runner.runs] == ["x", "z", "w", "y", "v"]   # predicted starts

    def at(status: dict, busy: set) -> dict:
        for r in runner.runs:
            r.status = status.get(r.name, "pending")
        return {r.name: q for r, q in runner._startable(busy)}

    assert at({}, set()) == {"x": ["hostA/1", "hostB/1"], "z": ["hostA/2", "hostC/1"]}
    # x ended, z and w run: hostA/1 and hostD/1 are free; y waits for hostB/1 and keeps
    # hostA/1, so v (which would take hostA/1 and hostD/1) does not start before it
    assert at({"x": "passed", "z": "running", "w": "running"},
              {"hostA/2", "hostC/1", "hostB/1"}) == {}
    # w ended: y takes its crossing queues; v finds one host free only
    assert at({"x": "passed", "z": "running", "w": "passed"},
              {"hostA/2", "hostC/1"}) == {"y": ["hostB/1", "hostA/1"]}
