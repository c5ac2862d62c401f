"""syncserver: barriers and data exchange for the members of a run (aiohttp, JSON, token).

``SyncServer`` (embedded in a process) and ``SyncClient`` (asyncio) speak the protocol of
:mod:`syncserver.protocol`; ``migrate-sync`` (:mod:`syncserver.hostclient`, standard library
only, shipped to hosts as a zipapp) speaks it too.
"""

import importlib

from .protocol import (AuthError, BarrierAborted, BarrierTimeout, MembershipError, ProtocolError,
                       SyncConnectionError, SyncError)

#: imported when first asked for (PEP 562): both import aiohttp (0.3 s on a slow machine),
#: which the protocol, the host-side client and the zipapp's build do not need
_LAZY = {"SyncClient": "client", "SyncServer": "server", "ServerOptions": "server",
         "make_app": "server"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SyncServer", "SyncClient", "ServerOptions", "make_app", "SyncError",
           "BarrierTimeout", "BarrierAborted", "MembershipError", "ProtocolError", "AuthError",
           "SyncConnectionError"]
