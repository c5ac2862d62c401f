"""A QEMU's CPU outside its vCPU threads (issue 21: the CPU a sweep compares per setting),
read over SSH from a lab host's ``/proc``: checked against what a real process's threads
measured of themselves (``CLOCK_THREAD_CPUTIME_ID``), a thread that already ended included;
the sampler that follows a QEMU which someone else kills (libvirt's source) keeps its last
snapshot, ends with the process, and leaves nothing on the host."""

import asyncio

import pytest

from migrator.hosts import quote
from migrator.hypervisor.qemu_cpu import CpuSampler, read_qemu_cpu

#: a process shaped like a QEMU under debug-threads=on: a vCPU thread that burns 0.6 s and
#: stays, a migration thread that burns 0.3 s and ends; prints its pid, the vCPU thread's
#: id, each thread's own CPU and the process's, then waits for its stdin to close
PROGRAM = r"""
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None)
spent, ready, stay = {}, threading.Event(), threading.Event()
def burn(name, seconds, keep):
    libc.prctl(15, name.encode(), 0, 0, 0)          # PR_SET_NAME: the thread's comm
    spent["tid " + name] = threading.get_native_id()
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    spent[name] = time.thread_time()
    if keep:
        ready.set()
        stay.wait()
mig = threading.Thread(target=burn, args=("mig/src/main", 0.3, False))
vcpu = threading.Thread(target=burn, args=("CPU 0/TCG", 0.6, True))
mig.start(); vcpu.start(); mig.join(); ready.wait()
print(os.getpid(), spent["tid CPU 0/TCG"], spent["CPU 0/TCG"], spent["mig/src/main"],
      time.process_time(), flush=True)
sys.stdin.read()
stay.set()
"""


@pytest.fixture
def host(hosts):
    return hosts["hostA"]


async def test_outside_the_vcpus_is_the_process_minus_its_vcpu_threads(no_leaks, host):
    proc = await host.spawn(f"exec python3 -c {quote(PROGRAM)}")
    try:
        pid, tid, vcpu_s, mig_s, total_s = (await proc.readline()).split()
        pid, tid, vcpu_s, mig_s, total_s = int(pid), int(tid), *map(float, (vcpu_s, mig_s,
                                                                            total_s))
        tick = 0.02                         # /proc counts in 10 ms ticks; one each side
        by_name = await read_qemu_cpu(host, pid)
        by_id = await read_qemu_cpu(host, pid, (tid,))
        assert by_name == by_id and by_name.vcpu_tids == (tid,)
        assert abs(by_name.vcpu_s - vcpu_s) <= tick, (by_name, vcpu_s)
        assert abs(by_name.total_s - total_s) <= tick, (by_name, total_s)
        # the migration thread ended before the read: its 0.3 s still count
        assert by_name.outside_vcpus_s >= mig_s - tick, (by_name, mig_s)
        # a wrong thread named as the vCPU: the figure changes (the read is not by name)
        other = await read_qemu_cpu(host, pid, (pid,))
        assert other.vcpu_tids == (pid,) and other.vcpu_s < vcpu_s / 2

        async with CpuSampler(host, pid, by_name, 0.05) as sampler:
            async with asyncio.timeout(10):
                while sampler.last is None:
                    await asyncio.sleep(0.05)
            assert abs(sampler.last.total_s - by_name.total_s) <= tick
            assert abs(sampler.last.vcpu_s - by_name.vcpu_s) <= tick
            await host.run(f"kill -KILL {pid}", check=True)
            # the loop ends with the process (it is not stopped by the block's end)
            async with asyncio.timeout(10):
                await asyncio.shield(sampler._task)
        assert abs(sampler.last.outside_vcpus_s - by_name.outside_vcpus_s) <= tick
    finally:
        await proc.stop()
    assert await read_qemu_cpu(host, pid) is None
    left = await host.run("pgrep -af 'p=/proc/[0-9]+; while read' || true")
    assert left.stdout.strip() == "", left.stdout


async def test_the_sampler_ends_when_its_block_ends(no_leaks, host):
    proc = await host.spawn("exec sh -c 'echo $$; exec cat > /dev/null'")   # ends with its stdin
    try:
        pid = int(await proc.readline())
        start = await read_qemu_cpu(host, pid, (pid,))       # its one thread as the vCPU
        assert start is not None and start.outside_vcpus_s == 0
        async with CpuSampler(host, pid, start, 0.05) as sampler:
            async with asyncio.timeout(10):
                while sampler.last is None:
                    await asyncio.sleep(0.05)
        assert sampler._task.done()
        left = await host.run("pgrep -af 'p=/proc/[0-9]+; while read' || true")
        assert left.stdout.strip() == "", left.stdout
    finally:
        await proc.stop()



#: a QEMU-shaped process whose "migration thread" works while it is sampled: a vCPU thread
#: that idles, a thread that burns 0.3 s once told to (a line on stdin) and then says
#: "done"; prints its pid first
WORKS_WHEN_TOLD = r"""
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None)
def vcpu():
    libc.prctl(15, b"CPU 0/TCG", 0, 0, 0)
    threading.Event().wait()
threading.Thread(target=vcpu, daemon=True).start()
print(os.getpid(), flush=True)
sys.stdin.readline()
def mig():
    libc.prctl(15, b"mig/src/send", 0, 0, 0)
    end = time.thread_time() + 0.3
    while time.thread_time() < end:
        pass
    print("done", flush=True)
threading.Thread(target=mig).start()
sys.stdin.readline()
"""


async def test_a_snapshot_asked_for_comes_at_once_and_is_kept(no_leaks, host):
    """``snapshot_now`` (libvirt's source: its destination resumed, the source is killed
    next) takes the figure at once, not at the next interval; a snapshot that arrived while
    the controller was busy is still the last when the block ends (read to the end before
    the loop is reaped); the block's end stops a loop that sleeps for long at once."""
    import time
    proc = await host.spawn(f"exec python3 -c {quote(WORKS_WHEN_TOLD)}")
    try:
        pid = int(await proc.readline())
        start = await read_qemu_cpu(host, pid)
        assert start is not None and len(start.vcpu_tids) == 1, start
        tick = 0.02
        # an interval far longer than the test: every snapshot after the first is asked for
        async with CpuSampler(host, pid, start, 600) as sampler:
            async with asyncio.timeout(10):
                while sampler.last is None:
                    await asyncio.sleep(0.05)
            first = sampler.last
            assert abs(first.outside_vcpus_s - start.outside_vcpus_s) <= tick
            proc.write("go\n")
            async with asyncio.timeout(10):
                assert await proc.readline() == "done\n"
            sampler.snapshot_now()
            async with asyncio.timeout(10):
                while sampler.last is first:
                    await asyncio.sleep(0.01)
            worked = sampler.last.outside_vcpus_s - start.outside_vcpus_s
            assert 0.3 - tick <= worked <= 0.3 + 2 * tick, (worked, sampler.last)
            # asked again, and the controller busy until the block ends: that snapshot
            # waits unread in the connection when the block ends
            asked = sampler.last
            sampler.snapshot_now()
            time.sleep(0.5)
            ended = time.monotonic()
        assert time.monotonic() - ended < 5          # not the loop's 600 s sleep
        assert sampler.last is not asked and sampler.last.total_s >= asked.total_s
    finally:
        await proc.stop()
    left = await host.run("pgrep -af 'p=/proc/[0-9]+; while read' || true")
    assert left.stdout.strip() == "", left.stdout
