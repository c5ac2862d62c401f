"""The multi-host migration framework: ``MultihostMigration`` and what it hands to scenarios."""

from .context import InstanceRecord, MigrationRecord, RunContext
from .data import MigrationData
from .multihost import MigrationHandle, MultihostMigration
from .pairing import group_hosts
from .scenario import load_scenario

__all__ = ["MultihostMigration", "MigrationData", "MigrationHandle", "RunContext",
           "MigrationRecord", "InstanceRecord", "group_hosts", "load_scenario"]
