"""migrate-lab: a multi-host lab on one machine (namespace hosts, sshd, shared storage, guest)."""

from .lab import DownReport, HostHealth, Lab, UpReport, default_host_names
from .state import LabPhase, LabState

__all__ = ["Lab", "LabPhase", "LabState", "UpReport", "DownReport", "HostHealth",
           "default_host_names"]
