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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable

import pytest
import pytest_asyncio

from migrator.config import Config, Inventory
from migrator.lab import Lab
from migrator.lab import network
from migrator.lab.system import is_alive

TEST_BASE = Path("/srv/migrator-test")
SESSION_LAB = "mtest"
SESSION_SUBNET = "10.77.240.0/24"
BIN = Path(sys.executable).parent


def pytest_configure(config):
    if os.geteuid() != 0:
        pytest.exit("the test suite needs root (it builds network-namespace labs)", returncode=2)


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


def lab_dir(name: str) -> Path:
    return TEST_BASE / name


def assert_lab_gone(lab: Lab, state) -> None:
    """Nothing the lab made remains: namespaces, links, processes (zombies count as gone)."""
    assert not lab.dir.exists(), f"{lab.dir} left behind"
    for h in state.hosts:
        assert not network.netns_exists(h.netns), f"namespace {h.netns} left"
        assert not network.link_exists(h.veth), f"link {h.veth} left"
        for ref in (h.init, h.sshd, h.libvirtd):
            if ref is not None:
                assert not is_alive(ref.proc()), f"{h.name}: pid {ref.pid} still running"
    assert not network.link_exists(state.bridge), f"bridge {state.bridge} left"


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can see whether it passed."""
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())
