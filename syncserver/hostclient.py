"""``migrate-sync``: the host-side sync client. Python 3 standard library only.

Shipped to hosts as a zipapp (:func:`syncserver.zipapp.build`), so processes on hosts and
scripts in test shells join the same barriers as the controller::

    migrate-sync barrier NAME --members hostA,hostB --timeout 30
    migrate-sync exchange NAME --members hostA,hostB --data '{"port": 4444}' --timeout 30
    migrate-sync abort NAME --reason "disk full"
    migrate-sync sync NAME [--members a,b,c]     # LAVA's lava-sync ($MIGRATE_SYNC_GROUP)
    migrate-sync send KEY=VALUE [KEY=VALUE ...]  # LAVA's lava-send: returns at once
    migrate-sync wait KEY [--timeout S]          # LAVA's lava-wait: prints the value
    migrate-sync member          # stay connected as this host's participant until killed
    migrate-sync member --until-stdin-eof   # ... serving JSON requests from stdin

Connection settings come from options or the environment (never the token on the command
line, where ``ps`` would show it): ``--url``/``MIGRATE_SYNC_URL``, ``--run``/
``MIGRATE_SYNC_RUN``, ``--member``/``MIGRATE_SYNC_MEMBER``, ``--token-file``/
``MIGRATE_SYNC_TOKEN_FILE`` or ``MIGRATE_SYNC_TOKEN``.

Exit status: 0 done; 1 the barrier timed out or was aborted (stderr names who is missing or
who aborted); 2 bad usage, membership or protocol error, token refused; 3 the server could not
be reached or the link was lost.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time
from urllib.parse import urlencode, urlsplit

from .protocol import (MAX_MESSAGE_BYTES, WS_PATH, AuthError, BarrierAborted, BarrierTimeout,
                       ProtocolError, SyncConnectionError, SyncError, check_name, encode,
                       error_from_json)

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class WebSocket:
    """A minimal RFC 6455 client: text frames, ping/pong, close. Blocking, one thread."""

    def __init__(self, url: str, path: str, query: dict, token: str, timeout: float):
        self._send_lock = threading.Lock()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "ws"):
            raise SyncConnectionError(f"unsupported URL scheme in {url!r} (http:// or ws://)")
        host, port = parts.hostname or "localhost", parts.port or 80
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise SyncConnectionError(f"cannot reach sync server {url}: {exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        request = (f"GET {path}?{urlencode(query)} HTTP/1.1\r\nHost: {netloc}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                   f"Authorization: Bearer {token}\r\n\r\n")
        self.sock.sendall(request.encode())
        head, self.buf = self._read_head()
        status_line, *header_lines = head.split("\r\n")
        try:
            status = int(status_line.split()[1])
        except (IndexError, ValueError):
            raise SyncConnectionError(f"not an HTTP answer from {url}: {status_line!r}") from None
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status == 401:
            raise AuthError(f"sync server {url} refused the token")
        if status == 400:
            raise ProtocolError(f"sync server {url} refused the connection (400)", status=400)
        if status != 101:
            raise SyncConnectionError(f"sync server {url}: HTTP {status}")
        accept = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise SyncConnectionError(f"sync server {url}: bad WebSocket handshake")

    def _read_head(self) -> tuple[str, bytes]:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise SyncConnectionError("connection closed during the handshake")
            data += chunk
            if len(data) > 65536:
                raise SyncConnectionError("handshake answer too large")
        head, _, rest = data.partition(b"\r\n\r\n")
        return head.decode("latin-1"), rest

    def _recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SyncConnectionError("connection to the sync server lost")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        with self._send_lock:       # pongs (reader) and requests (stdin) may send at once
            self._send_frame_locked(opcode, payload)

    def _send_frame_locked(self, opcode: int, payload: bytes) -> None:
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send_text(self, text: str) -> None:
        try:
            self._send_frame(OP_TEXT, text.encode())
        except OSError as exc:
            raise SyncConnectionError(f"cannot send to the sync server: {exc}") from None

    def recv_text(self, timeout: float | None) -> str:
        """The next text message, answering pings meanwhile. ``timeout`` bounds the silence
        between frames (the server pings regularly, so silence means a dead link)."""
        self.sock.settimeout(timeout)
        parts: list[bytes] = []
        try:
            while True:
                b1, b2 = self._recv_exact(2)
                opcode, n = b1 & 0x0F, b2 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", self._recv_exact(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", self._recv_exact(8))[0]
                if n > 2 * MAX_MESSAGE_BYTES:
                    raise SyncConnectionError(f"frame of {n} bytes from the server is too large")
                mask = self._recv_exact(4) if b2 & 0x80 else None
                payload = self._recv_exact(n)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if opcode == OP_PING:
                    self._send_frame(OP_PONG, payload)
                elif opcode == OP_PONG:
                    continue
                elif opcode == OP_CLOSE:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    raise SyncConnectionError(f"the sync server closed the connection ({code})")
                elif opcode in (OP_TEXT, OP_CONT):
                    parts.append(payload)
                    if b1 & 0x80:
                        return b"".join(parts).decode()
        except socket.timeout:
            raise SyncConnectionError(f"the sync server was silent for {timeout:g} s "
                                      "(no heartbeat): link lost") from None
        except OSError as exc:
            raise SyncConnectionError(f"connection to the sync server lost: {exc}") from None

    def close(self) -> None:
        try:
            self._send_frame(OP_CLOSE, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()


class HostSync:
    """One member's session with the sync server (blocking)."""

    def __init__(self, url: str, token: str, member: str, run_id: str,
                 persistent: bool = False, connect_timeout: float = 10.0,
                 silence_s: float = 30.0):
        self.silence_s = silence_s
        self.ws = WebSocket(url, WS_PATH, {"run": check_name(run_id, "run id"),
                                           "member": check_name(member, "member name"),
                                           "persistent": "1" if persistent else "0"},
                            token, connect_timeout)
        self._id = 0

    def request(self, payload: dict, answer_within_s: float) -> dict:
        self._id += 1
        self.ws.send_text(encode({"id": self._id, **payload}))
        deadline = time.monotonic() + answer_within_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SyncConnectionError(f"no answer from the sync server within "
                                          f"{answer_within_s:g} s")
            answer = json.loads(self.ws.recv_text(min(left, self.silence_s)))
            if answer.get("id") != self._id:
                continue
            if answer.get("ok"):
                return answer.get("result") or {}
            raise error_from_json(answer.get("error") or {})

    def wait_closed(self) -> None:
        """Stay connected (answering heartbeats) until the server closes the link."""
        while True:
            self.ws.recv_text(self.silence_s)

    def serve(self, out) -> None:
        """Stay connected; write every answer the server sends as one JSON line to ``out``
        (the answers to requests :func:`_serve_stdin` forwarded)."""
        while True:
            out.write(self.ws.recv_text(self.silence_s) + "\n")
            out.flush()

    def close(self) -> None:
        self.ws.close()


def _serve_stdin(session: HostSync) -> threading.Event:
    """Forward each line of stdin (a JSON request: barrier, exchange or abort, with the id its
    sender chose) to the server as this member; when stdin ends (the controller closed it, or
    its SSH session died), close the link cleanly and exit 0, whatever the main thread does.
    A line that is not a JSON object is answered with an error line, never sent on.

    :return: set once stdin has ended, before the link is closed: the main thread, woken by
        that close in the middle of a read, must then exit 0 too, not as a lost link (3).
    """
    ended = threading.Event()

    def watch() -> None:
        buf = b""
        try:
            while chunk := os.read(0, 65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in filter(None, (ln.strip() for ln in lines)):
                    try:
                        request = json.loads(line)
                        if not isinstance(request, dict):
                            raise ValueError("not an object")
                    except ValueError as exc:
                        sys.stdout.write(json.dumps({"ok": False, "error": {
                            "type": "ProtocolError", "message": f"bad request line: {exc}"}})
                            + "\n")
                        sys.stdout.flush()
                        continue
                    session.ws.send_text(encode(request))
        except (OSError, SyncError):
            pass
        ended.set()
        session.close()
        os._exit(0)
    threading.Thread(target=watch, name="stdin", daemon=True).start()
    return ended


def _token(args) -> str:
    path = args.token_file or os.environ.get("MIGRATE_SYNC_TOKEN_FILE")
    if path:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as exc:
            raise SystemExit(f"migrate-sync: cannot read token file {path}: {exc.strerror}")
    token = os.environ.get("MIGRATE_SYNC_TOKEN")
    if not token:
        raise SystemExit("migrate-sync: no token: use --token-file or $MIGRATE_SYNC_TOKEN_FILE "
                         "or $MIGRATE_SYNC_TOKEN")
    return token


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="migrate-sync", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("MIGRATE_SYNC_URL"))
    p.add_argument("--run", default=os.environ.get("MIGRATE_SYNC_RUN"))
    p.add_argument("--member", default=os.environ.get("MIGRATE_SYNC_MEMBER"))
    p.add_argument("--token-file")
    p.add_argument("--heartbeat-silence", type=float, default=30.0,
                   help="seconds without any frame from the server that mean the link is lost")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("barrier", "exchange"):
        s = sub.add_parser(name)
        s.add_argument("name")
        s.add_argument("--members", required=True, help="comma-separated member names")
        s.add_argument("--timeout", type=float, required=True)
        s.add_argument("--generation", type=int, help="pin the round (default: current)")
        if name == "exchange":
            s.add_argument("--data", required=True, help="this member's data, as JSON")
    y = sub.add_parser("sync", help="LAVA's lava-sync: wait until every member of the group "
                                    "arrived at NAME (a barrier, one round per call)")
    y.add_argument("name")
    y.add_argument("--members", default=os.environ.get("MIGRATE_SYNC_GROUP"),
                   help="comma-separated member names (default: $MIGRATE_SYNC_GROUP)")
    y.add_argument("--timeout", type=float,
                   default=float(os.environ.get("MIGRATE_SYNC_TIMEOUT") or 3600))
    snd = sub.add_parser("send", help="LAVA's lava-send: set KEY=VALUE for the run's members "
                                      "(returns at once)")
    snd.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    w = sub.add_parser("wait", help="LAVA's lava-wait: print KEY's value once a member sent it")
    w.add_argument("key")
    w.add_argument("--timeout", type=float,
                   default=float(os.environ.get("MIGRATE_SYNC_TIMEOUT") or 3600))
    a = sub.add_parser("abort")
    a.add_argument("name")
    a.add_argument("--reason", required=True)
    a.add_argument("--kind", choices=("barrier", "exchange"), default="barrier")
    m = sub.add_parser("member", help="stay connected as this host's participant until killed")
    m.add_argument("--until-stdin-eof", action="store_true",
                   help="serve requests as this member: each stdin line is a JSON request "
                        "(barrier, exchange, abort), each answer a JSON line on stdout; leave "
                        "(exit 0) when stdin ends, so the participant lives exactly as long "
                        "as the SSH session that started it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for opt in ("url", "run", "member"):
        if not getattr(args, opt):
            print(f"migrate-sync: --{opt} (or $MIGRATE_SYNC_{opt.upper()}) is required",
                  file=sys.stderr)
            return 2
    try:
        session = HostSync(args.url, _token(args), args.member, args.run,
                           persistent=args.cmd == "member", silence_s=args.heartbeat_silence)
        try:
            if args.cmd == "member":
                print(f"migrate-sync: {args.member} is a member of run {args.run} at "
                      f"{args.url}", flush=True)
                if args.until_stdin_eof:
                    stdin_ended = _serve_stdin(session)
                    try:
                        session.serve(sys.stdout)
                    except SyncConnectionError:
                        if stdin_ended.is_set():    # the link closed because stdin ended
                            return 0
                        raise
                session.wait_closed()
                return 3
            if args.cmd == "abort":
                result = session.request({"op": "abort", "name": args.name,
                                          "reason": args.reason, "kind": args.kind}, 30)
                print(json.dumps(result))
                return 0
            if args.cmd == "send":
                for pair in args.pairs:
                    key, eq, value = pair.partition("=")
                    if not eq:
                        print(f"migrate-sync: send {pair!r}: KEY=VALUE expected",
                              file=sys.stderr)
                        return 2
                    session.request({"op": "send", "name": key, "data": value}, 30)
                return 0
            if args.cmd == "wait":
                result = session.request({"op": "wait", "name": args.key,
                                          "timeout": args.timeout}, args.timeout + 10)
                data = result["data"]
                print(data if isinstance(data, str) else json.dumps(data))
                return 0
            if args.cmd == "sync":
                if not args.members:
                    print("migrate-sync: sync: --members (or $MIGRATE_SYNC_GROUP) is required",
                          file=sys.stderr)
                    return 2
                args.cmd, args.generation = "barrier", None
                args.name = f"sync.{args.name}"
            members = [m.strip() for m in args.members.split(",") if m.strip()]
            payload = {"op": args.cmd, "name": args.name, "members": ",".join(members),
                       "timeout": args.timeout, "generation": args.generation}
            if args.cmd == "exchange":
                try:
                    payload["data"] = json.loads(args.data)
                except ValueError as exc:
                    print(f"migrate-sync: --data is not JSON: {exc}", file=sys.stderr)
                    return 2
            result = session.request(payload, args.timeout + 10)
            print(json.dumps(result["data"] if args.cmd == "exchange" else result))
            return 0
        finally:
            session.close()
    except (BarrierTimeout, BarrierAborted) as exc:
        print(f"migrate-sync: {exc}", file=sys.stderr)
        return 1
    except SyncConnectionError as exc:
        print(f"migrate-sync: {exc}", file=sys.stderr)
        return 3
    except SyncError as exc:
        print(f"migrate-sync: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
