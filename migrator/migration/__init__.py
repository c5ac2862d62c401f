"""One live migration: parameters, the state machine, progress and the result record."""

from .engine import EDGES, BaseMigration, Migration, MigrationResult, Phase, ProgressRecord
from .params import MigrationParams


def make_migration(vm, dst_host, dst_address: str, params: MigrationParams | None = None,
                   config=None) -> BaseMigration:
    """The migration of ``vm`` for its driver: QMP for a QemuVM, libvirt for a LibvirtVM."""
    from ..hypervisor.libvirt import LibvirtVM
    if isinstance(vm, LibvirtVM):
        from .libvirt import LibvirtMigration
        return LibvirtMigration(vm, dst_host, dst_address, params, config)
    return Migration(vm, dst_host, dst_address, params, config)


__all__ = ["Migration", "BaseMigration", "MigrationParams", "MigrationResult", "Phase",
           "ProgressRecord", "EDGES", "make_migration"]
