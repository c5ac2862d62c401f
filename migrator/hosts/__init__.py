"""Hosts reached over SSH: commands, files, liveness, fan-out and installables."""

from .installable import Installable
from .parallel import parallel, run_on
from .result import CmdResult
from .ssh import RemoteProcess, SSHHost, join, quote

__all__ = ["SSHHost", "CmdResult", "parallel", "run_on", "Installable", "quote", "join", "RemoteProcess"]
