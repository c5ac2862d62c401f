"""Drivers: how a VM is started, stopped and reached on a host.

``qemu`` (:class:`~.qemu.QemuVM`: QEMU over SSH, QMP through SSH socket forwarding) and
``libvirt`` (:class:`~.libvirt.LibvirtVM`: libvirt-python). Both share :class:`~.vm.GuestVM`
(spec, run dir, serial console sessions) and the interface described in :mod:`.vm`.
"""

from __future__ import annotations

from .vm import GuestVM, VMSpec

DRIVERS = ("qemu", "libvirt")


def make_vm(driver: str, spec: VMSpec, host, run_dir: str, config=None) -> GuestVM:
    """A VM object of ``driver`` (``qemu`` or ``libvirt``). :raise ValueError: unknown driver."""
    if driver == "qemu":
        from .qemu import QemuVM
        return QemuVM(spec, host, run_dir, config)
    if driver == "libvirt":
        from .libvirt import LibvirtVM
        return LibvirtVM(spec, host, run_dir, config)
    raise ValueError(f"unknown driver {driver!r} (known: {', '.join(DRIVERS)})")


__all__ = ["GuestVM", "VMSpec", "make_vm", "DRIVERS"]
