"""``migrate-syncserver``: the barrier and data-exchange server on its own."""

from __future__ import annotations

import asyncio
import os
import sys

from .common import Parser, setup_logging


def syncserver_main(argv: list[str] | None = None) -> int:
    """``migrate-syncserver --bind ADDR --port N --token-file F [--create-token]``."""
    import secrets
    import signal as _signal
    from pathlib import Path

    p = Parser(prog="migrate-syncserver",
                description="Barrier and data-exchange server for migrator runs.")
    p.add_argument("--bind", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default 0: pick a free one)")
    p.add_argument("--token-file", required=True, help="file holding the shared token")
    p.add_argument("--create-token", action="store_true",
                   help="write a new random token to --token-file (mode 0600) if it is missing")
    p.add_argument("--heartbeat", type=float, default=None,
                   help="WebSocket heartbeat in seconds (default 5)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    from syncserver.server import ServerOptions, serve_forever

    path = Path(args.token_file)
    if not path.exists() and args.create_token:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    try:
        token = path.read_text().strip()
    except OSError as exc:
        print(f"migrate-syncserver: error: cannot read token file {path}: {exc.strerror} "
              "(use --create-token to make one)", file=sys.stderr)
        return 2
    if path.stat().st_mode & 0o077:
        print(f"migrate-syncserver: warning: token file {path} is readable by others",
              file=sys.stderr)
    options = ServerOptions(**({"heartbeat_s": args.heartbeat} if args.heartbeat else {}))
    # every member is a connection, i.e. a file descriptor: allow as many as the hard limit
    import resource
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (_signal.SIGTERM, _signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_forever(args.bind, args.port, token, options, stop)

    try:
        asyncio.run(main())
    except ValueError as exc:
        print(f"migrate-syncserver: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"migrate-syncserver: error: cannot listen on {args.bind}:{args.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0
