"""The driver contract: the same VMs and migrations through both drivers (``qemu``: QMP over
SSH; ``libvirt``: libvirt-python against each lab host's libvirtd), same promises.

Every test ends with a leak check: no QEMU in any lab host, empty run dirs, and no libvirt
domain defined anywhere.
"""

import asyncio
import contextlib
import ipaddress
import json
import subprocess
from typing import AsyncIterator

import pytest

from migrator.errors import GuestError, MigrationError
from migrator.framework import dhcp_leases
from migrator.hosts import SSHHost
from migrator.hypervisor import make_vm
from migrator.hypervisor.libvirt_uri import host_uri
from migrator.hypervisor.vm import VMSpec
from migrator.lab.processes import host_processes, is_qemu
from migrator.migration import MigrationParams, Phase, make_migration
from migrator.migration.blackout import BlackoutProbe
from migrator.migration.oracles import dirtier_report, wait_dirtying

from .conftest import drop_tcp_port, running

#: libvirt twice: managed (migrate3, the controller drives both daemons) and peer-to-peer
#: (migrateToURI3, the source daemon drives the destination itself)
DRIVERS = ["qemu", "libvirt", "libvirt-p2p"]
#: the same, with peer-to-peer libvirt only in the full matrix (``make matrix``): for tests
#: where p2p changes nothing but who opens the destination's connection
DRIVERS_P2P_IN_MATRIX = ["qemu", "libvirt", pytest.param("libvirt-p2p", marks=pytest.mark.matrix)]


async def leftovers(lab, hosts, inventory) -> list[str]:
    found = []
    # a QEMU, or a libvirt connection left open (its ssh or virt-ssh-helper)
    found += [p.describe() for p in host_processes(lab)
              if is_qemu(p) or p.comm in ("ssh", "virt-ssh-helper")]
    for h in hosts.values():
        # run dirs, libvirt domains, and taps (ours: mg*, libvirt's: vnet*)
        r = await h.run(f"ls -A {inventory.run_dir}; virsh -q list --all --name; "
                        "ls /sys/class/net | grep -E '^(mg|vnet)' || true")
        found += [f"{h.name}: {x}" for x in r.stdout.split()]
    return found


@pytest.fixture
def guest_args():
    """Extra kernel arguments for the guest (a test overrides this to run the dirtier)."""
    return ""


@pytest.fixture
def vm_mac():
    """The guest's NIC MAC (None: no NIC; a test overrides this)."""
    return None


@pytest.fixture
def vm_net():
    """The NIC's network: None (``network: user`` when a MAC is given), or ``bridge``: on the
    lab's guest network, at :func:`guest_ip` (``bridge-dhcp``: which the guest asks DHCP
    for); a test overrides this."""
    return None


@pytest.fixture(params=DRIVERS)
async def vm(request, lab, hosts, inventory, config, guest_args, vm_mac, vm_net):
    """A lab guest started on hostA through the driver under test; afterwards nothing of it
    may be left on any host (also checked when the test failed: then it is cleaned first)."""
    driver, _, mode = request.param.partition("-")
    if mode == "p2p":
        config = config.model_copy(update={"libvirt": config.libvirt.model_copy(
            update={"p2p": True})})
    spec = VMSpec(f"c{request.param[0]}{len(mode)}", kernel=str(inventory.guest.kernel),
                  initrd=str(inventory.guest.initrd),
                  append=f"{inventory.guest.append} lab.out=ttyS1 {guest_args}".strip(),
                  mac=vm_mac, **({} if vm_net is None else dict(
                      network="bridge", bridge=inventory.guest_bridge_of("hostA"),
                      ip=guest_ip(inventory), dhcp=vm_net == "bridge-dhcp")))
    the_vm = make_vm(driver, spec, hosts["hostA"], str(inventory.run_dir), config)
    the_vm.driver = driver
    await the_vm.start()
    yield the_vm
    left = await leftovers(lab, hosts, inventory)
    async with asyncio.TaskGroup() as tg:      # side by side: libvirt's takes 0.36 s a host
        for h in hosts.values():
            tg.create_task(make_vm(driver, spec, h, str(inventory.run_dir), config).stop())
    await the_vm.disconnect()   # a test that failed before stopping it: not the next one's leak
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.passed:
        assert left == [], f"left behind: {left}"


def migration(vm, hosts, inventory, dst, **params):
    return make_migration(vm, hosts[dst], inventory.hosts[dst].address,
                          MigrationParams(**params), vm.config)


@contextlib.asynccontextmanager
async def started_and_moving(m) -> AsyncIterator[asyncio.Task]:
    """``async with started_and_moving(m) as task``: ``m.run()`` as a task, given once at
    least 1 MiB has moved, and owned by the block (see :func:`running`): still running when
    the block is left (a failed assertion), it is cancelled and awaited there, so it does not
    run into the next test."""
    async with running(m.run()) as task:
        async for record in m.progress():
            if record.transferred >= 2**20:
                break
        yield task


async def alive_on(vm, host: str) -> None:
    assert vm.host.name == host
    assert await vm.status() == "running"
    session = await vm.wait_for_login()
    assert (await session.cmd("echo alive")).strip() == "alive"


async def assert_whole_after_postcopy(vm, session) -> None:
    """The guest's memsum pattern verifies through ``session`` (which followed the VM), and
    the dirtier's first report on the VM's new host finds no stale page."""
    assert (await session.cmd("memsum verify")).split()[-1] == "ok=1"
    await wait_dirtying(vm, 30)               # the dirtier's first report on the destination
    report = await dirtier_report(vm)
    assert report[1] == 0, f"stale pages after postcopy: {report}"


@pytest.mark.parametrize("vm", ["qemu", "libvirt"], indirect=True)
async def test_a_command_printing_across_the_switchover_loses_no_line(vm, hosts, inventory):
    """A console command in flight through a migration: what the guest printed on the source
    before the switchover and on the destination after it comes through the same session
    whole and in order (the destination's console is connected ahead, the source's read to
    its end), and the line typed afterwards reaches the guest on its new host. Before: the
    source's console closing ended the command ("serial console closed"), or the lines
    printed before the session re-attached were lost."""
    import re
    session = await vm.wait_for_login()
    # numbered lines until a line is typed: typed after the migration, so the command spans it
    loop = 'i=0; while ! read -t 0.1 x; do echo "L$i"; i=$((i+1)); done; echo "stopped at $i"'
    async with running(session.cmd(loop, timeout=120)) as cmd:
        await migration(vm, hosts, inventory, "hostB").run()
        assert session.host == "hostB"
        # typed once the guest printed on the destination too (an idle guest migrates in
        # tens of ms: typed at once, "go" could end the loop before any line there)
        async with asyncio.timeout(30):
            while not re.search(r"^L\d+", (await hosts["hostB"].run(
                    f"cat {vm.paths.serial_log}", check=True)).stdout, re.M):
                await asyncio.sleep(0.05)
        session.writer.write(b"go\n")           # the session types on the destination now
        out = await cmd
    numbers = [int(n) for n in re.findall(r"^L(\d+)", out, re.M)]   # "go" may be echoed after one
    last = int(re.search(r"stopped at (\d+)", out).group(1))
    assert numbers == list(range(last)), out
    # printed on both sides: the destination's own log of its console starts after L0
    r = await hosts["hostB"].run(f"cat {vm.paths.serial_log}", check=True)
    on_dst = [int(n) for n in re.findall(r"^L(\d+)", r.stdout, re.M)]
    assert on_dst and 0 < on_dst[0] and on_dst[-1] == last - 1, r.stdout[-500:]
    await alive_on(vm, "hostB")
    await vm.stop()


@pytest.mark.parametrize("vm", DRIVERS_P2P_IN_MATRIX, indirect=True)
async def test_there_and_back_with_a_session_and_sane_stats(vm, hosts, inventory):
    session = await vm.wait_for_login()
    await session.cmd("memsum write 16 42")
    for src, dst in (("hostA", "hostB"), ("hostB", "hostA")):
        r = await migration(vm, hosts, inventory, dst).run()
        assert (r.status, r.phase, r.driver, r.src, r.dst) == ("completed", "CLEANED",
                                                               vm.driver, src, dst)
        assert 0 < r.total_time_ms < 60_000 and 0 <= r.downtime_ms <= r.total_time_ms
        assert r.transferred_bytes > 16 * 2**20 and r.iterations >= 1
        assert r.throughput_mbps > 0 and r.wall_s > 0 and r.run_s >= r.wall_s
        assert r.port is not None or vm.driver == "libvirt"
        assert r.postcopy_switched is None          # no postcopy asked for
        phases = [p for p, _, _ in r.phases]
        assert phases[0] == "PENDING" and phases[-3:] == ["COMPLETED", "VERIFIED", "CLEANED"]
        if vm.driver == "libvirt":             # libvirt's figures without its own RPCs
            assert 0 < r.total_time_net_ms <= r.total_time_ms
            assert 0 <= r.downtime_net_ms <= r.downtime_ms
        # what it cost QEMU outside the vCPUs, each side: sending, receiving (libvirt starts
        # the destination inside the migration: from its launch)
        cpu = r.qemu_cpu
        assert cpu["dst_since"] == ("launch" if vm.driver == "libvirt" else "migration")
        assert 0 < cpu["src_s"] <= 2 * r.run_s and 0 < cpu["dst_s"] <= 2 * r.run_s, cpu
        assert r.migration_cpu_s == round(cpu["src_s"] + cpu["dst_s"], 3)
        # the session object the test holds followed the VM
        assert (await session.cmd("memsum verify")).split()[-1] == "ok=1"
        await alive_on(vm, dst)
    await vm.stop()


@pytest.mark.parametrize("vm", DRIVERS_P2P_IN_MATRIX, indirect=True)
async def test_cancel_midway_keeps_the_vm_on_its_source(vm, hosts, inventory):
    session = await vm.wait_for_login()
    await session.cmd("memsum write 16 7")
    m = migration(vm, hosts, inventory, "hostB", bandwidth_mibs=2)
    async with started_and_moving(m) as task:
        m.cancel("the test cancels it")
        with pytest.raises(MigrationError,
                           match=r"\[MIGRATING\]: cancelled: the test cancels it") as info:
            await task
    assert m.phase is Phase.ROLLED_BACK and m.result.status == "cancelled"
    assert "VM running on hostA" in info.value.outcome
    assert "destination removed from hostB" in info.value.outcome
    await alive_on(vm, "hostA")
    assert (await session.cmd("memsum verify")).split()[-1] == "ok=1"
    await vm.stop()


@pytest.mark.parametrize("guest_args", ["lab.dirty=32"])
@pytest.mark.parametrize("vm, how", [("qemu", "interrupt"), ("libvirt", "cancel")],
                         indirect=["vm"])
async def test_stopped_after_the_postcopy_switch_the_postcopy_is_finished(vm, how, hosts,
                                                                         inventory):
    """``cancel()``, or the caller's task cancelled (Ctrl-C), after the switchover: nothing
    can be rolled back (the destination runs the guest and holds its newest pages), so the
    postcopy is finished and the VM lands whole on the destination (phase LANDED), said so.
    Interrupted the moment the switch is asked for (QEMU still says "active": it switches at
    its next pass), or cancelled once postcopy runs."""
    session = await vm.wait_for_login()
    await session.cmd("memsum write 16 5")
    m = migration(vm, hosts, inventory, "hostB", postcopy_after_s=0, bandwidth_mibs=8)
    async with running(m.run()) as task:
        if how == "interrupt":
            m.observers.append(lambda _m, phase: phase is Phase.POSTCOPY and task.cancel())
        else:
            async for record in m.progress():
                if record.status == "postcopy-active" and record.remaining > 8 * 2**20:
                    break
            else:
                pytest.fail(f"postcopy ended before it could be stopped: {await task}")
        if how == "cancel":
            m.cancel("the test cancels it")
            with pytest.raises(MigrationError,
                               match=r"\[POSTCOPY\]: cancelled: the test cancels it") as info:
                await task
            outcome = info.value.outcome
        else:                   # cancelled by the observer above
            with pytest.raises(asyncio.CancelledError):
                await task
            outcome = m.result.error
    assert m.phase is Phase.LANDED and m.result.phase == "LANDED", (m.phase, outcome)
    assert "the VM runs on hostB" in outcome and "NOT" not in outcome, outcome
    assert m.result.postcopy_switched is True
    await alive_on(vm, "hostB")
    await assert_whole_after_postcopy(vm, session)
    await vm.stop()


@pytest.mark.parametrize("guest_args", ["lab.dirty=32"])
@pytest.mark.parametrize("vm", ["libvirt"], indirect=True)
async def test_libvirt_postcopy_stalled_link(vm, hosts, inventory, caplog):
    """The destination's migration port dropped (nftables) after the switchover, so nothing
    breaks, it just stops. Where libvirt can resume a postcopy, the stall is recovered
    (abortJobFlags POSTCOPY, the destination's dead connection closed, migrate3 with
    POSTCOPY_RESUME on a new port) with the port still dropped. Where it cannot (libvirt
    11.3.0's destination daemon crashes on a resume), the stall is waited out, never
    failed: the link comes back, TCP goes on, the migration completes. Either way the guest's
    memory arrives intact and no page is stale. (The qemu driver's recovery:
    test_migration.py.)"""
    from migrator.migration.libvirt import _RESUME_BROKEN
    session = await vm.wait_for_login()
    await session.cmd("memsum write 16 4")
    m = make_migration(vm, hosts["hostB"], inventory.hosts["hostB"].address,
                       MigrationParams(bandwidth_mibs=8, postcopy_after_s=0.5,
                                       policy={"stall_s": 2.0}))
    async with running(m.run()) as task:
        async for record in m.progress():        # postcopy running, many pages still to go
            if record.status == "postcopy-active" and record.remaining > 16 * 2**20 \
                    and m.result.port is not None:
                break
        else:
            pytest.fail(f"postcopy ended before the link could be cut: {await task}")
        old_port = m.result.port
        broken = _RESUME_BROKEN.get(m._dst_version)
        table = await drop_tcp_port(hosts["hostB"], old_port)
        try:
            if broken:       # waited out: the link comes back once the stall is noticed
                async with asyncio.timeout(60):
                    while "waited for until the migration's timeout" not in caplog.text:
                        await m.wait_changed()
                await hosts["hostB"].run(f"nft delete table inet {table}", check=True)
                table = None
            r = await task
        finally:
            if table is not None:
                await hosts["hostB"].run(f"nft delete table inet {table}", check=True)
    assert r.status == "completed" and r.postcopy_switched is True, r
    if broken:
        assert r.postcopy_recoveries == 0, r
    else:
        assert r.postcopy_recoveries == 1 and r.port != old_port, r
    await alive_on(vm, "hostB")
    await assert_whole_after_postcopy(vm, session)
    await vm.stop()


async def test_destination_daemon_stopped_midway(vm, hosts, inventory, lab):
    """qemu: the destination QEMU is killed; libvirt: the destination's libvirtd is stopped
    (its QEMU keeps running, orphaned: the rollback must kill it through the pidfile)."""
    session = await vm.wait_for_login()
    await session.cmd("memsum write 16 9")
    m = migration(vm, hosts, inventory, "hostB", bandwidth_mibs=4)
    async with started_and_moving(m) as task:
        try:
            if vm.driver == "qemu":
                await hosts["hostB"].run(f"kill -KILL $(cat {m.dst_vm.paths.pidfile})",
                                         check=True)
            else:
                assert lab.control("hostB", "libvirtd stop").startswith("ok")
            with pytest.raises(MigrationError) as info:
                await task
        finally:
            # libvirtd back before a still-running migration is cancelled (its rollback needs
            # it); no assert in here, it would replace the test's own failure: checked below
            if vm.driver == "libvirt":
                restarted = lab.control("hostB", "libvirtd start")
    if vm.driver == "libvirt":
        assert restarted.startswith("ok"), restarted
    assert info.value.vm == vm.name and info.value.src == "hostA" and info.value.dst == "hostB"
    assert "VM running on hostA" in info.value.outcome, info.value
    assert "destination removed from hostB" in info.value.outcome, info.value
    assert "NOT" not in info.value.outcome, info.value
    await alive_on(vm, "hostA")
    assert (await session.cmd("memsum verify")).split()[-1] == "ok=1"
    await vm.stop()


async def test_source_killed_midway_is_reported_lost_and_nothing_is_left(vm, hosts,
                                                                         inventory):
    """kill -9 of the source QEMU during precopy: the VM runs nowhere (the destination never
    ran it). That is said (phase LOST, never a rollback that claims the VM runs on the
    source), and the incoming destination is removed with everything else of it (checked by
    the fixture: no QEMU, run dir or domain left)."""
    m = migration(vm, hosts, inventory, "hostB", bandwidth_mibs=2)
    async with started_and_moving(m) as task:
        pid = vm.pid if vm.driver == "qemu" else await vm.read_pid()
        await hosts["hostA"].run(f"kill -KILL {pid}", check=True)
        with pytest.raises(MigrationError) as info:
            await task
    assert m.phase is Phase.LOST and m.result.phase == "LOST", (m.phase, info.value)
    assert info.value.vm == vm.name and info.value.src == "hostA" and info.value.dst == "hostB"
    assert info.value.phase == "MIGRATING", info.value
    assert "VM LOST: its source QEMU on hostA is gone" in info.value.outcome, info.value
    assert "NOT" not in info.value.outcome and "VM running on" not in info.value.outcome, \
        info.value


@pytest.mark.parametrize("guest_args", ["lab.dirty=32"])
@pytest.mark.parametrize("vm", DRIVERS_P2P_IN_MATRIX, indirect=True)
async def test_postcopy_switch_keeps_memory_intact(vm, hosts, inventory):
    """Postcopy from the first poll on, while the guest keeps 32 MiB dirty (capped at 32 MiB/s
    so precopy cannot converge first and the switch really happens): the dirtier on the
    destination finds no stale page and the checksum verifies."""
    session = await vm.wait_for_login()
    await session.cmd("memsum write 16 5")
    m = migration(vm, hosts, inventory, "hostB", postcopy_after_s=0, bandwidth_mibs=32)
    r = await m.run()
    assert r.status == "completed" and "POSTCOPY" in [p for p, _, _ in r.phases]
    assert r.postcopy_switched is True, r
    if vm.driver == "libvirt":      # libvirt itself says the guest ran in postcopy
        import libvirt
        assert ("dst", "lifecycle", libvirt.VIR_DOMAIN_EVENT_RESUMED,
                libvirt.VIR_DOMAIN_EVENT_RESUMED_POSTCOPY) in [e[:4] for e in m.events]
    await assert_whole_after_postcopy(vm, session)
    await alive_on(vm, "hostB")
    await vm.stop()


GUEST_IP = 20          #: the bridged test guest's host number on the lab's guest subnet


def guest_ip(inventory) -> str:
    net = ipaddress.ip_network(inventory.guest_network.subnet)
    return f"{net.network_address + GUEST_IP}/{net.prefixlen}"


async def bridge_port_of(lab, inventory, mac: str) -> str | None:
    """Which lab host's link the root guest bridge has learned ``mac`` on (its FDB)."""
    out = subprocess.run(["bridge", "-j", "fdb", "show", "br", inventory.lab.guest_bridge],
                         capture_output=True, text=True, check=True).stdout
    ports = {h.guest_veth: h.name for h in lab.state().hosts}
    return next((ports.get(e["ifname"]) for e in json.loads(out)
                 if e.get("mac") == mac and e["ifname"] in ports), None)


@pytest.mark.parametrize("vm", ["qemu", "libvirt"], indirect=True)
@pytest.mark.parametrize("vm_mac, vm_net", [("02:6d:69:67:01:01", "bridge")])
async def test_a_bridged_guest_keeps_mac_and_address_and_stays_reachable(
        vm, hosts, inventory, lab, vm_mac, vm_net):
    """``network: bridge``: the guest's NIC is a tap on its host's guest bridge (qemu: ours,
    libvirt: its own), its address from ``lab.ip=``. Probed from the controller in a process
    of its own (ICMP every 5 ms, and a TCP stream through ``nc -e cat`` in the guest) across a
    migration there and back: the guest keeps MAC and address, the lab's guest bridge learns
    its MAC on the destination's link (QEMU's announce after the switchover: verified, not
    assumed), replies come after the switchover (from the destination: the source's vCPUs
    never run again), and the TCP stream survives whole and in order."""
    address = vm.spec.address
    session = await vm.wait_for_login()
    await session.cmd("nc -ll -p 7000 -e cat </dev/null >/dev/null 2>&1 &")
    assert await bridge_port_of(lab, inventory, vm_mac) in ("hostA", None)
    for dst in ("hostB", "hostA"):
        async with BlackoutProbe(address, interval_ms=5, tcp_port=7000) as probe:
            r = await migration(vm, hosts, inventory, dst).run()
            await alive_on(vm, dst)             # the probe goes on a little after the switch
        switchover = next(wall for phase, _t, wall in r.phases if phase == "COMPLETED")
        report = probe.report(switchover)
        assert report.replies_after_switchover and report.replies_after_switchover > 0, report
        assert report.tcp_survived, report.tcp
        assert report.blackout_ms is not None and report.received > 0, report
        assert await bridge_port_of(lab, inventory, vm_mac) == dst
        assert (await session.cmd("cat /sys/class/net/eth0/address")).strip() == vm_mac
        assert f"inet {vm.spec.ip} " in await session.cmd("ip -4 addr show eth0")
        if vm.driver == "qemu":                 # our tap moved: gone from the source
            src = "hostA" if dst == "hostB" else "hostB"
            assert not (await hosts[src].run(f"ip link show {vm.paths.tap}")).ok
            assert (await hosts[dst].run(f"ip link show {vm.paths.tap}")).ok
    await vm.stop()


@pytest.mark.parametrize("vm", ["qemu"], indirect=True)
@pytest.mark.parametrize("vm_mac, vm_net", [("02:6d:69:67:01:02", "bridge-dhcp")])
async def test_a_guest_without_a_dhcp_lease_is_named_and_gets_its_address_once_it_has_one(
        vm, inventory, vm_mac):
    """A guest that asks DHCP for its address (``lab.ip=dhcp``) when the lab's dnsmasq has no
    lease for its MAC (static leases only): ``wait_reachable`` fails naming host, VM, MAC and
    the expected address. Once the lease is published, the guest's DHCP client (still asking)
    gets it."""
    server = inventory.guest_network.dhcp
    with pytest.raises(GuestError) as info:
        await vm.wait_reachable(timeout=3)
    assert info.value.host == "hostA" and info.value.vm == vm.name
    assert (f"not reachable at {vm.spec.ip} (MAC {vm_mac}, bridge gbr0, by DHCP"
            in str(info.value)), str(info.value)
    leases = server.hosts_dir / f"test-{vm.name}.hosts"
    leases.write_text(f"{vm_mac},{vm.spec.address}\n")
    try:
        await vm.wait_reachable(timeout=30)
        session = await vm.wait_for_login()
        assert f"inet {vm.spec.ip} " in await session.cmd("ip -4 addr show eth0")
        assert "default" not in await session.cmd("ip route")      # no route handed out
    finally:
        dhcp_leases.withdraw(server, leases)
    await vm.stop()


@pytest.mark.parametrize("vm", ["qemu", pytest.param("libvirt", marks=pytest.mark.matrix),
                                pytest.param("libvirt-p2p", marks=pytest.mark.matrix)],
                         indirect=True)
@pytest.mark.parametrize("vm_mac", ["02:6d:69:67:00:01"])
async def test_the_nic_keeps_its_mac_across_migrations(vm, hosts, inventory, vm_mac):
    """``network: user`` (a MAC, no network given): the restricted user-mode NIC."""
    assert vm.spec.network == "user"
    session = await vm.wait_for_login()
    for dst in ("hostB", "hostA"):
        assert (await session.cmd("cat /sys/class/net/eth0/address")).strip() == vm_mac
        await migration(vm, hosts, inventory, dst).run()
    assert (await session.cmd("cat /sys/class/net/eth0/address")).strip() == vm_mac
    await vm.stop()


@pytest.mark.parametrize("driver", ["qemu", "libvirt"])
async def test_disk_on_shared_storage_follows_the_vm(driver, lab, hosts, inventory, config):
    """A qcow2 on the lab's shared directory (virtio-blk, cache=none): blocks written on the
    source are read on the destination. libvirt does not know the directory as shared storage
    and refuses without libvirt.unsafe; the VM then stays on its source."""
    shared = inventory.shared_dir
    disk = f"{shared}/contract-{driver}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "16M"], check=True)
    spec = VMSpec(f"d{driver[0]}", kernel=str(inventory.guest.kernel),
                  initrd=str(inventory.guest.initrd),
                  append=f"{inventory.guest.append} lab.out=ttyS1", disk=disk)
    unsafe = config.model_copy(update={"libvirt": config.libvirt.model_copy(
        update={"unsafe": True})})
    vm = make_vm(driver, spec, hosts["hostA"], str(inventory.run_dir), config)
    try:
        await vm.start()
        session = await vm.wait_for_login()
        written = await session.cmd("dd if=/dev/urandom of=/tmp/blob bs=1M count=4 2>/dev/null"
                                    " && dd if=/tmp/blob of=/dev/vda bs=1M conv=fsync "
                                    "2>/dev/null && sha256sum < /tmp/blob")
        if driver == "libvirt":
            with pytest.raises(MigrationError, match="Unsafe migration") as info:
                await migration(vm, hosts, inventory, "hostB").run()
            assert "VM running on hostA" in info.value.outcome
            await alive_on(vm, "hostA")
            vm.config = unsafe
        await make_migration(vm, hosts["hostB"], inventory.hosts["hostB"].address,
                             MigrationParams(), vm.config).run()
        read = await session.cmd("dd if=/dev/vda bs=1M count=4 2>/dev/null | sha256sum")
        assert read.split()[0] == written.split()[0] and vm.host.name == "hostB"
    finally:
        await vm.stop()
        subprocess.run(["rm", "-f", disk], check=True)
    assert await leftovers(lab, hosts, inventory) == []


async def test_libvirt_itself_sees_the_domain_on_the_destination(lab, hosts, inventory, config):
    """libvirt's own client (virsh over the lab URI) agrees: running on hostB, gone on hostA."""
    spec = VMSpec("virshvm", kernel=str(inventory.guest.kernel),
                  initrd=str(inventory.guest.initrd), append=inventory.guest.append)
    vm = make_vm("libvirt", spec, hosts["hostA"], str(inventory.run_dir), config)
    await vm.start()
    try:
        await migration(vm, hosts, inventory, "hostB").run()

        def virsh(host, *args):
            return subprocess.run(["virsh", "-c", host_uri(hosts[host]), *args],
                                  capture_output=True, text=True, timeout=60)
        there = virsh("hostB", "domstate", "virshvm")
        assert there.returncode == 0 and there.stdout.strip() == "running", there
        persistent = virsh("hostB", "dominfo", "virshvm")
        assert "Persistent:     yes" in persistent.stdout          # VIR_MIGRATE_PERSIST_DEST
        gone = virsh("hostA", "domstate", "virshvm")
        assert gone.returncode != 0 and "failed to get domain" in gone.stderr
    finally:
        await vm.stop()
    assert await leftovers(lab, hosts, inventory) == []


async def test_libvirt_refuses_a_host_whose_key_is_not_known(inventory, config, tmp_path):
    """The libssh URI carries the inventory's known_hosts: an unknown host key is refused."""
    from migrator.hypervisor.libvirt import LibvirtError
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    entry = inventory.hosts["hostA"]
    stranger = SSHHost("hostA", entry.address, known_hosts=empty,
                       client_keys=[inventory.ssh.identity_file], config=config)
    spec = VMSpec("nokey", kernel=str(inventory.guest.kernel))
    vm = make_vm("libvirt", spec, stranger, str(inventory.run_dir), config)
    with pytest.raises(LibvirtError, match="host key") as info:
        await vm.conn()
    assert info.value.unreachable and info.value.host == "hostA"
