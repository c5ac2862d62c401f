"""Crash-safe runs: ``migrate-run`` SIGKILLed at each phase of a migration and during a
barrier, then ``migrate-run recover``: exactly one copy of the VM runs, on the host the
hypervisors' state calls for, its memory checksum intact, and nothing else is left on any
host. Also: a live run is refused, two recoveries never overlap, a new run recovers first.

Each kill lands exactly where it aims: with ``journal.stop_after`` the controller stops
itself (SIGSTOP) right after the record it aims at is durable, before the step that record
names; the test sees it stopped, SIGKILLs it, and checks the journal's last record.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest

from .conftest import BIN
from .controller import Controller, recover_cli
from migrator.config import Config
from migrator.framework.journal import find_run, list_runs, read_journal
from migrator.hosts import SSHHost
from migrator.hypervisor import VMSpec, make_vm
from migrator.lab import processes

SLOW = ["-p", "migration.bandwidth_mibs=1"]     # 32 MiB of pattern take 30 s: still migrating
#: vm1 bridged, its MAC and address from a pool: the dead run leaves taps on both hosts and
#: a claimed range, which recover must remove (no_leaks checks)
BRIDGED = ["-p", "vms.vm1.network=bridge", "-p", "vms.vm1.mac=auto", "-p", "vms.vm1.ip=auto",
           "-p", "network.pools.r.base_mac=02:6e:00:00:07:00",
           "-p", "network.pools.r.base_ip=10.78.240.70", "-p", "network.pools.r.range_size=2"]
#: the same for two pairs: a range each (and their static DHCP leases)
BRIDGED_2 = BRIDGED + ["-p", "network.pools.s.base_mac=02:6e:00:00:08:00",
                       "-p", "network.pools.s.base_ip=10.78.240.72",
                       "-p", "network.pools.s.range_size=2"]


def vm_processes(lab, vm: str) -> list[str]:
    """Hosts running a QEMU of ``vm`` (either driver)."""
    return [p.host for p in processes.vm_processes(lab, vm)]


def participant(lab, host: str) -> int:
    """The pid of ``host``'s sync participant."""
    (pid,) = [p.pid for p in processes.host_processes(lab)
              if p.host == host and processes.is_participant(p)]
    return pid


async def memsum_verify(inventory, driver: str, host: str, run_id: str) -> str:
    spec = VMSpec("vm1", kernel=str(inventory.guest.kernel))
    async with SSHHost.from_inventory(host, inventory) as h:
        vm = make_vm(driver, spec, h, f"{inventory.run_dir}/{run_id}", Config())
        try:
            session = await vm.wait_for_login(60)
            return (await session.cmd("memsum verify")).strip()
        finally:
            vm._close_session()
            await vm.disconnect()


# (driver, what the kill aims at, extra arguments, the hosts the VMs must be kept on);
# MATRIX: run by 'make matrix' (pytest --matrix), not by 'make test': each of these differs
# from a kept case only in the phase record the kill lands after, and the fault bench's
# ctl-sigkill-recover rows (bench/faults.py) cover the setup/precopy/postcopy moments again
MATRIX = pytest.mark.matrix
CASES = [
    pytest.param("qemu", "PREPARING_DEST", SLOW, ["hostA"], marks=MATRIX),
    pytest.param("qemu", "LISTENING", SLOW, ["hostA"], marks=MATRIX),
    # the 2-pair case below is bridged too
    pytest.param("qemu", "MIGRATING", SLOW + BRIDGED, ["hostA"], marks=MATRIX),
    # 4 MiB/s, not SLOW: the postcopy that recovery waits for must not take 30 s
    ("qemu", "POSTCOPY", ["-p", "migration.postcopy_after_s=0", "-p",
                          "migration.bandwidth_mibs=4"], ["hostB"]),
    pytest.param("qemu", "COMPLETED", [], ["hostB"], marks=MATRIX),
    pytest.param("qemu", "CLEANED", [], ["hostB"], marks=MATRIX),
    ("qemu", "barrier", [], ["hostB"]),
    # two pairs in one run, each with its own vm1 in the same run dir: resolved per pair;
    # bridged, from two address ranges: taps on four hosts, two claims and their leases
    ("qemu", "MIGRATING", SLOW + BRIDGED_2, ["hostA", "hostC"]),
    # libvirt's migrate3 prepares the listening destination inside the call: no LISTENING
    pytest.param("libvirt", "PREPARING_DEST", SLOW, ["hostA"], marks=MATRIX),
    ("libvirt", "MIGRATING", SLOW, ["hostA"]),
    # libvirt POSTCOPY: test_libvirt_postcopy_running_on_the_destination_is_finished (the
    # kill must land once the destination runs, not at the record: see there)
    ("libvirt", "COMPLETED", [], ["hostB"]),
    pytest.param("libvirt", "CLEANED", [], ["hostB"], marks=MATRIX),
    pytest.param("libvirt", "barrier", [], ["hostB"], marks=MATRIX),
]


def _case_id(case) -> str:
    d, t, _a, k = case.values if hasattr(case, "values") else case
    return f"{d}-{t}-{len(k)}pair"


@pytest.mark.parametrize("driver, target, args, keepers", CASES,
                         ids=[_case_id(c) for c in CASES])
async def test_sigkill_then_recover_keeps_exactly_one_copy_intact(
        lab, inventory, tmp_path, no_leaks, driver, target, args, keepers):
    pairs = len(keepers)
    stop = "barrier:migration_finished" if target == "barrier" else \
        f"phase:{target}@{pairs}"
    ctl = Controller(tmp_path, inventory.source, driver, [*args, "-p", f"journal.stop_after={stop}"],
                     "hostA,hostB,hostC,hostD" if pairs == 2 else "hostA,hostB")
    await ctl.start()
    try:
        await ctl.wait_stopped()
        if target == "barrier":
            # and hostB's participant hung too: recovery must end it (its SSH session's end
            # does not, while it is stopped). Stopped only now, with the controller stopped
            # past its last record: earlier, it would hold up the barriers before the stop point
            os.kill(participant(lab, "hostB"), signal.SIGSTOP)
        await ctl.kill()
    finally:
        await ctl.stop()
    run_id = ctl.run_id()
    assert run_id is not None
    last = ctl.journal()[-1]
    if target == "barrier":
        assert last["event"] == "barrier" and last["name"].startswith("migration_finished")
    else:
        assert last["event"] == "phase" and last["phase"] == target, f"killed at {last}"

    if BRIDGED[1] in args:          # what recover must give back (no_leaks checks it did)
        kinds = [e["kind"] for e in ctl.journal() if e.get("event") == "resource"]
        # a claim is journaled before it is tried: a pair may have tried the other's first
        assert kinds.count("dhcp_hosts") == pairs <= kinds.count("pool_claim"), kinds
    slots = [e["path"] for e in ctl.journal() if e.get("kind") == "migration_slot"]
    assert len(slots) == pairs            # the dead run's slots, given back by recover
    rc, out, err = await recover_cli(ctl, run_id)
    assert rc == 0, out + err
    assert out.count(f"{run_id}  vm1") == pairs and "UNRESOLVED" not in out, out
    assert not any(Path(p).exists() for p in slots), slots
    if target == "barrier":
        assert "sync participant(s)" in out and "on hostB killed" in out, out
    assert sorted(vm_processes(lab, "vm1")) == keepers, (last, out)
    for keeper in keepers:
        verified = await memsum_verify(inventory, driver, keeper, run_id)
        assert "ok=1" in verified and "bad_pages=0" in verified, verified
    # nothing of the run is left but the kept VMs; --stop then finishes the run's cleanup
    rc, out, err = await recover_cli(ctl, "--stop", run_id)
    assert rc == 0 and all(f"stopped on {k}" in out for k in keepers), out + err
    assert vm_processes(lab, "vm1") == [] and list_runs(ctl.state) == []


async def test_libvirt_postcopy_running_on_the_destination_is_finished(lab, inventory, tmp_path,
                                                                       no_leaks):
    """Managed migrate3, the controller SIGKILLed while postcopy runs on the destination
    (its Finish3 waiting there): libvirt marks the source paused/postcopy-failed and keeps
    its job, the destination goes on receiving. Recovery asks the source's QEMU itself,
    waits for the postcopy to complete and keeps the destination, memory intact.

    (Killed between the switch and Finish3 reaching the destination, a window of
    milliseconds, libvirt destroys the destination that never ran and keeps the source's job
    forever: recovery reports that one unresolved. The kill here waits for the destination's
    running/post-copy state, so it lands where a real crash most likely does.)"""
    ctl = Controller(tmp_path, inventory.source, "libvirt",
                     ["-p", "migration.postcopy_after_s=0", "-p", "migration.bandwidth_mibs=4"])
    await ctl.start()
    try:
        await ctl.wait_for(lambda r: r.get("event") == "phase" and r["phase"] == "POSTCOPY")
        async with SSHHost.from_inventory("hostB", inventory) as b:
            async with asyncio.timeout(60):
                while "post-copy" not in (await b.run("virsh domstate --reason vm1")).stdout:
                    await asyncio.sleep(0.1)
        await ctl.kill()
    finally:
        await ctl.stop()
    run_id = ctl.run_id()
    rc, out, err = await recover_cli(ctl, run_id)
    assert rc == 0 and "UNRESOLVED" not in out, out + err
    assert "postcopy waited for" in out, out
    assert vm_processes(lab, "vm1") == ["hostB"], out
    verified = await memsum_verify(inventory, "libvirt", "hostB", run_id)
    assert "ok=1" in verified and "bad_pages=0" in verified, verified
    rc, out, err = await recover_cli(ctl, "--stop", run_id)
    assert rc == 0 and "stopped on hostB" in out, out + err
    assert vm_processes(lab, "vm1") == [] and list_runs(ctl.state) == []


async def test_recover_refuses_a_live_run_and_a_run_being_recovered(lab, inventory, tmp_path,
                                                                     no_leaks):
    ctl = Controller(tmp_path, inventory.source, "qemu", SLOW)
    await ctl.start()
    try:
        await ctl.wait_for(lambda r: r.get("event") == "phase" and r["phase"] == "MIGRATING")
        run_id = ctl.run_id()
        rc, out, err = await recover_cli(ctl, run_id)
        assert rc == 2 and "alive or being recovered" in err and "controller pid" in err, \
            out + err
        assert len(err.strip().splitlines()) == 1, err
        assert ctl.proc.returncode is None          # the live run was not touched
        rc, out, err = await recover_cli(ctl)       # every dead run: this one is not dead
        assert rc == 0 and "no dead run" in out, out + err
        await ctl.kill()
    finally:
        await ctl.stop()
    # a recovery in progress (this process holds the run's lock as one would) refuses a second
    entry = find_run(ctl.state, run_id)
    lock = entry.lock("recover").acquire()
    try:
        rc, out, err = await recover_cli(ctl, run_id)
        assert rc == 2 and f"recover pid {os.getpid()}" in err, out + err
    finally:
        lock.release()
    # two at once: exactly one resolves the VM; the other is refused while the first holds
    # the run, or finds it recovered already; never both at work
    results = await asyncio.gather(recover_cli(ctl, run_id), recover_cli(ctl, run_id))
    did = [r for r in results if r[0] == 0 and "left running on hostA" in r[1]]
    assert len(did) == 1, results
    other = next(r for r in results if r is not did[0])
    assert (other[0] == 2 and "being recovered" in other[2]) or (
        other[0] == 0 and "recovered already" in other[1]), results
    assert vm_processes(lab, "vm1") == ["hostA"]
    # once more, after: it says so (the note was left out when nothing was recovered)
    rc, out, err = await recover_cli(ctl, run_id)
    assert rc == 0 and f"run {run_id}: recovered already, kept vm1@hostA" in out, out + err
    rc, out, err = await recover_cli(ctl, "--stop", run_id)
    assert rc == 0, out + err


async def test_a_new_run_recovers_the_dead_run_on_its_hosts_first(lab, inventory, tmp_path,
                                                                   no_leaks):
    (tmp_path / "dead").mkdir()
    ctl = Controller(tmp_path / "dead", inventory.source, "qemu", SLOW)
    await ctl.killed_while_migrating()
    dead = ctl.run_id()
    assert vm_processes(lab, "vm1") == ["hostA", "hostB"]     # both copies left running
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "-i", str(inventory.source), "-o", str(tmp_path / "r"),
        "-m", "hostA,hostB", "-p", f"journal.state_dir={ctl.state}", "ping_pong",
        "-p", "scenario.rounds=1", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = (b.decode() for b in await asyncio.wait_for(proc.communicate(), 300))
    assert proc.returncode == 0, out + err
    assert "recovered 1 dead run(s) on these hosts first" in out and dead in out, out
    assert "stopped on hostA (--stop)" in out, out
    assert list_runs(ctl.state) == []                       # the index is empty again
    (journal,) = (tmp_path / "dead" / "results").glob("*/journal.jsonl")
    records = read_journal(journal)
    assert records[0]["event"] == "run" and records[-1]["event"] == "recovered", records[-1]


async def test_a_controller_whose_disk_is_lost_is_recovered_from_the_hosts(
        lab, inventory, tmp_path, no_leaks):
    ctl = Controller(tmp_path, inventory.source, "qemu", SLOW)
    await ctl.killed_while_migrating()
    run_id = ctl.run_id()
    shutil.rmtree(ctl.state)                      # the journal's index and the results too
    shutil.rmtree(ctl.results)
    rc, out, err = await recover_cli(ctl, "--from-hosts", "-m", "hostA,hostB",
                                     "-i", str(inventory.source))
    assert rc == 0, out + err
    assert f"{run_id}  vm1" in out and "left running on hostA" in out, out
    assert vm_processes(lab, "vm1") == ["hostA"]
    verified = await memsum_verify(inventory, "qemu", "hostA", run_id)
    assert "ok=1" in verified, verified
    rc, out, err = await recover_cli(ctl, "--stop", run_id)
    assert rc == 0 and "stopped on hostA" in out, out + err


async def test_an_unreachable_host_leaves_the_vm_unresolved_and_untouched(lab, inventory,
                                                                          tmp_path, no_leaks):
    ctl = Controller(tmp_path, inventory.source, "qemu", SLOW)
    await ctl.killed_while_migrating()
    run_id = ctl.run_id()
    lab.control("hostB", "sshd stop")
    try:
        rc, out, err = await recover_cli(ctl, run_id)
        assert rc == 1 and "UNRESOLVED" in out and "hostB unreachable" in out, out + err
        assert sorted(vm_processes(lab, "vm1")) == ["hostA", "hostB"]   # nothing touched
        assert not find_run(ctl.state, run_id).recovered                # looked at again
    finally:
        lab.control("hostB", "sshd start")
    rc, out, err = await recover_cli(ctl, run_id)
    assert rc == 0 and "left running on hostA" in out, out + err
    verified = await memsum_verify(inventory, "qemu", "hostA", run_id)
    assert "ok=1" in verified, verified
    rc, out, err = await recover_cli(ctl, "--stop", run_id)
    assert rc == 0, out + err
