"""``migrate-run sweep`` (issue 21): a real sweep over the session lab, its comparison
checked for the effect the swept knob must have and loaded in Chromium; bad input refused
before anything runs."""

import asyncio
import json

import pytest

from .chromium import Chromium
from .conftest import BIN


async def sweep(inventory, results, *args, timeout=600):
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "sweep", "-i", str(inventory.source), "-o", str(results),
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_a_bandwidth_sweep_shows_the_cap_and_compares_in_a_browser(inventory, tmp_path,
                                                                        no_leaks):
    rc, out, err = await sweep(inventory, tmp_path, "--param",
                               "migration.bandwidth_mibs=24,128", "--repeat", "1",
                               "-p", "scenario.rounds=1", "ping_pong", "-m", "hostA,hostB")
    assert rc == 0, out + err
    (sweep_dir,) = tmp_path.iterdir()
    assert sweep_dir.name.startswith("sweep-bandwidth_mibs-")
    data = json.loads((sweep_dir / "sweep.json").read_text())
    runs = data["runs"]
    assert [(r["setting"], r["verdict"]) for r in runs] == [
        ({"migration.bandwidth_mibs": 24}, "passed"), ({"migration.bandwidth_mibs": 128},
                                                        "passed")]
    for r in runs:                                # each a whole run with its own records
        assert len(r["migrations"]) == 2 and r["controller_cpu_s"] > 0
        # and what each migration cost QEMU on the hosts, both sides
        assert all(m["migration_cpu_s"] > 0 and m["qemu_cpu"]["src_s"] > 0
                   and m["qemu_cpu"]["dst_s"] > 0 for m in r["migrations"]), r["migrations"]
        assert (sweep_dir / "runs" / f"{r['index']:03d}" / "output.log").exists()
        rec = json.loads((next((sweep_dir / "runs" / f"{r['index']:03d}").glob("2*"))
                          / "run.json").read_text())
        assert rec["config"]["migration"]["bandwidth_mibs"] == r["setting"][
            "migration.bandwidth_mibs"] and rec["config"]["scenario"]["rounds"] == 1
    slow, fast = ([m["throughput_mbps"] for m in r["migrations"]] for r in runs)
    # the cap is real: at 24 MiB/s (201 Mbit/s; QEMU's average counts the last, uncapped
    # pass too: seen 227) no hop went much faster, and the other setting clearly did
    assert max(slow) <= 24 * 8.389 * 1.5 and min(fast) > 1.5 * max(slow), (slow, fast)
    lines = out.splitlines()
    assert any(line.startswith("bandwidth_mibs=24 ") and " 1/1 " in line for line in lines)
    assert any(line.startswith("bandwidth_mibs=128 ") for line in lines), out
    async with Chromium() as browser:
        page = await browser.load(sweep_dir / "comparison.html")
        seen = await page.evaluate("""(() => ({
            rows: [...document.querySelectorAll('#comparison tr')].slice(1)
                  .map(r => r.cells[0].textContent),
            plots: [...document.querySelectorAll('figure.plot svg')]
                   .map(s => s.getBoundingClientRect().width),
            total: !!document.querySelector('#plot-total_time_ms svg'),
            cpu: !!document.querySelector('#plot-migration_cpu_s svg'),
            links: [...document.querySelectorAll('#runs a')].map(a => a.href)}))()""")
        # each run's own report is linked, and opens
        linked = await browser.load(__import__("pathlib").Path(
            seen["links"][0].removeprefix("file://")))
        verdict = await linked.evaluate("document.getElementById('verdict').textContent")
    assert not page.errors and not linked.errors, page.errors + linked.errors
    assert seen["rows"] == ["bandwidth_mibs=24", "bandwidth_mibs=128"]
    assert seen["total"] and seen["cpu"] and len(seen["plots"]) >= 6 and min(seen["plots"]) > 200
    assert verdict == "PASSED"


@pytest.mark.parametrize("args, message", [
    (["--param", "migration.no_such_knob=1,2", "ping_pong"],
     "sweep setting no_such_knob=1: config: unknown key 'migration.no_such_knob'"),
    (["--param", "migration.multifd_channels=", "ping_pong"], "empty value list"),
    (["--param", "migration.multifd_channels=1,,2", "ping_pong"], "empty value list"),
    (["--param", "migration.multifd_channels=0,2", "ping_pong"],
     "sweep setting multifd_channels=0: config:"),
    (["--param", "migration.multifd_channels=1,2", "--param",
      "migration.multifd_channels=4", "ping_pong"], "swept twice"),
    (["--param", "migration.multifd_channels=1,1", "ping_pong"], "given twice"),
    (["--param", "migration.multifd_channels=1,2", "-p", "migration.multifd_channels=4",
      "ping_pong"], "both swept"),
    (["ping_pong"], "at least one --param"),
    (["--sweep", "no-such-sweep"], "no sweep 'no-such-sweep'"),
    (["--param", "migration.multifd_channels=1,2", "no_such_scenario"], "no scenario"),
    (["--param", "migration.multifd_channels=1,2", "--repeat", "0", "ping_pong"],
     "--repeat 0"),
])
async def test_bad_sweeps_are_one_line_and_exit_2_before_anything(inventory, tmp_path, args,
                                                                  message):
    rc, out, err = await sweep(inventory, tmp_path, *args, "-m", "hostA,hostB", timeout=60)
    assert rc == 2, out + err
    (line,) = err.splitlines()
    assert line.startswith("migrate-run sweep: error:") and message in line, line
    assert not list(tmp_path.iterdir())


def test_the_ready_sweeps_are_valid():
    """Every ready sweep loads and each of its settings makes a valid config."""
    from migrator.plan.sweep import READY_DIR, Sweep
    names = sorted(p.stem for p in READY_DIR.glob("*.yaml"))
    assert names == ["bandwidth", "downtime", "multifd", "postcopy", "xbzrle"]
    for name in names:
        s = Sweep.load(name)
        s.check(None)
        assert s.scenario == "ping_pong" and len(s.settings()) >= 3 and s.repeat == 3
