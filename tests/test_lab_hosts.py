"""The session lab's hosts: up, reachable with strict host keys, each its own host."""

import asyncio
import json
import secrets
import subprocess
from pathlib import Path

import pytest

from migrator.errors import HostError
from migrator.hosts.ssh import SSHHost, quote
from migrator.lab import network

from .conftest import SESSION_LAB, SESSION_SUBNET, cli, lab_dir

HOSTS = ["hostA", "hostB", "hostC", "hostD"]


async def test_hosts_come_up_in_order(lab, inventory):
    result = await cli("status", "--name", SESSION_LAB, "--dir", str(lab.dir), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["healthy"] is True
    assert [h["name"] for h in status["hosts"]] == HOSTS
    assert all(h["ok"] for h in status["hosts"])
    assert list(inventory.hosts) == HOSTS
    assert [inventory.hosts[h].address for h in HOSTS] == [
        "10.77.240.11", "10.77.240.12", "10.77.240.13", "10.77.240.14"]
    assert inventory.lab.subnet == SESSION_SUBNET


async def test_openssh_with_strict_host_keys(lab):
    config = lab.ssh_config.read_text()
    assert config.count("StrictHostKeyChecking yes") == len(HOSTS)
    for host in HOSTS:
        out = await asyncio.to_thread(
            subprocess.run, ["ssh", "-F", str(lab.ssh_config), host, "hostname"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == host


async def test_migrate_lab_ssh_runs_a_command(lab):
    result = await cli("ssh", "--name", SESSION_LAB, "--dir", str(lab.dir), "hostB",
                       "echo", "from-$(hostname)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from-hostB"


async def test_each_host_sees_its_own_hostname_and_hosts_file(inventory):
    for host in HOSTS:
        async with SSHHost.from_inventory(host, inventory) as h:
            r = await h.run("hostname; cat /etc/hosts", check=True)
            lines = r.stdout.splitlines()
            assert lines[0] == host
            assert f"127.0.1.1 {host}" in lines
            for other in HOSTS:
                assert f"{inventory.hosts[other].address} {other}" in lines


async def test_shared_dir_is_shared(inventory):
    token = secrets.token_hex(16)
    path = f"{inventory.shared_dir}/token-{token}"
    async with SSHHost.from_inventory("hostA", inventory) as a:
        await a.run(f"echo {quote(token)} > {quote(path)}", check=True)
    try:
        for host in HOSTS[1:]:
            async with SSHHost.from_inventory(host, inventory) as h:
                r = await h.run(f"cat {quote(path)}", check=True)
                assert r.stdout.strip() == token
    finally:
        Path(path).unlink()


async def test_run_dir_is_private_to_each_host(inventory):
    name = f"private-{secrets.token_hex(4)}"
    async with SSHHost.from_inventory("hostA", inventory) as a, \
            SSHHost.from_inventory("hostB", inventory) as b:
        await a.run(f"touch /run/migrator/{name}", check=True)
        assert (await a.run(f"test -e /run/migrator/{name}")).exit_status == 0
        assert (await b.run(f"test -e /run/migrator/{name}")).exit_status == 1
        assert not Path("/run/migrator", name).exists()   # the controller cannot see it
        await a.run(f"rm /run/migrator/{name}", check=True)


async def test_wrong_host_key_is_refused(lab, inventory, tmp_path):
    # a known_hosts that names hostA with some other key: both clients must refuse
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(tmp_path / "other")], check=True)
    other = (tmp_path / "other.pub").read_text().split()
    address = inventory.hosts["hostA"].address
    bad_known = tmp_path / "known_hosts"
    bad_known.write_text(f"hostA,{address} {other[0]} {other[1]}\n")
    ssh = inventory.ssh
    out = await asyncio.to_thread(subprocess.run, [
        "ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={bad_known}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-i", str(ssh.identity_file), f"root@{address}", "true"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 255
    assert "Host key verification failed" in out.stderr
    host = SSHHost("hostA", address, known_hosts=bad_known, client_keys=[ssh.identity_file])
    with pytest.raises(HostError, match=r"^hostA: host key not verifiable") as info:
        await host.run("true")
    assert info.value.host == "hostA"


async def test_no_route_off_the_lab(lab, inventory, ip_forward_before):
    state = lab.state()
    for h in state.hosts:
        routes = await network.routes_in(h.netns)
        assert [r["dst"] for r in routes] == [SESSION_SUBNET], routes
        assert not any(r.get("gateway") for r in routes)
    async with SSHHost.from_inventory("hostA", inventory) as a:
        r = await a.run("ip -6 addr show; cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6; "
                        "cat /proc/sys/net/ipv4/ip_forward", check=True)
        assert r.stdout.split() == ["1", "0"]            # no IPv6 address at all, no forwarding
    for link in [state.bridge, *(h.veth for h in state.hosts),
                 state.guest_bridge, *(h.guest_veth for h in state.hosts)]:
        assert network.ipv6_disabled_root(link), link
    # the guest network: the controller's address on it, the hosts only bridge (no address,
    # no route: the host's routes above are its lab subnet's alone)
    guest_net = inventory.guest_network
    assert guest_net.subnet != SESSION_SUBNET and guest_net.bridge == "gbr0"
    r = subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", state.guest_bridge],
                       capture_output=True, text=True, check=True)
    (link,) = json.loads(r.stdout)
    assert [f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]] == \
        [state.guest_bridge_address] and guest_net.controller_address in \
        state.guest_bridge_address
    async with SSHHost.from_inventory("hostA", inventory) as a:
        r = await a.run("ip -4 -o addr show dev gbr0; ip -o link show master gbr0",
                        check=True)
        assert "inet" not in r.stdout and "gveth0" in r.stdout, r.stdout
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == ip_forward_before


async def test_up_again_is_a_noop(lab):
    before = lab.state()
    result = await cli("up", "--name", SESSION_LAB, "--dir", str(lab.dir), "--hosts",
                       ",".join(HOSTS), "--subnet", SESSION_SUBNET, "--libvirt")
    assert result.returncode == 0, result.stderr
    assert "already up" in result.stdout
    after = lab.state()
    assert [h.sshd.pid for h in after.hosts] == [h.sshd.pid for h in before.hosts]


async def test_up_with_other_hosts_on_a_running_lab_is_refused(lab):
    result = await cli("up", "--name", SESSION_LAB, "--dir", str(lab.dir), "-n", "5",
                       "--subnet", SESSION_SUBNET)
    assert result.returncode == 2
    assert "already up with hosts hostA,hostB,hostC,hostD" in result.stderr
    assert len(lab.state().hosts) == 4


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "at least 1 host"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--hosts", "hostA,hostA"], "duplicate host name 'hostA'"),
    (["--hosts", "a b"], "bad host name 'a b'"),
    (["--subnet", "10.77.243.0/30"], "too small"),
    (["--subnet", SESSION_SUBNET], "overlaps 10.77.240.0/24 on interface mtestbr0"),
    (["--dir", "/tmp/migrator-lab-test"], "StrictModes"),
    (["--name", "Bad!"], "bad lab name"),
    (["-n", "300", "--subnet", "10.77.243.0/24"], "holds at most 244 hosts"),
])
async def test_bad_input_gets_one_line_and_changes_nothing(lab, args, message):
    if "--name" not in args:
        args = ["--name", "mtbad", *args]
    if "--dir" not in args and "--frobnicate" not in args:
        args = [*args, "--dir", str(lab_dir("mtbad"))]
    result = await cli("up", *args)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not network.link_exists("mtbadbr0")
    assert not lab_dir("mtbad").exists()
    assert not Path("/tmp/migrator-lab-test").exists()


async def test_status_of_absent_lab(lab):
    result = await cli("status", "--name", "mtnone", "--dir", str(lab_dir("mtnone")))
    assert result.returncode == 1
    assert "absent" in result.stdout


async def test_missing_packages_named_before_anything_starts(lab, tmp_path):
    # a PATH with every tool the lab needs except QEMU
    import shutil
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("ip", "unshare", "nsenter", "ssh-keygen", "ssh", "sh", "dnsmasq"):
        (bindir / tool).symlink_to(shutil.which(tool))
    result = await cli("up", "--name", "mtpkg", "--dir", str(lab_dir("mtpkg")),
                       "--subnet", "10.77.247.0/24", env={"PATH": str(bindir)})
    assert result.returncode == 2, result
    assert result.stderr.strip() == ("migrate-lab: error: missing packages: qemu-system-x86_64 "
                                     "(qemu-system-x86 (from bookworm-backports)): run "
                                     "'make setup'")
    assert not network.link_exists("mtpkgbr0") and not lab_dir("mtpkg").exists()
