"""Address pools (seed 004) without a lab: every bad pool or address is one line before
anything starts; a range's arithmetic; a VM keeps the index it took; a range's static DHCP
leases. Claims between two real
runs on the lab: tests/test_network.py."""

from __future__ import annotations

import dataclasses
import os

import pytest

from migrator.config import AddressPool, Config, DhcpServer, GuestNetwork, HostEntry, Inventory
from migrator.errors import ConfigError
from migrator.framework import dhcp_leases
from migrator.framework.env import Env
from migrator.framework.pools import AddressRange, Claim, check_pools


def pools(**extra):
    base = {"p1": {"base_mac": "02:aa:00:00:00:00", "base_ip": "10.78.9.100", "range_size": 4},
            "p2": {"base_mac": "02:aa:00:00:01:00", "base_ip": "10.78.9.104", "range_size": 4}}
    return base | extra


def inventory(tmp_path, subnet="10.78.9.0/24", controller="10.78.9.1"):
    return Inventory(hosts={"a": HostEntry(address="10.77.9.11"),
                            "b": HostEntry(address="10.77.9.12")},
                     shared_dir=tmp_path, guest_network=GuestNetwork(
                         subnet=subnet, controller_address=controller),
                     guest={"kernel": "/k", "initrd": "/i"})


BAD_CONFIGS = [
    ({"network": {"pools": pools(p3={"base_mac": "02:aa:00:00:00:03", "base_ip": "10.78.9.200",
                                     "range_size": 2})}},
     "pools p1 and p3 overlap in their MACs"),
    ({"network": {"pools": pools(p3={"base_mac": "02:bb:00:00:00:00", "base_ip": "10.78.9.107",
                                     "range_size": 2})}},
     "pools p2 and p3 overlap in their addresses"),
    ({"network": {"pools": {"p": {"base_mac": "03:00:00:00:00:00", "base_ip": "10.78.9.9",
                                  "range_size": 2}}}}, "03:00:00:00:00:00 is a multicast MAC"),
    ({"network": {"pools": {"p": {"base_mac": "00:16:3e:00:00:00", "base_ip": "10.78.9.9",
                                  "range_size": 2}}}},
     "00:16:3e:00:00:00 is not locally administered"),
    ({"network": {"pools": pools()},
      "vms": {f"v{i}": {"network": "bridge", "mac": "auto", "ip": "auto"} for i in range(5)}},
     "5 VMs take addresses from the pools (v0, v1, v2, v3, v4) but pool p1 holds 4"),
    ({"network": {"pools": pools()},
      "vms": {"v": {"network": "bridge", "mac": "02:aa:00:00:00:02"}}},
     "vms.v: 02:aa:00:00:00:02 is inside pool p1"),
    ({"vms": {"v": {"network": "bridge", "mac": "auto", "ip": "auto"}}},
     "ip: auto needs address pools (network.pools)"),
    ({"vms": {"v": {"network": "bridge", "mac": "02:00:00:00:00:01", "ip": "10.78.9.5/24"},
              "w": {"network": "bridge", "mac": "02:00:00:00:00:02", "ip": "10.78.9.5/24"}}},
     "vms.v and vms.w have the same address 10.78.9.5"),
    ({"vms": {"v": {"network": "bridge"}}}, "network: bridge needs a mac"),
    ({"vms": {"v": {"ip": "10.78.9.5/24"}}}, "ip needs network: bridge"),
    ({"vms": {"v": {"network": "wifi"}}}, "'wifi': network is none, user or bridge"),
    ({"vms": {"v": {"mac": "02-00-00-00-00-01"}}}, "'02-00-00-00-00-01' is not a unicast MAC"),
    ({"vms": {"v": {"network": "none", "mac": "02:00:00:00:00:01"}}},
     "a mac with network: none"),
    ({"vms": {"v": {"network": "user"}}}, "network: user needs a mac"),
    ({"vms": {"v": {"network": "bridge", "mac": "02:00:00:00:00:01", "dhcp": True}}},
     "dhcp needs ip (auto, or the address the DHCP server gives)"),
]


@pytest.mark.parametrize("data, line", BAD_CONFIGS, ids=[b[1][:40] for b in BAD_CONFIGS])
def test_a_bad_pool_or_address_is_one_line(tmp_path, data, line):
    import yaml
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        Config.load(path)
    assert line in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("pool, line", [
    ({"base_mac": "02:aa:00:00:00:00", "base_ip": "10.78.8.250", "range_size": 10},
     "network.pools.p: 10.78.8.250..10.78.9.3 is not inside the guest network 10.78.9.0/24"),
    ({"base_mac": "02:aa:00:00:00:00", "base_ip": "10.78.9.0", "range_size": 2},
     "holds 10.78.9.0, its network address"),
    ({"base_mac": "02:aa:00:00:00:00", "base_ip": "10.78.9.250", "range_size": 6},
     "holds 10.78.9.255, its broadcast address"),
    ({"base_mac": "02:aa:00:00:00:00", "base_ip": "10.78.9.1", "range_size": 2},
     "holds 10.78.9.1, the controller's address"),
])
def test_pools_must_fit_the_guest_network(tmp_path, pool, line):
    config = Config.model_validate({"network": {"pools": {"p": pool}}})
    with pytest.raises(ConfigError, match=line.replace(".", r"\.")):
        check_pools(config, inventory(tmp_path))
    check_pools(Config(), inventory(tmp_path))                     # no pools: nothing to check


def test_a_range_counts_macs_and_addresses():
    config = Config.model_validate({"network": {"pools": {"p": {
        "base_mac": "02:aa:00:00:00:fe", "base_ip": "10.78.9.254", "range_size": 2}}}})
    r = AddressRange("p", config.network.pools["p"], 23)
    assert (r.mac(0), r.mac(1)) == ("02:aa:00:00:00:fe", "02:aa:00:00:00:ff")
    assert (r.ip(0), r.ip(1)) == ("10.78.9.254/23", "10.78.9.255/23")


def test_a_vm_keeps_the_address_it_took_and_a_range_runs_out(tmp_path):
    config = Config.model_validate({
        "network": {"pools": {"p": {"base_mac": "02:aa:00:00:00:00", "base_ip": "10.78.9.100",
                                    "range_size": 2}}},
        "vms": {n: {"network": "bridge", "mac": "auto", "ip": "auto"} for n in ("x", "y")}})
    env = Env(config, inventory(tmp_path), "/run/migrator/r1", None, per_host=True)
    env.use_range(AddressRange("p", config.network.pools["p"], 24))
    a = env.spec("x", "a/x")
    b = env.spec("y", "a/y")
    assert (a.mac, a.ip, a.bridge, a.network) == ("02:aa:00:00:00:00", "10.78.9.100/24",
                                                  "gbr0", "bridge")
    assert (b.mac, b.ip) == ("02:aa:00:00:00:01", "10.78.9.101/24")
    assert env.spec("x", "a/x").ip == a.ip                   # booted again: the same
    assert "lab.ip=10.78.9.100/24" in a.kernel_append()
    dhcp = dataclasses.replace(a, dhcp=True)                # asks for it instead
    assert "lab.ip=dhcp" in dhcp.kernel_append() and "lab.ip=10" not in dhcp.kernel_append()
    with pytest.raises(ConfigError, match="address range p is used up"):
        env.spec("x", "b/x")                                 # a third VM of this instance


@pytest.mark.parametrize("ip, line", [
    ("10.78.9.1/24", "address 10.78.9.1 is the controller's address on 10.78.9.0/24"),
    ("10.78.9.255/24", "address 10.78.9.255 is its broadcast address"),
    ("10.78.10.5/24", "address 10.78.10.5/24 is not in the guest network 10.78.9.0/24"),
])
def test_a_static_address_must_be_a_guest_s_own(tmp_path, ip, line):
    config = Config.model_validate({"vms": {"v": {"network": "bridge",
                                                  "mac": "02:00:00:00:00:01", "ip": ip}}})
    with pytest.raises(ConfigError, match=line.replace(".", r"\.")):
        Env(config, inventory(tmp_path), "/run/migrator/r1", None)


def test_claims_refuse_any_overlap_whatever_the_pools_are_called(tmp_path):
    """The claim script (run here by bash, as a host runs it) under the segment's lock: a
    range overlapping a held claim in its IPs or in its MACs is refused naming the holder,
    whatever its pool is called in the other run's config; a release removes its own."""
    import json
    import subprocess

    from migrator.config import AddressPool
    from migrator.framework.pools import _TAKEN, _claim_script, release_command

    seg = str(tmp_path / "seg")

    def claim(name, base_ip, base_mac, run):
        pool = AddressPool(base_mac=base_mac, base_ip=base_ip, range_size=4)
        path = f"{seg}/{name}.{run}.pair1.claim"
        owner = json.dumps({"run_id": run, "instance": "pair1"})
        r = subprocess.run(["bash", "-c", _claim_script(seg, path, pool, owner)],
                           input=owner + "\n", capture_output=True, text=True)
        return r.returncode, r.stdout, path

    assert claim("a", "10.0.0.100", "02:00:00:00:00:00", "r1")[0] == 0
    for other in (("b", "10.0.0.103", "02:00:00:00:01:00", "r2"),      # an IP in common
                  ("a", "10.0.0.110", "02:00:00:00:00:03", "r3")):     # a MAC in common
        rc, out, _path = claim(*other)
        assert rc == _TAKEN and json.loads(out)["run_id"] == "r1"
    rc, _out, mine = claim("d", "10.0.0.104", "02:00:00:00:00:04", "r4")   # adjacent: free
    assert rc == 0
    subprocess.run(["bash", "-c", release_command(mine, "r4")], check=True)
    assert sorted(p.name for p in (tmp_path / "seg").glob("*.claim")) == ["a.r1.pair1.claim"]
    with pytest.raises(ValueError, match="not a claim of run r9"):
        release_command(mine, "r9")


def test_a_range_s_static_leases_are_published_and_withdrawn(tmp_path):
    """The DHCP server's hosts file of a claim: every MAC,IP of the range, written whole
    (no dot file left: dnsmasq would skip it but a reader would not), removed on release;
    only a process named dnsmasq is ever signalled."""
    hosts = tmp_path / "hosts.d"
    hosts.mkdir()
    pid_file = tmp_path / "pid"
    pid_file.write_text(f"{os.getpid()}\n")                # this python: not dnsmasq
    server = DhcpServer(hosts_dir=hosts, pid_file=pid_file)
    pool = AddressPool(base_mac="02:aa:00:00:00:fe", base_ip="10.78.9.100", range_size=3)
    claim = Claim(AddressRange("p", pool, 24), "/shared/migrator-pools/10.78.9.0_24/"
                  "p.20261130-1-ab.pair1.claim")
    path = dhcp_leases.publish(server, claim)
    assert path == hosts / "p.20261130-1-ab.pair1.hosts"
    assert path.read_text() == ("02:aa:00:00:00:fe,10.78.9.100\n02:aa:00:00:00:ff,10.78.9.101\n"
                                "02:aa:00:00:01:00,10.78.9.102\n")
    assert [p.name for p in hosts.iterdir()] == [path.name]
    problem = dhcp_leases.withdraw(server, path)
    assert not path.exists()
    assert f"names pid {os.getpid()}, a " in problem and "not dnsmasq: not signalled" in \
        problem, problem
    pid_file.unlink()
    assert "is not running" in dhcp_leases.withdraw(server, path)
    hosts.chmod(0o500)
    try:
        if os.access(hosts, os.W_OK):                    # root: make it a file instead
            hosts.chmod(0o700)
            hosts.rmdir()
            hosts.write_text("")
        with pytest.raises(ConfigError, match="hosts_dir .* is not a writable directory"):
            dhcp_leases.check_writable(server)
    finally:
        if hosts.is_dir():
            hosts.chmod(0o700)
