#!/usr/bin/env python3
"""The blackout prober, a process of its own: ICMP echo to a guest every few milliseconds, and
optionally a TCP stream through an echo listener in the guest.

Run by :class:`migrator.migration.blackout.BlackoutProbe` (``python3 probe_process.py TARGET
INTERVAL_MS [TCP_PORT]``), never imported by the orchestrator: its timing must not depend on
the orchestrator's event loop. Standard library only, so the same file can run on a host.
``probe_process.py --first TIMEOUT_S TARGET`` (:meth:`GuestVM.wait_reachable
<migrator.hypervisor.vm.GuestVM.wait_reachable>`) probes every 100 ms until the first reply:
exit 0 printing the seconds it took, exit 1 when none came within ``TIMEOUT_S``.

It prints ``ready`` once its socket is open and the TCP stream (if any) connected, then probes
until its standard input closes (or SIGTERM), waits a moment for replies in flight, and prints
one JSON line:

* ``sent``: ``[[seq, send_ns], ...]`` (CLOCK_REALTIME, taken just before each send);
* ``replies``: ``[[seq, recv_ns], ...]``, ``recv_ns`` the kernel's receive timestamp
  (SO_TIMESTAMPNS), so a late wake-up of this process does not count as network time;
* ``tcp``: ``{connected, error, sent, echoed, in_order, max_stall_ms}``: a counter stream
  (8-byte big-endian integers, one chunk per interval) written to ``TARGET:TCP_PORT``, whose
  echo must come back whole and in order; ``error`` says how the connection ended early
  (reset, closed), None when it survived.

What can go wrong: no permission for a raw socket (root or CAP_NET_RAW needed): exits 2 with
the reason on stderr; the TCP connection refused: ``ready`` is still printed and ``tcp``
carries the error.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import struct
import sys
import threading
import time

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
#: how long replies in flight are waited for after the last probe
DRAIN_S = 0.3
#: asked to stop, the prober goes on until a probe sent after the request is answered (the
#: blackout, if one is running, has ended: its length is known), at most this long
RECOVERY_S = 5.0
#: how long the TCP stream's echo may take to catch up after the last chunk (a guest busy
#: after its migration, e.g. the dirtier under TCG, echoes late; late is not lost)
TCP_DRAIN_S = 5.0


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    payload = b"migrator-blackout-probe-" + struct.pack("!Q", seq)
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF)
    return struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, seq & 0xFFFF) \
        + payload


class Prober:
    def __init__(self, target: str, interval_s: float, tcp_port: int | None):
        try:
            socket.inet_aton(target)
        except OSError:
            raise ValueError(f"{target!r} is not an IPv4 address") from None
        self.target, self.interval_s, self.tcp_port = target, interval_s, tcp_port
        self.ident = random.randrange(1, 0xFFFF)
        self.stop = threading.Event()
        self.sent: list[list[int]] = []
        self.replies: list[list[int]] = []
        self.tcp = {"connected": False, "error": None, "sent": 0, "echoed": 0,
                    "in_order": True, "max_stall_ms": 0.0} if tcp_port else None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.settimeout(0.1)
        self.stream: socket.socket | None = None
        self.writing = True                     # False once a send failed

    # -- ICMP ---------------------------------------------------------------------------------

    def receive(self) -> None:
        while not self.stop.is_set() or time.monotonic() < self.drain_until:
            try:
                data, anc, _flags, addr = self.sock.recvmsg(2048, socket.CMSG_SPACE(16))
            except socket.timeout:
                continue
            if addr[0] != self.target or len(data) < 20:
                continue
            ihl = (data[0] & 0x0F) * 4
            if len(data) < ihl + 40:            # not one of our echo replies (too short)
                continue
            icmp_type, _code, _sum, ident, _seq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if icmp_type != 0 or ident != self.ident:
                continue
            seq = struct.unpack("!Q", data[ihl + 8 + 24:ihl + 8 + 32])[0]
            stamp = next((struct.unpack("qq", c[2][:16]) for c in anc
                          if c[0] == socket.SOL_SOCKET and c[1] == SO_TIMESTAMPNS), None)
            recv_ns = stamp[0] * 1_000_000_000 + stamp[1] if stamp else time.time_ns()
            self.replies.append([seq, recv_ns])

    # -- TCP ----------------------------------------------------------------------------------

    def connect_stream(self) -> None:
        try:
            self.stream = socket.create_connection((self.target, self.tcp_port), timeout=5)
            self.stream.settimeout(0.2)
            self.tcp["connected"] = True
        except OSError as exc:
            self.tcp["error"] = f"connect: {exc}"

    def read_stream(self) -> None:
        expect, buf, last = 0, b"", time.monotonic()
        while self.stream is not None:
            try:
                data = self.stream.recv(65536)
            except socket.timeout:
                if self.stop.is_set() and (self.tcp["echoed"] >= self.tcp["sent"]
                                           or time.monotonic() >= self.tcp_drain_until):
                    return
                continue
            except OSError as exc:
                self.tcp["error"] = self.tcp["error"] or f"receive: {exc}"
                return
            if not data:
                self.tcp["error"] = self.tcp["error"] or "closed by the guest"
                return
            now = time.monotonic()
            self.tcp["max_stall_ms"] = max(self.tcp["max_stall_ms"], (now - last) * 1000)
            last = now
            buf += data
            whole = len(buf) // 8 * 8
            for (value,) in struct.iter_unpack("!Q", buf[:whole]):
                if value != expect:
                    self.tcp["in_order"] = False
                expect = value + 1
            buf = buf[whole:]
            self.tcp["echoed"] = expect
            if self.stop.is_set() and expect >= self.tcp["sent"]:
                return                  # the whole stream came back

    def write_stream(self, counter: int) -> int:
        chunk = b"".join(struct.pack("!Q", counter + i) for i in range(8))
        try:
            self.stream.sendall(chunk)
        except OSError as exc:
            self.tcp["error"] = self.tcp["error"] or f"send: {exc}"
            self.writing = False
            return counter
        self.tcp["sent"] = counter + 8
        return counter + 8

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> dict:
        self.drain_until = self.tcp_drain_until = float("inf")
        if self.tcp is not None:
            self.connect_stream()
        threads = [threading.Thread(target=self.receive, daemon=True)]
        if self.stream is not None:
            threads.append(threading.Thread(target=self.read_stream, daemon=True))
        for t in threads:
            t.start()
        print("ready", flush=True)
        seq, counter, deadline = 0, 0, time.monotonic()
        stop_seq = stop_at = None
        while True:
            if self.stop.is_set():
                if stop_seq is None:
                    stop_seq, stop_at = seq, time.monotonic()
                if (any(r[0] >= stop_seq for r in self.replies[-8:])
                        or time.monotonic() - stop_at >= RECOVERY_S):
                    break
            self.sent.append([seq, time.time_ns()])
            try:
                self.sock.sendto(echo_request(self.ident, seq), (self.target, 0))
            except OSError:
                pass                      # no route for a moment: a lost probe, counted so
            if self.stream is not None and self.writing and stop_seq is None:
                counter = self.write_stream(counter)   # the stream ends at the request
            seq += 1
            deadline += self.interval_s
            if stop_seq is None:
                self.stop.wait(max(0.0, deadline - time.monotonic()))
            else:
                time.sleep(max(0.0, deadline - time.monotonic()))
        self.drain_until = time.monotonic() + DRAIN_S
        self.tcp_drain_until = time.monotonic() + TCP_DRAIN_S
        for t in threads:
            t.join(TCP_DRAIN_S + 1)
        if self.tcp is not None and self.tcp["connected"] and self.tcp["error"] is None \
                and self.tcp["echoed"] < self.tcp["sent"]:
            self.tcp["error"] = (f"echo incomplete: {self.tcp['echoed']} of "
                                 f"{self.tcp['sent']} counters back {TCP_DRAIN_S:g} s after "
                                 "the end")
        if self.stream is not None:
            self.stream.close()
        self.sock.close()
        return {"target": self.target, "interval_ms": self.interval_s * 1000,
                "sent": self.sent, "replies": self.replies, "tcp": self.tcp}


def first_reply(target: str, timeout_s: float) -> int:
    prober = Prober(target, 0.1, None)
    t0 = time.monotonic()
    prober.drain_until = float("inf")
    receiver = threading.Thread(target=prober.receive, daemon=True)
    receiver.start()
    seq = 0
    while not prober.replies and time.monotonic() - t0 < timeout_s:
        try:
            prober.sock.sendto(echo_request(prober.ident, seq), (target, 0))
        except OSError:
            pass
        seq += 1
        end = time.monotonic() + 0.1
        while not prober.replies and time.monotonic() < end:
            time.sleep(0.002)
    if prober.replies:
        print(f"{time.monotonic() - t0:.3f}", flush=True)
        return 0
    return 1


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "--first":
        try:
            return first_reply(argv[3], float(argv[2]))
        except (OSError, ValueError) as exc:
            print(f"probe_process: {exc}", file=sys.stderr)
            return 2
    if len(argv) not in (3, 4):
        print("usage: probe_process.py TARGET INTERVAL_MS [TCP_PORT]", file=sys.stderr)
        return 2
    try:
        prober = Prober(argv[1], float(argv[2]) / 1000, int(argv[3]) if len(argv) == 4 else None)
    except (OSError, ValueError) as exc:
        print(f"probe_process: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: prober.stop.set())

    def stdin_closed() -> None:
        sys.stdin.buffer.read()
        prober.stop.set()

    threading.Thread(target=stdin_closed, daemon=True).start()
    print(json.dumps(prober.run()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
