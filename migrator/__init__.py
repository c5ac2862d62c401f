"""migrator: live migration of QEMU/KVM virtual machines across many hosts, and its test bed."""

import logging

from .config import Config, Inventory, find_inventory, load_inventory
from .errors import (CommandError, ConfigError, GuestError, HostError, InventoryError, LabError,
                     MigratorError)

logging.getLogger("migrator").addHandler(logging.NullHandler())

__all__ = ["Config", "Inventory", "find_inventory", "load_inventory", "MigratorError",
           "ConfigError", "InventoryError", "HostError", "CommandError", "LabError",
           "GuestError"]
__version__ = "0.1.0"
