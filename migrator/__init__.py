"""migrator: live migration of QEMU/KVM virtual machines across many hosts, and its test bed.

Names are imported lazily, so light entry points (a lab host's init) do not pay for the
whole package.
"""

import importlib
import logging

logging.getLogger("migrator").addHandler(logging.NullHandler())

_EXPORTS = {
    "Config": "config", "Inventory": "config", "find_inventory": "config",
    "load_inventory": "config", "MigratorError": "errors", "ConfigError": "errors",
    "InventoryError": "errors", "HostError": "errors", "CommandError": "errors",
    "LabError": "errors", "GuestError": "errors", "MigrationError": "errors",
    "BarrierError": "errors", "ScenarioError": "errors",
    "MultihostMigration": "framework", "MigrationData": "framework",
    "GuestHost": "guest.host", "ParallelVMTasks": "framework.tasks",
    "TaskResults": "framework.tasks",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
