"""report.html drawn in a process of its own, while the run goes on.

::

    async with PageDrawer(stop_s) as drawer:
        await drawer.start()                    # when the first guest boots
        drawer.draw(records)                    # migrations that ended: their plots
        drawer.draw_run_plots(records)          # all of them, when none is in flight
        await drawer.write_page(out_dir)        # the page, taking what was drawn ahead

The drawer is ``python -m migrator.report.drawer``: one JSON request per line on its stdin,
one answer line per request on its stdout, in order; it ends at the end of its stdin (so a
controller that dies leaves nothing). It imports matplotlib, warms it up and draws while the
controller goes on: the controller never imports matplotlib, and a plot's drawing (tenths of
a second of CPU under the GIL in a thread) never competes with the controller's event loop
(its checks, its cleanup, its next migration): it runs on another core. Each plot is drawn
in a child forked from the warm drawer (:class:`_Forks`, :data:`CHILDREN` at once), so the
last migration's plot and the run's plots are drawn side by side, not one after the other,
while the run ends. The plots drawn ahead are kept in :mod:`.html`'s cache, in the drawer:
the page it writes takes them, once every child has given its plot.

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
import os
import signal
import sys
import tempfile
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


#: plots drawn at once, each in a child forked from the warm drawer (matplotlib imported,
#: its fonts found): a migration's plot beside the run's, beside the next migration's
CHILDREN = 2
#: the children's niceness: a plot is never more urgent than the run's own work (its QEMUs,
#: its controller), which it would otherwise slow down on a busy machine
NICE = 10


class _Forks:
    """Plots drawn in children forked from the drawer, at most :data:`CHILDREN` at once,
    while it goes on reading requests; each child's result kept in the drawer (for the page)
    when it is collected, in the order the children began.

    A child writes its result (JSON) to an unlinked temporary file, so it never waits for
    the drawer; it dies with the drawer (``PR_SET_PDEATHSIG``). A fork that fails draws the
    plot in the drawer itself; a child that fails leaves its plot to the page (a warning).
    """

    def __init__(self, kept: logging.Handler, page_log: logging.Logger) -> None:
        import ctypes
        self.kept, self.page_log = kept, page_log
        self.running: list[tuple[int, Any, str, Any]] = []   # (pid, result file, key, keep)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._parent = os.getpid()

    def start(self, key: str, job, keep, supersedes: bool = False) -> None:
        """``keep(key, job())``, the job in a child; nothing if that key is being drawn.
        ``supersedes``: the job replaces every other of the same ``keep`` being drawn (the
        run's plots of fewer migrations): they are killed, what they drew is for nobody."""
        if any(k == key for _pid, _out, k, _keep in self.running):
            return
        if supersedes:
            for entry in [e for e in self.running if e[3] == keep]:
                self._kill(entry)
        while len(self.running) >= CHILDREN:
            self._collect(self.running[0])
        out = tempfile.TemporaryFile()
        try:
            pid = os.fork()
        except OSError as exc:
            out.close()
            self.page_log.info("report: a plot drawn in the drawer itself (fork: %s)", exc)
            keep(key, job())
            return
        if pid == 0:
            self._child(out, job)       # never returns
        self.running.append((pid, out, key, keep))

    def collect_done(self) -> None:
        """Keep what the children that ended drew (never waits)."""
        for entry in list(self.running):
            pid, status = os.waitpid(entry[0], os.WNOHANG)
            if pid:
                self._collect(entry, status)

    def collect_all(self) -> None:
        """Wait for every child, keep what they drew."""
        while self.running:
            self._collect(self.running[0])

    def stop(self) -> None:
        """Kill the children left (their plots are for nobody now) and reap them."""
        while self.running:
            self._kill(self.running[0])

    def _kill(self, entry) -> None:
        self.running.remove(entry)
        pid, out, _key, _keep = entry
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        out.close()

    def _collect(self, entry, status: int | None = None) -> None:
        self.running.remove(entry)
        pid, out, key, keep = entry
        if status is None:
            _pid, status = os.waitpid(pid, 0)
        with out:
            out.seek(0)
            data = out.read()
        try:
            result = json.loads(data)
        except ValueError:
            result = {"error": f"its child (pid {pid}) ended with no result "
                               f"(wait status {status})"}
        self.kept.lines.extend((level, text) for level, text in result.get("log", ()))
        if "error" in result:
            self.page_log.warning("report: a plot not drawn ahead: %s", result["error"])
        else:
            keep(key, result["value"])

    def _child(self, out, job) -> None:
        """In the child: the job's result written, then out at once (no atexit: the
        drawer's own run at its end; no buffered output of the drawer's written twice)."""
        code = 1
        try:
            self._libc.prctl(1, signal.SIGKILL)         # PR_SET_PDEATHSIG
            if os.getppid() != self._parent:            # the drawer died meanwhile
                os._exit(code)
            os.nice(NICE)
            self.kept.lines = []
            try:
                result = {"value": job()}
                code = 0
            except BaseException as exc:  # noqa: BLE001 - the result says it
                result = {"error": f"{type(exc).__name__}: {exc}"}
            result["log"] = self.kept.lines
            out.write(json.dumps(result).encode())
            out.flush()
        finally:
            os._exit(code)


def _serve(requests, answers) -> None:
    """The drawer process: each request done in turn, its answer written and flushed; the
    plots drawn ahead in children (:class:`_Forks`), the page once they are all in."""
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
    forks = _Forks(kept, page_log)
    try:
        for line in requests:
            answer: dict[str, Any] = {"ok": True}
            try:
                forks.collect_done()
                request = json.loads(line)
                answer["id"] = request.get("id")
                op = request.get("op")
                if op == "warm_up":
                    html.prefetch()
                elif op == "draw":
                    for key, job in html.migration_plot_jobs(request["records"]):
                        forks.start(key, job, html.keep_migration_plot)
                elif op == "run_plots":
                    job = html.run_plots_job(request["records"])
                    if job is not None:
                        forks.start(*job, html.keep_run_plots, supersedes=True)
                elif op == "page":
                    forks.collect_all()
                    answer["path"] = str(html.write_html(Path(request["dir"])))
                else:
                    raise ValueError(f"no such request: {op!r}")
            except Exception as exc:  # noqa: BLE001 - the answer says it
                answer.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            answer["log"], kept.lines = kept.lines, []
            answers.write(json.dumps(answer) + "\n")
            answers.flush()
    finally:
        forks.stop()


def main() -> int:
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
    code = main()
    try:
        atexit._run_exitfuncs()
        sys.stderr.flush()
    finally:
        os._exit(code)


__all__ = ["DrawerError", "PageDrawer"]
