"""The dirtier's check (``checks.dirtier``): a migration that loses guest memory fails, with
the lost pages named, whatever QEMU said about it. Against a real lost write: Debian 12's
QEMU 7.2 loses dirty pages under TCG (fixed in QEMU 9.0 by commit 03bfc2188f06), in the
discriminating case of the lab recipe (8 MiB dirtied at 64 MiB/s, 128 MiB/s, 50 ms
downtime: four dirty-bitmap syncs or more; bench/discriminating_case.py: 5 of 5 runs lose
pages), once the dirtier has run a few seconds (in its first passes it does not lose any:
tests/scenarios/settled_hop.py waits for 30). The same run with the system's QEMU 10
passes. QEMU 7.2 is the lab's own build (``migrate-lab qemu install 7.2``, done by setup)."""

import re
from pathlib import Path

import pytest

from migrator.lab import qemus


from .test_framework import migrate_run, the_run

SETTLED_HOP = str(Path(__file__).parent / "scenarios" / "settled_hop.py")
DISCRIMINATING = ["-p", "vms.vm1.append=console=ttyS0 quiet panic=-1 lab.out=ttyS1 "
                        "lab.dirty=8 lab.rate=64",
                  "-p", "migration.bandwidth_mibs=128", "-p", "migration.downtime_limit_ms=50"]


@pytest.fixture(scope="module")
def qemu72():
    path = qemus.binary("7.2")
    assert path.is_file(), f"QEMU 7.2 is not installed ({path}): run make setup"
    return path


async def test_qemu_72_losing_pages_fails_the_migration_and_the_run(
        inventory, tmp_path, no_leaks, qemu72):
    rc, out, err = await migrate_run(inventory, tmp_path, "-m", "hostA,hostB", SETTLED_HOP,
                                     "-p", f"vms.vm1.qemu={qemu72}", *DISCRIMINATING)
    assert rc == 1, out + err
    run, migs, junit = the_run(tmp_path)
    assert run["verdict"] == "failed"
    first = migs[0]
    # QEMU completed the move; the guest's memory did not survive it
    assert first["phases"][-1][0] == "CLEANED" and first["status"] == "failed", first
    check = first["dirtier_check"]
    assert check["host"] == "hostB" and check["new_stale_pages"] > 0, check
    assert check["stale"] and re.match(r"hostB: STALE page=\d+ has=\d+ want=\d+",
                                       check["stale"][0]), check
    assert re.match(r"vm1 hostA->hostB \[VERIFIED\]: the guest's dirtier found \d+ stale "
                    r"page\(s\) on hostB after the migration: writes made on hostA never "
                    r"reached hostB", first["error"]), first["error"]
    assert len(migs) == 1                      # the scenario ended there
    # the run says so where a person looks: the summary (a failure the scenario did not
    # handle: not "expected"), the verdict line, the instance, JUnit
    assert re.search(r"^pair1-1 +vm1 +hostA->hostB +failed +\d", out, re.M), out
    assert "verdict: FAILED" in out and "stale page(s)" in out + err, out + err
    (inst,) = run["instances"]
    assert inst["status"] == "failed" and "stale page(s)" in inst["error"], inst
    failures = [f.get("message", "") + (f.text or "") for f in junit.iter("failure")]
    assert any("stale page(s)" in f for f in failures), failures


async def test_the_same_migration_on_qemu_10_passes_the_check(inventory, tmp_path, no_leaks):
    rc, out, err = await migrate_run(inventory, tmp_path, "-m", "hostA,hostB", SETTLED_HOP,
                                     *DISCRIMINATING)
    assert rc == 0, out + err
    run, migs, _junit = the_run(tmp_path)
    assert run["verdict"] == "passed"
    for m in migs:
        check = m["dirtier_check"]
        assert check["checked"] and check["host"] == m["dst"], check
        assert check["stale_pages"] == 0 and check["stale"] == [], check
