"""The guest status follower (:mod:`migrator.guest.statusfollow`) on a real host of the
session lab: what it delivers, stamped with the host's clock, and what it must not (a file
that a new QEMU put on the same path, as when the VM migrates back)."""

import asyncio
import time
from shlex import quote

from migrator.guest.statusfollow import StatusFollower


async def until(lines: list, n: int, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while len(lines) < n:
            await asyncio.sleep(0.02)


async def test_it_follows_one_file_from_its_end_and_stops_at_a_replacement(hosts, tmp_path):
    host = hosts["hostA"]
    path = f"/tmp/migrator-test-follow-{time.time_ns()}.log"
    q = quote(path)
    got: list[tuple[float, str]] = []
    await host.run(f"printf 'old 1\\nold 2\\n' > {q}", check=True)
    follower = StatusFollower(host, path, lambda now, line: got.append((now, line)))
    try:
        await follower.start()
        assert follower.running
        before = time.time()
        # a line in two writes is one line; blank lines and CRs are dropped
        await host.run(f"printf 'DIRTY t=1 pass=1 ' >> {q}; sleep 0.1; "
                       f"printf 'rate=8MB/s bad=0\\r\\n\\n' >> {q}", check=True)
        await until(got, 1)
        after = time.time()
        assert [line for _now, line in got] == ["DIRTY t=1 pass=1 rate=8MB/s bad=0"]
        # stamped by the host's clock when the line was complete (the lab's hosts share
        # this machine's clock), within the 20 ms poll
        assert before <= got[0][0] <= after + 0.05, (before, got, after)
        # a new file on the same path (a new QEMU there) is not this copy's: after the old
        # file's last line, nothing more is read
        await host.run(f"echo 'last of the old' >> {q}; mv {q} {q}.gone; "
                       f"echo 'new QEMU 1' > {q}.new; mv {q}.new {q}", check=True)
        await until(got, 2)
        await host.run(f"echo 'new QEMU 2' >> {q}", check=True)
        await follower.stop()             # reads the file once more, then ends
        assert not follower.running
        assert [line for _now, line in got] == ["DIRTY t=1 pass=1 rate=8MB/s bad=0",
                                                "last of the old"]
    finally:
        await follower.stop()
        await host.run(f"rm -f {q} {q}.gone", check=True)


async def test_a_file_made_after_it_started_is_read_from_its_start(hosts):
    host = hosts["hostB"]
    path = f"/tmp/migrator-test-follow-{time.time_ns()}.log"
    got: list[str] = []
    follower = StatusFollower(host, path, lambda now, line: got.append(line))
    try:
        await follower.start()
        await host.run(f"printf 'TICK 0\\nTICK 1\\n' > {quote(path)}", check=True)
        await until(got, 2)
        await host.run(f"echo 'TICK 2' >> {quote(path)}", check=True)
        await follower.stop()             # the last line, written just before, delivered
        assert got == ["TICK 0", "TICK 1", "TICK 2"]
    finally:
        await follower.stop()
        await host.run(f"rm -f {quote(path)}", check=True)
