"""report.html drawn in a process of its own, while the run goes on.

::

    async with PageDrawer(stop_s) as drawer:
        await drawer.start()                    # when the first guest boots
        drawer.draw(records)                    # migrations that ended: their plots
        drawer.draw_run_plots(records)          # all of them, once no more are to come
        await drawer.write_page(out_dir)        # the page, taking what was drawn ahead

The drawer is ``python -m migrator.report.drawer``: one JSON request per line on its stdin,
one answer line per request on its stdout, in order; it ends at the end of its stdin (so a
controller that dies leaves nothing). It imports matplotlib, warms it up and draws while the
controller goes on: the controller never imports matplotlib, and a plot's drawing (tenths of
a second of CPU under the GIL in a thread) never competes with the controller's event loop
(its checks, its cleanup, its next migration): it runs on another core. Its cache of plots
drawn ahead is :mod:`.html`'s own, in that process: the page it writes takes them.

What can go wrong: the drawer cannot start, dies, or answers a request with an error. Then
:meth:`PageDrawer.write_page` raises :class:`DrawerError`, and the caller draws the page
itself (:func:`migrator.report.results.write_page` does): the page is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..aio import shielded, wait_for

log = logging.getLogger(__name__)


class DrawerError(Exception):
    """The drawer process could not do what it was asked (why in the message)."""


class PageDrawer:
    """The controller's side of the drawer process (see the module's docstring)."""

    def __init__(self, stop_s: float, page_s: float):
        #: how long the process has to end after its stdin closed, before it is killed
        self.stop_s = stop_s
        #: how long :meth:`write_page` waits for the page
        self.page_s = page_s
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._gone: str | None = None

    async def __aenter__(self) -> "PageDrawer":
        return self

    async def __aexit__(self, *exc) -> None:
        await shielded(self.close())

    @property
    def started(self) -> bool:
        """The process was started (it may have ended since)."""
        return self._reader is not None or self._gone is not None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._gone is None

    async def start(self) -> None:
        """Start the process and ask it to warm up (matplotlib imported, its fonts found,
        the page's template compiled). Returns once it runs, not once it is warm.

        :raise DrawerError: the process could not be started.
        """
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "migrator.report.drawer", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise DrawerError(f"the report's drawer did not start: {exc}") from exc
        self._reader = asyncio.get_running_loop().create_task(self._read(),
                                                              name="report drawer")
        self._send({"op": "warm_up"})

    def draw(self, records: list[dict]) -> None:
        """Draw the plots of these migration records (as
        :func:`migrator.report.results.migration_body` makes them) ahead of the page.
        Returns at once; a failure is logged, and the page then draws them itself."""
        self._send({"op": "draw", "records": records})

    def draw_run_plots(self, records: list[dict]) -> None:
        """Draw the run's plots from every migration record, ahead of the page (as
        :meth:`draw`)."""
        self._send({"op": "run_plots", "records": records})

    async def write_page(self, out_dir: Path) -> Path:
        """Write ``out_dir/report.html`` (after everything asked before: one request at a
        time). What the drawer logs about the plots and the page is logged here, under
        ``migrator.report.html``, at its level, as each answer arrives.

        :raise DrawerError: the drawer is not running, died, or could not write the page.
        :raise TimeoutError: no page within :attr:`page_s`.
        """
        answer = await wait_for(self._send({"op": "page", "dir": str(out_dir)}), self.page_s)
        return Path(answer["path"])

    async def close(self) -> None:
        """End the process (its stdin closed; killed if it does not end within
        :attr:`stop_s`) and wait for it. Never raises; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
            try:
                await wait_for(proc.wait(), self.stop_s)
            except TimeoutError:
                log.warning("report drawer (pid %d) did not end within %g s: killed",
                            proc.pid, self.stop_s)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:        # ends at the process's EOF
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None

    def _send(self, request: dict) -> "asyncio.Future[dict]":
        fut = asyncio.get_running_loop().create_future()
        if not self.running:
            fut.set_exception(DrawerError(f"the report's drawer {self._gone or 'is not running'}"))
            fut.exception()                 # retrieved: a request nobody awaits is no error
            return fut
        rid = next(self._ids)
        self._pending[rid] = fut
        try:
            self._proc.stdin.write((json.dumps({"id": rid, **request}, default=str)
                                    + "\n").encode())
        except (BrokenPipeError, ConnectionResetError, RuntimeError) as exc:
            self._pending.pop(rid, None)
            fut.set_exception(DrawerError(f"the report's drawer is gone ({exc})"))
            fut.exception()
        return fut

    async def _read(self) -> None:
        """Answers to their requests; what the process says on stderr, logged; when it
        ends, every request left fails with why."""
        proc = self._proc

        async def stderr() -> None:     # drained whatever it says (a full pipe stops it)
            while chunk := await proc.stderr.read(65536):
                log.debug("report drawer: %s", chunk.decode(errors="replace").rstrip())

        said = asyncio.get_running_loop().create_task(stderr())
        try:
            while line := await proc.stdout.readline():
                try:
                    answer = json.loads(line)
                except ValueError:
                    log.warning("report drawer said %r", line[:200])
                    continue
                for level, text in answer.get("log", ()):     # as the page's own log
                    logging.getLogger("migrator.report.html").log(level, "%s", text)
                fut = self._pending.pop(answer.get("id"), None)
                if fut is not None and fut.done():      # its caller stopped waiting
                    fut = None
                if answer.get("ok"):
                    if fut is not None:
                        fut.set_result(answer)
                    continue
                error = DrawerError(f"the report's drawer: {answer.get('error')}")
                log.warning("%s", error)
                if fut is not None:
                    fut.set_exception(error)
                    fut.exception()
            await said
        except asyncio.CancelledError:     # torn down (the loop ends): the process with it
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            raise
        finally:
            said.cancel()                   # (at its EOF already, unless this one failed)
            await asyncio.gather(said, return_exceptions=True)
            code = await proc.wait()
            self._gone = f"ended (exit status {code})"
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(DrawerError(f"the report's drawer {self._gone}"))
                    fut.exception()
            self._pending.clear()


def _serve(requests, answers) -> None:
    """The drawer process: each request done in turn, its answer written and flushed."""
    from . import html

    class Kept(logging.Handler):
        """html's log lines (a plot not drawn, the page), sent with each answer."""

        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.lines: list[tuple[int, str]] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append((record.levelno, record.getMessage()))

    kept = Kept()
    page_log = logging.getLogger("migrator.report.html")
    page_log.addHandler(kept)
    page_log.setLevel(logging.INFO)
    page_log.propagate = False
    for line in requests:
        answer: dict[str, Any] = {"ok": True}
        try:
            request = json.loads(line)
            answer["id"] = request.get("id")
            op = request.get("op")
            if op == "warm_up":
                html.prefetch()
            elif op == "draw":
                html.draw_ahead(request["records"])
            elif op == "run_plots":
                html.draw_run_plots_ahead(request["records"])
            elif op == "page":
                answer["path"] = str(html.write_html(Path(request["dir"])))
            else:
                raise ValueError(f"no such request: {op!r}")
        except Exception as exc:  # noqa: BLE001 - the answer says it
            answer.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        answer["log"], kept.lines = kept.lines, []
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def main() -> int:
    import signal
    # Ctrl-C reaches the terminal's whole process group: the run it belongs to decides what
    # happens (it rolls back, then asks for the page); this process ends with its stdin
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers, sys.stdout = sys.stdout, sys.stderr        # stdout is the answers' only
    _serve(sys.stdin, answers)
    return 0


if __name__ == "__main__":
    # out at once, as migrate-run itself (cli.run_command): what libraries registered runs
    # (matplotlib's temporary config dir), not the tear-down of matplotlib's modules one by
    # one (0.2 s that the controller would wait for at its very end)
    import atexit
    import os
    code = main()
    try:
        atexit._run_exitfuncs()
        sys.stderr.flush()
    finally:
        os._exit(code)


__all__ = ["DrawerError", "PageDrawer"]
