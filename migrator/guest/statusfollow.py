"""The guest's status lines (its second serial port, ``status.log`` on the host) as they
arrive, each stamped with the *host's* clock when it reached the file.

::

    follower = StatusFollower(host, vm.paths.status_log, on_line)
    await follower.start()        # on_line(host_time, "DIRTY t=12 pass=3 rate=80MB/s bad=0")
    ...
    await follower.stop()         # never raises; the lines written until now are delivered

Why the host's clock: the guest's own clock stops while the VM is paused, and its lines come
four times a second; neither shows when the guest really stopped and resumed. A small Python
follower runs on the host (python3 is already needed there by the sync participant): it
polls the file every 20 ms, so a line's stamp is at most 20 ms after QEMU wrote it. It
starts at the file's end (only what comes from now on); a file that does not exist yet
(the destination's QEMU not started) is waited for and read from its start. It follows one
QEMU's file: once that file is truncated or replaced (a new QEMU on the same path: the VM
migrated back), it reads nothing more.

The follower ends when its stdin closes, after one last read of the file. What goes wrong
while it runs or stops is logged, never raised into the caller.

:raise HostError: (:meth:`StatusFollower.start`) the follower cannot be started.
"""

from __future__ import annotations

import asyncio
import logging
from shlex import quote
from typing import Callable

from ..aio import cancel_and_wait, shielded, wait_for
from ..errors import HostError

log = logging.getLogger(__name__)

#: how long the follower's Python may take to start on a busy host
STARTUP_S = 10.0
#: the follower's source (run as ``python3 -u -c SOURCE PATH``); prints ``<time> <line>``
FOLLOWER = r"""
import os, select, sys, time
path, f, ino, buf = sys.argv[1], None, None, b""
def emit(chunk):
    global buf
    now = time.time()
    buf += chunk.replace(b"\r", b"")
    *lines, buf = buf.split(b"\n")
    out = "".join("%.3f %s\n" % (now, l.decode(errors="replace")) for l in lines
                  if l.strip())
    if out:
        sys.stdout.write(out)
        sys.stdout.flush()
def poll():
    global f, ino
    if ino == -1:
        return
    try:
        st = os.stat(path)
        if f is None:
            f, ino = open(path, "rb"), st.st_ino
        elif st.st_ino != ino or st.st_size < f.tell():
            ino = -1
    except OSError:
        pass
    if f is None:
        return
    chunk = f.read()
    if chunk:
        emit(chunk)
try:
    st = os.stat(path)
    f, ino = open(path, "rb"), st.st_ino
    f.seek(0, 2)
except OSError:
    pass
sys.stdout.write("ready\n")
sys.stdout.flush()
while not (select.select([0], [], [], 0.02)[0] and not os.read(0, 4096)):
    poll()
poll()
"""


class StatusFollower:
    """One follower of ``path`` on ``host`` (see the module's docstring). ``on_line`` is
    called on the event loop with (host time, line); what it raises is logged."""

    def __init__(self, host, path: str, on_line: Callable[[float, str], None],
                 finish_s: float = 2.0):
        self.host, self.path, self.on_line, self.finish_s = host, str(path), on_line, finish_s
        self._proc = None
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        """Returns once the follower has the file's end (or knows it has no file yet):
        every line written from then on is delivered.

        :raise HostError: the host cannot start it."""
        proc = await self.host.spawn(
            f"exec python3 -u -c {quote(FOLLOWER)} {quote(self.path)}")
        try:
            ready = await wait_for(proc.readline(), STARTUP_S)
        except TimeoutError:
            ready = f"nothing within {STARTUP_S:g} s"
        except BaseException:
            await shielded(proc.stop())
            raise
        if ready != "ready\n":
            await shielded(proc.stop())
            raise HostError(self.host.name, f"the status follower of {self.path} did not "
                            f"start (said {ready!r})")
        self._proc = proc
        self._reader = asyncio.create_task(self._read(proc),
                                           name=f"status follower {self.host.name}")

    @property
    def running(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def _read(self, proc) -> None:
        while line := await proc.readline():
            stamp, _sep, text = line.rstrip("\n").partition(" ")
            try:
                self.on_line(float(stamp), text)
            except Exception:  # noqa: BLE001 - a measurement: logged, never raised
                log.exception("[host=%s] status follower: line %r not taken", self.host.name,
                              line)

    async def stop(self) -> None:
        """Close its stdin (it reads the file once more and leaves), deliver its last lines,
        reap it (killed if it lingers). Never raises but the caller's own cancellation,
        after the cleanup."""
        if self._proc is None:
            return
        # both set together in start(), with no await between
        proc, reader, self._proc, self._reader = self._proc, self._reader, None, None

        async def end() -> None:
            try:
                proc.close_input()
                try:
                    await wait_for(asyncio.shield(reader), self.finish_s)
                except TimeoutError:
                    log.warning("[host=%s] status follower of %s did not end within %g s",
                                self.host.name, self.path, self.finish_s)
                except Exception:  # noqa: BLE001 - _read logs what it can; this is the rest
                    log.exception("[host=%s] status follower of %s failed", self.host.name,
                                  self.path)
            finally:
                try:
                    await cancel_and_wait(reader)
                except Exception:  # noqa: BLE001 - already logged above
                    pass
                await proc.stop()             # reaped; its group killed if it lingers
        await shielded(end())


__all__ = ["FOLLOWER", "StatusFollower"]
