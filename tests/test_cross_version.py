"""Cross-version migration (issue 23) in a lab of its own: hostA runs Debian 12's QEMU 7.2
(``migrate-lab up --qemu hostA=7.2``: the lab's build, beside the system's), hostB and hostC
the system's QEMU 10 (same-version runs, QEMU 10 to 10, are every other test's; their
versions recorded: tests/test_compare.py). The ready ``cross_version`` scenario with configs/cross_version.yaml
(vm1 pinned to pc-i440fx-7.2, running the dirtier in the recipe's discriminating case:
8 MiB dirtied at 64 MiB/s, sent at 128 MiB/s, 50 ms downtime limit).

It is also the dirtier check's test against a real lost write: QEMU 7.2 as the source loses
dirty pages under TCG (with the dirtier writing fast: see FAST_DIRTIER), and the verdict must
say so, whatever QEMU's own status says; where it lost nothing, the verdict must say that
too."""

import re
from pathlib import Path

import pytest

from migrator.config import GUEST_KERNEL_APPEND, Inventory
from migrator.lab import Lab, qemus

from .conftest import BIN, assert_lab_gone, cli, lab_dir
from .test_framework import the_run

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "cross_version.yaml")
NAME = "mtcross"


@pytest.fixture(scope="module")
async def cross_lab(config):
    assert qemus.binary("7.2").is_file(), "QEMU 7.2 is not installed: run make setup"
    lab = Lab(NAME, lab_dir(NAME), config)
    up = await cli("up", "--name", NAME, "--dir", str(lab.dir), "-n", "3", "--qemu",
                   "hostA=7.2", "--subnet", "10.77.248.0/24", "--accel", "tcg")
    assert up.returncode == 0, up.stderr
    try:
        yield lab
    finally:
        state = lab.state()
        down = await cli("down", "--name", NAME, "--dir", str(lab.dir))
        assert down.returncode == 0, down.stderr
        assert_lab_gone(lab, state)


async def run(lab: Lab, results: Path, *args: str) -> tuple[int, str]:
    import asyncio
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "-i", str(lab.inventory_path), "-o", str(results),
        "--display", "lines", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(300):
        out, _ = await proc.communicate()
    return proc.returncode, out.decode()


def test_the_lab_gives_hosta_its_own_qemu(cross_lab):
    inv = Inventory.load(cross_lab.inventory_path)
    assert inv.hosts["hostA"].qemu == str(qemus.binary("7.2"))
    assert inv.hosts["hostB"].qemu is None and inv.hosts["hostC"].qemu is None
    assert inv.drivers == ["qemu"]


#: fresh 7.2 -> 10 hops a test may sample for one that loses pages; each hop sampled is
#: asserted, lost or not
LOSS_SAMPLES = 4
#: the dirtier writing as fast as it can (512 MB/s asked; the config's 64 MB/s paces it with
#: sleeps): 7.2's lost writes are those made through TLB entries that stayed writable across
#: a dirty-bitmap sync (QEMU commit 03bfc2188f06), and the faster the dirtier writes between
#: syncs, the more of them. Measured on this machine under TCG: at 64 MB/s 7.2 lost pages in
#: 5 of 18 hops at this commit and 9 of 18 at the previous session's (the difference is
#: within chance), which made a 4-hop sample miss a loss in about a run in four; at 512 MB/s
#: in 16 of 16 (11 with stale pages found, 5 where the dirtier never reported again)
FAST_DIRTIER = f"vms.vm1.append={GUEST_KERNEL_APPEND} lab.out=ttyS1 lab.dirty=8 lab.rate=512"


def crashed_after_the_check(run_json: dict, hop: dict, mig: str) -> bool:
    """Whether 7.2's lost writes were the guest kernel's, and it crashed only after the
    dirtier had checked its own pages on the destination (all there): the hop completed and
    passed its checks, and the next check on hostB failed, naming the kernel's own report
    (an oops, a BUG, a panic) read off the console. Seen here once in 41 hops out of 7.2 at
    the config's 64 MB/s (29 lost writes; the other 28 showed in the dirtier's check: stale
    pages, a guest that had rebooted before it, or one that never reported again)."""
    (inst,) = run_json["instances"]
    if inst["status"] != "failed" or "the guest's kernel reported a failure" not in (
            inst["error"] or ""):
        return False
    check = hop["dirtier_check"]
    assert check["checked"] and check["new_stale_pages"] == 0 and not check["restarted"], check
    assert hop["status"] == "completed" and hop["dst"] == "hostB", hop
    assert hop["qemu"]["src"]["version"].startswith("7.2."), hop["qemu"]
    assert re.search(rf"vm1 on hostB: .*the guest's kernel reported a failure.*; in check_\w+ "
                     rf"of migration {mig} \(vm1 hostA->hostB\)", inst["error"]), inst["error"]
    assert run_json["verdict"] == "failed"
    return True


@pytest.mark.timeout(LOSS_SAMPLES * 300 + 60)       # each run is bounded by run()'s 300 s
async def test_old_to_new_the_dirtier_flags_what_qemu_72_lost(cross_lab, tmp_path):
    lost = []
    for attempt in range(LOSS_SAMPLES):
        results = tmp_path / f"try{attempt}"
        rc, out = await run(cross_lab, results, "-c", CONFIG, "-p", FAST_DIRTIER,
                            "-m", "hostA,hostB", "cross_version")
        run_json, migs, junit = the_run(results)
        versions = run_json["versions"]["hosts"]
        assert versions["hostA"]["qemu"]["version"].startswith("7.2."), versions
        assert versions["hostB"]["qemu"]["version"].startswith("10."), versions
        assert run_json["versions"]["vms"] == {"vm1": "pc-i440fx-7.2"}, run_json["versions"]
        assert re.search(r"QEMU 7\.2\.\S+ .*on hostA <-> QEMU 10\.\S+ .*on hostB, machine "
                         r"pc-i440fx-7\.2", out), out
        hop = migs[0]
        assert hop["machine"] == "pc-i440fx-7.2"
        assert hop["qemu"]["src"]["version"].startswith("7.2.")
        assert hop["qemu"]["dst"]["version"].startswith("10.")
        # the versions in JUnit, per instance and per migration (a clean first hop is
        # followed by the way back, 10 -> 7.2: its own testcase, its own versions)
        props = {p.get("name"): p.get("value")
                 for p in junit.find("testsuite").find("properties")}
        assert props["version.hostA.qemu"].startswith("7.2."), props
        assert props["version.hostB.qemu"].startswith("10."), props
        cases = {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")}
                 for c in junit.iter("testcase")}
        first = cases["pair1-1 vm1 hostA->hostB"]
        assert first["qemu.src"].startswith("7.2.") and first["qemu.dst"].startswith("10.")
        assert first["machine"] == "pc-i440fx-7.2"
        back = cases.get("pair1-2 vm1 hostB->hostA")
        assert back is None or (back["qemu.src"].startswith("10.")
                                and back["qemu.dst"].startswith("7.2.")), cases
        check = hop["dirtier_check"]
        if crashed_after_the_check(run_json, hop, "pair1-1"):
            assert rc == 1, out
            lost.append(run_json["instances"][0]["error"])
            break
        if not (check["new_stale_pages"] > 0 or check["restarted"] or not check["checked"]):
            # 7.2 lost nothing this time, and the dirtier checked every page to say so:
            # the hop passes, and so does the run
            assert check["checked"] and check["stale_pages"] == 0, check
            assert hop["status"] == "completed", hop
            assert rc == 0 and run_json["verdict"] == "passed", out
            continue
        # 7.2 -> 10: QEMU said completed; the guest's memory says otherwise, and so does the
        # run: the dirtier finds its own pages stale; or the lost pages were the kernel's, and
        # the guest rebooted (its dirtier started over) or never got to report again
        assert len(migs) == 1, migs                        # the scenario ended there
        assert hop["phases"][-1][0] == "CLEANED" and hop["status"] == "failed", hop
        assert re.match(r"vm1 hostA->hostB \[VERIFIED\]: the guest's dirtier (found \d+ stale "
                        r"page\(s\) on hostB|started over on hostB|did not check all its pages "
                        r"on hostB)", hop["error"]), hop["error"]
        assert re.search(r"^pair1-1 +vm1 +hostA->hostB +failed +\d", out, re.M), out
        assert rc == 1 and run_json["verdict"] == "failed", out
        (inst,) = run_json["instances"]
        assert inst["status"] == "failed" and "[VERIFIED]" in inst["error"], inst
        lost.append(check)
        break
    assert lost, f"QEMU 7.2 lost no page in {LOSS_SAMPLES} hops"


async def test_new_to_old_and_back_each_verdict_is_what_the_dirtier_saw(cross_lab, tmp_path):
    rc, out = await run(cross_lab, tmp_path, "-c", CONFIG, "-m", "hostB,hostA",
                        "cross_version")
    run_json, migs, _junit = the_run(tmp_path)
    there, back = migs
    # 10 -> 7.2: moved as the pinned machine type, every page checked on 7.2's side
    assert there["status"] == "completed", there
    assert there["machine"] == "pc-i440fx-7.2"
    assert there["qemu"]["src"]["version"].startswith("10.")
    assert there["qemu"]["dst"]["version"].startswith("7.2.")
    assert there["dirtier_check"]["checked"] and there["dirtier_check"]["stale_pages"] == 0
    # 7.2 -> 10, the guest having come in to 7.2 by migration: 7.2 may or may not lose pages
    # here (both seen); whichever, the verdict says what the dirtier saw
    check = back["dirtier_check"]
    # lost: pages stale, a dirtier that started over, or none that reported again
    lost = check["new_stale_pages"] > 0 or check["restarted"] or not check["checked"]
    assert back["qemu"]["src"]["version"].startswith("7.2.")
    if not lost and crashed_after_the_check(run_json, back, "pair1-2"):
        assert rc == 1, out
        return
    assert back["status"] == ("failed" if lost else "completed"), back
    assert (rc, run_json["verdict"]) == ((1, "failed") if lost else (0, "passed")), out


async def test_a_machine_type_the_old_qemu_lacks_is_refused_before_anything_moves(
        cross_lab, tmp_path):
    # no pinned machine type: QEMU 10's "pc" is pc-i440fx-10.0, which 7.2 does not have
    rc, out = await run(cross_lab, tmp_path, "-m", "hostB,hostA", "ping_pong",
                        "-p", "scenario.rounds=1")
    assert rc == 1, out
    _run, migs, _junit = the_run(tmp_path)
    (first,) = migs
    assert first["phases"][-1][0] == "ROLLED_BACK", first["phases"]
    assert [p for p, *_ in first["phases"]][:3] == ["PENDING", "PREPARING_DEST",
                                                  "ROLLING_BACK"], first["phases"]
    assert re.search(r"vm1 hostB->hostA \[PREPARING_DEST\]: hostA's QEMU 7\.2\.\S+ .*has no "
                     r"machine type pc-i440fx-10\.\d+, which vm1 runs as on hostB's QEMU "
                     r"10\.\S+ .*pin vms\.vm1\.machine", first["error"]), first["error"]


async def test_the_libvirt_driver_refuses_a_host_with_its_own_qemu(cross_lab, tmp_path):
    # an inventory whose hosts offer libvirt too (a hand-written one could)
    inv = Inventory.load(cross_lab.inventory_path)
    both = tmp_path / "inventory.yaml"
    inv.model_copy(update={"drivers": ["qemu", "libvirt"]}).dump(both)
    rc, out = await run(cross_lab, tmp_path / "results", "-i", str(both), "-m", "hostA,hostB",
                        "ping_pong", "-p", "driver=libvirt")
    assert rc == 2, out
    assert out.strip().count("\n") == 0, out                   # one line
    assert "hostA name their own QEMU" in out and "only the qemu driver" in out, out
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


async def test_bad_qemu_options_are_refused_before_anything(config):
    for arg, message in (("hostZ=7.2", "no host 'hostZ'"), ("hostA=6.0", "neither a QEMU build"),
                         ("hostA", "expected HOST=BUILD")):
        r = await cli("up", "--name", "mtbadq", "--dir", str(lab_dir("mtbadq")), "--qemu",
                      arg, "--subnet", "10.77.249.0/24", "--accel", "tcg")
        assert r.returncode == 2 and message in r.stderr, (arg, r.stderr)
        assert not lab_dir("mtbadq").exists()
