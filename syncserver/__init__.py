"""syncserver: barriers and data exchange for the members of a run (aiohttp, JSON, token).

``SyncServer`` (embedded in a process) and ``SyncClient`` (asyncio) speak the protocol of
:mod:`syncserver.protocol`; ``migrate-sync`` (:mod:`syncserver.hostclient`, standard library
only, shipped to hosts as a zipapp) speaks it too.
"""

from .client import SyncClient
from .protocol import (AuthError, BarrierAborted, BarrierTimeout, MembershipError, ProtocolError,
                       SyncConnectionError, SyncError)
from .server import ServerOptions, SyncServer, make_app

__all__ = ["SyncServer", "SyncClient", "ServerOptions", "make_app", "SyncError",
           "BarrierTimeout", "BarrierAborted", "MembershipError", "ProtocolError", "AuthError",
           "SyncConnectionError"]
