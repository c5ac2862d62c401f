"""The sync protocol: messages, limits and errors. Standard library only.

Shared by the aiohttp server, the asyncio ``SyncClient`` and the stdlib host-side client
(``migrate-sync``, shipped to hosts as a zipapp), so all three speak exactly the same thing.

Transport: one WebSocket per client at ``GET /v1/ws?run=RUN&member=NAME[&persistent=1]`` with
``Authorization: Bearer TOKEN``. Every message is a JSON object with ``"v": 1``.

Requests (client -> server), each with a client-chosen integer ``id``::

    {"v": 1, "id": 7, "op": "barrier",  "name": N, "members": M, "timeout": S, "generation": G?}
    {"v": 1, "id": 8, "op": "exchange", "name": N, "members": M, "timeout": S, "data": ANY,
                                                                            "generation": G?}

where M is a list of member names, or the same names as one comma-separated string (the
compact form the clients send).
    {"v": 1, "id": 9, "op": "abort",    "name": N, "reason": TEXT, "kind": "barrier"|"exchange"?}
    {"v": 1, "id": 10, "op": "send",    "name": K, "data": ANY}
    {"v": 1, "id": 11, "op": "wait",    "name": K, "timeout": S}

``send``/``wait`` are the run's key-value messages (LAVA's ``lava-send KEY=VAL`` and
``lava-wait KEY``): ``send`` sets key K (the last send wins) and is answered at once;
``wait`` is answered with ``{"data": V, "from": MEMBER}`` once K is set (at once if it is),
else fails with ``BarrierTimeout`` after S seconds, naming the run's lost members if any.

Answers (server -> client)::

    {"v": 1, "id": 7, "ok": true, "result": {"generation": G, "released_in_ms": X, ...}}
    {"v": 1, "id": 7, "ok": false, "error": {"type": "BarrierTimeout", "message": ..., ...}}

A barrier (or exchange) name lives in a run's namespace and is reused across rounds: each
round is a *generation* (1, 2, ...). ``generation`` in a request pins the round; without it
the client joins the open round, or starts the next one after a released round.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

PROTOCOL_VERSION = 1
WS_PATH = "/v1/ws"
MAX_MESSAGE_BYTES = 1 << 20          #: largest message either side accepts (1 MiB)
MAX_MEMBERS = 10_000                 #: largest member list of one barrier
MAX_NAME = 200                       #: longest run, member or barrier name
MAX_TIMEOUT_S = 7 * 24 * 3600.0      #: a week: longer is surely a mistake
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/#+-]{0,199}$")
OPS = ("barrier", "exchange", "abort", "send", "wait")


# -- errors ----------------------------------------------------------------------------------

class SyncError(Exception):
    """Root of the sync errors. Each carries the data of its JSON form as attributes."""

    type = "SyncError"

    def __init__(self, message: str, **fields: Any):
        super().__init__(message)
        self.message = message
        self.fields = fields
        for key, value in fields.items():
            setattr(self, key, value)

    def to_json(self) -> dict:
        return {"type": self.type, "message": self.message, **self.fields}


class BarrierTimeout(SyncError):
    """Not every member arrived in time. ``missing``: who did not arrive (sorted);
    ``arrived``; ``barrier``; ``generation``; ``timeout``. Every waiter gets the same one."""

    type = "BarrierTimeout"


class BarrierAborted(SyncError):
    """A member aborted the barrier (``by``, ``reason``), or a member was lost
    (``lost=True``: its connection closed or stopped answering heartbeats)."""

    type = "BarrierAborted"


class MembershipError(SyncError):
    """Bad membership: a member list with duplicates, a caller not in its own list, lists
    that disagree between members, a member already waiting, or a member known to be gone."""

    type = "MembershipError"


class ProtocolError(SyncError):
    """A malformed request: not JSON, wrong version, unknown op, bad field. ``status`` is the
    HTTP-style code (400, 413)."""

    type = "ProtocolError"


class AuthError(SyncError):
    """The server refused the token (401)."""

    type = "AuthError"


class SyncConnectionError(SyncError):
    """The server could not be reached, or the connection to it was lost."""

    type = "SyncConnectionError"


ERRORS = {cls.type: cls for cls in (SyncError, BarrierTimeout, BarrierAborted, MembershipError,
                                    ProtocolError, AuthError, SyncConnectionError)}


def server_url(host: str, port: int) -> str:
    """The URL clients use for a server listening on ``host``:``port`` (an IPv6 address in
    brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def error_from_json(data: dict) -> SyncError:
    """The exception an error answer describes (unknown types become ``SyncError``)."""
    data = dict(data)
    cls = ERRORS.get(str(data.pop("type", "SyncError")), SyncError)
    message = str(data.pop("message", "sync error"))
    return cls(message, **{k: v for k, v in data.items() if isinstance(k, str)})


# -- messages --------------------------------------------------------------------------------

def encode(message: dict) -> str:
    return json.dumps({"v": PROTOCOL_VERSION, **message}, separators=(",", ":"))


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ProtocolError(f"bad {what} {value!r}: 1-{MAX_NAME} characters of letters, digits "
                            "and _.:@/#+- starting with a letter or digit", status=400)
    return value


class Members(tuple):
    """A validated member list (in the order given) with its set, made once per distinct list."""

    set: frozenset

    def __new__(cls, names):
        self = super().__new__(cls, names)
        self.set = frozenset(self)
        return self


@functools.lru_cache(maxsize=1024)
def _members_from_text(text: str) -> Members:
    return _validated(text.split(","))


@functools.lru_cache(maxsize=1024)
def _members_from_tuple(names: tuple) -> Members:
    return _validated(names)


def _validated(names) -> Members:
    if not names or list(names) == [""]:
        raise ProtocolError("'members' must not be empty", status=400)
    if len(names) > MAX_MEMBERS:
        raise ProtocolError(f"at most {MAX_MEMBERS} members", status=413)
    for m in names:
        if not isinstance(m, str):
            raise ProtocolError(f"bad member name {m!r}", status=400)
        check_name(m, "member name")
    return Members(names)


def parse_members(value: Any) -> Members:
    """``members`` as a JSON list of names, or as one comma-separated string (names cannot
    contain commas). Every member of a round sends the same list, so each distinct list is
    validated once and then found by its text: with 1000 members, the string form makes an
    arrival cost one hash instead of building and checking a thousand strings.

    :raise ProtocolError: for anything else, or a bad name.
    """
    try:
        if isinstance(value, str):
            return _members_from_text(value)
        if isinstance(value, list):
            return _members_from_tuple(tuple(value))
    except TypeError:                       # unhashable items in the list
        pass
    raise ProtocolError("'members' must be a non-empty list of names or a comma-separated "
                        "string of names", status=400)


def join_members(members) -> str:
    """The compact (comma-separated) wire form of a member list."""
    return ",".join(members)


def _timeout(timeout: Any) -> float:
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) \
            or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ProtocolError(f"'timeout' must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]",
                            status=400)
    return float(timeout)


def parse_request(text: str | bytes) -> dict:
    """Validate one request; return it with normalised fields.

    :raise ProtocolError: naming what is wrong (status 400, or 413 when too large).
    """
    if len(text) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(text)} bytes exceeds {MAX_MESSAGE_BYTES}",
                            status=413)
    try:
        msg = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}", status=400) from None
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a JSON object", status=400)
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {msg.get('v')!r} (server speaks "
                            f"{PROTOCOL_VERSION})", status=400)
    rid = msg.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise ProtocolError("'id' must be an integer", status=400)
    op = msg.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r} (known: {', '.join(OPS)})", status=400, id=rid)
    try:
        out = {"id": rid, "op": op, "name": check_name(
            msg.get("name"), "key" if op in ("send", "wait") else "barrier name")}
        if op == "send":
            if "data" not in msg:
                raise ProtocolError("a send needs 'data'", status=400)
            out["data"] = msg["data"]
            return out
        if op == "wait":
            out["timeout"] = _timeout(msg.get("timeout"))
            return out
        if op == "abort":
            reason = msg.get("reason", "")
            if not isinstance(reason, str) or len(reason) > 4096:
                raise ProtocolError("'reason' must be a string of at most 4096 characters",
                                    status=400)
            kind = msg.get("kind", "barrier")
            if kind not in ("barrier", "exchange"):
                raise ProtocolError(f"unknown kind {kind!r}", status=400)
            out.update(reason=reason, kind=kind)
            return out
        out["members"] = parse_members(msg.get("members"))
        out["timeout"] = _timeout(msg.get("timeout"))
        generation = msg.get("generation")
        if generation is not None and (not isinstance(generation, int)
                                       or isinstance(generation, bool) or generation < 1):
            raise ProtocolError("'generation' must be a positive integer", status=400)
        out["generation"] = generation
        if op == "exchange":
            if "data" not in msg:
                raise ProtocolError("an exchange needs 'data'", status=400)
            out["data"] = msg["data"]
        return out
    except ProtocolError as exc:
        exc.fields.setdefault("id", rid)
        exc.id = rid
        raise
