"""The lab's DHCP server: one dnsmasq (Debian's ``dnsmasq-base``) on the root namespace's
guest bridge, answering only the static leases the runs write (``--dhcp-range=...,static``:
a MAC without a lease gets nothing), with no DNS (``--port=0``), and no router or DNS server
handed out (the guest network is never routed).

Files, under ``<lab>/dhcp/``: ``hosts.d/`` (one file of ``MAC,IP`` lines per claimed range,
read at once through inotify; the inventory's ``guest_network.dhcp.hosts_dir``),
``dnsmasq.pid`` (SIGHUP makes dnsmasq forget a removed file's leases), ``leases``,
``dnsmasq.log`` (every DHCP exchange, ``--log-dhcp``) and ``dnsmasq.err`` (its start-up
errors). dnsmasq drops to user ``nobody`` after binding.

What can go wrong: ``dnsmasq`` is not installed (a :class:`ConfigError` from the lab's tool
check); it exits at start (the bridge is gone, the DHCP port is taken: :class:`LabError`
quoting its error).
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
from pathlib import Path

from ..errors import LabError
from .system import Proc

DNSMASQ = "dnsmasq"
#: how long a lease lasts: a guest renews it at half; a lease outlives its range's release
#: until it expires (dnsmasq will not give its address to another MAC before)
LEASE_TIME = "1h"


def dhcp_dir(lab_dir: Path) -> Path:
    return lab_dir / "dhcp"


def hosts_dir(lab_dir: Path) -> Path:
    return dhcp_dir(lab_dir) / "hosts.d"


def pid_file(lab_dir: Path) -> Path:
    return dhcp_dir(lab_dir) / "dnsmasq.pid"


def dnsmasq_args(lab_dir: Path, bridge: str, subnet: str) -> list[str]:
    net = ipaddress.ip_network(subnet)
    d = dhcp_dir(lab_dir)
    return [DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            "--no-resolv", "--no-hosts", f"--interface={bridge}", "--bind-interfaces",
            "--except-interface=lo",
            f"--dhcp-range={net.network_address},static,{net.netmask},{LEASE_TIME}",
            "--dhcp-authoritative", "--dhcp-option=option:router",
            "--dhcp-option=option:dns-server", f"--dhcp-hostsdir={hosts_dir(lab_dir)}",
            f"--dhcp-leasefile={d / 'leases'}", f"--pid-file={pid_file(lab_dir)}",
            f"--log-facility={d / 'dnsmasq.log'}", "--log-dhcp"]


async def start_dnsmasq(lab_dir: Path, bridge: str, subnet: str, ready_timeout_s: float,
                        started=lambda proc: None) -> Proc:
    """Start the lab's dnsmasq on ``bridge`` (which holds an address of ``subnet``); return
    once it has written its pid file (its sockets are bound by then). ``started`` is called
    with the process as soon as it exists (the lab records it before waiting).

    :raise LabError: it exited, or did not get ready in time (then it is left to the
        caller's teardown, which stops what ``started`` recorded).
    """
    d = dhcp_dir(lab_dir)
    hosts_dir(lab_dir).mkdir(parents=True, exist_ok=True)
    pid_file(lab_dir).unlink(missing_ok=True)
    err = d / "dnsmasq.err"
    with open(err, "wb") as out:
        child = subprocess.Popen(dnsmasq_args(lab_dir, bridge, subnet), stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=out, start_new_session=True, close_fds=True)
    proc = Proc.of(child.pid)
    if proc is not None:
        started(proc)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ready_timeout_s
    while not pid_file(lab_dir).exists():
        if child.poll() is not None or proc is None:
            text = err.read_text(errors="replace").strip() or f"exit status {child.returncode}"
            raise LabError(f"the lab's DHCP server (dnsmasq) on {bridge} did not start: "
                           f"{text.splitlines()[-1]}")
        if loop.time() > deadline:
            raise LabError(f"the lab's DHCP server (dnsmasq) on {bridge} not ready within "
                           f"{ready_timeout_s:g} s; see {err}")
        await asyncio.sleep(0.01)
    return proc


__all__ = ["DNSMASQ", "LEASE_TIME", "dhcp_dir", "dnsmasq_args", "hosts_dir", "pid_file",
           "start_dnsmasq"]
