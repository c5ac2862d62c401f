"""The guest's status lines (its second serial port, ``status.log`` on the host) as they
arrive, each stamped with the *host's* clock when it reached the file.

::

    async with follow_status(host, vm.paths.status_log, on_line):
        ...                       # on_line(host_time, "DIRTY t=12 pass=3 rate=80MB/s bad=0")

Why the host's clock: the guest's own clock stops while the VM is paused, and its lines come
once a second; neither shows when the guest really stopped and resumed. A small Python
follower runs on the host (python3 is already needed there by the sync participant): it
polls the file every 20 ms, so a line's stamp is at most 20 ms after QEMU wrote it. It
starts at the file's end (only what comes from now on); a file that does not exist yet
(the destination's QEMU not started) is waited for and read from its start; a file that is
truncated or replaced (a new QEMU on the same path) is read again from its start.

The follower ends when its stdin closes (leaving the block); the lines written until then
are still delivered.

:raise HostError: (on entering) the follower cannot be started on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from shlex import quote
from typing import AsyncIterator, Callable

from ..aio import cancel_and_wait, shielded, wait_for

log = logging.getLogger(__name__)

#: the follower's source (run as ``python3 -u -c SOURCE PATH``); prints ``<time> <line>``
FOLLOWER = r"""
import os, select, sys, time
path, f, ino, buf = sys.argv[1], None, None, b""
try:
    st = os.stat(path)
    f, ino = open(path, "rb"), st.st_ino
    f.seek(0, 2)
except OSError:
    pass
while True:
    if select.select([0], [], [], 0.02)[0] and not os.read(0, 4096):
        break
    try:
        st = os.stat(path)
    except OSError:
        continue
    if f is None or st.st_ino != ino or st.st_size < f.tell():
        if f is not None:
            f.close()
        f, ino, buf = open(path, "rb"), st.st_ino, b""
    chunk = f.read()
    if chunk:
        now = time.time()
        buf += chunk.replace(b"\r", b"")
        *lines, buf = buf.split(b"\n")
        out = "".join("%.3f %s\n" % (now, l.decode(errors="replace")) for l in lines
                      if l.strip())
        if out:
            sys.stdout.write(out)
            sys.stdout.flush()
"""


@contextlib.asynccontextmanager
async def follow_status(host, path: str, on_line: Callable[[float, str], None],
                        finish_s: float = 5.0) -> AsyncIterator[None]:
    """Call ``on_line(host_time, line)`` for each line written to ``path`` on ``host`` while
    the block runs (see the module's docstring). ``on_line`` must not raise."""
    proc = await host.spawn(f"exec python3 -u -c {quote(FOLLOWER)} {quote(path)}")

    async def read() -> None:
        while line := await proc.readline():
            stamp, _sep, text = line.rstrip("\n").partition(" ")
            try:
                on_line(float(stamp), text)
            except ValueError:
                log.debug("[host=%s] status follower said %r", host.name, line)

    reader = asyncio.create_task(read(), name=f"status follower {host.name}")
    try:
        yield
    finally:
        async def end() -> None:
            proc.close_input()                   # it leaves; its last lines are still read
            try:
                await wait_for(asyncio.shield(reader), finish_s)
            except TimeoutError:
                log.warning("[host=%s] status follower of %s did not end within %g s",
                            host.name, path, finish_s)
            await cancel_and_wait(reader)
            await proc.stop()                    # reaped (its group killed if it lingers)
        await shielded(end())


__all__ = ["FOLLOWER", "follow_status"]
