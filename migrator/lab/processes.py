"""What runs inside a lab's hosts, seen from the machine: QEMUs, sshd sessions, participants.

Tests and benchmarks ask these questions of a lab after every run ("did anything leak?",
"where does vm1 run?"); the answers come from /proc, not from the hosts' SSH, so they hold
even when a host's sshd is stopped. Each process is read once; one that ends while it is read
is simply not in the answer (the next call sees the truth).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from . import hostproc, network
from .system import Proc, processes_in_netns

if TYPE_CHECKING:
    from .lab import Lab


@dataclass(frozen=True)
class HostProcess:
    """A process running in a lab host's network namespace."""

    host: str
    proc: Proc
    comm: str
    cmdline: str            # NULs as spaces, stripped

    @property
    def pid(self) -> int:
        return self.proc.pid

    def describe(self) -> str:
        return f"{self.host}: {self.comm} pid {self.pid} ({self.cmdline[:160]})"


def host_processes(lab: "Lab") -> Iterator[HostProcess]:
    """Every live process in the namespaces of ``lab``'s hosts."""
    for hs in lab.state().hosts:
        for p in processes_in_netns(network.netns_path(hs.netns)):
            try:
                comm = Path(f"/proc/{p.pid}/comm").read_text().strip()
                cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue                     # ended in between
            yield HostProcess(hs.name, p, comm, cmdline.decode(errors="replace").strip())


def is_qemu(p: HostProcess) -> bool:
    return p.comm.startswith("qemu-system")


def runs_vm(p: HostProcess, vm: str) -> bool:
    """A QEMU of the VM named ``vm``, started by either driver (``-name vm`` by the qemu
    driver, ``-name guest=vm,...`` by libvirt)."""
    line = p.cmdline + " "
    return is_qemu(p) and (f"-name {vm} " in line or f"guest={vm}," in line
                           or f"guest={vm} " in line)


def vm_processes(lab: "Lab", vm: str) -> list[HostProcess]:
    """The QEMUs of ``vm`` in ``lab``, any host, either driver."""
    return [p for p in host_processes(lab) if runs_vm(p, vm)]


def is_participant(p: HostProcess) -> bool:
    """A host's sync participant (``migrate-sync ... member``)."""
    return "migrate-sync" in p.cmdline and " member" in p.cmdline


def sshd_sessions(lab: "Lab") -> list[HostProcess]:
    """The session processes of the lab hosts' sshds (one or more per SSH connection, shown
    as ``sshd: root@notty`` and the like). The listening sshd is not one: it is the process
    the host's init recorded, and OpenSSH titles it ``[listener]``."""
    listeners = {hs.name: hostproc.daemon_proc(lab.host_dir(hs.name), "sshd")
                 for hs in lab.state().hosts}
    return [p for p in host_processes(lab)
            if p.comm in ("sshd", "sshd-session") and "[listener]" not in p.cmdline
            and p.proc != listeners.get(p.host)]


__all__ = ["HostProcess", "host_processes", "is_participant", "is_qemu", "runs_vm",
           "sshd_sessions", "vm_processes"]
