"""Parallel VM tasks (DTS's MultipleVM, issue 15): ``ParallelVMTasks`` and YAML task lists.

No lab: every refusal of ``add`` and of a task file (one line, exit 2, nothing connected:
the hosts are unroutable), DTS's ``virt_params`` translated to QEMU's and libvirt's terms,
VM identity (host, name). On the session lab: the example task list over 4 hosts (8 VMs
started in parallel, commands with expects, a migration), and the library API's outcomes
(a mismatch reported while the others finish, fail_fast, a refused migration).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from migrator import ParallelVMTasks
from migrator.cli.run import run_main
from migrator.config import Config, Inventory
from migrator.errors import ConfigError, ScenarioError
from migrator.framework import RunContext
from migrator.framework.env import Env
from migrator.framework.tasklist import load_task_list
from migrator.framework.tasks import TaskResult, TaskResults, virt_settings
from migrator.hypervisor.libvirt import domain_xml
from migrator.hypervisor.qemu import qemu_argv
from migrator.hosts import SSHHost
from migrator.hypervisor.vm import vm_paths
from migrator.lab import processes

from .conftest import running
from .controller import Controller, recover_cli
from .test_framework import migrate_run

HOSTS = ["hostA", "hostB", "hostC", "hostD"]
EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "parallel-tasks.example.yaml"


def unroutable(shared: bool = True) -> Inventory:
    return Inventory.model_validate({
        "hosts": {h: {"address": f"192.0.2.{i + 1}"} for i, h in enumerate(HOSTS)},
        "guest": {"kernel": "/images/vmlinux", "initrd": "/images/initrd.img",
                  "append": "console=ttyS0"},
        **({"shared_dir": "/shared"} if shared else {})})


def tasks(hosts=("hostA", "hostB"), config: Config | None = None, **kw) -> ParallelVMTasks:
    return ParallelVMTasks(list(hosts), context=RunContext(config or Config(), unroutable()),
                           **kw)


CMD = {"commands": ["uname -s"], "expects": ["^Linux$"], "timeouts": [10]}

# (what is added before, the refused task, the one line it gets)
REFUSED = [
    ([], ("stop", {"name": "vm0", "host": "hostA"}), "unknown action 'stop'"),
    ([], ("start", {"name": "vm0", "host": "hostA", "vnc": True}), "unknown key(s) vnc"),
    ([], ("start", {"name": "vm0"}), "say which host: host (a name) or dut_id"),
    ([], ("start", {"name": "vm0", "host": "hostZ"}), "host 'hostZ' is not a host of this run"),
    ([], ("start", {"name": "vm0", "dut_id": 2}), "dut_id 2 is not a host index (0..1"),
    ([], ("start", {"name": "vm0", "dut_id": 1, "host": "hostA"}),
     "host 'hostA' and dut_id 1 (hostB) disagree"),
    ([("start", {"name": "vm0", "host": "hostA"})], ("start", {"name": "vm0", "dut_id": 0}),
     "vm0 is started on hostA already"),
    ([], ("cmd", {"name": "vm0", "host": "hostA", **CMD}),
     "task #1 cmd hostA/vm0: vm0 is never started on hostA (add a start task for it first)"),
    ([("start", {"name": "vm0", "host": "hostA"})],
     ("cmd", {"name": "vm0", "host": "hostA", "commands": ["a", "b", "c"],
              "expects": ["", ""], "timeouts": [1, 2, 3]}),
     '3 commands, 2 expects, 3 timeouts: the lists must be of equal length ("" expects '
     'nothing)'),
    ([("start", {"name": "vm0", "host": "hostA"})],
     ("cmd", {"name": "vm0", "host": "hostA", "commands": ["a"], "expects": ["(x"],
              "timeouts": [1]}), "expect 1 '(x' is not a regular expression"),
    ([("start", {"name": "vm0", "host": "hostA"})],
     ("cmd", {"name": "vm0", "host": "hostA", "commands": ["a"], "expects": [""],
              "timeouts": [0]}), "timeout 1 must be a number of seconds > 0, not 0"),
    ([], ("start", {"name": "vm0", "host": "hostA", "virt_params": {"vnc": [{}]}}),
     "virt_params: unknown section(s) vnc"),
    ([], ("start", {"name": "vm0", "host": "hostA", "virt_params": {"cpu": [{"cores": 2}]}}),
     "virt_params.cpu: unknown key(s) cores"),
    ([], ("start", {"name": "vm0", "host": "hostA", "virt_params": {"mem": [{"size": "lots"}]}}),
     "virt_params.mem.size must be a number, not 'lots'"),
    ([], ("start", {"name": "vm0", "host": "hostA", "virt_params": {"mem": [{"size": 8}]}}),
     "virt_params: mem_mib: Input should be greater than or equal to 32"),
    ([], ("start", {"name": "vm0", "host": "hostA", "virt_config": "/nonexistent.yaml"}),
     "virt_config /nonexistent.yaml: No such file or directory"),
    ([], ("start", {"name": "vm0", "host": "hostA", "virt_params": {}, "virt_config": "x"}),
     "virt_params or virt_config, not both"),
    ([("start", {"name": "vm0", "host": "hostA"}), ("start", {"name": "vm0", "host": "hostB"})],
     ("migration", {"name": "vm0", "host": "hostA", "to": "hostB"}),
     "cannot migrate to hostB: hostB runs a VM named vm0 (hostB/vm0) by then"),
    ([("start", {"name": "vm1", "host": "hostA"})],
     ("migration", {"name": "vm1", "host": "hostA", "to_dut_id": 0}),
     "vm1 is on hostA by then already"),
    ([("start", {"name": "vm1", "host": "hostA"}),
      ("migration", {"name": "vm1", "host": "hostA", "to": "hostB"})],
     ("start", {"name": "vm1", "host": "hostB"}),
     "hostB runs hostA/vm1 there by then; a VM name is unique on its host"),
]


@pytest.mark.parametrize("before, refused, line", REFUSED,
                         ids=[f"{r[0]}-{i}" for i, (_b, r, _l) in enumerate(REFUSED)])
def test_add_refuses_with_one_line_naming_the_task(before, refused, line):
    t = tasks()
    for action, settings in before:
        t.add(action, settings)
    with pytest.raises(ConfigError) as err:
        t.add(*refused)
    assert line in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert str(err.value).startswith(f"task #{len(before) + 1} {refused[0]}")
    assert len(t.results().all()) == len(before)        # nothing of it was added


def test_a_device_is_refused_under_libvirt_and_an_image_needs_shared_storage():
    with pytest.raises(ConfigError, match="not supported by the libvirt driver"):
        tasks(config=Config(driver="libvirt")).add("start", {
            "name": "vm0", "host": "hostA", "virt_params": {"device": [{"driver": "e1000"}]}})
    t = ParallelVMTasks(["hostA"], context=RunContext(Config(), unroutable(shared=False)))
    with pytest.raises(ConfigError, match="has an image but the inventory has no shared_dir"):
        t.add("start", {"name": "vm0", "host": "hostA",
                        "virt_params": {"disk": [{"file": "/images/base.qcow2"}]}})


def test_dts_virt_params_become_qemu_arguments_and_libvirt_xml():
    decl = virt_settings({"qemu": [{"path": "/usr/libexec/qemu-kvm"}],
                          "cpu": [{"model": "Nehalem", "number": 2, "cpupin": "0 1"}],
                          "mem": [{"size": 256, "hugepage": "yes"}],
                          "login": [{"user": "root", "password": "tester"}],
                          "device": [{"driver": "virtio-rng-pci", "opt_max-bytes": 1024}]},
                         None, "qemu", "t")
    assert (decl.qemu, decl.cpu_model, decl.vcpus, decl.cpu_affinity, decl.mem_mib,
            decl.hugepages, decl.login.password) == (
        "/usr/libexec/qemu-kvm", "Nehalem", 2, "0,1", 256, True, "tester")
    env = Env(Config(), unroutable(), "/run/migrator/r1", "/shared/d", per_host=True)
    spec = env.spec("vm0", env.key("vm0", "hostA"), decl)
    argv = qemu_argv(spec, vm_paths("/run/migrator/r1", "vm0"))
    assert argv[0] == "/usr/libexec/qemu-kvm"
    assert argv[argv.index("-cpu") + 1] == "Nehalem" and argv[argv.index("-smp") + 1] == "2"
    assert "memory-backend-file,id=mem0,size=256M,mem-path=/dev/hugepages,prealloc=on," \
           "share=off" in argv and "memory-backend=mem0" in argv
    assert argv[argv.index("-device", argv.index("-daemonize")) + 1] == \
        "virtio-rng-pci,max-bytes=1024"
    xml = ET.fromstring(domain_xml(spec.__class__(**{**spec.__dict__, "extra_args": ()}),
                                   vm_paths("/run/migrator/r1", "vm0")))
    assert xml.find("vcpu").get("cpuset") == "0,1" and xml.find("vcpu").text == "2"
    assert xml.find("memoryBacking/hugepages") is not None
    assert xml.find("cpu/model").text == "Nehalem"
    assert xml.find("devices/emulator").text == "/usr/libexec/qemu-kvm"


def test_vm_identity_is_host_and_name():
    config = Config.load(None, {"vms.vm0.mac": "auto", "vms.vm0.image": "/images/base.qcow2"})
    env = Env(config, unroutable(), "/run/migrator/r1", "/shared/migrator-runs/r1/tasks",
              per_host=True)
    a, b = (env.spec("vm0", env.key("vm0", h)) for h in ("hostA", "hostB"))
    assert a.name == b.name == "vm0"                      # run dir and domain: per host
    assert a.mac != b.mac and a.disk != b.disk            # the run's pool and shared storage
    assert a.disk == "/shared/migrator-runs/r1/tasks/hostA/vm0.qcow2"
    # without per_host (MultihostMigration) a name is the identity, as it always was
    plain = Env(config, unroutable(), "/run/migrator/r1", "/shared/migrator-runs/r1/main")
    assert plain.key("vm0", "hostA") == "vm0"
    assert plain.spec("vm0").disk == "/shared/migrator-runs/r1/main/vm0.qcow2"
    # a name is unique on its host: a second VM of that name there is refused, naming both
    env.place("hostB", "vm0", "hostB/vm0")
    with pytest.raises(ScenarioError) as err:
        env.place("hostB", "vm0", "hostA/vm0")
    assert str(err.value) == (
        "hostA/vm0: hostB already runs a VM named vm0 (hostB/vm0); a VM name is unique on "
        "its host (its run dir /run/migrator/r1/vm0, its libvirt domain vm0)")
    env.unplace("hostB", "vm0", "hostB/vm0")
    env.place("hostB", "vm0", "hostA/vm0")                # free again: a migration lands


def test_results_by_host_vm_action_status_and_dts_shape():
    rs = [TaskResult(1, "start", "hostA", "vm0", "passed"),
          TaskResult(2, "cmd", "hostA", "vm0", "failed", error="hostA/vm0 cmd #1 'x': ..."),
          TaskResult(3, "cmd", "hostA", "vm0", "skipped"),
          TaskResult(4, "start", "hostB", "vm0", "passed")]
    results = TaskResults(rs)
    assert not results.ok and list(results) == ["hostA", "hostB"]
    assert [t.index for t in results["hostA"]["vm0"]["cmd"]] == [2, 3]
    assert {k: [t.index for t in v] for k, v in results.by_status().items()} == {
        "passed": [1, 4], "failed": [2], "skipped": [3]}
    assert [e["status"] for e in results.by_dut()["hostA"]] == ["passed", "failed", "skipped"]
    assert "hostA/vm0 cmd #1 'x'" in results.table()


# -- task files: refused before anything starts -------------------------------------------------

def write_inventory(tmp_path: Path) -> Path:
    path = tmp_path / "inv.yaml"
    path.write_text("hosts:\n" + "".join(f"  {h}: {{address: 192.0.2.{i + 1}}}\n"
                                         for i, h in enumerate(HOSTS))
                    + "guest: {kernel: /k, initrd: /i, append: console=ttyS0}\n")
    return path


BAD_FILES = [
    ("tasks: {start: 1}", "'tasks' must be a non-empty list"),
    ("tasks: [{start: {name: vm0, host: all}}]\nmax_vms: 2", "unknown key(s) max_vms"),
    ("tasks: [{start: {name: vm0, host: hostZ}}]", "tasks[1]: task #1 start: host 'hostZ' is "
                                                   "not a host of this run (hostA, hostB)"),
    ("tasks: [{start: {name: vm0, host: all}}, {start: {name: vm0, dut_id: 1}}]",
     "tasks[2]: task #3 start hostB/vm0: vm0 is started on hostB already"),
    ("tasks: [{start: {name: vm0, host: all}},\n"
     "        {cmd: {name: vm1, host: hostA, commands: [a], expects: [''], timeouts: [1]}}]",
     "tasks[2]: task #3 cmd hostA/vm1: vm1 is never started on hostA"),
    ("tasks: [{start: {name: vm0, host: all}},\n"
     "        {cmd: {name: vm0, host: all, commands: [a, b], expects: [''], timeouts: [1, 1]}}]",
     "tasks[2]: task #3 cmd hostA/vm0: 2 commands, 1 expects, 2 timeouts"),
    ("tasks: [{start: {name: vm0, host: hostA, virt_config: missing.yaml}}]",
     "virt_config {dir}/missing.yaml: No such file or directory"),
    ("tasks: [{start: {name: vm0, host: all}}, {migration: {name: vm0, host: hostA, to: hostB}}]",
     "cannot migrate to hostB: hostB runs a VM named vm0 (hostB/vm0) by then"),
    ("tasks: [{reboot: {name: vm0, host: hostA}}]", "unknown action 'reboot'"),
    ("tasks: [", "is not YAML"),
]


def assert_refused_in_one_line(tmp_path, capsys, name: str, text: str, line: str) -> None:
    """``migrate-run FILE`` with ``text`` in FILE: exit 2, one line holding ``line``
    (``{dir}``: tmp_path), nothing started."""
    f = tmp_path / name
    f.write_text(text + "\n")
    state = tmp_path / "state"
    rc = run_main(["-m", "hostA,hostB", "-i", str(write_inventory(tmp_path)), "-o",
                   str(tmp_path / "results"), "-p", f"journal.state_dir={state}", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert line.format(dir=tmp_path) in err and err.startswith(f"migrate-run: error: {f}"), err
    assert not (tmp_path / "results").exists() and not state.exists()   # nothing started


@pytest.mark.parametrize("text, line", BAD_FILES, ids=[b[1][:30] for b in BAD_FILES])
def test_a_bad_task_file_is_one_line_and_exit_2(tmp_path, capsys, text, line):
    assert_refused_in_one_line(tmp_path, capsys, "tasks.yaml", text, line)


def test_the_example_task_list_loads_as_dts_would_run_it():
    ctx = RunContext(Config(), unroutable())
    t = load_task_list(EXAMPLE, HOSTS, ctx)
    starts = [(r.host, r.vm) for r in t.results().all() if r.action == "start"]
    assert starts[:8] == [(h, v) for h in HOSTS for v in ("vm0", "vm1")]
    assert [(r.action, r.to) for r in t.results().all()][-2:] == [("migration", "hostB"),
                                                                  ("cmd", None)]


# -- on the session lab ---------------------------------------------------------------------------

async def test_the_example_task_list_starts_8_vms_in_parallel_on_4_hosts(inventory, tmp_path,
                                                                          no_leaks):
    rc, out, err = await migrate_run(inventory, tmp_path, "-m", ",".join(HOSTS), str(EXAMPLE))
    assert rc == 0, out + err
    (run_dir,) = list(tmp_path.iterdir())
    records = json.loads((run_dir / "tasks.json").read_text())
    assert all(r["status"] == "passed" for r in records), out
    starts = [r for r in records if r["action"] == "start"]
    assert [(r["host"], r["vm"]) for r in starts] == \
        [(h, v) for h in HOSTS for v in ("vm0", "vm1")] + [("hostA", "vm2")]
    # parallel: every one of the 8 began before any of them had its shell answering
    first8 = starts[:8]
    assert max(r["started_s"] for r in first8) < \
        min(r["started_s"] + r["duration_s"] for r in first8), first8
    assert all(r["cpu_s"] > 0 for r in starts)
    cmds = [r for r in records if r["action"] == "cmd"]
    assert all(c["status"] == "passed" for r in cmds for c in r["commands"])
    boot_ids = {r["commands"][1]["stdout"].strip() for r in cmds[:8]}
    assert len(boot_ids) == 8                                     # 8 distinct guests
    assert cmds[-1]["host"] == "hostA" and cmds[-1]["commands"][0]["stdout"] == "42\n"
    (mig,) = json.loads((run_dir / "run.json").read_text())["migrations"]
    assert (mig["vm"], mig["src"], mig["dst"], mig["status"]) == ("vm2", "hostA", "hostB",
                                                                  "completed")
    journal = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    keys = {e["key"] for e in journal if e.get("event") == "vm" and e["state"] == "started"}
    assert keys == {f"{h}/{v}" for h in HOSTS for v in ("vm0", "vm1")} | {"hostA/vm2"}
    assert {e.get("key") for e in journal if e.get("event") == "phase"} == {"hostA/vm2"}
    junit = ET.parse(run_dir / "junit.xml").getroot()
    assert junit.find("testsuite").get("tests") == str(len(records) + 2)   # + migration, run
    assert "#20 cmd hostA/vm2" in out and "verdict: PASSED" in out


async def test_outcomes_a_mismatch_fail_fast_and_a_refused_migration(inventory, no_leaks,
                                                                     tmp_path):
    # (vm1's migration at 1 MiB/s: 128 MiB cannot move before fail_fast stops it)
    config = Config.load(None, {"journal.state_dir": str(tmp_path / "state"),
                                "migration.bandwidth_mibs": "1"})
    ctx = RunContext(config, inventory)
    async with ParallelVMTasks(["hostA", "hostB"], context=ctx) as t:
        for dut in (0, 1):
            t.add("start", {"name": "vm0", "dut_id": dut})
        t.add("start", {"name": "vm1", "host": "hostA"})
        bad = t.add("cmd", {"name": "vm0", "host": "hostA", "commands": ["echo one", "true"],
                            "expects": ["^two$", ""], "timeouts": [10, 10]})
        after = t.add("cmd", {"name": "vm0", "host": "hostA", **CMD})
        good = t.add("cmd", {"name": "vm0", "host": "hostB", "commands": ["echo one"],
                             "expects": ["^one$"], "timeouts": [10]})
        results = await t.run()
        assert results["hostB"]["vm0"]["start"][0].passed and good.passed
        assert bad.status == "failed" and [c.status for c in bad.commands] == \
            ["mismatch", "skipped"]
        assert bad.error == ("hostA/vm0 cmd #1 'echo one': /^two$/ not in its output (exit 0, "
                             "last line 'one')")
        assert after.status == "skipped" and "#4 cmd hostA/vm0 failed" in after.error
        # a second vm0 on hostB is refused before anything moves
        with pytest.raises(ConfigError, match="hostB runs a VM named vm0"):
            t.add("migration", {"name": "vm0", "host": "hostA", "to": "hostB"})
        # fail_fast: hostA's failure stops hostB's long command (interrupted in the guest)
        # and vm1's migration (rolled back, saying why), and what comes after is skipped
        t.fail_fast = True
        moving = t.add("migration", {"name": "vm1", "host": "hostA", "to": "hostB"})
        fails = t.add("cmd", {"name": "vm0", "host": "hostA", "commands": ["sleep 3; exit 3"],
                              "expects": [""], "timeouts": [10]})
        long = t.add("cmd", {"name": "vm0", "host": "hostB",
                             "commands": ["sleep 1; echo ready; sleep 60"], "expects": [""],
                             "timeouts": [90]})
        later = t.add("cmd", {"name": "vm0", "host": "hostB", **CMD})
        await t.run()
        assert fails.status == "failed" and "exit status 3" in fails.error
        assert long.status == "cancelled" and "fail_fast: #8 cmd hostA/vm0" in long.error
        assert moving.status == "cancelled" and "fail_fast: #8" in moving.error, moving.error
        (rec,) = [m for m in ctx.migrations if m.vm == "vm1"]
        assert rec.status == "cancelled" and re.search(
            r"^vm1 hostA->hostB \[\w+\]: interrupted: fail_fast: #8 cmd hostA/vm0 did not "
            r"pass first; VM running on hostA", rec.error), rec.error
        assert later.status == "skipped" and "fail_fast" in later.error
        # the guest's console is free again: its sleep was interrupted
        r = await t.guest("hostB", "vm0").run("ps | grep -v grep | grep -c 'sleep 60' || true",
                                              timeout=10)
        assert r.stdout.strip() == "0", r
    assert ctx.instances[0].status == "failed" and "tasks did not pass" in ctx.instances[0].error


async def test_an_interrupted_preparation_does_not_wait_for_a_slow_versions_probe(
        inventory, tmp_path, no_leaks):
    """The hosts' versions (the report's) are probed beside the preparation, bounded by
    host_cleanup_s. A run interrupted meanwhile stops that probe (its command killed on the
    host) instead of waiting out a slow host: here hostA's QEMU takes for ever to say its
    version and host_cleanup_s is 300 s. It waited for it, shielded."""
    mark = inventory.shared_dir / f"slow-qemu-{os.getpid()}.called"
    slow = inventory.shared_dir / f"slow-qemu-{os.getpid()}"
    slow.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then : > {mark}; exec sleep 600; "
                    "fi\nexec qemu-system-x86_64 \"$@\"\n")
    slow.chmod(0o755)
    data = inventory.model_dump(mode="json")
    data["hosts"]["hostA"]["qemu"] = str(slow)
    config = Config.load(None, {"journal.state_dir": str(tmp_path / "state"),
                                "timeouts.host_cleanup_s": "300"})
    try:
        t = ParallelVMTasks(["hostA", "hostB"],
                            context=RunContext(config, Inventory.model_validate(data)))
        t.add("start", {"name": "vm0", "host": "hostB"})
        async with running(t.run()) as task:
            async with asyncio.timeout(60):
                while not mark.exists():            # the probe is asking hostA's QEMU
                    await asyncio.sleep(0.05)
            task.cancel()
            async with asyncio.timeout(60):         # (not host_cleanup_s)
                await asyncio.wait([task])
        assert task.cancelled()
        await t.close()
        async with SSHHost.from_inventory("hostA", inventory) as h:
            left = await h.run("pgrep -x -f 'sleep 600'")
        assert left.stdout == "", left.stdout          # the probe's command ended with it
    finally:
        slow.unlink()
        mark.unlink(missing_ok=True)


async def test_a_run_interrupted_mid_command_leaves_no_command_running(inventory, tmp_path,
                                                                        no_leaks):
    """Ctrl-C (the run's task cancelled) while a guest command runs: the task and its
    command both say cancelled. The command stayed 'running' in the results (and so in
    tasks.json), a status that is no outcome."""
    config = Config.load(None, {"journal.state_dir": str(tmp_path / "state")})
    async with ParallelVMTasks(["hostA"], context=RunContext(config, inventory)) as t:
        t.add("start", {"name": "vm0", "host": "hostA"})
        long = t.add("cmd", {"name": "vm0", "host": "hostA", "commands": ["sleep 60"],
                             "expects": [""], "timeouts": [90]})
        async with running(t.run()) as task:
            async with asyncio.timeout(120):
                while long.commands[0].status != "running":
                    await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.wait([task])
        assert task.cancelled()
        assert long.status == "cancelled" and "run interrupted" in long.error, long
        assert long.commands[0].status == "cancelled", long.commands[0]


CRASH_LIST = """
tasks:
  - start: {name: vm0, host: all}
  - start: {name: vm1, host: hostA}
  - migration: {name: vm1, host: hostA, to: hostB}
"""


async def test_a_killed_task_list_is_recovered_vm_by_host_and_name(lab, inventory, tmp_path,
                                                                    no_leaks):
    """SIGKILL while hostA/vm1 migrates to hostB, next to a vm0 on each host: recover keeps
    each of the three VMs once, where it belongs (by name alone, vm0 would be one VM with
    two copies: UNRESOLVED)."""
    tasks = tmp_path / "crash.yaml"
    tasks.write_text(CRASH_LIST)
    ctl = Controller(tmp_path, inventory.source, "qemu",
                     ["-p", "migration.bandwidth_mibs=1", "-p",
                      "journal.stop_after=phase:MIGRATING"], scenario=tasks)
    await ctl.killed_at_stop_point()
    run_id = ctl.run_id()
    assert ctl.journal()[-1]["key"] == "hostA/vm1"
    rc, out, err = await recover_cli(ctl, run_id)
    assert rc == 0 and "UNRESOLVED" not in out, out + err
    for key, host in (("hostA/vm0", "hostA"), ("hostB/vm0", "hostB"), ("hostA/vm1", "hostA")):
        assert f"{run_id}  {key}  resolved  {host}  running" in out, out
    assert "migration from hostA cancelled" in out
    assert sorted(p.host for p in processes.vm_processes(lab, "vm0")) == ["hostA", "hostB"]
    assert [p.host for p in processes.vm_processes(lab, "vm1")] == ["hostA"]
    rc, out, err = await recover_cli(ctl, "--stop", run_id)
    assert rc == 0 and out.count("(--stop)") == 3, out + err
