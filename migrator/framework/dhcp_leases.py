"""Static DHCP leases of claimed address ranges, for the guest network's DHCP server.

When the inventory names a DHCP server on the guest network (``guest_network.dhcp``: the
lab's dnsmasq), a run that claims an address range publishes the range's ``MAC,IP`` pairs
as a file of the server's hosts directory (``dnsmasq --dhcp-hostsdir`` reads a new file at
once, through inotify), so a guest that asks by DHCP (``dhcp: true``) gets the address its
pool gives its MAC. Giving the range back removes the file and sends the server SIGHUP: a
record dnsmasq has read stays until it re-reads its files.

::

    path = publish(server, claim)        # after the claim; journaled (kind: dhcp_hosts)
    withdraw(server, path)               # cleanup, and recover for a dead run

The files live on the controller (where the lab's dnsmasq runs). What can go wrong: the
directory is not writable (:class:`ConfigError` from :func:`publish`); the server is not
running (:func:`withdraw` removes the file and says so; the server's next start reads
the directory afresh).
"""

from __future__ import annotations

import ipaddress
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import DhcpServer, mac_text
from ..errors import ConfigError

if TYPE_CHECKING:
    from .pools import Claim


def hosts_file(server: DhcpServer, claim: "Claim") -> Path:
    """The hosts file of ``claim``: named like its claim file, so a run's are recognisable."""
    name = Path(claim.path).name.removesuffix(".claim")
    return server.hosts_dir / f"{name}.hosts"


def lease_lines(claim: "Claim") -> str:
    """``MAC,IP`` per address of the range (dnsmasq's dhcp-host syntax)."""
    pool = claim.range.pool
    return "".join(f"{mac_text(m)},{ipaddress.IPv4Address(i)}\n"
                   for m, i in zip(pool.macs(), pool.ips()))


def publish(server: DhcpServer, claim: "Claim") -> Path:
    """Write the range's static leases (atomically: a dot file renamed; dnsmasq skips dot
    files). :raise ConfigError: the hosts directory cannot be written."""
    path = hosts_file(server, claim)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(lease_lines(claim))
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"guest_network.dhcp.hosts_dir: cannot write {path}: "
                          f"{exc.strerror}") from None
    return path


def check_writable(server: DhcpServer) -> None:
    """Before anything starts. :raise ConfigError: the hosts directory is missing or not
    writable."""
    if not server.hosts_dir.is_dir() or not os.access(server.hosts_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"guest_network.dhcp.hosts_dir {server.hosts_dir} is not a writable "
                          "directory on this controller (the DHCP server's static leases)")


def withdraw(server: DhcpServer, path: str | os.PathLike) -> str | None:
    """Remove a published hosts file and make the server forget its leases; a problem, as a
    sentence (never raises)."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError as exc:
        return f"static leases {path} not removed ({exc.strerror})"
    return reload(server)


def reload(server: DhcpServer) -> str | None:
    """SIGHUP the server in ``pid_file`` (only a process named dnsmasq); a problem, as a
    sentence, or None."""
    if server.pid_file is None:
        return None
    try:
        pid = int(server.pid_file.read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return f"the DHCP server of {server.pid_file} is not running (its leases are re-read " \
               "when it starts)"
    if comm != "dnsmasq":
        return f"{server.pid_file} names pid {pid}, a {comm}, not dnsmasq: not signalled"
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return f"the DHCP server (pid {pid}) ended before it was told to re-read its leases"
    return None


__all__ = ["check_writable", "hosts_file", "lease_lines", "publish", "reload", "withdraw"]
