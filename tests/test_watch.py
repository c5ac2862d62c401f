"""Watching a run (issue 21): the live view in a real terminal, read off the screen while
migrations run, and the run's Prometheus metrics scraped meanwhile and parsed with
prometheus_client's own parser. Against the session lab."""

import asyncio
import contextlib
import os
import pty
import re
import sys
from typing import AsyncIterator

import pyte
import pytest

import aiohttp

from migrator.config import GUEST_KERNEL_APPEND

from .conftest import BIN, metric_samples
from .test_framework import the_run

COLS, ROWS = 180, 50
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")       # a terminal's control sequence


class Terminal:
    """A pseudo-terminal of COLS x ROWS whose screen a real terminal emulator (pyte) keeps:
    what a person would see, escape sequences applied."""

    def __init__(self):
        self.master, self.slave = pty.openpty()
        os.set_blocking(self.master, False)
        import fcntl
        import struct
        import termios
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        self.changed = asyncio.Event()
        self.closed = False                   # every writer of the pty is gone

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return
        except OSError:                       # EIO: the process and its children left
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
            self.closed = True
        self.raw += data
        self.stream.feed(data)
        self.changed.set()

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    @contextlib.asynccontextmanager
    async def running(self, *argv: str, env: dict) -> AsyncIterator[asyncio.subprocess.Process]:
        """``argv`` on this terminal (its stdin, stdout and stderr), in a session of its own;
        killed if it still runs when the block ends; the terminal is closed then."""
        loop = asyncio.get_running_loop()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=self.slave, stdout=self.slave, stderr=self.slave, env=env,
            start_new_session=True)
        os.close(self.slave)
        loop.add_reader(self.master, self._readable)
        try:
            yield proc
        finally:
            loop.remove_reader(self.master)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            os.close(self.master)

    async def wait_screen(self, check, timeout: float) -> list[str]:
        """The screen's lines once ``check(lines)`` holds (checked at every output)."""
        try:
            async with asyncio.timeout(timeout):
                while not check(self.lines()):
                    assert not self.closed, "the run ended first; its screen:\n" + \
                        "\n".join(self.lines())
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"not seen within {timeout:g} s; the screen:\n" +
                                 "\n".join(self.lines())) from None
        return self.lines()


async def scrape(url: str) -> dict[str, float]:
    """``url``'s metrics, parsed: ``name{label=value,...}`` -> value."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:
            assert r.status == 200 and r.content_type == "text/plain"
            return metric_samples(await r.text())


def bar_rows(lines: list[str], phase: str) -> list[str]:
    return [line for line in lines if f" {phase} " in line and "━" in line]


def sent_mib(row: str) -> int:
    """The 'sent' figure of a bar row: the first number after the bar (-1 when the row is
    not drawn that far yet: the screen is read between the chunks of a frame)."""
    found = re.search(r"━[━╸╺ ]*\s+([\d,]+)\s", row)
    return int(found.group(1).replace(",", "")) if found else -1


#: a live view over a run with nothing in flight, and a warning logged while it is up
WARNS_UNDER_THE_VIEW = """
import asyncio, logging, types
from migrator.cli.common import setup_logging
from migrator.report.live import live_view
async def main():
    setup_logging(False)
    ctx = types.SimpleNamespace(progress_lines=True, live={}, migrations=[], server=None,
                                run_id="r1")
    async with live_view(ctx, mode="live", refresh_s=0.05):
        await asyncio.sleep(0.3)
        logging.getLogger("migrator.somewhere").warning("a warning while the view is up")
        await asyncio.sleep(0.3)
asyncio.run(main())
"""


async def test_a_warning_logged_under_the_live_view_scrolls_above_it():
    """The run's log handler writes to the stderr of the moment (the live view's, which
    prints above the bars), not to the terminal behind the view's back."""
    term = Terminal()
    async with term.running(sys.executable, "-c", WARNS_UNDER_THE_VIEW,
                            env={**os.environ, "TERM": "xterm-256color"}) as proc:
        async with asyncio.timeout(60):
            assert await proc.wait() == 0, term.raw.decode(errors="replace")
            while not term.closed:
                term.changed.clear()
                await term.changed.wait()
    shown = [line for line in term.lines() if line]
    text = "\n".join(shown)
    warned = [i for i, line in enumerate(shown) if "WARNING a warning while the view" in line]
    views = [i for i, line in enumerate(shown) if line.startswith("run r1 ")]
    # the warning on a line of its own, above the view's one line; nothing else drawn
    assert len(warned) == 1 and len(views) == 1 and warned[0] < views[0], text
    assert re.match(r"\d{4}-\d\d-\d\d [\d:,]+ migrator\.somewhere WARNING a warning while the "
                    r"view is up$", shown[warned[0]]), text
    assert len(shown) == 2, text


async def test_live_view_in_a_terminal_and_metrics_while_migrations_run(
        inventory, tmp_path, no_leaks):
    term = Terminal()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLS), "LINES": str(ROWS)}
    # a bandwidth cap, so that each hop lasts a few seconds (many frames) at any machine speed
    async with term.running(
            str(BIN / "migrate-run"), "-i", str(inventory.source), "-o", str(tmp_path),
            "-m", "hostA,hostB", "ping_pong", "-p", "scenario.rounds=1",
            "-p", "migration.bandwidth_mibs=24", "--metrics", "127.0.0.1:0",
            # the lab's dirtier in the guest: 8 MiB at 8 MiB/s, its lines on ttyS1
            "-p", f"vms.vm1.append={GUEST_KERNEL_APPEND} lab.out=ttyS1 lab.dirty=8 lab.rate=8",
            env=env) as proc:
        # a bar while vm1 migrates hostA -> hostB, with the run's line and the header over it
        # (its figures from the first progress sample on: the frame drawn when the phase
        # changed may come before it, with "-" for each)
        lines = await term.wait_screen(
            lambda ls: any("hostA->hostB" in r and " vm1 " in r and " MiB " in r
                           for r in bar_rows(ls, "MIGRATING")), timeout=240)
        (row,) = bar_rows(lines, "MIGRATING")
        assert re.search(r"pair1-1\s+vm1\s+hostA->hostB\s+MIGRATING\s+[━╸╺]+", row), row
        assert re.search(r"\s\d[\d,]*\s+MiB\s", row), row               # sent, of N MiB
        assert any(re.match(r"run \S+ +\d+ s +in flight 1 +queued 0 +completed 0", line)
                   for line in lines), lines
        assert any(line.split()[:4] == ["migration", "vm", "route", "phase"] for line in lines)
        first = sent_mib(row)
        assert first >= 0, row
        # the metrics, meanwhile: this migration's figures, KubeVirt-like names
        (url,) = set(re.findall(r"metrics: (http://127\.0\.0\.1:\d+/metrics)",
                                term.raw.decode(errors="replace")))
        got = await scrape(url)
        flying = "{dst=hostB,mig_id=pair1-1,src=hostA,vm=vm1}"
        assert got["migrator_migrations_in_running_phase"] == 1
        assert got["migrator_migration_data_total_bytes" + flying] > 100 * 2**20
        assert 0 < got["migrator_migration_data_processed_bytes" + flying]
        assert got["migrator_migration_data_remaining_bytes" + flying] > 0
        assert got["migrator_migration_started_total"] == 1
        assert got["migrator_migration_succeeded_total"] == 0
        # the sync server's own: the run's first barriers were released already
        assert got["migrator_sync_barrier_wait_seconds_count"] >= 1
        # drawn again in place, further on: the same row with more sent. (The screen is
        # read at every chunk of output, a frame may come in several: a screen without the
        # row is a frame half drawn, not the hop's end; that is told by its phase line.)
        def further(ls: list[str]) -> bool:
            return any(sent_mib(r) > first for r in bar_rows(ls, "MIGRATING")
                       if "hostA->hostB" in r)

        def hop_over(_ls) -> bool:
            phases = re.findall(r"\[pair1-1 vm1 hostA->hostB\] ([A-Z_]+)",
                                ANSI.sub("", term.raw.decode(errors="replace")))
            return "MIGRATING" in phases and phases[-1] != "MIGRATING"

        lines = await term.wait_screen(lambda ls: further(ls) or hop_over(ls), timeout=120)
        assert further(lines), "the hop ended before a second frame:\n" + "\n".join(lines)
        # the back hop gets its own bar (the first one's row is gone)
        lines = await term.wait_screen(
            lambda ls: any("hostB->hostA" in r for r in bar_rows(ls, "MIGRATING")),
            timeout=240)
        assert not any("hostA->hostB" in r for r in bar_rows(lines, "MIGRATING"))
        got = await scrape(url)
        assert got["migrator_migration_succeeded_total"] == 1
        assert got["migrator_migration_started_total"] == 2
        assert got["migrator_migration_downtime_seconds_count"] == 1
        assert got["migrator_migration_total_time_seconds_count"] == 1
        assert not [k for k in got if k.startswith("migrator_migration_data_total_bytes")
                    and "src=hostA" in k]                    # the ended one is gone
        # the phase lines scrolled above the view, timestamped
        assert any(re.match(r"\[ *[\d.]+s\] \[pair1-1 vm1 hostA->hostB\] CLEANED", line)
                   for line in lines), lines
        async with asyncio.timeout(240):
            rc = await proc.wait()
        lines = await term.wait_screen(lambda ls: any("verdict:" in line for line in ls), 10)
    text = "\n".join(lines)
    assert rc == 0, text
    assert "verdict: PASSED" in text
    assert not re.search(r"\d s iteration \d", term.raw.decode(errors="replace")), \
        "plain progress lines printed under the live view"
    run, migs, _junit = the_run(tmp_path)
    assert [m["status"] for m in migs] == ["completed"] * 2
    # the dirtier's own series, stamped on the hosts: the source's copy until the guest
    # stopped, the destination's after it resumed, no stale page anywhere
    for i, m in enumerate(migs):
        series, phases = m["dirtier"], {p: t for p, t, _wall in m["phases"]}
        hosts = [d["host"] for d in series]
        assert hosts == sorted(hosts, key=[m["src"], m["dst"]].index), hosts
        # (the first hop may start before the freshly booted dirtier's first line)
        assert hosts.count(m["src"]) >= (2 if i else 0) and hosts.count(m["dst"]) >= 1, \
            series
        assert all(d["stale_pages"] == 0 and d["rate_mibs"] > 0 for d in series), series
        # on the progress axis (seconds since 'migrate'): the source's lines end by the
        # completion, the destination's start around it (a hop of 3 s or more: the cap),
        # within the follower's poll and the controller's view of the completion
        done_at = phases["COMPLETED"] - phases["MIGRATING"]
        assert all(d["t"] <= done_at + 0.5 for d in series if d["host"] == m["src"]), \
            (series, done_at)
        assert all(d["t"] >= done_at - 1.0 for d in series if d["host"] == m["dst"]), \
            (series, done_at)
        assert [d["now"] for d in series] == sorted(d["now"] for d in series)
        # and the guest checked every page on the destination, none stale (checks.dirtier)
        check = m["dirtier_check"]
        assert check["host"] == m["dst"] and check["checked"], check
        assert check["stale_pages"] == 0 and check["new_stale_pages"] == 0, check
        first = next(d["pass"] for d in series if d["host"] == m["dst"])
        assert check["pass"] >= first + 2, (check, series)


@pytest.mark.parametrize("metrics, message", [
    ("127.0.0.1:{port}", "cannot listen there"),
    ("127.0.0.1", "expected ADDR:PORT"),
    ("localhost:99999", "expected ADDR:PORT"),
    ("localhost:0", "port 0 needs an IP address")])
async def test_a_metrics_address_that_cannot_serve_is_refused_before_anything(
        inventory, tmp_path, metrics, message):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "migrate-run"), "-i", str(inventory.source), "-o", str(tmp_path),
            "-m", "hostA,hostB", "ping_pong",
            "--metrics", metrics.format(port=taken.getsockname()[1]),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    assert proc.returncode == 2, out + err
    (line,) = err.decode().splitlines()
    assert line.startswith("migrate-run: error: --metrics") and message in line
    assert not list(tmp_path.iterdir())                  # nothing started: no results


async def test_the_view_says_which_host_an_instances_barrier_waits_on(config, inventory):
    """A scenario instance's barrier (the instances sync as <run-id>.<instance>) in what
    the live view and ``status`` show: a real sync server, members connected as hosts."""
    from migrator.framework import RunContext
    from migrator.framework.control import status_of
    from migrator.report.live import render
    from syncserver import SyncClient
    ctx = RunContext(config, inventory)
    await ctx.start_server("127.0.0.1")
    members = ["hostA", "hostB", "hostC"]
    clients = [SyncClient(ctx.sync_url, token=ctx.token, member=m,
                          run_id=f"{ctx.run_id}.pair1") for m in members]
    try:
        await asyncio.gather(*(c.connect() for c in clients))
        early = [asyncio.ensure_future(c.barrier("disks_prepared", members, timeout=30))
                 for c in clients[::2]]
        async with asyncio.timeout(30):
            while not status_of(ctx)["barriers"] or \
                    len(status_of(ctx)["barriers"][0]["arrived"]) < 2:
                await asyncio.sleep(0.01)
        (b,) = status_of(ctx)["barriers"]
        assert (b["run"], b["name"], b["waiting_on"]) == (f"{ctx.run_id}.pair1",
                                                          "disks_prepared", ["hostB"])
        text = render(status_of(ctx), 3).plain
        assert "barrier 'disks_prepared' (pair1): waiting on hostB (2 of 3 arrived" in text
        await clients[1].barrier("disks_prepared", members, timeout=30)
        await asyncio.gather(*early)
        assert status_of(ctx)["barriers"] == []
    finally:
        await asyncio.gather(*(c.close() for c in clients))
        await ctx.stop_server()


def test_display_mode_choice():
    """``auto`` is live on a terminal only; ``live`` and ``lines`` are what they say."""
    from migrator.report.live import wants_live

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty
    assert wants_live("auto", Stream(True)) and not wants_live("auto", Stream(False))
    assert wants_live("live", Stream(False)) and not wants_live("lines", Stream(True))
