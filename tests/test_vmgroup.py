"""VM groups (LAVA's vm_group, issue 15): job files run by ``migrate-run JOB.yaml -m HOSTS``.

No lab: every bad job is one line, exit 2, before anything starts. On the session lab: the
example job (host + server + 2 clients, the multinode API VM<->VM and VM<->host, wait-vms, a
live migration inside the job, the host's second shell after the VMs closed) next to a job
whose host shell starts its VM itself (auto_start_vms: false, host -> VM), at once on
disjoint hosts.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from .test_framework import migrate_run
from .test_tasks import assert_refused_in_one_line

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "vm-group.example.yaml"

GOOD = """
vm_group:
  host: {role: host}
  vms: [{role: server}, {role: client, count: 2}]
actions:
  - test_shell: {role: host, commands: [wait-vms]}
"""

BAD_JOBS = [
    ("vm_group: {vms: [{role: server}]}\nactions: [{test_shell: {commands: [a]}}]",
     "a job needs vm_group.host.role: the host the VMs run on"),
    (GOOD.replace("count: 2", "count: 0"),
     "vm_group.vms.1.count: Input should be greater than or equal to 1"),
    (GOOD.replace("{role: server}", "{role: client}"),
     "two members are named client-1"),
    (GOOD + "  - test_shell: {role: db, commands: [a]}", "actions[2]: unknown role 'db'"),
    (GOOD + "  - migrate: {role: server, to: hostZ}",
     "actions[2]: migrate to 'hostZ', not a host of -m (hostA, hostB)"),
    (GOOD + "  - migrate: {role: host, to: hostB}", "actions[2]: unknown VM role 'host'"),
    (GOOD + "  - test_shell: {role: server, script: nothere.sh}",
     "actions[2]: script {dir}/nothere.sh: No such file or directory"),
    (GOOD + "  - test_shell: {role: server, commands: [a], script: x.sh}",
     "actions[2]: test_shell takes commands or script (one)"),
    (GOOD + "  - reboot: {role: server}", "actions[2]: unknown action 'reboot'"),
    (GOOD.replace("{role: server}", "{role: server, colour: red}"),
     "vm_group.vms.0.colour: Extra inputs are not permitted"),
    (GOOD.replace("vm_group:", "vm_group:\n  auto_start_vms: false").replace(
        "  - test_shell: {role: host, commands: [wait-vms]}",
        "  - test_shell: {role: server, commands: [a]}"),
     "auto_start_vms is false and the host has no test_shell to run start-vms"),
    ("hosts: [a]", "a YAML file is a task list (top-level 'tasks') or a VM group job "
                   "('vm_group'); it has: hosts"),
]


@pytest.mark.parametrize("text, line", BAD_JOBS, ids=[b[1][:40] for b in BAD_JOBS])
def test_a_bad_job_is_one_line_and_exit_2(tmp_path, capsys, text, line):
    assert_refused_in_one_line(tmp_path, capsys, "job.yaml", text, line)


HOST_STARTS = """
job_name: host starts its VM
timeout: 240
vm_group:
  host: {role: host}
  auto_start_vms: false
  vms: [{role: worker, launch_with: ['test "$MIGRATE_VM" = worker-1']}]
actions:
  - test_shell:
      role: host
      commands: [start-vms, start-vms, "migrate-sync wait worker.ready",
                 "migrate-vm worker-1 hostD", "migrate-vm worker-1 hostD",
                 "migrate-sync send go=now", wait-vms]
  - test_shell:
      role: worker
      commands: ["migrate-sync send worker.ready=1", "migrate-sync wait go"]
  - test_shell: {role: worker, commands: ["migrate-sync wait nobody-sends-this"], timeout: 3}
  - test_shell: {role: host, commands: ["! wait-vms"]}
"""


async def test_vm_group_jobs_both_start_modes_multinode_and_a_migration(inventory, tmp_path,
                                                                        no_leaks):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    job_b = tmp_path / "host-starts.yaml"
    job_b.write_text(HOST_STARTS)
    (rc_a, out_a, err_a), (rc_b, out_b, err_b) = await asyncio.gather(
        migrate_run(inventory, tmp_path / "a", "-m", "hostA,hostB", str(EXAMPLE)),
        migrate_run(inventory, tmp_path / "b", "-m", "hostC,hostD", str(job_b)))
    # (a) the example: everything passes
    assert rc_a == 0, out_a + err_a
    (run_a,) = list((tmp_path / "a").iterdir())
    tasks = json.loads((run_a / "tasks.json").read_text())
    assert all(t["status"] == "passed" for t in tasks), out_a
    shells = [t for t in tasks if t["action"] in ("cmd", "test_shell")]
    host1, host2 = [t for t in shells if t["vm"] == "host"]
    server_last = [t for t in shells if t["vm"] == "server-1"][-1]
    assert re.fullmatch(r"[0-9a-f-]{36}\n", host1["commands"][0]["stdout"])  # its boot id
    assert server_last["commands"][2]["status"] == "passed"       # its /tmp came along
    (mig,) = json.loads((run_a / "run.json").read_text())["migrations"]
    assert (mig["vm"], mig["src"], mig["dst"], mig["status"]) == ("server-1", "hostA",
                                                                  "hostB", "completed")
    # the host's second shell began after the VMs closed; its first waited for the VMs
    closed = out_a.index("VMs closed")
    assert out_a.index("hostA/host shell #2") > closed > out_a.index("hostA/host shell #1")
    assert host2["started_s"] > max(t["started_s"] + t["duration_s"] for t in shells
                                    if t["vm"] != "host")
    # (b) the host started its VM (a second start-vms is a no-op), migrated it (a second
    # migrate-vm to where it is is refused, naming why), host -> VM worked, and
    # the worker's wait for a key nobody sends was interrupted at its 3 s; so wait-vms in
    # the first host shell failed naming it, and the second shell saw it fail too
    assert rc_b == 1, out_b + err_b
    (run_b,) = list((tmp_path / "b").iterdir())
    tb = json.loads((run_b / "tasks.json").read_text())
    start, worker, worker2, moved, h1, h2 = tb
    assert start["status"] == "passed" and start["host"] == "hostC"
    # the worker's wait for "go" was in flight across its migration: answered on hostD
    assert [c["status"] for c in worker["commands"]] == ["passed", "passed"]
    assert [c["status"] for c in worker2["commands"]] == ["timed_out"]
    assert (moved["action"], moved["to"], moved["status"]) == ("migration", "hostD", "passed")
    assert [c["status"] for c in h1["commands"]] == \
        ["passed", "passed", "passed", "passed", "failed", "passed", "failed"]
    assert "migrate-vm: task #5 migration hostC/worker-1: worker-1 runs on hostD already" \
        in h1["commands"][4]["stderr"]                     # the second one: refused, named
    assert ("wait-vms: failed: hostC/worker-1 (now on hostD) cmd #1 'migrate-sync wait "
            "nobody-sends-this'") in h1["commands"][6]["stderr"]
    (mig,) = json.loads((run_b / "run.json").read_text())["migrations"]
    assert (mig["vm"], mig["src"], mig["dst"]) == ("worker-1", "hostC", "hostD")
    assert h2["status"] == "passed"
