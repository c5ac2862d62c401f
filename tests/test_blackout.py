"""The blackout prober without a lab: its arithmetic on a known probe record, and the real
prober process (raw ICMP socket, kernel receive timestamps) against the loopback address, with
a TCP stream through a real echo server on this machine, one that resets it, and a target the
prober refuses. The prober across real migrations: tests/test_drivers.py (bridged guests)."""

from __future__ import annotations

import asyncio

import pytest

from migrator.migration.blackout import (BlackoutProbe, ProbeError, summarize, summarize_pings,
                                        switchover_time)

MS = 1_000_000


def test_the_longest_gap_its_losses_and_the_replies_after_the_switchover():
    t0 = 1_700_000_000 * 10**9
    sent = [[seq, t0 + seq * 5 * MS] for seq in range(10)]
    # probes 4, 5, 6 unanswered (the switchover); each reply 1 ms after its probe
    replies = [[seq, t0 + seq * 5 * MS + MS] for seq in range(10) if seq not in (4, 5, 6)]
    raw = {"target": "10.0.0.2", "interval_ms": 5.0, "sent": sent, "replies": replies,
           "tcp": None}
    report = summarize(raw, switchover=(t0 + 27 * MS) / 1e9)
    assert (report.sent, report.received, report.lost) == (10, 7, 3)
    # from probe 4, the first that waited after reply 3 showed the guest fine, to reply 7
    assert report.blackout_ms == pytest.approx(16.0)
    assert report.lost_in_blackout == 3
    assert report.blackout_from == pytest.approx((t0 + 20 * MS) / 1e9)
    assert report.max_reply_gap_ms == pytest.approx(20.0)     # reply 3 -> reply 7
    assert report.replies_after_switchover == 3               # 7, 8, 9: the destination's
    assert report.tcp_survived is None and "gaps_ms" not in report.to_json()
    assert summarize(raw).replies_after_switchover is None    # no switchover: not counted


def test_a_prober_that_did_not_send_is_not_a_blackout():
    """A gap between replies with no probe lost in it: the prober's process was not
    scheduled (a loaded machine), the network was fine."""
    t0 = 1_700_000_000 * 10**9
    times = [t0 + seq * 5 * MS for seq in range(5)] + \
        [t0 + 120 * MS + seq * 5 * MS for seq in range(5, 10)]
    raw = {"target": "10.0.0.2", "interval_ms": 5.0, "sent": [[s, t] for s, t in
                                                              enumerate(times)],
           "replies": [[s, t + MS] for s, t in enumerate(times)], "tcp": None}
    report = summarize(raw)
    assert report.blackout_ms == pytest.approx(1.0)                  # a round trip, no more
    assert (report.lost, report.recovered) == (0, True)
    assert report.max_reply_gap_ms == pytest.approx(120 + 25 - 20)


def test_an_outage_that_never_ends_is_the_blackout_not_recovered():
    t0 = 1_700_000_000 * 10**9
    sent = [[seq, t0 + seq * 5 * MS] for seq in range(100)]
    replies = [[seq, t0 + seq * 5 * MS + MS] for seq in range(10)]     # then silence
    report = summarize({"target": "10.0.0.2", "interval_ms": 5.0, "sent": sent,
                        "replies": replies, "tcp": None}, switchover=(t0 + 50 * MS) / 1e9)
    assert report.recovered is False and report.lost == report.lost_in_blackout == 90
    assert report.blackout_ms == pytest.approx(99 * 5 - 10 * 5)   # probe 10 -> the last probe
    assert report.replies_after_switchover == 0
    nothing = summarize({"target": "10.0.0.2", "interval_ms": 5.0, "sent": sent,
                         "replies": [], "tcp": None})
    assert (nothing.blackout_ms, nothing.recovered, nothing.lost) == (None, False, 100)


def test_the_switchover_is_postcopy_only_when_the_guest_switched():
    phases = [("MIGRATING", 0.1, 100.0), ("POSTCOPY", 0.5, 100.5), ("COMPLETED", 0.9, 100.9)]
    assert switchover_time(phases, postcopy_switched=True) == 100.5
    assert switchover_time(phases, postcopy_switched=False) == 100.9   # precopy finished first
    assert switchover_time(phases[::2]) == 100.9
    assert switchover_time(phases[:1]) is None                         # never switched


async def echo_server(close_after: int | None = None):
    """A real TCP echo server on 127.0.0.1; ``close_after``: reset the connection once
    that many bytes came (a listener that dies)."""
    async def handle(reader, writer):
        seen = 0
        try:
            while data := await reader.read(65536):
                seen += len(data)
                if close_after is not None and seen >= close_after:
                    writer.transport.abort()                   # RST, as a killed listener
                    return
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_the_prober_process_on_loopback_with_a_tcp_stream_that_survives():
    server = await echo_server()
    port = server.sockets[0].getsockname()[1]
    async with server:
        async with BlackoutProbe("127.0.0.1", interval_ms=5, tcp_port=port) as probe:
            await asyncio.sleep(0.3)                       # the probed time: nothing happens
    report = probe.report()
    assert report.sent >= 10 and report.received == report.sent, report
    assert report.blackout_ms is not None and report.lost_in_blackout == 0
    assert report.tcp["connected"] and report.tcp["error"] is None, report.tcp
    assert report.tcp["echoed"] == report.tcp["sent"] > 0 and report.tcp_survived


async def test_a_reset_tcp_stream_is_reported_not_survived():
    server = await echo_server(close_after=256)
    port = server.sockets[0].getsockname()[1]
    async with server:
        async with BlackoutProbe("127.0.0.1", interval_ms=5, tcp_port=port) as probe:
            await asyncio.sleep(0.3)
    report = probe.report()
    assert report.received > 0                                   # ICMP went on
    assert report.tcp["error"] is not None and report.tcp_survived is False, report.tcp


async def test_a_prober_that_cannot_start_names_why():
    with pytest.raises(ProbeError, match="did not start: probe_process: .not-an-address. is not an IPv4 address"):
        async with BlackoutProbe("not-an-address"):
            pass


def test_queued_probes_answered_in_a_burst_after_a_pause_still_show_the_pause():
    """The guest paused 100 ms (the switchover): probes 3..22 wait; 5..20 are lost, the
    others answered together when it runs again. The reply before the pause came on time,
    so the outage runs from probe 3's send to the burst."""
    t0 = 1_700_000_000 * 10**9
    sent = [[seq, t0 + seq * 5 * MS] for seq in range(30)]
    burst = t0 + 115 * MS
    replies = [[seq, t0 + seq * 5 * MS + MS] for seq in range(3)] + \
        [[3, burst], [4, burst + 10_000], [21, burst + 20_000], [22, burst + 30_000]] + \
        [[seq, t0 + seq * 5 * MS + MS] for seq in range(23, 30)]
    report = summarize({"target": "10.0.0.2", "interval_ms": 5.0, "sent": sent,
                        "replies": replies, "tcp": None})
    assert report.blackout_ms == pytest.approx(100.0)             # 15 ms -> 115 ms
    assert report.lost == report.lost_in_blackout == 16 and report.recovered


def ping_output(replies: list[int], sent: int, rtt_ms: float = 0.412) -> str:
    """What busybox ``ping -i`` prints, stopped with SIGINT."""
    lines = ["PING 10.78.0.5 (10.78.0.5): 56 data bytes"]
    lines += [f"64 bytes from 10.78.0.5: seq={q} ttl=64 time={rtt_ms:.3f} ms" for q in replies]
    lines += ["", "--- 10.78.0.5 ping statistics ---",
              f"{sent} packets transmitted, {len(replies)} packets received, "
              f"{100 * (sent - len(replies)) // sent}% packet loss"]
    return "\n".join(lines) + "\n"


def test_a_peer_guest_s_pings_give_the_longest_loss_at_their_resolution():
    out = ping_output([*range(0, 10), 12, *range(20, 30)], sent=31)
    r = summarize_pings(out, "10.78.0.5", 10.0)
    assert (r.sent, r.received, r.lost) == (31, 21, 10)
    assert (r.blackout_ms, r.lost_in_blackout, r.recovered) == (80.0, 7, True)
    assert r.replies_after_switchover is None and r.max_reply_gap_ms is None
    # the last ping in flight when stopped is no outage; a guest gone for good is
    assert summarize_pings(ping_output(list(range(10)), 11), "x", 10).blackout_ms == 0.0
    gone = summarize_pings(ping_output(list(range(5)), 30), "x", 10)
    assert (gone.blackout_ms, gone.recovered) == (260.0, False)
    assert summarize_pings(ping_output([], 7), "x", 10).received == 0
    # pings still in flight are those sent within a round trip of the stop: 4 at 10 ms when
    # the replies take 45 ms (a loaded TCG peer), not when they take 0.4 ms
    late = ping_output([*range(0, 10), *range(12, 21)], sent=25, rtt_ms=45.0)
    r = summarize_pings(late, "x", 10)
    assert (r.blackout_ms, r.lost_in_blackout, r.recovered) == (30.0, 2, True)
    quick = summarize_pings(ping_output([*range(0, 10), *range(12, 21)], sent=25), "x", 10)
    assert (quick.lost_in_blackout, quick.recovered) == (4, False)
