"""The run journal, its index and lock, without a lab: a real child process holds a run and
is SIGKILLed; the kernel's release of its lock is what proves it dead."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import BIN
from migrator.framework.journal import (RunJournal, RunLocked, _still_named, find_run,
                                        list_runs, read_journal)
from migrator.errors import ConfigError

HOLDER = textwrap.dedent('''
    import sys, time
    from migrator.framework.journal import RunJournal
    j = RunJournal.create(sys.argv[1], sys.argv[2], None, {"hosts": {"hostA": "10.0.0.1"}})
    j.record("vm", vm="vm1", host="hostA", state="starting")
    j._file.write('{"event": "vm", "vm": "vm1", "sta')   # a record torn by the kill
    j._file.flush()
    print("holding", flush=True)
    time.sleep(600)
''')


def holder(state, run_id) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, run_id, str(state)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_live_controller_holds_its_run_and_its_death_frees_it(tmp_path):
    proc = holder(tmp_path, "run-1")
    try:
        entry = find_run(tmp_path, "run-1")
        assert entry.is_alive()
        with pytest.raises(RunLocked) as info:
            entry.lock("recover").acquire()
        assert f"controller pid {proc.pid}" in info.value.holder
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    entry = find_run(tmp_path, "run-1")
    assert not entry.is_alive()                     # the kernel dropped the flock
    events = entry.events()                         # the torn last line is skipped
    assert [e["event"] for e in events] == ["run", "vm"]
    assert events[0]["controller"]["pid"] == proc.pid and events[0]["hosts"] == {
        "hostA": "10.0.0.1"}
    lock = entry.lock("recover").acquire()          # now one recovery may take it
    try:
        with pytest.raises(RunLocked, match="recover pid"):
            entry.lock("recover").acquire()
    finally:
        lock.release()


def test_a_run_that_ends_cleanly_leaves_no_index_entry(tmp_path):
    journal = RunJournal.create("run-2", tmp_path, tmp_path / "results" / "journal.jsonl",
                                {"hosts": {}})
    journal.record("phase", mig_id="m-1", vm="vm1", src="a", dst="b", phase="MIGRATING")
    assert [e.run_id for e in list_runs(tmp_path)] == ["run-2"]
    journal.finish("passed", leftovers=[])
    assert list_runs(tmp_path) == []
    records = read_journal(tmp_path / "results" / "journal.jsonl")
    assert [r["event"] for r in records] == ["run", "phase", "end"]
    # one that could not clean up stays in the index for recover, unlocked
    journal = RunJournal.create("run-3", tmp_path, None, {"hosts": {}})
    journal.finish("failed", leftovers=["hostA: vm1 not stopped"])
    (entry,) = list_runs(tmp_path)
    assert not entry.is_alive() and entry.info["leftovers"] == ["hostA: vm1 not stopped"]


def test_a_journal_torn_in_the_middle_is_refused_by_name(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"event": "run"}\n{"event": \n{"event": "end"}\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        read_journal(path)


def test_a_torn_last_record_is_cut_before_a_recovery_appends(tmp_path):
    """The controller died writing a record: each recovery appends after the last whole one
    (the torn one, whose step never began, dropped), however many times it runs. Appended
    to the torn line, the first recovery's record was lost and the second's left the torn
    line in the middle: every later read refused the journal."""
    proc = holder(tmp_path, "run-7")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    entry = find_run(tmp_path, "run-7")
    for n in (1, 2):
        lock = entry.lock("recover").acquire()
        try:
            journal = RunJournal.reopen(entry, lock)
            journal.record("recovered", n=n)
            journal.close()
        finally:
            lock.release()
    events = read_journal(entry.journal_path)
    assert [(e["event"], e.get("n")) for e in events] == [
        ("run", None), ("vm", None), ("recovered", 1), ("recovered", 2)]


def test_a_lock_is_never_made_again_for_an_entry_being_removed(tmp_path):
    """An entry is removed with its lock held (lock file first, then the directory): a
    recovery arriving meanwhile finds the run gone. It made the lock file again, which
    kept the entry's directory (with no run.json) for every later recover to stumble on;
    and one that had opened the lock before the removal got the flock of a file no longer
    in the index."""
    journal = RunJournal.create("run-8", tmp_path, None, {"hosts": {}})
    journal.detach()
    entry = find_run(tmp_path, "run-8")
    held = os.open(entry.dir / "lock", os.O_RDWR)     # opened before the removal
    try:
        (entry.dir / "lock").unlink()                  # the removal's first step
        with pytest.raises(FileNotFoundError):
            entry.lock("recover").acquire()
        assert not (entry.dir / "lock").exists()
        assert not _still_named(held, entry.dir / "lock")
        (entry.dir / "lock").write_text("")            # another file by that name
        assert not _still_named(held, entry.dir / "lock")
    finally:
        os.close(held)


async def test_a_run_killed_as_it_ended_is_recovered_by_its_end_records_leftovers(tmp_path):
    """The controller wrote its end record naming what it left, and died before the index
    entry said so: recover goes to the hosts for them (here: one that cannot be reached,
    said, the run kept for later) instead of taking the run for one that ended clean and
    dropping it with its leftovers."""
    from migrator.config import Config, Inventory
    inv = Inventory.model_validate({"hosts": {"hostA": {"address": "192.0.2.1"}},
                                    "guest": {"kernel": "/images/vmlinux",
                                              "initrd": "/images/initrd.img"}})
    journal = RunJournal.create("run-9", tmp_path, None, {
        "hosts": {"hostA": "192.0.2.1"}, "driver": "qemu", "run_root": str(inv.run_dir),
        "inventory": inv.model_dump(mode="json"), "config": Config().model_dump(mode="json")})
    journal.record("vm", vm="vm1", host="hostA", state="starting")
    journal.record("end", status="failed", leftovers=["hostA: vm1 not stopped"])
    journal.detach()                                # killed before entry.update(leftovers=)
    p = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "recover", "-p", f"journal.state_dir={tmp_path}", "run-9",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = (b.decode() for b in await p.communicate())
    assert p.returncode == 1 and "vm1: hostA unreachable" in out, out + err
    assert [e.run_id for e in list_runs(tmp_path)] == ["run-9"]


async def test_recover_cli_lists_runs_and_refuses_bad_input_in_one_line(tmp_path):
    proc = holder(tmp_path, "run-4")
    try:
        async def recover(*args):
            p = await asyncio.create_subprocess_exec(
                str(BIN / "migrate-run"), "recover", "-p", f"journal.state_dir={tmp_path}",
                *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await p.communicate()
            return p.returncode, out.decode(), err.decode()
        rc, out, err = await recover("--list")
        assert rc == 0 and "run-4  live" in out and f"controller pid {proc.pid}" in out, out
        rc, out, err = await recover("no-such-run")
        assert rc == 2 and err.count("\n") == 1 and "no run no-such-run" in err, err
        rc, out, err = await recover("run-4")
        assert rc == 2 and "alive or being recovered" in err and err.count("\n") == 1, err
        rc, out, err = await recover("--from-hosts")
        assert rc == 2 and "needs the hosts" in err, err
        for bad, says in ((["--forget"], "one RUN-ID"), (["--forget", "--list"], "go together"),
                          (["--list", "run-4"], "no RUN-ID"), (["-m", "hostA"], "--from-hosts"),
                          (["--forget", "run-4"], "alive or being recovered")):
            rc, out, err = await recover(*bad)
            assert rc == 2 and says in err and err.count("\n") == 1, (bad, err)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


async def test_a_dead_run_whose_hosts_are_gone_is_forgotten_saying_what_may_be_left(tmp_path):
    proc = holder(tmp_path, "run-5")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    p = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "recover", "--forget", "run-5",
        "-p", f"journal.state_dir={tmp_path}", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = (b.decode() for b in await p.communicate())
    assert p.returncode == 0, out + err
    assert "run run-5 forgotten" in out and "no host touched" in out, out
    assert "hostA: VM vm1 (starting" in out and "hostA (10.0.0.1)" in out, out
    assert list_runs(tmp_path) == []
    # the journal was inside the index entry: gone with it; one kept elsewhere gets the record
    journal = RunJournal.create("run-6", tmp_path, tmp_path / "r6.jsonl", {"hosts": {}})
    journal.detach()
    from migrator.config import Config
    from migrator.framework.recover import forget
    assert forget(Config.load(None, {"journal.state_dir": str(tmp_path)}), "run-6") == []
    assert read_journal(tmp_path / "r6.jsonl")[-1]["event"] == "forgotten"


def test_migrate_run_help_lists_the_subcommands_and_a_scenario_still_is_the_default():
    out = subprocess.run([str(BIN / "migrate-run"), "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "recover" in out.stdout and "subcommands" in out.stdout
    bad = subprocess.run([str(BIN / "migrate-run"), "-m", "hostA,hostB", "-i", "/nonexistent",
                          "ping_pong"], capture_output=True, text=True)
    assert bad.returncode == 2 and "nonexistent" in bad.stderr, bad.stderr


def test_recover_by_host_and_name_looks_only_where_each_vm_can_be():
    """Parallel VM tasks' VMs are (host, name): each is resolved on the hosts its last
    records name. hostB/vm0 left for hostC (done); hostA/vm0 was then moving into hostB: the
    vm0 run dir on hostB is hostA/vm0's, never hostB/vm0's."""
    from migrator.config import Config, Inventory
    from migrator.framework.journal import RunEntry
    from migrator.framework.recover import _RunRecovery
    inv = Inventory.model_validate({"hosts": {h: {"address": f"192.0.2.{i}"} for i, h in
                                              enumerate(["hostA", "hostB", "hostC"], 1)}})
    head = {"event": "run", "hosts": {h: e.address for h, e in inv.hosts.items()},
            "driver": "qemu", "run_root": "/run/migrator",
            "inventory": inv.model_dump(mode="json"), "config": Config().model_dump(mode="json")}

    def phase(key, src, dst, p):
        return {"event": "phase", "instance": "tasks", "key": key, "vm": "vm0", "src": src,
                "dst": dst, "phase": p}
    events = [head, {"event": "instance", "instance": "tasks", "per_host": True,
                     "hosts": ["hostA", "hostB", "hostC"]}]
    for h in ("hostA", "hostB"):
        events.append({"event": "vm", "instance": "tasks", "key": f"{h}/vm0", "vm": "vm0",
                       "host": h, "state": "started", "mem_mib": 256})
    events += [phase("hostB/vm0", "hostB", "hostC", p) for p in
               ("PREPARING_DEST", "MIGRATING", "COMPLETED", "CLEANED")]
    events += [phase("hostA/vm0", "hostA", "hostB", p) for p in ("PREPARING_DEST", "MIGRATING")]
    r = _RunRecovery(RunEntry("r1", Path("/nonexistent")), events, Config(), stop=False)
    assert r.per_host == {"tasks"}
    assert r.vm_keys("tasks", True) == {"hostA/vm0": ("vm0", {"hostA", "hostB"}),
                                        "hostB/vm0": ("vm0", {"hostC"})}
    # a migration that rolled back leaves the VM where it was
    events.append(phase("hostA/vm0", "hostA", "hostB", "ROLLED_BACK"))
    assert r.vm_keys("tasks", True)["hostA/vm0"] == ("vm0", {"hostA"})
