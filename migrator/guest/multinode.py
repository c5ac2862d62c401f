"""The multinode API inside a guest, over its serial console (as LAVA's dispatcher did).

A guest has no route to the run's sync server (its NIC, if any, is restricted user-mode
networking), so ``migrate-sync sync|send|wait`` in a guest is a small shell script
(:data:`SHIM`) that asks the controller over the console: it turns the terminal's echo off,
prints one request line ``<MN:NONCE:ID:ARGS>`` (``ARGS``: its arguments, one per line,
base64) on the terminal and reads the answer line ``<MNR:ID:ok|err:B64>`` the controller
types back. The controller, while it reads the console for anything (a command's output),
cuts every complete request line with this VM's nonce out of what it reads, has it answered
(:attr:`SerialConsole.requests <migrator.guest.console.SerialConsole.requests>`), and types
the answer. A request is bounded by the command that made it: its timeout ends the wait.

::

    await install(guest, nonce, env={"MIGRATE_SYNC_MEMBER": "server-1"})
    serve(session, nonce, handler)   # handler(op, args) -> (ok, text)

Same spelling as on hosts: ``migrate-sync sync NAME``, ``migrate-sync send KEY=VALUE...``,
``migrate-sync wait KEY`` (prints the value). The shim needs a controlling terminal (the
console shell has one) and runs in the foreground; a shim in a background job would be
stopped by the terminal (SIGTTIN).

What can go wrong: a console that does not answer (the command's timeout); a handler error
(answered as ``err``: the shim exits 1 with the message on stderr).
"""

from __future__ import annotations

import base64
import re
import secrets
from typing import TYPE_CHECKING, Awaitable, Callable

from ..hosts import quote

if TYPE_CHECKING:
    from .console import SerialConsole
    from .host import GuestHost

#: where the shim lives in the guest
SHIM_DIR = "/tmp/migrator-mn"

SHIM = r'''#!/bin/sh
# migrate-sync in a guest (migrator): the multinode API over the serial console.
case "$1" in
  sync|send|wait) ;;
  *) echo "migrate-sync: usage: migrate-sync sync NAME | send KEY=VALUE... | wait KEY" >&2
     exit 2;;
esac
exec 3<>/dev/tty || { echo "migrate-sync: no terminal to reach the controller" >&2; exit 3; }
old=$(stty -g <&3)
trap 'stty "$old" <&3' EXIT
trap 'exit 130' INT TERM
stty -echo <&3
args=$(for a in "$@"; do printf '%s\n' "$a"; done | base64 | tr -d '\n')
printf '\n<MN:%s:%s:%s>\n' "@NONCE@" "$$" "$args" >&3
while IFS= read -r line <&3; do
  case "$line" in
    "<MNR:$$:ok:"*) v=${line#"<MNR:$$:ok:"}; printf '%s' "${v%>*}" | base64 -d; exit 0;;
    "<MNR:$$:err:"*) v=${line#"<MNR:$$:err:"}; printf '%s' "${v%>*}" | base64 -d >&2
                     echo >&2; exit 1;;
  esac
done
exit 3
'''

#: a complete request line (the terminal ends lines with CR LF)
REQUEST = re.compile(r"<MN:(?P<nonce>[0-9a-f]{16}):(?P<id>[0-9]+):(?P<args>[A-Za-z0-9+/=]*)>\r*\n")

#: the longest answer (base64) typed back: the tty's line buffer holds 4095 bytes
MAX_ANSWER_B64 = 4000

Handler = Callable[[str, list[str]], Awaitable[tuple[bool, str]]]


def new_nonce() -> str:
    return secrets.token_hex(8)


async def install(guest: "GuestHost", nonce: str, env: dict[str, str]) -> None:
    """Write the shim into the guest and set its shell up: ``PATH`` finds it, ``env`` is
    exported (``MIGRATE_SYNC_MEMBER``, ``MIGRATE_ROLE``...).

    :raise GuestError: the console does not answer or the file cannot be written.
    """
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "migrate-sync"
        path.write_text(SHIM.replace("@NONCE@", nonce))
        await guest.run(f"mkdir -p {SHIM_DIR}", check=True)
        await guest.send_file(path, f"{SHIM_DIR}/migrate-sync")
    exports = " ".join(f"{k}={quote(v)}" for k, v in env.items())
    session = await guest._session()
    await session.cmd(f"chmod 755 {SHIM_DIR}/migrate-sync && export PATH={SHIM_DIR}:\"$PATH\""
                      + (f" {exports}" if exports else ""),
                      guest.config.timeouts.guest_cmd_s)


def serve(console: "SerialConsole", nonce: str, handler: Handler) -> None:
    """Answer this console's multinode requests (those with ``nonce``) with ``handler``,
    whenever the console is read."""

    async def answer(match: re.Match[str]) -> bytes | None:
        if match.group("nonce") != nonce:
            return None                      # not ours: left in the output
        try:
            raw = base64.b64decode(match.group("args"), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            ok, text = False, "migrate-sync: the controller could not read the request"
        else:
            args = raw.split("\n")[:-1] if raw.endswith("\n") else raw.split("\n")
            try:
                ok, text = await handler(args[0] if args else "", args[1:])
            except Exception as exc:  # noqa: BLE001 - answered to the guest, not lost
                ok, text = False, f"migrate-sync: {exc}"
        b64 = base64.b64encode(text.encode()).decode()
        if len(b64) > MAX_ANSWER_B64:       # one canonical tty line holds 4095 bytes
            ok, b64 = False, base64.b64encode(
                f"migrate-sync: the answer ({len(text.encode())} bytes) is too large for the "
                f"console (at most {MAX_ANSWER_B64 * 3 // 4} bytes)".encode()).decode()
        return f"<MNR:{match.group('id')}:{'ok' if ok else 'err'}:{b64}>\n".encode()

    console.requests = (REQUEST, answer)
