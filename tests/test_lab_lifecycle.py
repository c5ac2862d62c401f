"""Lab life cycle: down leaves nothing, up recovers after a crash, 16 hosts, two labs, libvirt."""

import asyncio
import json
import os
import signal

import pytest

from migrator.config import Inventory
from migrator.errors import HostKeyError
from migrator.hosts.ssh import SSHHost
from migrator.hypervisor.qemu import VMSpec, start_vm
from migrator.lab import Lab, LabPhase
from migrator.lab.system import Proc, is_alive

from .conftest import BIN, assert_lab_gone, cli, lab_dir


async def _all_hosts_answer(inv: Inventory) -> list[str]:
    async def one(name):
        async with SSHHost.from_inventory(name, inv) as h:
            return (await h.run("hostname", check=True)).stdout.strip()
    return list(await asyncio.gather(*(one(n) for n in inv.hosts)))


async def test_down_leaves_nothing_even_with_guests_and_strays(config):
    lab = Lab("mtdown", lab_dir("mtdown"), config)
    await lab.up(["hostA", "hostB"], "10.77.241.0/24", accel="tcg")
    inv = Inventory.load(lab.inventory_path)
    # things a user or a later issue leaves behind on the hosts: a running guest, a stray
    # background process started over ssh
    async with SSHHost.from_inventory("hostA", inv) as a:
        spec = VMSpec("leftover", kernel=str(inv.guest.kernel), initrd=str(inv.guest.initrd))
        qemu_pid = await start_vm(a, spec, str(inv.run_dir))
        stray = await a.run("setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!", check=True)
    qemu, sleeper = Proc.of(qemu_pid), Proc.of(int(stray.stdout))
    assert is_alive(qemu) and is_alive(sleeper)
    state = lab.state()
    result = await cli("down", "--name", "mtdown", "--dir", str(lab.dir))
    assert result.returncode == 0, result.stderr
    assert "2 namespaces" in result.stdout
    assert not is_alive(qemu) and not is_alive(sleeper)
    assert_lab_gone(lab, state)
    again = await cli("down", "--name", "mtdown", "--dir", str(lab.dir))
    assert again.returncode == 0 and "nothing to remove" in again.stdout


async def test_up_recovers_after_hosts_died_mid_build(config):
    """A crash leaves lab.json in 'building', processes dead, namespaces and links behind."""
    lab = Lab("mtcrash", lab_dir("mtcrash"), config)
    await lab.up(["hostA", "hostB", "hostC"], "10.77.242.0/24", accel="tcg")
    state = lab.state()
    for h in state.hosts:                       # the machine "crashed": every process is gone
        for ref in (h.sshd, h.init):
            os.kill(ref.pid, signal.SIGKILL)
    async with asyncio.timeout(30):             # SIGKILL is delivered asynchronously
        while any(is_alive(ref.proc()) for h in state.hosts for ref in (h.sshd, h.init)):
            await asyncio.sleep(0.01)
    state.phase = LabPhase.BUILDING             # ... while up was still running
    state.save(lab.state_file)
    assert not any(h.ok for h in await lab.health())
    result = await cli("up", "--name", "mtcrash", "--dir", str(lab.dir), "-n", "3",
                       "--subnet", "10.77.242.0/24", "--accel", "tcg")
    assert result.returncode == 0, result.stderr
    assert "removing its leftovers first" in result.stdout
    assert "recovered from a broken lab" in result.stdout
    assert all(h.ok for h in await lab.health())
    assert await _all_hosts_answer(Inventory.load(lab.inventory_path)) == \
        ["hostA", "hostB", "hostC"]
    state = lab.state()
    await lab.down()
    assert_lab_gone(lab, state)


async def test_up_killed_at_a_random_moment_then_up_and_down(config):
    """SIGKILL a real 'migrate-lab up' as soon as it has written its plan."""
    lab = Lab("mtkill", lab_dir("mtkill"), config)
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-lab"), "up", "--name", "mtkill", "--dir", str(lab.dir), "-n", "6",
        "--subnet", "10.77.243.0/24", "--accel", "tcg",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    async with asyncio.timeout(60):
        while not lab.state_file.exists() and proc.returncode is None:
            await asyncio.sleep(0.001)
    proc.kill()
    await proc.wait()
    result = await cli("up", "--name", "mtkill", "--dir", str(lab.dir), "-n", "6",
                       "--subnet", "10.77.243.0/24", "--accel", "tcg")
    assert result.returncode == 0, result.stderr
    assert all(h.ok for h in await lab.health())
    state = lab.state()
    assert state.phase == LabPhase.UP
    result = await cli("down", "--name", "mtkill", "--dir", str(lab.dir))
    assert result.returncode == 0, result.stderr
    assert_lab_gone(lab, state)


async def test_sixteen_hosts_up_reachable_down(config):
    lab = Lab("mt16", lab_dir("mt16"), config)
    result = await cli("up", "--name", "mt16", "--dir", str(lab.dir), "-n", "16",
                       "--subnet", "10.77.244.0/24", "--accel", "tcg")
    assert result.returncode == 0, result.stderr
    inv = Inventory.load(lab.inventory_path)
    names = list(inv.hosts)
    assert names[0] == "hostA" and names[-1] == "hostP" and len(names) == 16
    assert await _all_hosts_answer(inv) == names
    state = lab.state()
    result = await cli("down", "--name", "mt16", "--dir", str(lab.dir))
    assert result.returncode == 0, result.stderr
    assert_lab_gone(lab, state)


async def test_two_labs_with_a_hostA_each_coexist(lab, inventory, config):
    """... the second one without shared storage (``up --no-shared``): no shared_dir in its
    inventory, and each host's local_dir its own."""
    other = Lab("mttwo", lab_dir("mttwo"), config)
    await other.up(["hostA", "hostB"], "10.77.245.0/24", accel="tcg", shared=False)
    try:
        inv2 = Inventory.load(other.inventory_path)
        assert inv2.hosts["hostA"].address != inventory.hosts["hostA"].address
        assert inv2.shared_dir is None and inv2.local_dir == other.local_dir
        assert inventory.shared_dir is not None and other.state().shared is False
        async with SSHHost.from_inventory("hostA", inv2) as a, \
                SSHHost.from_inventory("hostB", inv2) as b:
            await a.run(f"echo mine > {inv2.local_dir}/only-on-A", check=True)
            seen = await b.run(f"ls -A {inv2.local_dir}", check=True)
            assert seen.stdout.split() == []
        assert (other.host_dir("hostA") / "local" / "only-on-A").read_text() == "mine\n"
        for inv in (inventory, inv2):
            async with SSHHost.from_inventory("hostA", inv) as h:
                r = await h.run("hostname; ip -4 -o addr show eth0", check=True)
                assert r.stdout.splitlines()[0] == "hostA"
                assert inv.hosts["hostA"].address in r.stdout
        # a key of one lab does not open the other
        cross = SSHHost("hostA", inv2.hosts["hostA"].address,
                        known_hosts=inventory.ssh.known_hosts,
                        client_keys=[inventory.ssh.identity_file])
        try:
            with pytest.raises(HostKeyError, match="host key not verifiable"):
                await cross.run("true")     # must not connect: mtest's known_hosts
        finally:
            await cross.close()             # in case it wrongly did
    finally:
        state = other.state()
        await other.down()
    assert_lab_gone(other, state)
    assert all(h.ok for h in await lab.health())   # the session lab is untouched


async def test_libvirt_one_daemon_per_host(config):
    lab = Lab("mtvirt", lab_dir("mtvirt"), config)
    result = await cli("up", "--name", "mtvirt", "--dir", str(lab.dir), "--libvirt",
                       "--subnet", "10.77.246.0/24", "--accel", "tcg")
    assert result.returncode == 0, result.stderr
    try:
        inv = Inventory.load(lab.inventory_path)
        assert inv.drivers == ["qemu", "libvirt"]
        uuids = []
        for name in inv.hosts:
            async with SSHHost.from_inventory(name, inv) as h:
                r = await h.run("virsh -c qemu:///system hostname && virsh -c qemu:///system "
                                "capabilities | grep -m1 '<uuid>'", check=True)
                got_name, uuid_line = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
                assert got_name == name
                own = (lab.host_dir(name) / "host_uuid").read_text().strip()
                assert uuid_line == f"<uuid>{own}</uuid>"
                uuids.append(own)
        assert len(set(uuids)) == 2, uuids
        status = json.loads((await cli("status", "--name", "mtvirt", "--dir", str(lab.dir),
                                       "--json")).stdout)
        assert all(h["libvirtd"] for h in status["hosts"])
    finally:
        state = lab.state()
        result = await cli("down", "--name", "mtvirt", "--dir", str(lab.dir))
    assert result.returncode == 0, result.stderr
    assert_lab_gone(lab, state)
