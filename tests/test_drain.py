"""VMs that outlive a run and host drain (issue 18, parts 3 and 4): ``migrate-run vm
start|list|stop``, ``migrate-run drain HOST`` placing by the inventory's capacity (plan
first, bad input refused before anything starts, a VM without room left and named, the exit
status saying whether the host is empty), a drain whose controller dies finished by
``recover`` without stopping any VM, and ``migrate-run status`` / ``cancel`` from another
terminal against a live drain.

Every drained VM here is a real libvirt domain on the session lab: two kinds, migrator's own
(``vm start``) and one defined with ``virsh`` and a pty console (an operator's domain that
migrator never started). Memory is checked with the lab guest's ``memsum``.
"""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import BIN
from .controller import Controller, recover_cli
from migrator.config import Config, HostCapacity, VMSettings
from migrator.framework.fleet import Fleet, fleet_env, fleet_run_dir, start_vm
from migrator.framework.journal import list_runs, read_journal
from migrator.hosts import SSHHost, quote
from migrator.hypervisor.libvirt import LibvirtVM, domain_xml
from migrator.hypervisor.vm import vm_paths
from migrator.lab import processes


@dataclass
class Setup:
    """An inventory with capacities and a state dir of the test's own."""

    inventory_path: Path
    state: Path
    config: Config
    inventory: object
    tmp: Path

    @property
    def args(self) -> list[str]:
        return ["-i", str(self.inventory_path), "-p", f"journal.state_dir={self.state}"]

    def with_capacity(self, **hosts: tuple[float, int] | None) -> None:
        """Declare ``hostB=(cpus, mem_mib)``...; None removes it."""
        for name, cap in hosts.items():
            entry = self.inventory.hosts[name]
            self.inventory.hosts[name] = entry.model_copy(update={
                "capacity": HostCapacity(cpus=cap[0], mem_mib=cap[1]) if cap else None})
        self.inventory.dump(self.inventory_path)


async def mr(*args: str, timeout: float = 300) -> tuple[int, str, str]:
    """``migrate-run ARGS`` as a process: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def domains(inventory, host: str) -> list[str]:
    async with SSHHost.from_inventory(host, inventory) as h:
        return (await h.run("virsh -q list --name", check=True)).stdout.split()


async def where(inventory, name: str) -> list[str]:
    return [h for h in ("hostA", "hostB", "hostC", "hostD")
            if name in await domains(inventory, h)]


async def start_foreign(setup: Setup, name: str, host: str) -> None:
    """A domain defined and started with virsh, console on a pty: not migrator's."""
    spec = fleet_env(setup.config, setup.inventory).spec(name, decl=VMSettings())
    root = ET.fromstring(domain_xml(spec, vm_paths("/nonexistent", name)))
    devices = root.find("devices")
    for serial in devices.findall("serial"):
        devices.remove(serial)
    ET.SubElement(devices, "serial", type="pty")
    xml = ET.tostring(root, encoding="unicode")
    async with SSHHost.from_inventory(host, setup.inventory) as h:
        await h.run(f"cat > /tmp/{name}.xml && virsh -q define /tmp/{name}.xml && "
                    f"virsh -q start {name}; rm -f /tmp/{name}.xml", stdin=xml, check=True)


async def memsum(setup: Setup, name: str, host: str, command: str) -> str:
    """``memsum COMMAND`` in fleet VM ``name`` on ``host``, over its serial console."""
    async with SSHHost.from_inventory(host, setup.inventory) as h:
        vm = LibvirtVM(fleet_env(setup.config, setup.inventory).spec(name, decl=VMSettings()),
                       h, fleet_run_dir(setup.inventory), setup.config)
        try:
            session = await vm.wait_for_login(60)
            return (await session.cmd(f"memsum {command}", timeout=120)).strip()
        finally:
            vm._close_session()
            await vm.close()


@pytest.fixture
async def setup(no_leaks, lab, inventory, tmp_path):
    """The test's inventory (capacities declared per test) and state dir; afterwards every
    domain on the lab's hosts is removed (a failed test's too), before no_leaks looks."""
    state = tmp_path / "state"
    inv = inventory.model_copy(deep=True)
    s = Setup(tmp_path / "inventory.yaml", state,
              Config.load(None, {"journal.state_dir": str(state)}), inv, tmp_path)
    inv.dump(s.inventory_path)
    yield s
    for name in ("hostA", "hostB", "hostC", "hostD"):
        async with SSHHost.from_inventory(name, inventory) as h:
            await h.run("for d in $(virsh -q list --all --name); do virsh -q destroy $d; "
                        "virsh -q undefine $d; done; "
                        f"rm -rf {quote(fleet_run_dir(inventory))}; true")
    async with SSHHost.from_inventory("hostA", inventory) as h:
        await h.run(f"rm -rf {quote(str(inventory.shared_dir))}/migrator-vms")


async def test_vm_start_list_stop_and_a_drain_plan(setup, lab):
    """vm start/list/stop through the CLI; every domain is listed (migrator's and not);
    bad input of vm and drain gets one line and exit 2 before anything starts; --dry-run
    prints the plan, placing the largest first where the most room stays and naming the VM
    no target has room for (exit 1: the host would not be empty)."""
    rc, out, err = await mr("vm", "start", "web1", "-H", "hostA", "--mem", "160",
                            *setup.args)
    assert rc == 0 and "web1 runs on hostA (160 MiB, 1 vCPU)" in out, out + err
    await start_foreign(setup, "ext1", "hostA")
    rc, out, err = await mr("vm", "list", "-m", "hostA,hostB", *setup.args)
    rows = [line.split() for line in out.splitlines()[1:]]
    assert rc == 0 and ["hostA", "ext1", "running", "128", "1", "-"] in rows \
        and ["hostA", "web1", "running", "160", "1", "migrator"] in rows, out + err
    assert Fleet(setup.config).get("web1").host == "hostA"

    bad = [(["vm", "start", "web1", "-H", "hostB"], "exists already"),
           (["vm", "start", "web2", "-H", "hostZ"], "hostZ"),
           (["vm", "start", "vms", "-H", "hostB"], "VM name"),
           (["vm", "stop", "nope"], "no VM nope started by migrator"),
           (["drain", "hostA", "--to", "hostA,hostB"], "hostA is the host being drained"),
           (["drain", "hostA", "--to", "hostZ"], "hostZ"),
           (["drain", "hostA", "--max-parallel", "0"], "--max-parallel 0"),
           (["drain", "hostA", "-p", "queue.per_source=0"], "per_source"),
           (["drain", "hostA", "-p", "driver=qemu"], "its driver is libvirt"),
           (["drain", "hostA", "-p", "migration.storage=copy-all"], "disks are on shared"),
           (["drain", "hostA"], "no capacity declared for hostB, hostC, hostD")]
    for args, says in bad:
        rc, out, err = await mr(*args, *setup.args)
        assert rc == 2 and says in err and len(err.strip().splitlines()) == 1, (args, out, err)
    assert list_runs(setup.state) == [] and await where(setup.inventory, "web2") == []

    # hostB has room for one of them, hostC for none (160 + 128 MiB to place)
    setup.with_capacity(hostB=(2, 250), hostC=(2, 100))
    rc, out, err = await mr("drain", "hostA", "--to", "hostB,hostC", "--dry-run",
                            *setup.args)
    assert rc == 1, out + err
    plan = {line.split()[0]: line for line in out.splitlines()
            if line.split()[:1] in (["web1"], ["ext1"])}
    assert plan["web1"].split()[:4] == ["web1", "160", "1", "hostB"], out
    assert plan["ext1"].split()[:4] == ["ext1", "128", "1", "-"] \
        and "no target has room for 128 MiB" in plan["ext1"], out
    assert "room before (free vCPUs / MiB): hostB 2 / 250; hostC 2 / 100" in out, out
    assert list_runs(setup.state) == []
    assert sorted(await domains(setup.inventory, "hostA")) == ["ext1", "web1"]

    rc, out, err = await mr("vm", "stop", "web1", *setup.args)
    assert rc == 0 and "web1: stopped on hostA" in out, out + err
    assert Fleet(setup.config).get("web1") is None
    assert await domains(setup.inventory, "hostA") == ["ext1"]


async def test_drain_moves_every_vm_and_the_host_ends_empty(setup, lab):
    """Three domains on hostA (two of migrator's, memory patterns written, one operator's
    with a pty console) drain to hostB and hostC two at a time: exit 0, each runs on
    exactly one target with its memory intact, the records follow them, and the run's
    results hold a completed record for each."""
    await asyncio.gather(*(start_vm(setup.config, setup.inventory, n, "hostA", VMSettings())
                           for n in ("web1", "web2")), start_foreign(setup, "ext1", "hostA"))
    for n in ("web1", "web2"):
        assert "MEMSUM wrote" in await memsum(setup, n, "hostA", "write 16 5")
    setup.with_capacity(hostB=(2, 300), hostC=(4, 300))
    results = setup.tmp / "results"
    rc, out, err = await mr("drain", "hostA", "--to", "hostB,hostC", "--max-parallel", "2",
                            "-o", str(results), *setup.args)
    assert rc == 0 and "3 of 3 moved" in out and "the host is empty" in out, out + err
    assert await domains(setup.inventory, "hostA") == []
    placed = {}
    for n in ("web1", "web2", "ext1"):
        hosts = await where(setup.inventory, n)
        assert len(hosts) == 1 and hosts[0] in ("hostB", "hostC"), (n, hosts, out)
        placed[n] = hosts[0]
    # equal sizes: by name, each where the most memory stays free (ties: --to's order)
    assert placed == {"ext1": "hostB", "web1": "hostC", "web2": "hostB"}, out
    for n in ("web1", "web2"):
        assert Fleet(setup.config).get(n).host == placed[n]
        verified = await memsum(setup, n, placed[n], "verify")
        assert "ok=1" in verified and "bad_pages=0" in verified, verified
    (run_dir,) = results.iterdir()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["verdict"] == "passed" and sorted(
        (m["vm"], m["dst"], m["status"]) for m in run["migrations"]) == sorted(
        (n, placed[n], "completed") for n in placed), run["migrations"]
    assert list_runs(setup.state) == []
    rc, out, err = await mr("vm", "stop", "web1", "web2", *setup.args)
    assert rc == 0, out + err


def drain_process(setup: Setup, *args: str) -> Controller:
    """``migrate-run drain ARGS`` as a child process in a session of its own."""
    ctl = Controller(setup.tmp, setup.inventory_path, "libvirt", [])
    ctl.argv = [str(BIN / "migrate-run"), "drain", *args, "-o", str(ctl.results),
                *setup.args]
    ctl.state = setup.state
    return ctl


async def test_a_drain_whose_controller_dies_is_finished_by_recover(setup, lab):
    """SIGKILL of the drain's controller while web1 migrates: recover rolls the migration
    back (or finishes it), leaves web1 running on exactly one host with its memory intact,
    stops nothing (the VM is not the run's), and leaves nothing of the run."""
    await start_vm(setup.config, setup.inventory, "web1", "hostA", VMSettings())
    assert "MEMSUM wrote" in await memsum(setup, "web1", "hostA", "write 32 9")
    setup.with_capacity(hostB=(2, 300))
    ctl = drain_process(setup, "hostA", "--to", "hostB", "-p", "migration.bandwidth_mibs=1")
    try:
        await ctl.start()
        await ctl.wait_for(lambda r: r.get("event") == "phase" and r["phase"] == "MIGRATING")
        await ctl.kill()
    finally:
        await ctl.stop()
    (entry,) = list_runs(setup.state)
    rc, out, err = await recover_cli(ctl, entry.run_id)
    assert rc == 0 and "left running on hostA (not the run's: drained)" in out, out + err
    assert await where(setup.inventory, "web1") == ["hostA"]
    assert [p.host for p in processes.vm_processes(lab, "web1")] == ["hostA"]
    verified = await memsum(setup, "web1", "hostA", "verify")
    assert "ok=1" in verified and "bad_pages=0" in verified, verified
    assert list_runs(setup.state) == [], "a drain's recovered run keeps nothing"
    events = read_journal(entry.journal_path)
    assert events[-1]["event"] == "recovered" and events[-1]["kept"] == []
    rc, out, err = await mr("vm", "stop", "web1", *setup.args)
    assert rc == 0, out + err


async def status(setup: Setup) -> list[dict]:
    rc, out, err = await mr("status", "--json", "-p", f"journal.state_dir={setup.state}")
    assert rc == 0, out + err
    return json.loads(out)


async def wait_status(setup: Setup, ctl: Controller, match, timeout: float = 120) -> dict:
    """The live run's status once ``match(migrations by id)`` holds."""
    async with asyncio.timeout(timeout):
        while True:
            assert ctl.proc.returncode is None, ctl._ended("the status awaited")
            answers = await status(setup)
            if answers and "migrations" in answers[0]:
                by_id = {m["mig_id"]: m for m in answers[0]["migrations"]}
                if match(by_id):
                    return answers[0]
            await asyncio.sleep(0.2)


async def test_status_and_cancel_from_another_terminal(setup, lab):
    """A drain of three VMs one at a time, watched and steered from outside: status shows
    the first migrating (bytes sent) and the others QUEUED behind hostA's limit; cancelling
    the third ends it without starting (it stays on hostA); an unknown id is refused with
    what is in flight; the first completes; cancelling the run's id then rolls the second
    back and ends the drain (exit 130), every VM on exactly one host."""
    await asyncio.gather(*(start_vm(setup.config, setup.inventory, n, "hostA", VMSettings())
                           for n in ("web1", "web2", "web3")))
    for n in ("web1", "web2", "web3"):
        assert "MEMSUM wrote" in await memsum(setup, n, "hostA", "write 24 3")
    setup.with_capacity(hostB=(4, 500))
    # 4 MiB/s: each VM's ~40 MiB take ~10 s, the window for status and each cancel
    ctl = drain_process(setup, "hostA", "--max-parallel", "1", "--to", "hostB",
                        "-p", "migration.bandwidth_mibs=4")
    try:
        await ctl.start()
        now = await wait_status(setup, ctl, lambda m: len(m) == 3 and (
            m["drain-1"]["phase"] == "MIGRATING" and (m["drain-1"]["transferred"] or 0) > 0
            and m["drain-3"]["phase"] == "QUEUED"))
        by_id = {m["mig_id"]: m for m in now["migrations"]}
        assert by_id["drain-1"]["vm"] == "web1" and by_id["drain-3"]["vm"] == "web3"
        assert by_id["drain-3"]["waiting_for"] == "hostA sends 1/1", now
        run_id = now["run_id"]

        rc, out, err = await mr("cancel", "drain-9", "-p", f"journal.state_dir={setup.state}")
        assert rc == 2 and "no migration drain-9 in flight" in err, out + err
        rc, out, err = await mr("cancel", "drain-3", "-p", f"journal.state_dir={setup.state}")
        assert rc == 0 and f"run {run_id}: migration drain-3 cancelled" in out, out + err
        await ctl.wait_for(lambda r: r.get("event") == "phase" and r["vm"] == "web3"
                           and r["phase"] == "ROLLED_BACK")
        assert not any(r.get("event") == "phase" and r["vm"] == "web3"
                       and r["phase"] == "MIGRATING" for r in ctl.journal())
        await ctl.wait_for(lambda r: r.get("event") == "phase" and r["vm"] == "web2"
                           and r["phase"] == "MIGRATING", timeout=240)
        assert any(r.get("event") == "phase" and r["vm"] == "web1" and r["phase"] == "CLEANED"
                   for r in ctl.journal())
        rc, out, err = await mr("cancel", run_id, "-p", f"journal.state_dir={setup.state}")
        assert rc == 0 and f"run {run_id}: cancelled" in out, out + err
        assert await ctl.wait(120) == 130, ctl.output()
    finally:
        await ctl.stop()
    assert "web3" in ctl.output() and "cancelled" in ctl.output()
    assert await where(setup.inventory, "web1") == ["hostB"]
    assert await where(setup.inventory, "web2") == ["hostA"]
    assert await where(setup.inventory, "web3") == ["hostA"]
    assert list_runs(setup.state) == []
    for n, h in (("web1", "hostB"), ("web2", "hostA")):
        verified = await memsum(setup, n, h, "verify")
        assert "ok=1" in verified and "bad_pages=0" in verified, (n, verified)
    rc, out, err = await mr("status", "-p", f"journal.state_dir={setup.state}")
    assert rc == 0 and "no live run" in out, out + err
    rc, out, err = await mr("vm", "stop", "web1", "web2", "web3", *setup.args)
    assert rc == 0, out + err
