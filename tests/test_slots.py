"""Migration slots and their queue (issue 18, part 2): limits per source, per destination and
per cluster that hold across runs (files on the lab's shared storage, claimed over SSH under a
lock), served by priority then in order, without one busy host holding up the others; a
ticket withdrawn while it waits never holds a slot; migrate-run's migrations queue (phase
QUEUED) instead of failing, and a queued one can be cancelled before it starts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from migrator.config import QueueSettings
from migrator.framework import RunContext
from migrator.framework.slots import slots_dir
from migrator.hosts import SSHHost

from .test_framework import migrate_run, the_run

HERE = Path(__file__).parent


@pytest.fixture
async def host_a(inventory, config):
    async with SSHHost.from_inventory("hostA", inventory, config) as h:
        yield h


@pytest.fixture
async def slot_files(host_a, inventory):
    """What slot files the shared storage holds now (checked empty before and after)."""
    directory = slots_dir(str(inventory.shared_dir))

    async def ls() -> list[str]:
        r = await host_a.run(f"ls {directory} 2>/dev/null | grep '[.]slot$' || true")
        return r.stdout.split()
    assert await ls() == []
    yield ls
    assert await ls() == [], "a slot was left behind"


def run_with(config, inventory, **queue) -> RunContext:
    return RunContext(config.model_copy(update={"queue": QueueSettings(**queue)}), inventory)


async def test_a_limit_queues_and_a_freed_slot_wakes_the_next_at_once(config, inventory, host_a,
                                                                       slot_files):
    """per_source 1: the second ticket waits until the first gives its slot back, and is
    woken by that at once (poll_s is 60 s here: only the run's own event can wake it)."""
    ctx = run_with(config, inventory, per_source=1, poll_s=60)
    async with ctx.slots.ticket(host_a, "hostB", "vm1", "m-1") as one:
        assert await one.try_once()
        async with ctx.slots.ticket(host_a, "hostC", "vm2", "m-2") as two:
            assert not await two.try_once()
            assert two.why_waiting() == "hostA sends 1/1"
            assert sorted(await slot_files()) == [one.name]
            waiting = asyncio.ensure_future(two.wait())
            await asyncio.sleep(0)
            assert not waiting.done()
            await ctx.slots._release(one)          # what leaving one's block does
            await asyncio.wait_for(waiting, 10)
            assert two.granted and sorted(await slot_files()) == [two.name]


async def test_limits_hold_across_runs_and_a_slot_freed_by_another_run_is_seen(
        config, inventory, host_a, slot_files):
    """Two runs (two controllers as far as the slots know): per_cluster 1 held by the first
    keeps the second waiting; once freed, the second sees it at its next look (poll_s)."""
    first = run_with(config, inventory, per_cluster=1, poll_s=0.2)
    second = run_with(config, inventory, per_cluster=1, poll_s=0.2)
    async with first.slots.ticket(host_a, "hostB", "vm1", "m-1") as held:
        assert await held.try_once()
        async with second.slots.ticket(host_a, "hostD", "vm9", "m-1") as other:
            waiting = asyncio.ensure_future(other.wait())
            await asyncio.sleep(1.0)               # five looks of the second run: all full
            assert not waiting.done() and other.why_waiting() == "cluster 1/1"
            await first.slots._release(held)
            await asyncio.wait_for(waiting, 10)
            content = await host_a.run(f"cat {other.path}")
            src_dst, owner = content.stdout.splitlines()
            assert src_dst == "hostA hostD" and json.loads(owner)["run_id"] == second.run_id


async def test_priority_first_then_order_and_a_busy_host_holds_up_no_one_else(
        config, inventory, host_a, slot_files):
    """With hostB receiving at its limit, a pass serves, in order: the priority-5 ticket to
    hostC before the older one to hostD; the oldest, to hostB, waits without blocking them."""
    ctx = run_with(config, inventory, per_source=5, per_destination=1, per_cluster=3,
                   poll_s=60)
    async with ctx.slots.ticket(host_a, "hostB", "vm0", "m-0") as busy:
        assert await busy.try_once()
        async with ctx.slots.ticket(host_a, "hostB", "vm1", "m-1") as blocked, \
                ctx.slots.ticket(host_a, "hostD", "vm2", "m-2") as older, \
                ctx.slots.ticket(host_a, "hostC", "vm3", "m-3", priority=5) as urgent:
            assert [t.name.split(".")[2] for t in ctx.slots.waiting] == ["vm3", "vm1", "vm2"]
            assert not await blocked.try_once()    # one pass for all of them
            assert urgent.granted and older.granted and not blocked.granted
            assert blocked.why_waiting() == "hostB receives 1/1, cluster 3/3"


async def test_a_ticket_withdrawn_while_waiting_never_holds_a_slot(config, inventory, host_a,
                                                                   slot_files):
    ctx = run_with(config, inventory, per_source=1, poll_s=0.1)
    async with ctx.slots.ticket(host_a, "hostB", "vm1", "m-1") as one:
        assert await one.try_once()

        async def wait_for_a_slot():
            async with ctx.slots.ticket(host_a, "hostC", "vm2", "m-2") as t:
                await t.wait()
        waiter = asyncio.ensure_future(wait_for_a_slot())
        await asyncio.sleep(0.5)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert ctx.slots.waiting == []
    # both blocks left: slot_files checks that nothing is left


async def test_migrations_beyond_the_limit_queue_and_a_queued_one_is_cancelled_before_it_starts(
        inventory, tmp_path, no_leaks, host_a, slot_files):
    rc, out, err = await migrate_run(inventory, tmp_path, "-m", "hostA,hostB",
                                     "-p", "queue.per_source=1",
                                     str(HERE / "scenarios" / "queued.py"))
    assert rc == 0, out + err
    run, migs, _ = the_run(tmp_path)

    def at(m, phase):
        return next(w for p, _, w in m["phases"] if p == phase)
    there, back = migs[:4], {m["vm"]: m for m in migs[4:]}
    # out: one call, four VMs, one transfer at a time (the next starts after one ended)
    spans = sorted((at(m, "MIGRATING"), at(m, "CLEANED")) for m in there)
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:])), spans
    assert sum("QUEUED" in [p for p, _, _ in m["phases"]] for m in there) >= 3
    # back: all four ask at once: vm3 (priority 5) first, then vm1 and vm2 in order of asking
    assert at(back["vm3"], "MIGRATING") < at(back["vm1"], "MIGRATING") \
        < at(back["vm2"], "MIGRATING")
    assert back["vm2"]["queued_s"] > back["vm1"]["queued_s"] > 0
    # vm4: cancelled in the queue, never transferred, its prepared destination removed
    vm4 = back["vm4"]
    phases = [p for p, _, _ in vm4["phases"]]
    assert vm4["status"] == "cancelled" and "MIGRATING" not in phases and "QUEUED" in phases
    assert phases[-1] == "ROLLED_BACK" and "VM running on hostB" in vm4["error"]
    assert "cancelled while queued" in vm4["error"]
    assert run["verdict"] == "passed"
    assert "[queue] vm" in out               # the wait was said
