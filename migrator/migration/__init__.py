"""One live migration: parameters, the state machine, progress and the result record."""

import sys

from .engine import EDGES, BaseMigration, Migration, MigrationResult, Phase, ProgressRecord
from .params import MigrationParams


def make_migration(vm, dst_host, dst_address: str, params: MigrationParams | None = None,
                   config=None) -> BaseMigration:
    """The migration of ``vm`` for its driver: QMP for a QemuVM, libvirt for a LibvirtVM."""
    # a LibvirtVM exists only once its module was imported: a qemu-driver run never imports
    # libvirt-python for this test (23 ms of start-up, issue 22)
    libvirt_vms = sys.modules.get("migrator.hypervisor.libvirt")
    if libvirt_vms is not None and isinstance(vm, libvirt_vms.LibvirtVM):
        from .libvirt import LibvirtMigration
        return LibvirtMigration(vm, dst_host, dst_address, params, config)
    return Migration(vm, dst_host, dst_address, params, config)


__all__ = ["Migration", "BaseMigration", "MigrationParams", "MigrationResult", "Phase",
           "ProgressRecord", "EDGES", "make_migration"]
