"""Shared fixtures: the test session's own lab and helpers to run the CLI.

The session lab is named ``mtest`` on 10.77.240.0/24 under /srv/migrator-test, so it never
collides with a lab a user (or an earlier run) left up: not the default ``mlab`` name,
bridge, subnet or directory. Labs made by single tests use other names and subnets of
10.77.24x.0/24 and remove themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable

import pytest
import pytest_asyncio

from migrator.config import Config, Inventory
from migrator.lab import Lab
from migrator.lab import network
from migrator.lab.processes import host_processes, is_qemu
from migrator.lab.processes import sshd_sessions as lab_sshd_sessions
from migrator.lab.system import Proc, is_alive

TEST_BASE = Path("/srv/migrator-test")
SESSION_LAB = "mtest"
SESSION_SUBNET = "10.77.240.0/24"
BIN = Path(sys.executable).parent


def pytest_addoption(parser):
    parser.addoption("--matrix", action="store_true",
                     help="also run the whole of each fault matrix (cases marked 'matrix'; "
                          "'make matrix'), not only its representative cases")


def pytest_configure(config):
    if os.geteuid() != 0:
        pytest.exit("the test suite needs root (it builds network-namespace labs)", returncode=2)
    config.addinivalue_line("markers", "matrix: a case of a fault matrix beyond its "
                            "representative ones; run with --matrix (make matrix)")


def pytest_collection_modifyitems(config, items):
    """Without ``--matrix``, a matrix's extra cases are deselected (not skipped: they are
    not part of ``make test``, whose time budget they would exceed)."""
    if config.getoption("--matrix"):
        return
    extra = [i for i in items if i.get_closest_marker("matrix")]
    if extra:
        config.hook.pytest_deselected(items=extra)
        items[:] = [i for i in items if not i.get_closest_marker("matrix")]


@dataclass
class CLIResult:
    returncode: int
    stdout: str
    stderr: str


async def cli(*args: str, env: dict | None = None, timeout: float = 300) -> CLIResult:
    """Run ``migrate-lab ARGS`` as a real process and capture its output."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-lab"), *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return CLIResult(proc.returncode, out.decode(), err.decode())


@contextlib.asynccontextmanager
async def running(aw: Awaitable) -> AsyncIterator[asyncio.Future]:
    """``aw`` as a task owned by the ``async with`` block around it.

    Tests share one event loop for the whole session, so a task a test started and did not
    finish (an assertion failed before it was awaited) would go on running into the next
    tests. On leaving the block, by any way, the task is cancelled if it is still pending and
    waited for (a migration rolls back first); whatever it ended with is collected here, so
    only the block's own exception, if any, propagates.
    """
    task = asyncio.ensure_future(aw)
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()            # mark it retrieved: no "never retrieved" warning


async def gather_owned(*aws: Awaitable) -> list:
    """``asyncio.gather(*aws)`` (results in order; the first exception raised as is), except
    that nothing outlives the call: when one fails, the others are cancelled and awaited
    before the exception propagates (plain gather leaves them running)."""
    async with contextlib.AsyncExitStack() as stack:
        tasks = [await stack.enter_async_context(running(aw)) for aw in aws]
        return list(await asyncio.gather(*tasks))


def metric_samples(text: str) -> dict[str, float]:
    """Prometheus text, parsed by prometheus_client's own parser: ``name{label=value,...}``
    (labels sorted) -> value."""
    from prometheus_client.parser import text_string_to_metric_families
    return {s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                      if s.labels else ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def lab_dir(name: str) -> Path:
    return TEST_BASE / name


def assert_lab_gone(lab: Lab, state) -> None:
    """Nothing the lab made remains: namespaces, links, processes (zombies count as gone)."""
    assert not lab.dir.exists(), f"{lab.dir} left behind"
    for h in state.hosts:
        assert not network.netns_exists(h.netns), f"namespace {h.netns} left"
        assert not network.link_exists(h.veth), f"link {h.veth} left"
        assert h.guest_veth and not network.link_exists(h.guest_veth), \
            f"link {h.guest_veth} left"
        for ref in (h.init, h.sshd, h.libvirtd):
            if ref is not None:
                assert not is_alive(ref.proc()), f"{h.name}: pid {ref.pid} still running"
    assert state.dhcp is not None and not is_alive(state.dhcp.proc()), \
        f"the lab's dnsmasq (pid {state.dhcp and state.dhcp.pid}) still running"
    assert not network.link_exists(state.bridge), f"bridge {state.bridge} left"
    assert state.guest_bridge and not network.link_exists(state.guest_bridge), \
        f"bridge {state.guest_bridge} left"


@pytest.fixture(scope="session")
def config() -> Config:
    return Config()


@pytest.fixture(scope="session")
def ip_forward_before() -> str:
    return Path("/proc/sys/net/ipv4/ip_forward").read_text()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def lab(config, ip_forward_before):
    """The session's lab: 4 hosts (hostA ... hostD) with a libvirtd each, up for the whole
    session."""
    the_lab = Lab(SESSION_LAB, lab_dir(SESSION_LAB), config)
    await the_lab.up(["hostA", "hostB", "hostC", "hostD"], SESSION_SUBNET, libvirt=True,
                     accel="auto")
    yield the_lab
    state = the_lab.state()
    await the_lab.down()
    assert_lab_gone(the_lab, state)


@pytest.fixture(scope="session")
def inventory(lab) -> Inventory:
    return Inventory.load(lab.inventory_path)


@pytest.fixture
async def hosts(inventory, config):
    """hostA and hostB of the session's lab, by name (closed afterwards)."""
    from migrator.hosts import SSHHost
    hs = {n: SSHHost.from_inventory(n, inventory, config) for n in ("hostA", "hostB")}
    yield hs
    for h in hs.values():
        await h.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can see whether it passed."""
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())


# -- what a test may leave behind: nothing ------------------------------------------------------

def lab_processes(lab) -> list[str]:
    """QEMUs and host-side participants (migrate-sync) still running in lab hosts, each
    named by host, command, pid and command line."""
    return [p.describe() for p in host_processes(lab)
            if is_qemu(p) or "migrate-sync" in p.cmdline]


def sshd_sessions(lab) -> dict[Proc, str]:
    """The lab hosts' sshd session processes (see :func:`migrator.lab.processes.sshd_sessions`),
    each with a description naming host, pid and command line."""
    return {p.proc: p.describe() for p in lab_sshd_sessions(lab)}


async def drop_tcp_port(host, port: int) -> str:
    """Drop every TCP segment to ``port`` on ``host`` (nftables, in its namespace); return the
    table's name (``nft delete table inet NAME`` lifts it)."""
    table = f"mtest_block_{port}"
    await host.run("nft -f -", check=True, stdin=(
        f"add table inet {table}\n"
        f"add chain inet {table} input {{ type filter hook input priority -10; }}\n"
        f"add rule inet {table} input tcp dport {port} drop\n"))
    return table


async def settled(probe, timeout_s: float = 30, interval_s: float = 0.1):
    """Call ``probe()`` until its answer is empty or ``timeout_s`` passed; return the last
    answer (what is still there, for the assertion's message). Never raises a timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (found := probe()) and loop.time() < deadline:
        await asyncio.sleep(interval_s)
    return found


@pytest.fixture
async def no_leaks(lab, inventory):
    """After the test: no QEMU or participant in any lab host, empty run dirs, no libvirt
    domain, and no SSH session on a lab host that the test opened and left open.

    Processes of a just-ended run are given a bounded time to be reaped (and SSH sessions to
    close); what is still there then fails the test, named: host, pid and command line of
    each process, the files in each directory, the domains."""
    from migrator.hosts import SSHHost, quote
    sessions_before = set(sshd_sessions(lab))
    yield
    problems = [f"still running: {p}" for p in await settled(lambda: lab_processes(lab))]
    dirs = {"run dir": inventory.run_dir,
            "shared run dir": inventory.shared_dir / "migrator-runs",
            "local run dir": inventory.local_dir / "migrator-runs"}

    async def host_left(name: str) -> list[str]:
        """What ``name`` kept: its checks side by side on its one connection."""
        found = []
        async with SSHHost.from_inventory(name, inventory) as h:
            async with asyncio.TaskGroup() as tg:
                listings = [tg.create_task(h.run(f"[ ! -d {quote(d)} ] || ls -A -- {quote(d)}"))
                            for d in dirs.values()]
                domains = tg.create_task(h.run("virsh -q list --all --name"))
                taps = tg.create_task(h.run("ls /sys/class/net | grep -E '^(mg|vnet)' || true"))
        for (what, d), listing in zip(dirs.items(), listings):
            r = listing.result()
            if not r.ok:
                found.append(f"{name}: cannot list {what} {d}: {r.stderr.strip()}")
            elif r.stdout.split():
                found.append(f"{name}: {what} {d} kept files {r.stdout.split()}")
        r = domains.result()
        if not r.ok:
            found.append(f"{name}: cannot list libvirt domains: {r.stderr.strip()}")
        elif r.stdout.split():
            found.append(f"{name}: libvirt domains left {r.stdout.split()}")
        if taps.result().stdout.split():          # our taps (mg*), libvirt's (vnet*)
            found.append(f"{name}: taps left {taps.result().stdout.split()}")
        return found

    # every host side by side: 0.22 s, one after another 0.55 s (4 hosts, measured)
    async with asyncio.TaskGroup() as tg:
        checks = [tg.create_task(host_left(h.name)) for h in lab.state().hosts]
    for check in checks:
        problems += check.result()
    claims = inventory.shared_dir / "migrator-pools"
    if claims.is_dir() and (held := sorted(str(p) for p in claims.glob("*/*.claim"))):
        problems.append(f"address range claims left {held}")
    slots = inventory.shared_dir / "migrator-slots"
    if slots.is_dir() and (held := sorted(p.name for p in slots.glob("*.slot"))):
        problems.append(f"migration slots left {held}")
    server = inventory.guest_network.dhcp
    if server is not None and (leases := sorted(p.name for p in server.hosts_dir.iterdir())):
        problems.append(f"static DHCP leases left in {server.hosts_dir}: {leases}")
    # last, so the sessions of the checks above had their time to close too
    left = await settled(lambda: [d for p, d in sshd_sessions(lab).items()
                                  if p not in sessions_before])
    problems += [f"SSH session left open: {d}" for d in left]
    if problems:
        # reported once, here: cleared so that the next tests do not fail for this one
        await clear_leftovers(lab, inventory, dirs.values())
    assert problems == [], "the test left behind:\n  " + "\n  ".join(problems)


async def clear_leftovers(lab, inventory, dirs) -> None:
    """Kill every QEMU and participant in the lab hosts (stopped ones too), empty ``dirs`` on
    every host and remove every libvirt domain."""
    from migrator.hosts import SSHHost, quote
    for p in host_processes(lab):
        if is_qemu(p) or "migrate-sync" in p.cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    await settled(lambda: lab_processes(lab))
    for name in (h.name for h in lab.state().hosts):
        async with SSHHost.from_inventory(name, inventory) as h:
            for d in dirs:
                await h.run(f"[ ! -d {quote(d)} ] || find {quote(d)} -mindepth 1 -delete")
            await h.run("for d in $(virsh -q list --all --name); do virsh destroy $d; "
                        "virsh undefine --nvram $d || virsh undefine $d; done")
    for claim in (inventory.shared_dir / "migrator-pools").glob("*/*.claim"):
        claim.unlink(missing_ok=True)
    for slot in (inventory.shared_dir / "migrator-slots").glob("*.slot"):
        slot.unlink(missing_ok=True)
    if inventory.guest_network.dhcp is not None:
        for leases in inventory.guest_network.dhcp.hosts_dir.iterdir():
            leases.unlink(missing_ok=True)
