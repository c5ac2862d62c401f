"""The MultihostMigration framework and migrate-run, against the session lab (real sshd, QEMU,
sync server, participants on every host). VM-heavy: one test at a time."""

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .chromium import Chromium
from .conftest import BIN, cli, gather_owned
from migrator import BarrierError, MultihostMigration
from migrator.config import Config, load_any_inventory
from migrator.errors import ConfigError, HostError
from migrator.framework import RunContext, group_hosts
from migrator.lab import network
from migrator.lab.system import processes_in_netns
from migrator.migration import Phase

HOSTS = ["hostA", "hostB", "hostC", "hostD"]


async def migrate_run(inventory, results: Path, *args: str, timeout: float = 300):
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "-i", str(inventory.source), "-o", str(results), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def the_run(results: Path) -> tuple[dict, list[dict], ET.Element]:
    """run.json, the migration records (in order), junit.xml of the only run in ``results``."""
    (run_dir,) = list(results.iterdir())
    run = json.loads((run_dir / "run.json").read_text())
    migs = [json.loads((run_dir / "migrations" / f"{m['mig_id']}-{m['vm']}.json").read_text())
            for m in run["migrations"]]
    return run, migs, ET.parse(run_dir / "junit.xml").getroot()


# -- the ready scenarios ---------------------------------------------------------------------

async def test_ping_pong_round_trips_with_a_surviving_workload(inventory, tmp_path, no_leaks):
    rc, out, err = await migrate_run(inventory, tmp_path, "-m", "hostA,hostB", "ping_pong",
                                     "-p", "scenario.rounds=2",
                                     "-p", "report.progress_interval_s=0.2",
                                     "-p", "migration.bandwidth_mibs=64")   # hops of ~1 s
    assert rc == 0, out + err
    # stdout is a pipe: plain timestamped lines (a progress line per interval), no live view
    assert "\x1b[" not in out and "━" not in out
    assert re.search(r"^\[ *[\d.]+s\] \[pair1-1 vm1 hostA->hostB\] +[\d.]+ s iteration \d+ "
                     r"+sent +[\d.]+ MiB remaining", out, re.M), out
    run, migs, junit = the_run(tmp_path)
    assert run["verdict"] == "passed" and run["hosts"] == ["hostA", "hostB"]
    # each destination's QEMU asked once for its machine types, the first while the guest
    # booted (before the first migration's PREPARING_DEST), the answer kept for every hop
    (run_dir,) = tmp_path.iterdir()
    log = (run_dir / "run.log").read_text()
    asked = [line[:23] for line in log.splitlines()
             if "run: qemu-system-x86_64 --version && qemu-system-x86_64 -machine help" in line]
    first_hop = next(line[:23] for line in log.splitlines() if "-> PREPARING_DEST" in line)
    assert len(asked) == 2 and asked[0] < first_hop, (asked, first_hop)
    # the sync (the server's aiohttp imported and served, the participants started) began
    # once the guest booted: none of it on the path to the guest's start
    lines = log.splitlines()
    started = next(i for i, line in enumerate(lines) if "[vm=vm1 host=hostA] starting" in line)
    for sync_step in ("sync server listening on", "migrate-sync.pyz member"):
        assert started < next(i for i, line in enumerate(lines) if sync_step in line), sync_step
    assert [(m["src"], m["dst"], m["status"]) for m in migs] == [
        ("hostA", "hostB", "completed"), ("hostB", "hostA", "completed")] * 2
    for m in migs:
        assert [p for p, _, _ in m["phases"]][-1] == "CLEANED"
        assert m["total_time_ms"] > 0 and m["transferred_bytes"] > 0 and m["downtime_ms"] >= 0
        assert m["progress"] and m["progress"][-1]["status"] == "completed"   # its history
    assert junit.find("testsuite").get("tests") == "5"
    assert junit.find("testsuite").get("failures") == "0"
    assert "verdict: PASSED" in out and "MIGRATING" in out      # live progress was shown


async def test_a_ready_scenario_runs_through_libvirt_unchanged(inventory, tmp_path, no_leaks):
    rc, out, err = await migrate_run(inventory, tmp_path, "-m", "hostC,hostD", "ping_pong",
                                     "-p", "scenario.rounds=1", "-p", "driver=libvirt")
    assert rc == 0, out + err
    run, migs, _ = the_run(tmp_path)
    assert run["config"]["driver"] == "libvirt"
    assert [(m["driver"], m["status"]) for m in migs] == [("libvirt", "completed")] * 2
    assert all(0 < m["total_time_net_ms"] <= m["total_time_ms"] for m in migs)
    # what ran, as the qemu driver records it: libvirt's canonical machine type, each
    # side's QEMU (libvirt's getVersion), each host's libvirt
    for m in migs:
        assert re.fullmatch(r"pc-i440fx-\d+\.\d+", m["machine"] or ""), m["machine"]
        assert m["qemu"]["src"]["version"] == m["qemu"]["dst"]["version"], m["qemu"]
        assert m["qemu"]["src"]["version"].startswith("10."), m["qemu"]
    assert run["versions"]["hosts"]["hostC"]["libvirt"].startswith("11."), run["versions"]


async def test_four_hosts_make_two_concurrent_pairs(inventory, tmp_path, no_leaks):
    """-m hostA,hostB -m hostC,hostD: (A,B) and (C,D), each running the API example."""
    rc, out, err = await migrate_run(inventory, tmp_path, "-m", "hostA,hostB",
                                     "-m", "hostC,hostD", "concurrent")
    assert rc == 0, out + err
    run, migs, junit = the_run(tmp_path)
    assert run["instances_hosts"] == {"pair1": ["hostA", "hostB"], "pair2": ["hostC", "hostD"]}
    assert len(migs) == 8 and all(m["status"] == "completed" for m in migs)
    assert {(m["src"], m["dst"]) for m in migs if m["mig_id"].startswith("pair2")} == {
        ("hostC", "hostD"), ("hostD", "hostC")}
    p1, p2 = run["instances"]
    assert p1["started"] < p2["started"] + p2["duration_s"]      # the pairs overlapped
    assert p2["started"] < p1["started"] + p1["duration_s"]
    # the two VMs of the first call migrated together
    first = [m for m in migs if m["mig_id"] == "pair1-1"]
    spans = [(m["phases"][0][2], m["phases"][-1][2]) for m in first]
    assert len(first) == 2 and max(s for s, _ in spans) < min(e for _, e in spans)
    assert len(junit.findall("testsuite")) == 2


async def test_ring_over_all_three_hosts(inventory, tmp_path, no_leaks):
    rc, out, err = await migrate_run(inventory, tmp_path, "--all", "-m", "hostA,hostB,hostC",
                                     "ring")
    assert rc == 0, out + err
    run, migs, _ = the_run(tmp_path)
    assert [i["instance"] for i in run["instances"]] == ["all"]
    assert [(m["src"], m["dst"]) for m in migs] == [("hostA", "hostB"), ("hostB", "hostC"),
                                                    ("hostC", "hostA")]


async def test_a_sync_address_in_use_is_refused_before_any_host_is_touched(inventory,
                                                                          tmp_path, no_leaks):
    """The sync server's socket is bound before anything else of the run, even the
    recovery of dead runs on its hosts (its aiohttp is imported later, in a thread, once
    the first guest boots): a port in use, or an address that does not resolve, is one
    clear line, exit 2, and nothing was started (no results directory: the run never
    began)."""
    import socket
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        rc, out, err = await migrate_run(inventory, tmp_path, "-m", "hostA,hostB", "ping_pong",
                                         "-p", "sync.bind=127.0.0.1", "-p", f"sync.port={port}")
    assert rc == 2, out + err
    assert err.splitlines() == [f"migrate-run: error: the sync server cannot bind "
                                f"127.0.0.1:{port}: Address already in use"], err
    rc, out, err = await migrate_run(inventory, tmp_path, "-m", "hostA,hostB", "ping_pong",
                                     "-p", "sync.bind=no-such-host.invalid")
    assert rc == 2, out + err
    assert err.splitlines() == ["migrate-run: error: the sync server cannot bind "
                                "no-such-host.invalid:0: Name or service not known"], err
    assert not list(tmp_path.iterdir())


async def test_a_sync_the_hosts_cannot_reach_fails_the_run_and_stops_its_guest(
        inventory, tmp_path, no_leaks):
    """The sync starts beside the scenario, once its first guest boots: a sync server the
    hosts cannot reach (bound on the controller's loopback) fails the run naming the host
    and the address, after the guest started; the scenario is cancelled (its guest's
    boot, or a migration, rolled back) and nothing is left on the hosts."""
    rc, out, err = await migrate_run(inventory, tmp_path, "-m", "hostA,hostB", "ping_pong",
                                     "-p", "sync.bind=127.0.0.1")
    assert rc == 1, out + err
    run, _migs, _junit = the_run(tmp_path)
    inst = run["instances"][0]
    assert inst["status"] == "failed", inst
    assert re.search(r"host[AB]: its sync participant did not join the sync server at "
                     r"http://127\.0\.0\.1:\d+", inst["error"]), inst
    (run_dir,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "vm" and r.get("state") == "started" for r in records), \
        records                                     # the guest had started first


async def test_cancel_then_migrate(inventory, tmp_path, no_leaks):
    rc, out, err = await migrate_run(inventory, tmp_path, "-m", "hostB,hostC",
                                     "cancel_then_migrate")
    assert rc == 0, out + err
    _, migs, junit = the_run(tmp_path)
    assert [m["status"] for m in migs] == ["cancelled", "completed"]
    first = migs[0]
    assert first["handled_by_scenario"] and first["phase"] == "ROLLED_BACK"
    assert "VM running on hostB" in first["error"] and "destination removed" in first["error"]
    assert first["params"]["bandwidth_mibs"] == 2
    assert junit.find("testsuite").get("failures") == "0"


async def test_dest_block_long_fails_cleanly_short_completes(inventory, tmp_path, no_leaks):
    """Long block: the engine's stall detection fails it (5 s); short block (1 s, shorter
    than TCP's retransmission backoff needs to resume) completes."""
    rc, out, err = await migrate_run(inventory, tmp_path, "-m", "hostA,hostB", "dest_block",
                                     "-p", "migration.policy.stall_s=5",
                                     "-p", "scenario.long_block_s=60")
    assert rc == 0, out + err
    _, migs, _ = the_run(tmp_path)
    assert [m["status"] for m in migs] == ["failed", "completed"]
    assert "stalled: no bytes moved for 5 s" in migs[0]["error"]
    assert "VM running on hostA" in migs[0]["error"]
    assert "unblocked" in out
    # the run's report.html, loaded in a real browser: rendered, plots drawn, failure named
    (run_dir,) = tmp_path.iterdir()
    async with Chromium() as browser:
        page = await browser.load(run_dir / "report.html")
        await page.screenshot(tmp_path / "report.png")
        seen = await page.evaluate("""(() => {
            const q = (s) => [...document.querySelectorAll(s)];
            return {
              verdict: document.getElementById('verdict').textContent,
              rows: q('#summary tr').slice(1).map(r => [r.className, r.cells[0].textContent,
                                                        r.cells[3].textContent]),
              failures: q('#failures h3.failure').map(h => h.textContent),
              errors: q('#failures .error').map(e => e.textContent),
              plots: q('section.migration').map(s => {
                const svg = s.querySelector('figure.plot svg');
                if (!svg) return null;
                const box = svg.getBoundingClientRect();
                // the data series (by id): a drawn line of several points each
                const points = (name) => {
                  const line = svg.querySelector(`[id="${s.id}-${name}"] path`);
                  return line ? (line.getAttribute('d').match(/L/g) || []).length + 1 : 0;
                };
                return {width: box.width, height: box.height,
                        remaining: points('remaining'), throughput: points('throughput'),
                        labels: [...svg.querySelectorAll('text')].map(t => t.textContent)};
              }),
              run_plots: q('#plot-time svg, #plot-downtime svg').length,
              external: q('script[src], link[href], img[src^=http]').length};
        })()""")
    assert not page.errors, page.errors
    assert seen["verdict"] == "PASSED" and seen["external"] == 0      # offline: nothing fetched
    assert [r[1:] for r in seen["rows"]] == [["pair1-1", "failed (expected)"],
                                             ["pair1-2", "completed"]]
    (failure,) = seen["failures"]
    assert "vm1 hostA → hostB: failed in MIGRATING, ended ROLLED_BACK" in failure, failure
    assert "stalled: no bytes moved for 5 s" in seen["errors"][0]
    assert seen["run_plots"] == 2
    for plot in seen["plots"]:                 # each migration: its series drawn
        assert plot and plot["width"] > 300 and plot["height"] > 150, plot
        assert plot["remaining"] >= 3 and plot["throughput"] >= 3, plot   # a sample a second
        assert {"MIGRATING", "seconds since migrate"} <= set(plot["labels"]), plot
    assert "ROLLING_BACK" in seen["plots"][0]["labels"]         # the failed one's end marked
    assert "COMPLETED" in seen["plots"][1]["labels"]
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the framework's promises ----------------------------------------------------------------

FAILING_CHECK = '''
from migrator import MultihostMigration

class FailingCheck(MultihostMigration):
    async def migration_scenario(self):
        async def check_worker(mig_data):
            raise RuntimeError("the workload is gone")
        await self.migrate_wait(["vm1"], self.hosts[0], self.hosts[1], None, check_worker)
'''


async def test_check_worker_error_fails_the_run_and_keeps_its_type(inventory, tmp_path,
                                                                   no_leaks):
    scenario = tmp_path / "failing_check.py"
    scenario.write_text(FAILING_CHECK)
    rc, out, err = await migrate_run(inventory, tmp_path / "results", "-m", "hostC,hostD",
                                     str(scenario))
    assert rc == 1, out + err
    run, migs, junit = the_run(tmp_path / "results")
    assert run["verdict"] == "failed"
    inst = run["instances"][0]
    assert inst["status"] == "failed" and inst["error_type"] == "RuntimeError"
    assert "the workload is gone" in inst["error"]
    assert "in check_worker of migration pair1-1 (vm1 hostC->hostD)" in inst["error"]
    assert migs[0]["status"] == "completed"                 # the migration itself worked
    failures = [c for c in junit.iter("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failures] == ["scenario"]
    assert "verdict: FAILED" in out


SILENT_GUEST = '''
from migrator import MultihostMigration

class SilentGuest(MultihostMigration):
    """The guest's shell busy (a long sleep typed, not waited for) when the checks come."""
    async def before_migration(self, mig_data):
        session = await mig_data.vms[0].wait_for_login(self.login_timeout)
        await session.sendline("sleep 600")

    async def migration_scenario(self):
        await self.migrate_wait(["vm1"], self.hosts[0], self.hosts[1])
'''


async def test_a_destination_guest_that_does_not_answer_fails_check_vms_dst(
        inventory, tmp_path, no_leaks):
    """The checks after a migration (run side by side): the source's passes, the
    destination's asks the guest's shell for one command, on the session the migration
    kept, and fails when no answer comes within guest_cmd_s."""
    scenario = tmp_path / "silent_guest.py"
    scenario.write_text(SILENT_GUEST)
    rc, out, err = await migrate_run(inventory, tmp_path / "results", "-m", "hostC,hostD",
                                     "-p", "timeouts.guest_cmd_s=3", str(scenario))
    assert rc == 1, out + err
    run, migs, _junit = the_run(tmp_path / "results")
    inst = run["instances"][0]
    assert inst["status"] == "failed", inst
    assert "in check_vms_dst of migration pair1-1 (vm1 hostC->hostD)" in inst["error"], inst
    assert "also failed" not in inst["error"], inst          # the source's check passed
    assert migs[0]["status"] == "completed"                  # the migration itself worked


DISK_SCENARIO = '''
from migrator import MultihostMigration

class DiskFollows(MultihostMigration):
    async def migration_scenario(self):
        async def worker(mig_data):
            s = await self.env.get_vm("disk1").wait_for_login(timeout=self.login_timeout)
            base = await s.cmd("dd if=/dev/vda bs=1M count=1 2>/dev/null | md5sum")
            self.context.say("base block " + base.split()[0])
            await s.cmd("echo written-on-source | dd of=/dev/vda bs=1M seek=1 conv=fsync "
                        "2>/dev/null")

        async def check_worker(mig_data):
            vm = self.env.get_vm("disk1")
            s = await vm.wait_for_login(timeout=self.login_timeout)
            got = await s.cmd("dd if=/dev/vda bs=1M skip=1 count=1 2>/dev/null | head -c 17")
            assert got.strip() == "written-on-source", got
            self.context.say("read on " + vm.host.name + ": " + got.strip())

        await self.migrate_wait(["disk1"], self.hosts[0], self.hosts[1], worker, check_worker)
'''


async def test_vm_from_a_qcow2_overlay_on_shared_storage(inventory, lab, tmp_path, no_leaks):
    """The disk-preparation path: a per-run overlay over a base image, migrated with the VM;
    the base image is never written; the overlay is removed after the run."""
    base = inventory.shared_dir / "test-framework-base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 1M", str(base)], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(f"vms:\n  disk1:\n    image: {base}\n")
        scenario = tmp_path / "disk_follows.py"
        scenario.write_text(DISK_SCENARIO)
        rc, out, err = await migrate_run(inventory, tmp_path / "results", "-c", str(cfg),
                                         "-m", "hostA,hostB", str(scenario))
        assert rc == 0, out + err
        expected = subprocess.run("head -c 1048576 /dev/zero | tr '\\0' Z | md5sum", shell=True,
                                  capture_output=True, text=True).stdout.split()[0]
        assert f"base block {expected}" in out            # the guest saw the base's data
        assert "read on hostB: written-on-source" in out
        untouched = subprocess.run(["qemu-io", "-c", "read -P 0 1M 1M", str(base)],
                                   capture_output=True, text=True)
        assert "Pattern verification failed" not in untouched.stdout + untouched.stderr
        assert untouched.returncode == 0
    finally:
        base.unlink()


def _sshds(host: str) -> list[int]:
    """The PIDs of ``host``'s sshd processes: its listener and its sessions."""
    netns = network.netns_path(f"mtest-{host}")
    pids = []
    for p in processes_in_netns(netns):
        with contextlib.suppress(FileNotFoundError):        # (ended meanwhile)
            if Path(f"/proc/{p.pid}/comm").read_text().strip() in ("sshd", "sshd-session"):
                pids.append(p.pid)
    return pids


class _MeetWhileHostBDies(MultihostMigration):
    """hostB hangs (its sshd frozen) while hostA waits at a barrier, then its sshd dies."""

    async def migration_scenario(self):
        # every participant up first (the sync starts when a guest boots or something
        # needs it: a barrier), before hostB's sshd freezes
        await self.barrier("up")
        registry = self.context.server.registry

        async def kill_hostB_sshd():
            sshds = _sshds("hostB")
            for pid in sshds:
                os.kill(pid, signal.SIGSTOP)
            while not any("hostA" in inst.waiters for run in registry.runs.values()
                          for inst in run.open_instances() if inst.name == "meet"):
                await asyncio.sleep(0.02)             # hostA is waiting at the barrier
            for pid in sshds:
                os.kill(pid, signal.SIGKILL)
            self.killed = time.monotonic()

        # owned: if one of the two fails, the other does not go on running into later tests
        await gather_owned(self.barrier("meet", timeout=120), kill_hostB_sshd())


async def test_a_host_whose_sshd_dies_during_a_barrier_is_named_at_once(inventory, lab,
                                                                        config, no_leaks):
    run = _MeetWhileHostBDies(["hostA", "hostB"], config=config, inventory=inventory)
    t0 = time.monotonic()
    try:
        with pytest.raises(BarrierError) as info:
            await run.run()
        assert time.monotonic() - t0 < 60                    # not the 120 s barrier timeout
        assert info.value.hosts == ["hostB"]
        assert info.value.barrier == "meet"
        # hostA's arrival was aborted, naming hostB; hostB's own arrival says why
        assert "hostB: could not arrive" in str(info.value)
        assert run.record.status == "failed"
        assert any("hostB" in p for p in run.record.cleanup_problems)   # hostB unreachable
    finally:
        # no assert in here: it would replace the test's own failure; checked below (or, when
        # the test failed, added to its report as a note)
        restart = await cli("host", "--name", "mtest", "--dir", str(lab.dir), "hostB",
                            "sshd-start")
        failure = sys.exc_info()[1]
        if restart.returncode != 0 and failure is not None:
            failure.add_note(f"also, hostB's sshd did not restart: {restart.stderr.strip()}")
    assert restart.returncode == 0, f"hostB's sshd did not restart: {restart.stderr.strip()}"
    # what hostB kept (its copy of the run's owner) is the journal's to find: the run ended
    # with leftovers, so it stayed in the index, and recovery now removes them
    from migrator.framework.recover import recover
    report = await recover(config, run.context.run_id)
    assert report.ok and report.runs == [run.context.run_id], report.table()


class _SyncLostMidMigration(MultihostMigration):
    """hostC's sshd frozen before the sync starts (its participant cannot be installed
    there), killed once vm1's migration hostA -> hostB is under way: the sync fails while
    the migration runs."""

    async def migration_scenario(self):
        self.sshds = _sshds("hostC")
        for pid in self.sshds:
            os.kill(pid, signal.SIGSTOP)
        self.handle = self.migrate(["vm1"], "hostA", "hostB",
                                   params_append={"bandwidth_mibs": 1})
        await self.handle.mig_data.wait_phase(Phase.MIGRATING)
        for pid in self.sshds:
            os.kill(pid, signal.SIGKILL)
        await self.handle


async def test_a_sync_lost_mid_migration_is_why_the_migration_was_cancelled(
        inventory, lab, config, no_leaks):
    """The sync failing while a migration runs cancels the scenario (the instance's
    TaskGroup, without a reason): the migration rolls back, and its record and the call's
    error say it was the sync that failed, naming the host, rather than only that the run
    was interrupted. SSH's timeout (and so its keepalive: ssh_connect_s / 3, 3 times) is long
    enough that frozen hostC is not found dead before the migration is under way, on any
    machine: its death is the SIGKILL, once the migration is MIGRATING."""
    slow_ssh = config.model_copy(update={"timeouts": config.timeouts.model_copy(
        update={"ssh_connect_s": 300.0})})
    run = _SyncLostMidMigration(["hostA", "hostB", "hostC"], config=slow_ssh,
                                inventory=inventory)
    try:
        with pytest.raises(HostError, match="hostC"):
            await run.run()
        assert run.record.status == "failed" and "hostC" in run.record.error, run.record
        mig = run.handle.mig_data.migrations["vm1"]
        assert mig.result.status == "cancelled" and mig.phase is Phase.ROLLED_BACK, mig.result
        assert re.search(r"^vm1 hostA->hostB \[MIGRATING\]: interrupted: the sync failed: "
                         r"Host\w*Error: hostC: .*; VM running on hostA; migration cancelled",
                         mig.result.error), mig.result.error
        assert re.search(r"cancelled \(the sync failed: Host\w*Error: hostC: ",
                         str(run.handle.error)), run.handle.error
    finally:
        for pid in getattr(run, "sshds", ()):       # (killed, or still frozen on a failure)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        restart = await cli("host", "--name", "mtest", "--dir", str(lab.dir), "hostC",
                            "sshd-start")
        # what hostC kept (the run's owner file) is recovery's to remove, also after a failure
        from migrator.framework.recover import recover
        report = await recover(config, run.context.run_id) if restart.returncode == 0 else None
    assert restart.returncode == 0, f"hostC's sshd did not restart: {restart.stderr.strip()}"
    assert report.ok and report.runs == [run.context.run_id], report.table()


class _OneBarrier(MultihostMigration):
    async def migration_scenario(self):
        await self.barrier("up")


async def test_barriers_and_exchanges_are_for_the_running_instance(inventory, config,
                                                                   no_leaks):
    """Before ``run()`` and after it returned there is no sync to meet on: a barrier or an
    exchange is refused with one clear line (after the run, it once reached the stopped
    sync and failed with a KeyError from inside it)."""
    run = _OneBarrier(["hostA", "hostB"], config=config, inventory=inventory)
    refused = r"\[.*\] barriers and exchanges are for the scenario .* while the instance runs"
    with pytest.raises(RuntimeError, match=refused):
        await run.barrier("early")
    assert (await run.run()).status == "passed"
    with pytest.raises(RuntimeError, match=refused):
        await run.barrier("late")
    with pytest.raises(RuntimeError, match=refused):
        await run.exchange("late", {"hostA": 1})


async def test_two_runs_at_once_on_one_controller_are_isolated(inventory, tmp_path, no_leaks):
    one, two = tmp_path / "one", tmp_path / "two"
    (rc1, out1, err1), (rc2, out2, err2) = await asyncio.gather(
        migrate_run(inventory, one, "-m", "hostA,hostB", "ping_pong", "-p", "scenario.rounds=1"),
        migrate_run(inventory, two, "-m", "hostA,hostB", "ping_pong", "-p", "scenario.rounds=1"))
    assert (rc1, rc2) == (0, 0), out1 + err1 + out2 + err2
    r1, m1, _ = the_run(one)
    r2, m2, _ = the_run(two)
    assert r1["run_id"] != r2["run_id"]
    assert len(m1) == len(m2) == 2
    assert all(m["status"] == "completed" for m in m1 + m2)


SLOW_SCENARIO = '''
from migrator import MultihostMigration

class Slow(MultihostMigration):
    async def migration_scenario(self):
        await self.migrate_wait(["vm1", "vm2"], self.hosts[0], self.hosts[1],
                                params_append={"bandwidth_mibs": 1})
'''


async def test_ctrl_c_mid_migration_rolls_back_and_leaves_nothing(inventory, lab, tmp_path,
                                                                 no_leaks):
    scenario = tmp_path / "slow.py"
    scenario.write_text(SLOW_SCENARIO)
    results = tmp_path / "results"
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "-i", str(inventory.source), "-o", str(results),
        "-m", "hostA,hostB", str(scenario), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    seen = []
    async with asyncio.timeout(120):
        while sum("MIGRATING" in line for line in seen) < 2:
            line = (await proc.stdout.readline()).decode()
            assert line, f"migrate-run ended early: {''.join(seen)}"
            seen.append(line)
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 130, "".join(seen) + out.decode() + err.decode()
    run, migs, _ = the_run(results)
    assert run["instances"][0]["status"] == "interrupted"
    assert len(migs) == 2
    for m in migs:
        assert m["phase"] == "ROLLED_BACK", m
        assert "VM running on hostA" in m["error"] and "NOT" not in m["error"]


# -- bad input: one line, exit status 2, nothing started ---------------------------------------

@pytest.mark.parametrize("args, message", [
    (["-m", "hostA,hostZ", "ping_pong"], "unknown host 'hostZ'"),
    (["-m", "hostA,hostB", "no_such_scenario"], "no scenario 'no_such_scenario'"),
    (["-m", "hostA,hostB,hostC", "ping_pong"], "hostC is left over"),
    (["-m", "hostA", "ping_pong"], "at least 2 hosts"),
    (["-m", "hostA,hostA", "ping_pong"], "host hostA given twice"),
    (["-m", "hostA,hostB", "-p", "frobnicate=1", "ping_pong"], "unknown key 'frobnicate'"),
    (["-m", "hostA,hostB", "-p", "timeouts.barrier_s=-1", "ping_pong"], "timeouts.barrier_s"),
    (["-m", "hostA,hostB", "-p", "driver=xen", "ping_pong"], "driver must be"),
    (["-m", "hostA,hostB", "-p", "vms.vm1.mem_mib=1", "ping_pong"], "vms.vm1.mem_mib"),
    (["-m", "hostA,hostB", "-p", "network.probe_from=hostZ", "ping_pong"],
     "network.probe_from 'hostZ': not a host of the inventory"),
    (["-m", "hostA,hostB", "-p", "network.probe_from=vm:vm1", "ping_pong"],
     "network.probe_from vm:vm1: no declared VM 'vm1' with network: bridge and an ip"),
])
async def test_bad_input_is_one_line_and_exit_2(inventory, tmp_path, args, message):
    rc, out, err = await migrate_run(inventory, tmp_path, *args, timeout=60)
    assert rc == 2, out + err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not tmp_path.exists() or not any(tmp_path.iterdir())      # nothing started


async def test_a_driver_the_hosts_do_not_offer_is_refused(inventory, tmp_path):
    qemu_only = tmp_path / "inventory.yaml"
    qemu_only.write_text(inventory.source.read_text().replace("- libvirt\n", ""))
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "-i", str(qemu_only), "-o", str(tmp_path / "r"),
        "-m", "hostA,hostB", "-p", "driver=libvirt", "ping_pong",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert "driver 'libvirt': the inventory's hosts offer qemu" in err.decode()


async def test_scenario_files_without_exactly_one_subclass_are_refused(inventory, tmp_path):
    none = tmp_path / "none.py"
    none.write_text("x = 1\n")
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module\n")
    for path, message in ((none, "exactly one MultihostMigration subclass (found: none)"),
                          (broken, "does not load: ModuleNotFoundError")):
        rc, _, err = await migrate_run(inventory, tmp_path / "r", "-m", "hostA,hostB",
                                       str(path), timeout=60)
        assert rc == 2 and message in err and "Traceback" not in err


# -- pieces ------------------------------------------------------------------------------------

def test_hosts_pair_in_the_order_typed():
    assert group_hosts(["hostD", "hostA", "hostC", "hostB"]) == [["hostD", "hostA"],
                                                                  ["hostC", "hostB"]]
    assert group_hosts(["hostB", "hostA", "hostC"], all_hosts=True) == [["hostB", "hostA",
                                                                         "hostC"]]
    with pytest.raises(ConfigError, match="hostC is left over"):
        group_hosts(["hostA", "hostB", "hostC"])


def test_ansible_inventories_yaml_and_ini(tmp_path):
    (tmp_path / "hosts.yml").write_text(textwrap.dedent("""\
        all:
          vars:
            ansible_user: root
            ansible_ssh_private_key_file: keys/id
            migrator_shared_dir: /srv/shared
            migrator_known_hosts: known_hosts
          children:
            hypervisors:
              hosts:
                node2: {ansible_host: 192.0.2.2, migration_address: 198.51.100.2}
                node1: {ansible_host: 192.0.2.1, ansible_port: 2222}
        """))
    inv = load_any_inventory(tmp_path / "hosts.yml")
    assert list(inv.hosts) == ["node2", "node1"]            # order kept
    assert inv.hosts["node2"].migration_address == "198.51.100.2"
    assert inv.ssh_for("node1").port == 2222 and inv.ssh_for("node2").port == 22
    assert inv.ssh.identity_file == tmp_path / "keys/id"
    assert inv.ssh.known_hosts == tmp_path / "known_hosts"
    assert str(inv.shared_dir) == "/srv/shared"
    (tmp_path / "hosts.ini").write_text(textwrap.dedent("""\
        # a comment
        [kvm]
        alpha ansible_host=192.0.2.10 ansible_user=admin
        beta ansible_host=192.0.2.11

        [all:vars]
        migrator_shared_dir=/nfs/vm
        """))
    inv = load_any_inventory(tmp_path / "hosts.ini")
    assert [(n, e.address) for n, e in inv.hosts.items()] == [("alpha", "192.0.2.10"),
                                                             ("beta", "192.0.2.11")]
    assert inv.ssh_for("alpha").user == "admin" and inv.ssh_for("beta").user == "root"
    (tmp_path / "empty.ini").write_text("[kvm]\n")
    with pytest.raises(ConfigError, match="neither a migrator inventory"):
        load_any_inventory(tmp_path / "empty.ini")


def test_undeclared_vm_names_must_look_like_vmN(inventory):
    ctx = RunContext(Config(), inventory)

    class Nothing(MultihostMigration):
        async def migration_scenario(self):
            pass

    scenario = Nothing(["hostA", "hostB"], context=ctx)
    assert scenario.env.spec("vm7").mem_mib == 128
    with pytest.raises(ConfigError, match="unknown VM 'web'"):
        scenario.env.spec("web")


def test_mac_auto_is_a_per_run_address_pool(inventory):
    def spec(run_id):
        ctx = RunContext(Config.load(None, {"vms.web.mac": "auto", "vms.db.mac": "auto"}),
                         inventory, run_id=run_id)

        class Nothing(MultihostMigration):
            async def migration_scenario(self):
                pass
        env = Nothing(["hostA", "hostB"], context=ctx).env
        return env.spec("web").mac, env.spec("db").mac

    web, db = spec("run-1")
    assert web.startswith("02:") and db.startswith("02:") and web != db
    assert spec("run-1") == (web, db) and spec("run-2")[0] != web
