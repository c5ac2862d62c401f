"""Guest networking through ``migrate-run`` on the session lab, four runs at once on one guest
network: two with one address range between them (exactly one gets it; the other names the
holder; the winner's VM takes the range's MAC and address, and every migration's blackout is
in the record, the summary table and JUnit); the ready scenario ``network_continuity`` (a
peer guest on a third host pings the migrating guest, a prober on a fourth host holds a TCP
stream through it: ``network.probe_from``) from its example config, its pools moved onto the
session lab's guest network: its mover gets its address from the lab's DHCP server, the
range's static lease; and a migration probed from a peer guest (``probe_from: vm:peer``).
The driver contract (both drivers, TCP stream, bridge FDB): tests/test_drivers.py."""

from __future__ import annotations

import asyncio
import ipaddress
import json

from pathlib import Path

import pytest

from migrator.hosts import SSHHost

from .test_framework import migrate_run, the_run

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "network.example.yaml"
PEER_PROBE = Path(__file__).parent / "scenarios" / "peer_probe.py"


@pytest.fixture
async def hostD(inventory, config):
    async with SSHHost.from_inventory("hostD", inventory, config) as h:
        yield h


async def test_two_runs_share_one_range_exactly_one_gets_it_and_reports_its_blackout(
        inventory, tmp_path, no_leaks, hostD):
    net = ipaddress.ip_network(inventory.guest_network.subnet)
    config = tmp_path / "net.yaml"
    config.write_text(f"""
network:
  pools:
    only: {{base_mac: "02:6e:00:00:00:10", base_ip: "{net.network_address + 100}",
            range_size: 2}}
vms:
  vm1: {{network: bridge, mac: auto, ip: auto}}
""")
    peer_config = tmp_path / "peer.yaml"
    peer_config.write_text(f"""
network:
  probe_from: vm:peer
  probe_interval_ms: 10
  pools:
    p: {{base_mac: "02:6e:00:00:00:30", base_ip: "{net.network_address + 130}",
         range_size: 2}}
vms:
  mover: {{network: bridge, mac: auto, ip: auto}}
  peer: {{network: bridge, mac: auto, ip: auto}}
""")
    # hostD probes network_continuity's guest: a real fleet's host with an address on its
    # guest bridge (lab hosts have none)
    prober_address = f"{net.network_address + 250}/{net.prefixlen}"
    await hostD.run(f"ip addr add {prober_address} dev {inventory.guest_network.bridge}",
                    check=True)
    try:
        *runs, (rc_nc, out_nc, err_nc), (rc_p, out_p, err_p) = await asyncio.gather(*(
            migrate_run(inventory, tmp_path / d, "-c", str(config), "-m", hosts, "ping_pong",
                        "-p", "scenario.rounds=1")
            for d, hosts in (("a", "hostA,hostB"), ("b", "hostC,hostD"))),
            migrate_run(inventory, tmp_path / "nc", "-a", "all", "-m", "hostA,hostB,hostC",
                        "-c", str(EXAMPLE), "-p", f"network.pools.first.base_ip="
                        f"{net.network_address + 110}", "-p", f"network.pools.second.base_ip="
                        f"{net.network_address + 118}", "-p", "network.probe_from=hostD",
                        "network_continuity"),
            migrate_run(inventory, tmp_path / "peer", "-c", str(peer_config), "-m",
                        "hostB,hostD", str(PEER_PROBE)))
    finally:
        await hostD.run(f"ip addr del {prober_address} dev {inventory.guest_network.bridge}")
    # the ready scenario: two hops, each with the TCP stream alive and the peer's pings back,
    # probed from hostD
    assert rc_nc == 0, out_nc + err_nc
    assert out_nc.count("TCP stream survived") == 2, out_nc
    assert "blackout over 2 hops: hostD p50" in out_nc, out_nc
    # the framework's probe from a peer guest: its pings' longest loss, at their resolution
    assert rc_p == 0, out_p + err_p
    _run, (m,), _junit = the_run(tmp_path / "peer")
    b = m["blackout"]
    assert b["probed_from"] == "vm:peer" and b["target"] == str(net.network_address + 131), b
    assert b["received"] > 0 and b["recovered"] and b["interval_ms"] == 10, b
    assert m["blackout_ms"] == b["blackout_ms"] and b["blackout_ms"] % 10 == 0, b
    # the mover asked the lab's dnsmasq for its address (the example's dhcp: true) and got
    # its range's, by its MAC; the peer, given its address on the command line, asked nothing
    server = inventory.guest_network.dhcp
    _run, migs_nc, _junit = the_run(tmp_path / "nc")
    mover_ip = {m["blackout"]["target"] for m in migs_nc}
    assert {m["blackout"]["probed_from"] for m in migs_nc} == {"hostD"}
    (run_dir,) = list((tmp_path / "nc").iterdir())
    journal = [json.loads(ln) for ln in (run_dir / "journal.jsonl").read_text().splitlines()]
    (published,) = [e for e in journal if e.get("kind") == "dhcp_hosts"]
    assert Path(published["path"]).parent == server.hosts_dir
    assert not Path(published["path"]).exists()          # withdrawn when the range was freed
    leases = {ln.split()[2]: ln.split()[1] for ln in
              (server.hosts_dir.parent / "leases").read_text().splitlines()}
    (ip,) = mover_ip
    assert ip in leases and leases[ip].startswith("02:6e:00:00:01:"), leases
    assert str(net.network_address + 110) not in leases, leases    # the peer: static
    passed = [d for d, (rc, _o, _e) in zip("ab", runs) if rc == 0]
    assert len(passed) == 1, [o + e for _rc, o, e in runs]
    (winner,) = passed
    loser = "b" if winner == "a" else "a"
    rc, out, err = runs["ab".index(loser)]
    run, migs, junit = the_run(tmp_path / winner)
    assert f"no free address range for pair1: only by run {run['run_id']}" in out + err, \
        out + err
    # the winner's VM took the range's first MAC and address, kept them, and was probed
    assert len(migs) == 2
    for m in migs:
        b = m["blackout"]
        assert b["target"] == str(net.network_address + 100), b
        assert b["replies_after_switchover"] > 0 and m["blackout_ms"] == b["blackout_ms"], b
    (run_dir,) = list((tmp_path / winner).iterdir())
    journal = [json.loads(ln) for ln in (run_dir / "journal.jsonl").read_text().splitlines()]
    assert any(e.get("kind") == "pool_claim" for e in journal)
    _rc, out, _err = runs["ab".index(winner)]
    header = next(ln for ln in out.splitlines() if ln.startswith("migration"))
    assert header.split()[4:7] == ["total", "downtime", "blackout"], header
    props = {p.get("name"): p.get("value") for p in junit.iter("property")}
    assert float(props["blackout_ms"]) >= 0 and int(props["blackout.replies_after_switchover"])
    assert "02:6e:00:00:00:10" in (run_dir / "run.log").read_text()
