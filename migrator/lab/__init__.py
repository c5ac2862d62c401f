"""migrate-lab: a multi-host lab on one machine (namespace hosts, sshd, shared storage, guest).

Names are imported lazily: ``python -m migrator.lab.hostinit`` (each lab host's init) must
start fast and must not be imported before runpy executes it.
"""

import importlib

_EXPORTS = {
    "Lab": "lab", "UpReport": "lab", "DownReport": "lab", "HostHealth": "lab",
    "default_host_names": "lab", "LabPhase": "state", "LabState": "state",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
