"""The lab's persistent state (``lab.json``): what ``up`` planned and what it has made so far.

``up`` writes the whole plan (every namespace, link and path name) *before* it creates
anything and records each process as it starts, so ``down`` can remove everything after a
crash at any point, and nothing else.
"""

from __future__ import annotations

import enum
import json
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from .system import Proc


class LabPhase(str, enum.Enum):
    """Where a lab is in its life."""

    ABSENT = "absent"              #: no lab state on disk
    BUILDING = "building"          #: ``up`` is running, or crashed while running
    UP = "up"                      #: ``up`` completed; health is checked separately
    TEARING_DOWN = "tearing-down"  #: ``down`` is running, or crashed while running


class ProcRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pid: int
    start: int

    @classmethod
    def of(cls, proc: Proc) -> "ProcRef":
        return cls(pid=proc.pid, start=proc.start)

    def proc(self) -> Proc:
        return Proc(self.pid, self.start)


class HostState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    netns: str
    veth: str
    address: str
    guest_veth: str = ""
    """The link from the root's guest bridge to the host's (empty: a lab from before)."""
    init: ProcRef | None = None
    sshd: ProcRef | None = None
    libvirtd: ProcRef | None = None


class LabState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = 1
    name: str
    dir: str
    subnet: str
    bridge: str
    bridge_address: str
    guest_subnet: str = ""
    guest_bridge: str = ""
    guest_bridge_address: str = ""
    dhcp: ProcRef | None = None
    """The lab's dnsmasq on the guest bridge (None: not started yet, or a lab from before)."""
    phase: LabPhase
    libvirt: bool
    shared: bool = True
    qemus: dict[str, str] = {}
    """Host -> its own QEMU binary (``migrate-lab up --qemu HOST=BUILD|PATH``); the others
    run the system's."""
    """The inventory names the shared directory as shared storage (``up --no-shared``:
    it does not, and VM disks live on each host's own ``local/``)."""
    accel: str = "tcg"
    accel_reason: str = ""
    hosts: list[HostState]
    made_base_dir: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0

    def host(self, name: str) -> HostState:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def save(self, path: Path) -> None:
        """Write atomically (a crash leaves the old or the new file, never half of one)."""
        self.updated_at = time.time()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "LabState | None":
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            return None
