"""The sync server and its clients: real aiohttp server, real WebSockets, real processes.

Each anchor weakness of autotest's syncdata/barrier (shared/notes/anchors-multihost.md (b))
has a test here; the closing note maps them.
"""

import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import metric_samples
from syncserver import (AuthError, BarrierAborted, BarrierTimeout, MembershipError,
                        ServerOptions, SyncClient, SyncServer)
from syncserver._aio import cancel_and_wait
from syncserver.hostclient import WebSocket
from syncserver.protocol import MAX_MESSAGE_BYTES, WS_PATH, SyncConnectionError
from syncserver.zipapp import build, build_bytes

TOKEN = secrets.token_hex(16)
FAST = ServerOptions(heartbeat_s=0.5)


@pytest.fixture
async def server():
    async with SyncServer(token=TOKEN, options=FAST) as s:
        yield s


async def clients(server, names, run="run1", **kw):
    cs = [SyncClient(server.url, token=TOKEN, member=n, run_id=run, **kw) for n in names]
    await asyncio.gather(*(c.connect() for c in cs))
    return cs


async def close_all(cs):
    await asyncio.gather(*(c.close() for c in cs))


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    return build(tmp_path_factory.mktemp("zipapp") / "migrate-sync.pyz")


def cli_env(server, member, run="run1", token_file=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATE_SYNC")}
    env.update(MIGRATE_SYNC_URL=server.url, MIGRATE_SYNC_RUN=run, MIGRATE_SYNC_MEMBER=member,
               MIGRATE_SYNC_TOKEN=TOKEN)
    return env


# -- barriers ----------------------------------------------------------------------------------

async def _waiting(server, run, name, n, kind="barrier"):
    """Wait (on the server's own state, not a sleep) until ``n`` members wait at ``name``."""
    async with asyncio.timeout(30):
        while True:
            r = server.registry.runs.get(run)
            inst = r.latest.get((kind, name)) if r else None
            if inst is not None and len(inst.waiters) >= n:
                return
            await asyncio.sleep(0.005)



async def test_open_rounds_say_whom_a_barrier_waits_on(server):
    """What a live view shows of a barrier: members, who arrived, whom it waits on."""
    a, b, c = await clients(server, ["hostA", "hostB", "hostC"])
    try:
        assert server.registry.open_rounds("run1") == []
        waits = [asyncio.ensure_future(x.barrier("ready", ["hostA", "hostB", "hostC"],
                                                 timeout=30)) for x in (a, c)]
        await _waiting(server, "run1", "ready", 2)
        (round_,) = server.registry.open_rounds("run1")
        assert round_["kind"] == "barrier" and round_["name"] == "ready"
        assert round_["arrived"] == ["hostA", "hostC"] and round_["waiting_on"] == ["hostB"]
        assert server.registry.open_rounds("another run") == []
        before = await _metrics(server)
        assert before["migrator_sync_barriers_open"] == 1
        assert before["migrator_sync_waiters"] == 2
        await b.barrier("ready", ["hostA", "hostB", "hostC"], timeout=30)
        await asyncio.gather(*waits)
        assert server.registry.open_rounds("run1") == []
        after = await _metrics(server)          # how long the first arrival waited
        assert after["migrator_sync_barrier_wait_seconds_count"] == \
            before["migrator_sync_barrier_wait_seconds_count"] + 1
        assert after["migrator_sync_barrier_wait_seconds_sum"] > \
            before["migrator_sync_barrier_wait_seconds_sum"]
        assert after["migrator_sync_barriers_open"] == 0
    finally:
        await close_all([a, b, c])


async def test_random_arrival_orders_release_everyone_once(server):
    names = [f"m{i}" for i in range(12)]
    cs = await clients(server, names)
    try:
        for _ in range(5):
            async def arrive(c):
                await asyncio.sleep(random.random() * 0.05)
                return await c.barrier("b", names, timeout=30)
            results = await asyncio.gather(*(arrive(c) for c in random.sample(cs, len(cs))))
            assert len({json.dumps(r, sort_keys=True) for r in results}) == 1
        assert results[0] == {"generation": 5}
    finally:
        await close_all(cs)


async def test_two_hundred_members(server):
    names = [f"member-{i:03d}" for i in range(200)]
    cs = await clients(server, names)
    try:
        results = await asyncio.gather(*(c.barrier("big", names, timeout=60) for c in cs))
        assert all(r["generation"] == 1 for r in results)
        data = await asyncio.gather(*(c.exchange("ids", names, {"i": i}, timeout=60)
                                      for i, c in enumerate(cs)))
        assert data[0] == {n: {"i": i} for i, n in enumerate(names)} == data[-1]
    finally:
        await close_all(cs)


async def test_timeout_names_exactly_the_missing_members(server):
    names = [f"h{i}" for i in range(6)]
    cs = await clients(server, names)
    try:
        arriving = random.sample(cs, 4)
        missing = sorted(set(names) - {c.member for c in arriving})
        errors = await asyncio.gather(*(c.barrier("t", names, timeout=0.3) for c in arriving),
                                      return_exceptions=True)
        assert all(isinstance(e, BarrierTimeout) for e in errors)
        assert {json.dumps(e.to_json(), sort_keys=True) for e in errors} == \
            {json.dumps(errors[0].to_json(), sort_keys=True)}       # the same error for all
        assert errors[0].missing == missing
        assert errors[0].arrived == sorted(c.member for c in arriving)
        assert f"missing {', '.join(missing)}" in str(errors[0])
        # a late member learns the outcome of the round it missed instead of hanging
        late = next(c for c in cs if c.member == missing[0])
        with pytest.raises(BarrierTimeout) as info:
            await late.barrier("t", names, timeout=30)
        assert info.value.missing == missing
    finally:
        await close_all(cs)


async def test_shortest_waiter_timeout_ends_the_round_for_all(server):
    cs = await clients(server, ["a", "b", "c"])
    try:
        patient = asyncio.ensure_future(cs[0].barrier("s", ["a", "b", "c"], timeout=60))
        await _waiting(server, "run1", "s", 1)
        with pytest.raises(BarrierTimeout) as mine:
            await cs[1].barrier("s", ["a", "b", "c"], timeout=0.2)
        with pytest.raises(BarrierTimeout) as theirs:
            await patient
        assert mine.value.to_json() == theirs.value.to_json()
        assert theirs.value.missing == ["c"] and theirs.value.timeout == 0.2
    finally:
        await close_all(cs)


async def test_abort_propagates_to_every_waiter_and_later_arrivals(server):
    names = ["a", "b", "c"]
    cs = await clients(server, names)
    try:
        waiting = [asyncio.ensure_future(c.barrier("x", names, timeout=60)) for c in cs[:2]]
        await _waiting(server, "run1", "x", 2)
        result = await cs[2].abort("x", "disk full on c")
        assert result == {"generation": 1, "waiters": 2}
        errors = await asyncio.gather(*waiting, return_exceptions=True)
        for e in errors:
            assert isinstance(e, BarrierAborted)
            assert (e.by, e.reason, e.lost, e.generation) == ("c", "disk full on c", False, 1)
        with pytest.raises(BarrierAborted, match="aborted by c: disk full on c"):
            await cs[2].barrier("x", names, timeout=60)
        # an abort before anyone arrives fails the round for those who come later
        await cs[0].abort("y", "scenario failed early")
        with pytest.raises(BarrierAborted, match="aborted by a: scenario failed early"):
            await cs[1].barrier("y", names, timeout=60)
    finally:
        await close_all(cs)


async def test_name_reuse_across_rounds_with_a_member_running_ahead(server):
    names = ["fast", "mid", "slow"]
    cs = await clients(server, names)
    arrived = {}

    async def loop(c, delay):
        for rnd in range(1, 31):
            arrived[(c.member, rnd)] = True
            result = await c.barrier("step", names, timeout=30)
            # released from round rnd only once every member arrived at round rnd
            assert all(arrived.get((n, rnd)) for n in names), (c.member, rnd)
            assert result["generation"] == rnd
            await asyncio.sleep(random.random() * delay)

    try:
        await asyncio.gather(loop(cs[0], 0), loop(cs[1], 0.005), loop(cs[2], 0.01))
    finally:
        await close_all(cs)


async def test_two_runs_are_isolated(server):
    r1 = await clients(server, ["a", "b"], run="run-one")
    r2 = await clients(server, ["a", "b", "c"], run="run-two")
    try:
        done1 = await asyncio.gather(*(c.barrier("same-name", ["a", "b"], 30) for c in r1))
        with pytest.raises(BarrierTimeout) as info:
            await r2[0].barrier("same-name", ["a", "b", "c"], 0.2)
        assert info.value.missing == ["b", "c"]      # run-one's arrivals did not count here
        assert done1[0]["generation"] == 1
        assert len(server.registry.runs) == 2
    finally:
        await close_all(r1 + r2)


async def test_membership_errors_are_clear_and_do_not_hang(server):
    cs = await clients(server, ["a", "b", "c"])
    try:
        with pytest.raises(MembershipError, match=r"duplicate members \['b'\]"):
            await cs[0].barrier("m1", ["a", "b", "b"], 30)
        with pytest.raises(MembershipError, match="member 'a' is not in its own member list"):
            await cs[0].barrier("m2", ["b", "c"], 30)
        first = asyncio.ensure_future(cs[0].barrier("m3", ["a", "b"], 30))
        await _waiting(server, "run1", "m3", 1)
        with pytest.raises(MembershipError, match="member lists disagree") as info:
            await cs[1].barrier("m3", ["a", "b", "c"], 30)
        assert info.value.expected == ["a", "b"] and info.value.got == ["a", "b", "c"]
        with pytest.raises(MembershipError, match="member lists disagree"):
            await first                                  # the other waiter is told too
        # a second arrival under the same member name is refused; the first still works
        twin = (await clients(server, ["a"]))[0]
        try:
            one = asyncio.ensure_future(cs[0].barrier("m4", ["a", "b"], 30))
            await _waiting(server, "run1", "m4", 1)
            with pytest.raises(MembershipError, match="'a' is already waiting"):
                await twin.barrier("m4", ["a", "b"], 30)
            await cs[1].barrier("m4", ["a", "b"], 30)
            assert (await one)["generation"] == 1
        finally:
            await twin.close()
    finally:
        await close_all(cs)


# -- lost members: real processes ----------------------------------------------------------------

async def _spawn_cli(pyz, server, member, *args, env_extra=None):
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/python3", "-I", str(pyz), *args,
        env={**cli_env(server, member), **(env_extra or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return proc


async def test_killed_member_process_aborts_the_barrier_naming_it(server, pyz):
    names = ["ctl", "victim", "absent"]            # 'absent' keeps the round open
    (ctl,) = await clients(server, ["ctl"])
    proc = await _spawn_cli(pyz, server, "victim", "barrier", "k", "--members", ",".join(names),
                            "--timeout", "600")
    try:
        mine = asyncio.ensure_future(ctl.barrier("k", names, timeout=600))
        await _waiting(server, "run1", "k", 2)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        with pytest.raises(BarrierAborted) as info:
            await mine
        assert info.value.by == "victim" and info.value.lost is True
        assert "victim lost its connection" in str(info.value)
        # it was not a persistent member: the name is not marked gone for later rounds
        later = asyncio.ensure_future(ctl.barrier("k-later", ["ctl", "victim"], timeout=600))
        await _waiting(server, "run1", "k-later", 1)
        await ctl.abort("k-later", "test over")
        with pytest.raises(BarrierAborted, match="aborted by ctl: test over"):
            await later
    finally:
        await ctl.close()


async def test_member_serves_requests_from_stdin_and_leaves_at_eof(server, pyz):
    """``member --until-stdin-eof``: each stdin line is a request sent as this member, each
    answer a stdout line with the sender's id; junk is answered, not sent; EOF: exit 0."""
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/python3", "-I", str(pyz), "member", "--until-stdin-eof",
        env=cli_env(server, "hostA"), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    (ctl,) = await clients(server, ["ctl"])
    try:
        assert b"is a member of run run1" in await proc.stdout.readline()
        proc.stdin.write(b"[1, 2]\n")
        junk = json.loads(await proc.stdout.readline())
        assert junk["ok"] is False and "bad request line" in junk["error"]["message"]
        mine = asyncio.ensure_future(ctl.barrier("served", ["ctl", "hostA"], timeout=30))
        proc.stdin.write(json.dumps({"id": 77, "op": "barrier", "name": "served",
                                     "members": "ctl,hostA", "timeout": 30,
                                     "generation": 1}).encode() + b"\n")
        answer = json.loads(await proc.stdout.readline())
        assert answer["id"] == 77 and answer["ok"] is True
        assert (await mine)["generation"] == 1
        proc.stdin.close()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await ctl.close()


async def test_killed_persistent_member_aborts_barriers_it_never_reached(server, pyz):
    member = await _spawn_cli(pyz, server, "hostB", "member")
    line = await asyncio.wait_for(member.stdout.readline(), 30)
    assert b"hostB is a member of run run1" in line
    (ctl,) = await clients(server, ["hostA"])
    try:
        waiting = asyncio.ensure_future(ctl.barrier("migrated", ["hostA", "hostB"], 600))
        await _waiting(server, "run1", "migrated", 1)
        member.send_signal(signal.SIGKILL)
        await member.wait()
        with pytest.raises(BarrierAborted) as info:
            await waiting
        assert info.value.by == "hostB" and info.value.lost
        with pytest.raises(BarrierAborted, match="member hostB is gone"):
            await ctl.barrier("next-phase", ["hostA", "hostB"], 600)
    finally:
        await ctl.close()


async def test_frozen_persistent_member_is_lost_by_heartbeat(server, pyz):
    member = await _spawn_cli(pyz, server, "frozen", "member")
    await asyncio.wait_for(member.stdout.readline(), 30)
    (ctl,) = await clients(server, ["ctl"])
    try:
        waiting = asyncio.ensure_future(ctl.barrier("f", ["ctl", "frozen"], 600))
        await _waiting(server, "run1", "f", 1)
        member.send_signal(signal.SIGSTOP)          # alive, socket open, but silent
        with pytest.raises(BarrierAborted) as info:
            await asyncio.wait_for(waiting, 30)     # heartbeat 0.5 s: lost within ~1 s
        assert info.value.by == "frozen" and info.value.lost
    finally:
        member.send_signal(signal.SIGKILL)
        await member.wait()
        await ctl.close()


async def test_client_sees_a_dead_server(pyz):
    s = SyncServer(token=TOKEN, options=FAST)
    await s.start()
    (c,) = await clients(s, ["a"])
    waiting = asyncio.ensure_future(c.barrier("never", ["a", "b"], 600))
    await _waiting(s, "run1", "never", 1)
    await s.stop()
    with pytest.raises(SyncConnectionError):
        await asyncio.wait_for(waiting, 30)
    await c.close()


# -- cancellation: a caller's cancellation is never swallowed ------------------------------------
#
# Each test holds a task exactly where its cancellation used to be lost (waiting for a child
# task it had cancelled, or for an answer that lands in the same loop turn), with events the
# test controls, cancels it there, and checks that it ends cancelled and left nothing open.

async def test_cancel_and_wait_lets_the_child_finish_then_delivers_the_callers_cancellation():
    in_cleanup, release, log = asyncio.Event(), asyncio.Event(), []

    async def child():
        try:
            await asyncio.Event().wait()
        finally:
            in_cleanup.set()
            await release.wait()            # not interrupted by the owner's own cancellation
            log.append("child cleaned up")

    task = asyncio.create_task(child())

    async def owner():
        try:
            await cancel_and_wait(task)
        finally:
            log.append("owner resumed")

    caller = asyncio.create_task(owner())
    await in_cleanup.wait()
    caller.cancel()
    release.set()
    await asyncio.wait([caller])
    assert caller.cancelled()
    assert task.cancelled() and log == ["child cleaned up", "owner resumed"]


async def test_cancel_and_wait_returns_quietly_or_raises_the_childs_own_error():
    started = asyncio.Event()

    async def forever():
        started.set()
        await asyncio.Event().wait()

    async def fails_on_cancel():
        try:
            await forever()
        except asyncio.CancelledError:
            raise ValueError("cleanup failed")

    task = asyncio.create_task(forever())
    await started.wait()
    assert await cancel_and_wait(task) is None and task.cancelled()

    started.clear()
    task = asyncio.create_task(fails_on_cancel())
    await started.wait()
    with pytest.raises(ValueError, match="cleanup failed"):
        await cancel_and_wait(task)

    async def done_already():
        return 7
    task = asyncio.create_task(done_already())
    await asyncio.wait([task])
    assert await cancel_and_wait(task) == 7

    # called while handling the owner's own (already delivered) cancellation: still waits
    # for the child and returns, so the owner's remaining cleanup runs
    started.clear()
    child = asyncio.create_task(forever())
    await started.wait()
    log, owner_waits = [], asyncio.Event()

    async def owner():
        try:
            owner_waits.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await cancel_and_wait(child)
            log.append("cleanup went on")
            raise

    o = asyncio.create_task(owner())
    await owner_waits.wait()
    o.cancel()
    await asyncio.wait([o])
    assert o.cancelled() and child.cancelled() and log == ["cleanup went on"]


async def test_client_close_cancelled_while_its_reader_ends_stays_cancelled(server):
    """``close()`` cancels its reader task and waits for it; the caller cancelled meanwhile
    used to have its cancellation swallowed (``suppress(CancelledError)``) and return."""
    in_cleanup, release = asyncio.Event(), asyncio.Event()
    c = SyncClient(server.url, token=TOKEN, member="a", run_id="cancel-close")

    async def slow_ending_reader():
        try:
            await asyncio.Event().wait()    # until close() cancels it
        finally:
            in_cleanup.set()
            await release.wait()

    c._read = slow_ending_reader
    await c.connect()
    session = c._session
    closing = asyncio.create_task(c.close())
    await in_cleanup.wait()                 # close() is waiting for its reader to end
    closing.cancel()
    release.set()
    await asyncio.wait([closing])
    assert closing.cancelled()
    assert session.closed and c._session is None and c._reader is None


async def test_server_stop_cancelled_while_its_collector_ends_stays_cancelled(monkeypatch):
    """The app's cleanup cancels the idle-run collector task and waits for it; a ``stop()``
    cancelled meanwhile used to return normally."""
    import syncserver.server as server_module
    in_cleanup, release = asyncio.Event(), asyncio.Event()

    async def slow_ending_collector(app):
        try:
            await asyncio.Event().wait()
        finally:
            in_cleanup.set()
            await release.wait()

    monkeypatch.setattr(server_module, "_collect_idle_runs", slow_ending_collector)
    s = SyncServer(token=TOKEN, options=FAST)
    await s.start()
    stopping = asyncio.create_task(s.stop())
    await in_cleanup.wait()
    stopping.cancel()
    release.set()
    await asyncio.wait([stopping])
    assert stopping.cancelled()


async def test_client_call_cancelled_as_its_answer_arrives_stays_cancelled(server, monkeypatch):
    """The answer and the caller's cancellation land in the same loop turn: the caller ends
    cancelled (Python 3.11's ``asyncio.wait_for`` returned the answer instead)."""
    arrived = asyncio.Event()
    join = server.registry.join

    async def spy(*args, **kw):
        arrived.set()
        return await join(*args, **kw)

    monkeypatch.setattr(server.registry, "join", spy)
    (c,) = await clients(server, ["a"], run="cancel-call")
    try:
        call = asyncio.create_task(c.barrier("b", ["a", "b"], timeout=30))
        await arrived.wait()                # sent: the caller waits for its answer
        (answer,) = c._pending.values()
        answer.set_result({"generation": 1})
        call.cancel()
        await asyncio.wait([call])
        assert call.cancelled()
        assert not c._pending
    finally:
        await c.close()


async def test_client_cancelled_while_connecting_leaves_no_session_open():
    """A ``connect()`` cancelled during the handshake closes the session it opened."""
    accepted, writers = asyncio.Event(), []

    def silent(reader, writer):             # accepts the connection, never answers
        writers.append(writer)
        accepted.set()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        c = SyncClient(f"http://127.0.0.1:{port}", token=TOKEN, member="a", run_id="r")
        connecting = asyncio.create_task(c.connect())
        await accepted.wait()
        session = c._session
        connecting.cancel()
        await asyncio.wait([connecting])
        assert connecting.cancelled()
        assert session.closed and c._session is None
    finally:
        for w in writers:
            w.close()
        listener.close()
        await listener.wait_closed()


# -- security and bad input ----------------------------------------------------------------------

async def test_auth_is_required(server):
    off_by_one = TOKEN[:-1] + ("1" if TOKEN.endswith("0") else "0")   # always differs
    for token in ("", "x" * 32, off_by_one):
        with pytest.raises(AuthError, match="refused the token"):
            async with SyncClient(server.url, token=token, member="a", run_id="r"):
                pass
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/metrics") as r:
            assert r.status == 401
        async with http.get(server.url + "/metrics",
                            headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200 and "migrator_sync_releases_total" in await r.text()
        async with http.get(server.url + "/healthz") as r:
            assert r.status == 200 and await r.text() == "ok\n"
        async with http.get(server.url + WS_PATH + "?run=bad%20run&member=a",
                            headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 400
    with pytest.raises(ValueError, match="token of at least 16"):
        SyncServer(token="short")


async def test_malformed_oversized_and_wrong_version_get_4xx_and_server_keeps_serving(server):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(server.url + WS_PATH, params={"run": "r", "member": "a"},
                                   headers=headers, max_msg_size=0) as ws:
            cases = [
                ("{not json", 400, "not JSON"),
                ("[1, 2]", 400, "JSON object"),
                ('{"v": 2, "id": 1, "op": "barrier"}', 400, "unsupported protocol version 2"),
                ('{"v": 1, "id": 1, "op": "dance", "name": "x"}', 400, "unknown op"),
                ('{"v": 1, "id": 1, "op": "barrier", "name": "x", "members": 5,'
                 ' "timeout": 1}', 400, "non-empty list"),
                ('{"v": 1, "id": 1, "op": "barrier", "name": "x", "members": "a,,b",'
                 ' "timeout": 1}', 400, "bad member name ''"),
                ('{"v": 1, "id": 1, "op": "barrier", "name": "x", "members": ["a"],'
                 ' "timeout": -1}', 400, "'timeout'"),
                ('{"v": 1, "id": 1, "op": "barrier", "name": "bad name", "members": ["a"],'
                 ' "timeout": 1}', 400, "bad barrier name"),
                ('{"v": 1, "id": 1, "op": "barrier", "name": "x", "members": ["a"], "timeout"'
                 ': 1, "pad": "' + "x" * (MAX_MESSAGE_BYTES + 10) + '"}', 413, "exceeds"),
            ]
            for text, status, message in cases:
                await ws.send_str(text)
                answer = json.loads((await ws.receive()).data)
                assert answer["ok"] is False
                assert answer["error"]["type"] == "ProtocolError"
                assert answer["error"]["status"] == status, text[:80]
                assert message in answer["error"]["message"]
            await ws.send_bytes(b"\x00\x01")
            assert json.loads((await ws.receive()).data)["error"]["status"] == 400
            # the same connection still works
            await ws.send_str(json.dumps({"v": 1, "id": 9, "op": "barrier", "name": "ok",
                                          "members": ["a"], "timeout": 5}))
            answer = json.loads((await ws.receive()).data)
            assert answer == {"v": 1, "id": 9, "ok": True, "result": {"generation": 1}}
        # far too large: the connection is closed (1009), and the server still serves others
        async with http.ws_connect(server.url + WS_PATH, params={"run": "r", "member": "b"},
                                   headers=headers, max_msg_size=0) as ws:
            await ws.send_str("x" * (3 * MAX_MESSAGE_BYTES))
            msg = await ws.receive()
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.CLOSING)
    (c,) = await clients(server, ["c"], run="r")
    assert (await c.barrier("still-serving", ["c"], 5))["generation"] == 1
    await c.close()
    assert (await _metrics(server))["migrator_sync_protocol_errors_total"] == 10


async def _metrics(server) -> dict[str, float]:
    """The server's /metrics, parsed by prometheus_client's own parser: sample -> value."""
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/metrics",
                            headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            return metric_samples(await r.text())


def _thread_server():
    """A server on its own loop in a thread, for the synchronous fuzzing test.

    Its heartbeat is long: the fuzzing client answers pings only while it reads, and
    hypothesis pauses between examples (a 0.5 s heartbeat rightly declares it dead)."""
    ready, box = threading.Event(), {}

    def main():
        async def run():
            async with SyncServer(token=TOKEN, options=ServerOptions(heartbeat_s=60)) as s:
                box["server"], box["loop"], box["stop"] = s, asyncio.get_running_loop(), \
                    asyncio.Event()
                ready.set()
                await box["stop"].wait()
        asyncio.run(run())

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    ready.wait(30)
    return box, thread


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10),
                                                                      children, max_size=5),
    max_leaves=20)
messages = st.one_of(
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.fixed_dictionaries({"v": st.sampled_from([1, 1, 0, "1"]), "id": st.integers(-5, 5),
                           "op": st.sampled_from(["barrier", "exchange", "abort", "x"]),
                           "name": st.text(max_size=12), "members": json_values,
                           "timeout": json_values, "generation": json_values,
                           "data": json_values, "reason": json_values})
    # a valid round may wait for its timeout: keep numeric timeouts short
    .map(lambda m: {**m, "timeout": min(m["timeout"], 2)}
         if isinstance(m["timeout"], (int, float)) and not isinstance(m["timeout"], bool)
         else m)
    .map(json.dumps))


def test_fuzzed_messages_never_break_the_server():
    box, thread = _thread_server()
    ws = WebSocket(box["server"].url, WS_PATH, {"run": "fuzz", "member": "a"}, TOKEN, 10)
    try:
        @settings(max_examples=300, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(messages)
        def one(text):
            ws.send_text(text)
            answer = json.loads(ws.recv_text(10))
            assert answer["v"] == 1 and isinstance(answer["ok"], bool)
            if not answer["ok"]:
                assert answer["error"]["type"] in ("ProtocolError", "MembershipError",
                                                   "BarrierTimeout", "BarrierAborted")
        one()
        # still serving, on this connection and on a new one
        ws.send_text(json.dumps({"v": 1, "id": 1, "op": "barrier", "name": "after-fuzz",
                                 "members": ["a"], "timeout": 5}))
        assert json.loads(ws.recv_text(10))["ok"] is True
    finally:
        ws.close()
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(30)


# -- host-side client, server command, zipapp ----------------------------------------------------

def test_zipapp_is_stdlib_only_and_reproducible(pyz):
    assert build_bytes() == build_bytes() == pyz.read_bytes()
    out = subprocess.run(["/usr/bin/python3", "-I", "-S", str(pyz), "--help"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "barrier" in out.stdout
    # no token on the command line, ever: there is no such option
    assert "--token " not in out.stdout


def _pyz_with(pyz, tmp_path, name: str, replace: dict[str, bytes]):
    """A copy of the zipapp ``pyz`` whose members in ``replace`` hold other bytes."""
    import zipfile
    out = tmp_path / name
    data = pyz.read_bytes()
    head = data[:data.index(b"PK")]
    out.write_bytes(head)
    with zipfile.ZipFile(pyz) as src, zipfile.ZipFile(out, "a") as dst:
        for info in src.infolist():
            dst.writestr(info, replace.get(info.filename, src.read(info.filename)))
    return out


def test_zipapp_runs_its_bytecode_where_it_can_and_its_source_elsewhere(pyz, tmp_path):
    """The participant's Python runs the archive's bytecode when it is of its own version
    (no compiling at each start), and compiles the source when the bytecode is foreign.
    Told apart by breaking the other half: a source that does not compile, bytecode whose
    magic number no Python has."""
    import importlib.util
    host_magic = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c",
         "import importlib.util, sys; sys.stdout.write(importlib.util.MAGIC_NUMBER.hex())"],
        capture_output=True, text=True, timeout=30).stdout
    broken_source = _pyz_with(pyz, tmp_path, "bytecode.pyz",
                              {"syncserver/hostclient.py": b"this is not python\n"})
    run = subprocess.run(["/usr/bin/python3", "-I", "-S", str(broken_source), "--help"],
                         capture_output=True, text=True, timeout=30)
    if host_magic == importlib.util.MAGIC_NUMBER.hex():
        assert run.returncode == 0 and "barrier" in run.stdout, run.stderr
    else:       # another version than the builder's: its bytecode cannot be used
        assert run.returncode != 0
    with __import__("zipfile").ZipFile(pyz) as z:
        pyc = z.read("syncserver/hostclient.pyc")
    foreign = _pyz_with(pyz, tmp_path, "foreign.pyz",
                        {"syncserver/hostclient.pyc": b"\xff\xff\r\n" + pyc[4:],
                         "syncserver/protocol.pyc": b"\xff\xff\r\n"})
    run = subprocess.run(["/usr/bin/python3", "-I", "-S", str(foreign), "--help"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and "barrier" in run.stdout, run.stderr


async def test_cli_exit_codes_and_messages(server, pyz):
    ok = await _spawn_cli(pyz, server, "solo", "barrier", "one", "--members", "solo",
                          "--timeout", "5")
    out, _ = await ok.communicate()
    assert ok.returncode == 0 and json.loads(out)["generation"] == 1
    t = await _spawn_cli(pyz, server, "solo", "barrier", "two", "--members", "solo,ghost",
                         "--timeout", "0.2")
    _, err = await t.communicate()
    assert t.returncode == 1 and b"missing ghost" in err
    bad = await _spawn_cli(pyz, server, "solo", "barrier", "three", "--members", "a,b",
                           "--timeout", "5")
    _, err = await bad.communicate()
    assert bad.returncode == 2 and b"not in its own member list" in err
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/python3", "-I", str(pyz), "barrier", "x", "--members", "a", "--timeout", "1",
        env={**cli_env(server, "a"), "MIGRATE_SYNC_TOKEN": "w" * 32},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"refused the token" in err
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/python3", "-I", str(pyz), "barrier", "x", "--members", "a", "--timeout", "1",
        env={**cli_env(server, "a"), "MIGRATE_SYNC_URL": "http://127.0.0.1:9"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 3 and b"cannot reach sync server" in err


async def _until(condition, within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while not condition():
            await asyncio.sleep(0.005)


async def test_full_garbage_collections_wait_until_no_round_is_open(server):
    """The standalone server's full collections (50 ms with 1000 members connected, see
    syncserver.gcpolicy) never run while a round waits for members, unless the longest
    interval passed; then the automatic thresholds are back."""
    import gc
    from syncserver.gcpolicy import NEVER, IdleFullCollections
    before = gc.get_threshold()
    a, b = await clients(server, ["a", "b"])
    try:
        async with IdleFullCollections(lambda: server.registry.open_count() == 0,
                                       check_s=0.01, min_interval_s=0.0,
                                       max_interval_s=3600) as policy:
            assert gc.get_threshold() == (before[0], before[1], NEVER)
            await _until(lambda: policy.collections >= 1)       # idle: collected
            waiting = asyncio.ensure_future(a.barrier("x", ["a", "b"], 30))
            try:
                await _waiting(server, "run1", "x", 1)
                seen, checks = policy.collections, policy.checks
                await _until(lambda: policy.checks >= checks + 10)
                assert policy.collections == seen                # a round is open: none
                await b.barrier("x", ["a", "b"], 30)
                await waiting
            finally:
                waiting.cancel()
            await _until(lambda: policy.collections > seen)     # released: collected
            assert policy.last_pause_s is not None
        assert gc.get_threshold() == before
        # the longest interval is kept whatever the load
        async with IdleFullCollections(lambda: False, check_s=0.01,
                                       max_interval_s=0.05) as busy:
            await _until(lambda: busy.collections >= 2)
        assert gc.get_threshold() == before
    finally:
        await close_all([a, b])


async def test_migrate_syncserver_command(tmp_path):
    token_file = tmp_path / "token"
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "migrate-syncserver"), "--bind", "127.0.0.1",
        "--port", "0", "--token-file", str(token_file), "--create-token",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert "listening on http://127.0.0.1:" in line
        url = line.split()[-1]
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        token = token_file.read_text().strip()
        async with SyncClient(url, token=token, member="a", run_id="r") as c:
            assert (await c.barrier("b", ["a"], 5))["generation"] == 1
        # served with the token: the rounds, and the full collections' pauses (none yet:
        # the first comes 10 s after the start at the earliest)
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/metrics",
                                headers={"Authorization": f"Bearer {token}"}) as r:
                samples = metric_samples(await r.text())
        assert samples["migrator_sync_gc_full_pause_seconds_count"] == 0     # 10 s not yet
        assert samples["migrator_sync_releases_total"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    bad = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "migrate-syncserver"), "--token-file",
        str(tmp_path / "missing"), stderr=asyncio.subprocess.PIPE)
    _, err = await bad.communicate()
    assert bad.returncode == 2 and len(err.decode().strip().splitlines()) == 1
    assert "cannot read token file" in err.decode()


async def test_lab_hosts_join_barriers_over_the_lab_network(lab, inventory):
    """Host-side members on real lab hosts (over SSH) and the controller, one barrier."""
    from migrator.hosts import Installable, SSHHost
    bridge = lab.state().bridge_address.split("/")[0]
    async with SyncServer(host=bridge, port=0, token=TOKEN, options=FAST) as s:
        hosts = [SSHHost.from_inventory(n, inventory) for n in ("hostA", "hostB")]
        try:
            tool = Installable.get(build_bytes(), name="migrate-sync.pyz", mode=0o755)
            paths = await tool.install_on(hosts)
            env = {"MIGRATE_SYNC_URL": s.url, "MIGRATE_SYNC_RUN": "lab-run",
                   "MIGRATE_SYNC_TOKEN": TOKEN}
            names = ["ctl", "hostA", "hostB"]
            async with SyncClient(s.url, token=TOKEN, member="ctl", run_id="lab-run") as ctl:
                remote = [h.run(f"python3 {p} --member {h.name} exchange ports --members "
                                f"ctl,hostA,hostB --data '{{\"port\": 4444}}' --timeout 30",
                                env=env, check=True) for h, p in zip(hosts, paths)]
                results = await asyncio.gather(
                    ctl.exchange("ports", names, {"port": 0}, timeout=30), *remote)
                assert results[0] == {"ctl": {"port": 0}, "hostA": {"port": 4444},
                                      "hostB": {"port": 4444}}
                assert all(json.loads(r.stdout) == results[0] for r in results[1:])
                # a host-side member killed on its host aborts the barrier for the controller
                # (hostA never comes, so the round stays open until hostB's death aborts it)
                waiting = asyncio.ensure_future(hosts[1].run(
                    f"python3 {paths[1]} --member hostB barrier end --members ctl,hostA,hostB "
                    "--timeout 600", env=env, timeout=600))
                mine = asyncio.ensure_future(ctl.barrier("end", names, 600))
                await _waiting(s, "lab-run", "end", 2)
                kill = await hosts[1].run("pkill -KILL -f 'migrate-sync[.]pyz --member hostB "
                                          "barrier end'")
                assert kill.ok
                assert (await waiting).aborted == 9
                with pytest.raises(BarrierAborted) as info:
                    await mine
                assert info.value.by == "hostB" and info.value.lost
            # a server bound to loopback is not reachable from the hosts: it binds where told
        finally:
            for h in hosts:
                await h.close()
    async with SyncServer(host="127.0.0.1", port=0, token=TOKEN) as local:
        async with SSHHost.from_inventory("hostA", inventory) as h:
            p = await Installable.get(build_bytes(), name="migrate-sync.pyz").install(h)
            r = await h.run(f"python3 {p} --url {local.url} --run r --member hostA barrier b "
                            "--members hostA --timeout 5", env={"MIGRATE_SYNC_TOKEN": TOKEN})
            assert r.exit_status == 3 and "cannot reach sync server" in r.stderr


# -- the multinode API: send / wait / sync (LAVA's lava-send, lava-wait, lava-sync) ----------

async def test_send_and_wait_in_either_order_and_a_wait_that_times_out_names_the_lost(server,
                                                                                       pyz):
    a, b = await clients(server, ["a", "b"])
    try:
        early = asyncio.ensure_future(b.wait("ip", timeout=30))      # waits before the send
        async with asyncio.timeout(30):
            while not server.registry.runs["run1"].value_waiters.get("ip"):
                await asyncio.sleep(0.005)
        await a.send("ip", "10.0.0.5")
        assert await early == "10.0.0.5"
        assert await b.wait("ip", timeout=1) == "10.0.0.5"             # after: at once
        await a.send("ip", {"v": 6})                                   # the last send wins
        assert await b.wait("ip", timeout=1) == {"v": 6}
        # a persistent member that is lost is named by a wait that then times out
        member = await _spawn_cli(pyz, server, "server-1", "member")
        assert b"server-1 is a member" in await asyncio.wait_for(member.stdout.readline(), 30)
        member.send_signal(signal.SIGKILL)
        await member.wait()
        async with asyncio.timeout(30):
            while "server-1" not in server.registry.runs["run1"].lost:
                await asyncio.sleep(0.005)
        with pytest.raises(BarrierTimeout) as info:
            await b.wait("never", timeout=0.3)
        assert str(info.value).startswith("wait 'never': nobody sent it within 0.3 s (members "
                                          "gone: server-1: member server-1 lost its connection")
        # a waiter whose connection closes is dropped, not kept
        dropped = await _spawn_cli(pyz, server, "c", "wait", "nothing", "--timeout", "600")
        async with asyncio.timeout(30):
            while not server.registry.runs["run1"].value_waiters.get("nothing"):
                await asyncio.sleep(0.005)
        dropped.send_signal(signal.SIGKILL)
        await dropped.wait()
        async with asyncio.timeout(30):
            while server.registry.runs["run1"].value_waiters.get("nothing"):
                await asyncio.sleep(0.005)
    finally:
        await close_all([a, b])


async def test_migrate_sync_send_wait_and_sync_on_the_command_line(server, pyz):
    group = {"MIGRATE_SYNC_GROUP": "host,server-1,client-1"}
    waiting = await _spawn_cli(pyz, server, "client-1", "wait", "server.ready")
    sender = await _spawn_cli(pyz, server, "server-1", "send", "server.ready=yes", "port=80")
    assert (await sender.communicate())[1] == b"" and sender.returncode == 0
    out, err = await waiting.communicate()
    assert waiting.returncode == 0 and out == b"yes\n", err
    syncs = [await _spawn_cli(pyz, server, m, "sync", "done", env_extra=group)
             for m in ("host", "server-1", "client-1")]
    outs = [await p.communicate() for p in syncs]
    assert [p.returncode for p in syncs] == [0, 0, 0], outs
    lonely = await _spawn_cli(pyz, server, "host", "sync", "again", "--timeout", "0.3",
                              env_extra=group)
    _, err = await lonely.communicate()
    assert lonely.returncode == 1 and b"missing client-1, server-1" in err, err
    bad = await _spawn_cli(pyz, server, "host", "send", "novalue")
    _, err = await bad.communicate()
    assert bad.returncode == 2 and err == b"migrate-sync: send 'novalue': KEY=VALUE expected\n"


# -- the embedding process's control calls (migrate-run status / cancel) ----------------------

async def test_control_calls_need_the_token_and_reach_the_handler(server):
    """``/v1/control/<name>``: 401 without the token, 404 until the process installs a
    handler, then the handler's answer (its status code too); a body that is not a JSON
    object is refused before the handler sees it."""
    seen = []

    async def handler(name, body):
        seen.append((name, body))
        return (200, {"name": name}) if name == "status" else (404, {"message": "no"})
    url = f"{server.url}/v1/control"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/status") as r:
            assert r.status == 401
        async with s.get(f"{url}/status", headers=auth) as r:
            assert r.status == 404
        server.set_control(handler)
        async with s.get(f"{url}/status", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with s.get(f"{url}/status", headers=auth) as r:
            assert r.status == 200 and await r.json() == {"name": "status"}
        async with s.post(f"{url}/cancel", headers=auth, json={"target": "m-1"}) as r:
            assert r.status == 404
        async with s.post(f"{url}/cancel", headers=auth, data="[1]") as r:
            assert r.status == 400
    assert seen == [("status", {}), ("cancel", {"target": "m-1"})]


async def test_a_runs_server_is_bound_at_once_served_later_and_stopped_whole(tmp_path):
    """RunContext.start_server: the port is bound when it returns (a client that connects
    then is answered once the server serves); a server stopped before it served says so to
    whoever waits for it, and leaves its port free; a running one is stopped whole."""
    import socket
    from migrator.config import Config, Inventory
    from migrator.framework.context import RunContext
    ctx = RunContext(Config(), Inventory(hosts={"hostA": {"address": "192.0.2.1"}}))
    await ctx.start_server("127.0.0.1")
    port = int(ctx.sync_url.rsplit(":", 1)[1])
    client = SyncClient(ctx.sync_url, token=ctx.token, member="a", run_id="r")
    await client.connect()              # (may have reached the backlog before the server)
    await client.close()
    assert (await ctx.server_started()) is ctx.server
    await ctx.stop_server()
    socket.create_server(("127.0.0.1", port)).close()         # free again

    ctx = RunContext(Config(), Inventory(hosts={"hostA": {"address": "192.0.2.1"}}))
    await ctx.start_server("127.0.0.1")
    port = int(ctx.sync_url.rsplit(":", 1)[1])
    waiting = asyncio.ensure_future(ctx.server_started())
    await asyncio.sleep(0)              # (one turn of the loop: it waits for the start)
    assert not waiting.done()
    await ctx.stop_server()             # before it served: its start is cancelled
    with pytest.raises(RuntimeError, match="stopped before it served"):
        await waiting
    assert ctx.server is None and not ctx.server_bound
    socket.create_server(("127.0.0.1", port)).close()


async def test_a_runs_server_served_later_serves_when_its_event_comes_or_a_client_knocks():
    """RunContext.start_server(serve_from=...): bound at once, served (its aiohttp
    imported) once the event is set (migrate-run: the first guest boots) with nobody
    asking; or at once when a client connects (migrate-run status), which is answered;
    never served if neither came before it was stopped."""
    import socket
    from migrator.config import Config, Inventory
    from migrator.framework.context import RunContext
    inv = Inventory(hosts={"hostA": {"address": "192.0.2.1"}})
    booting = asyncio.Event()
    ctx = RunContext(Config(), inv)
    await ctx.start_server("127.0.0.1", serve_from=booting)
    assert ctx.server_bound and ctx.server is None
    booting.set()
    await asyncio.wait([ctx._serving])          # (nobody waits for it: the event serves it)
    assert ctx.server is not None
    await ctx.stop_server()

    ctx = RunContext(Config(), inv)
    await ctx.start_server("127.0.0.1", serve_from=asyncio.Event())     # never set
    client = SyncClient(ctx.sync_url, token=ctx.token, member="a", run_id="r")
    async with asyncio.timeout(60):         # (unserved, its handshake would wait for ever)
        await client.connect()              # answered: its knock served the server
    await client.close()
    assert ctx.server is not None
    await ctx.stop_server()

    ctx = RunContext(Config(), inv)
    await ctx.start_server("127.0.0.1", serve_from=asyncio.Event())
    port = int(ctx.sync_url.rsplit(":", 1)[1])
    serving = ctx._serving
    await ctx.stop_server()                     # never asked: stopped unserved, port free
    assert serving.cancelled() and ctx.server is None and not ctx.server_bound
    socket.create_server(("127.0.0.1", port)).close()
