"""The live view of a run in a terminal: one bar per migration in flight, and the run's
lines (what is done, what is queued, which barrier waits on whom), redrawn in place while
the run's story (phase lines, warnings) scrolls above it.

::

    async with live_view(ctx, mode=config.report.display):
        ...                       # the run; ctx.say() lines print above the bars

What it draws is :func:`migrator.framework.control.status_of` (the answer ``migrate-run
status`` gets from another terminal), made every ``report.live_refresh_s`` by a task of
the event loop (the run's state is only read where it is changed), drawn when it differs
from the frame on the screen, and written to the
terminal by a thread (the loop never blocks on a slow or stopped terminal).
In mode ``auto`` the view is on when stdout is a terminal; otherwise (CI, a pipe, a file)
the run prints plain timestamped lines, a progress line per ``report.progress_interval_s``,
as it always did.

Per migration: id, VM, route, phase, a bar of the RAM sent of the guest's RAM (the disk
copied while the disk is copied first), sent/total, remaining, throughput, dirty rate,
iteration, auto-converge throttle, the policy's steps, and the time in flight. Queued
migrations say what they wait for.

Nothing here raises into the run: a frame that cannot be drawn is logged and skipped.
"""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import sys
import threading
import time
from typing import AsyncIterator

log = logging.getLogger(__name__)

MIB = 2 ** 20


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:,.0f}"


def fraction(row: dict) -> tuple[float, str, str]:
    """(done fraction, done, total) of one status row: the disk while it is copied, else
    the guest's RAM sent (total minus remaining: QEMU's transferred counts pages sent twice
    and goes past the total)."""
    if row.get("disk"):
        done, total = row["disk"]
        return (done / total if total else 0.0), f"disk {_mib(done)}", f"{_mib(total)} MiB"
    total = row.get("total")
    if not total or row.get("remaining") is None:
        return 0.0, "-", "-"
    return max(0.0, min(1.0, (total - row["remaining"]) / total)), _mib(row["transferred"]), \
        f"{_mib(total)} MiB"


def run_lines(status: dict, elapsed_s: float) -> list[str]:
    """The run's lines over the bars: counts, the queue, and each open barrier round with
    whom it waits on."""
    migs = status["migrations"]
    queued = [m for m in migs if m["phase"] == "QUEUED"]
    lines = [f"run {status['run_id']}  {elapsed_s:,.0f} s   in flight {len(migs) - len(queued)}"
             f"   queued {len(queued)}   completed {status['completed']}"
             f"   failed {status['failed']}"]
    for m in queued[:3]:
        lines.append(f"queue: {m['mig_id']} {m['vm']} {m['src']}->{m['dst']} waits for "
                     f"{m['waiting_for'] or 'its turn'}")
    if len(queued) > 3:
        lines.append(f"queue: and {len(queued) - 3} more")
    for b in status.get("barriers", []):
        part = b.get("run", "").removeprefix(status["run_id"]).lstrip(".")
        lines.append(f"{b['kind']} {b['name']!r}{f' ({part})' if part else ''}: waiting on "
                     f"{', '.join(b['waiting_on']) or '-'} ({len(b['arrived'])} of "
                     f"{len(b['members'])} arrived, open {b['open_s']:.0f} s)")
    return lines


#: the bars' columns: (header, right-aligned)
COLUMNS = (("migration", False), ("vm", False), ("route", False), ("phase", False),
           ("", False), ("sent", True), ("of", True), ("remaining", True), ("Mbit/s", True),
           ("dirty p/s", True), ("iter", True), ("throttle", True), ("policy", False),
           ("for", True))
BAR = 24


def bar(done: float, width: int = BAR) -> tuple[str, str]:
    """(done part, rest) of a bar ``width`` cells wide, in half cells: ``━━━╸`` and
    ``╺━━━``, as rich draws its own."""
    halves = round(max(0.0, min(1.0, done)) * width * 2)
    full, half = divmod(halves, 2)
    head = "━" * full + ("╸" if half else "")
    rest = width - full - half
    return head, ("╺" + "━" * (rest - 1) if rest and not half else "━" * rest)


def cells(m: dict) -> list[str]:
    """One migration's row, as the columns show it (the bar's cell left empty)."""
    _done, sent, total = fraction(m)
    return [m["mig_id"], m["vm"], f"{m['src']}->{m['dst']}",
            m["phase"] + (" (cancel asked)" if m.get("cancel_asked") else ""), "", sent, total,
            _mib(m["remaining"]) if m["remaining"] is not None and not m.get("disk") else "-",
            f"{m['mbps']:,.0f}" if m["mbps"] is not None else "-",
            f"{m['dirty_rate_pps']:,}" if m.get("dirty_rate_pps") is not None else "-",
            str(m["iteration"]) if m["iteration"] is not None else "-",
            f"{m['cpu_throttle']}%" if m["cpu_throttle"] else "-",
            m["policy"] or "-", f"{m['elapsed_s']:.0f} s"]


def render(status: dict, elapsed_s: float):
    """One frame of ``status`` (a rich Text). Laid out here, in aligned columns: rich's
    Table measures every cell at every frame, ten times the CPU of the text itself, and
    the view is redrawn four times a second for the whole run."""
    from rich.text import Text
    text = Text("\n".join(run_lines(status, elapsed_s)))
    if not status["migrations"]:
        return text
    rows = [cells(m) for m in status["migrations"]]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, (h, _) in
              enumerate(COLUMNS)]
    widths[4] = BAR

    def line(values: list[str]) -> list[str]:
        return [v.rjust(w) if right else v.ljust(w)
                for v, w, (_h, right) in zip(values, widths, COLUMNS)]
    text.append("\n" + "  ".join(line([h for h, _ in COLUMNS])).rstrip(), style="bold")
    for m, row in zip(status["migrations"], rows):
        parts = line(row)
        head, rest = bar(fraction(m)[0])
        text.append("\n" + "  ".join(parts[:4]) + "  ")
        text.append(head, style="bar.complete")
        text.append(rest, style="bar.back")
        text.append("  " + "  ".join(parts[5:]).rstrip())
    return text


class _TerminalWriter(io.TextIOBase):
    """The live view's terminal, written by a thread of its own: the event loop only
    queues text, and never blocks on a terminal that is slow, stopped (Ctrl-S) or not read
    (the run's QMP polls, policy clocks and barrier timeouts live on that loop)."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="live view writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (text := self.queue.get()) is not None:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass                          # the terminal is gone: nothing to show it on

    def write(self, text: str) -> int:
        self.queue.put(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.stream.fileno()

    def finish(self, timeout: float) -> None:
        """Write what is queued (for at most ``timeout``: a stopped terminal is left)."""
        self.queue.put(None)
        self.thread.join(timeout)


def wants_live(mode: str, stream=None) -> bool:
    """Whether ``mode`` (``auto`` | ``live`` | ``lines``) draws the live view on ``stream``
    (stdout): ``auto`` when it is a terminal."""
    stream = stream or sys.stdout
    return mode == "live" or (mode == "auto" and stream.isatty())


@contextlib.asynccontextmanager
async def live_view(ctx, mode: str = "auto", refresh_s: float = 0.25) -> AsyncIterator[bool]:
    """Draw ``ctx``'s run live while the block runs (when :func:`wants_live`); yields
    whether it does. While on, whatever the run prints to stdout or stderr (``ctx.say``, a
    warning) scrolls above the view, and the plain progress lines are off
    (``ctx.progress_lines``): the bars show the same. The last frame stays on
    the screen when the block ends."""
    import asyncio

    from ..aio import cancel_and_wait, shielded
    from ..framework.control import status_of
    if not wants_live(mode):
        yield False
        return
    from rich.console import Console
    from rich.live import Live
    writer = _TerminalWriter(sys.stdout)
    console = Console(file=writer, force_terminal=True, highlight=False, soft_wrap=True)
    t0 = time.monotonic()
    lines = ctx.progress_lines

    def frame():
        return render(status_of(ctx), time.monotonic() - t0)

    # stderr goes above the view too when it is the same terminal; redirected (2>FILE), it
    # stays where it was sent
    live = Live(console=console, auto_refresh=False, transient=False,
                redirect_stdout=True, redirect_stderr=sys.stderr.isatty())

    async def redraw() -> None:
        shown = None
        while True:
            try:
                text = frame()
                if text.plain != shown:   # the same frame again (figures change per sample,
                    live.update(text, refresh=True)   # clocks per second): nothing to draw
                    shown = text.plain
            except Exception:  # noqa: BLE001 - a frame never fails the run
                log.exception("live view: a frame could not be drawn")
            await asyncio.sleep(refresh_s)

    live.start()
    ctx.progress_lines = False
    task = asyncio.create_task(redraw(), name="live view")   # owned: ended below
    try:
        yield True
    finally:
        try:
            await cancel_and_wait(task)
        finally:
            ctx.progress_lines = lines
            try:
                live.update(frame(), refresh=True)      # the last frame stays
            except Exception:  # noqa: BLE001 - as above
                log.exception("live view: the last frame could not be drawn")
            live.stop()
            await shielded(asyncio.to_thread(writer.finish, 5.0))  # before what follows


__all__ = ["bar", "fraction", "live_view", "render", "run_lines", "wants_live"]
