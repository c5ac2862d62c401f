"""The lab's networks: one bridge in the root namespace, one network namespace per host; and
the guest network, a second L2 segment: a bridge ``gbr0`` in each host's namespace (the taps of
its VMs join it) linked to one lab-wide guest bridge in the root namespace (the controller's
address on it reaches the guests).

Safety rules (never relaxed): addresses only inside the lab subnet; no default route in any host
(its only route is the connected subnet); no NAT, no forwarding change (``ip_forward`` is never
written); IPv6 disabled on every lab link before it comes up, so no link-local traffic either.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from ..errors import ConfigError
from .system import run

NETNS_DIR = Path("/run/netns")


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _set_ipv6_off_root(ifname: str) -> None:
    Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("1\n")


async def check_subnet_free(subnet: ipaddress.IPv4Network, own_bridge: str,
                            option: str = "--subnet") -> None:
    """Refuse a subnet that overlaps any address or route already on this machine.

    Our own bridge (a lab being reconciled) does not count.

    :raise ConfigError: naming the interface or route that overlaps.
    """
    addrs = json.loads((await run("ip", "-j", "-4", "addr", "show", what="ip addr")).stdout)
    for link in addrs:
        if link.get("ifname") == own_bridge:
            continue
        for a in link.get("addr_info", []):
            net = ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
            if net.overlaps(subnet):
                raise ConfigError(
                    f"subnet {subnet} overlaps {net} on interface {link['ifname']} "
                    f"(another lab or a real network): choose another with {option}")
    routes = json.loads((await run("ip", "-j", "-4", "route", "show", "table", "all",
                                   what="ip route")).stdout)
    for r in routes:
        dst = r.get("dst")
        if not dst or dst == "default" or r.get("dev") == own_bridge:
            continue
        if r.get("type") in ("local", "broadcast"):
            continue
        try:
            net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False)
        except ValueError:
            continue
        if net.overlaps(subnet):
            raise ConfigError(f"subnet {subnet} overlaps route {dst} via {r.get('dev', '?')}: "
                              f"choose another with {option}")


async def create_bridge(name: str, address: ipaddress.IPv4Interface) -> None:
    """Create the lab bridge with ``address`` (IPv6 off before it comes up)."""
    await run("ip", "link", "add", name, "type", "bridge", what=f"create bridge {name}")
    _set_ipv6_off_root(name)
    await run("ip", "addr", "add", str(address), "dev", name, what=f"address {name}")
    await run("ip", "link", "set", name, "up", what=f"bring up {name}")


async def create_host_netns(netns: str, veth: str, bridge: str,
                            address: ipaddress.IPv4Interface) -> None:
    """Create ``netns`` with an ``eth0`` at ``address``, linked to ``bridge`` by ``veth``.

    The namespace gets only the connected route of its subnet: no default route.
    """
    await run("ip", "netns", "add", netns, what=f"create namespace {netns}")
    # IPv6 off for 'all' and 'default' first, so eth0 never gets a link-local address
    await run("ip", "netns", "exec", netns, "sh", "-c",
              "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && "
              "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
              what=f"disable IPv6 in {netns}")
    await run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
              "netns", netns, what=f"create link {veth}")
    _set_ipv6_off_root(veth)
    await run("ip", "link", "set", veth, "master", bridge, "up", what=f"attach {veth}")
    await run("ip", "-n", netns, "addr", "add", str(address), "dev", "eth0",
              what=f"address eth0 in {netns}")
    await run("ip", "-n", netns, "link", "set", "lo", "up", what=f"lo up in {netns}")
    await run("ip", "-n", netns, "link", "set", "eth0", "up", what=f"eth0 up in {netns}")


#: the guest bridge's name inside every lab host's namespace (inventory: guest_network.bridge)
HOST_GUEST_BRIDGE = "gbr0"


async def create_host_guest_link(netns: str, veth: str, guest_bridge: str) -> None:
    """In ``netns`` (made by :func:`create_host_netns`): a bridge :data:`HOST_GUEST_BRIDGE`
    without an address, joined to the root namespace's ``guest_bridge`` by ``veth`` (its
    inner end ``gveth0``). The host gets no address and no route on the guest network: it
    only bridges its VMs' taps onto the segment."""
    await run("ip", "-n", netns, "link", "add", HOST_GUEST_BRIDGE, "type", "bridge",
              what=f"create bridge {HOST_GUEST_BRIDGE} in {netns}")
    await run("ip", "link", "add", veth, "type", "veth", "peer", "name", "gveth0",
              "netns", netns, what=f"create link {veth}")
    _set_ipv6_off_root(veth)
    await run("ip", "link", "set", veth, "master", guest_bridge, "up", what=f"attach {veth}")
    await run("ip", "-n", netns, "link", "set", "gveth0", "master", HOST_GUEST_BRIDGE, "up",
              what=f"attach gveth0 in {netns}")
    await run("ip", "-n", netns, "link", "set", HOST_GUEST_BRIDGE, "up",
              what=f"bring up {HOST_GUEST_BRIDGE} in {netns}")


async def delete_link(name: str) -> None:
    """Delete a link if it exists (deleting one end of a veth deletes both)."""
    if link_exists(name):
        await run("ip", "link", "del", name, check=False)


async def delete_netns(name: str) -> None:
    if netns_exists(name):
        await run("ip", "netns", "del", name, what=f"delete namespace {name}")


async def routes_in(netns: str) -> list[dict]:
    out = await run("ip", "-n", netns, "-j", "route", "show", what=f"routes of {netns}")
    return json.loads(out.stdout)


def ip_forward_enabled() -> bool:
    return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"


def ipv6_disabled_root(ifname: str) -> bool:
    try:
        return Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").read_text().strip() == "1"
    except FileNotFoundError:
        return True


__all__ = [
    "HOST_GUEST_BRIDGE", "check_subnet_free", "create_bridge", "create_host_guest_link",
    "create_host_netns", "delete_link", "delete_netns",
    "ip_forward_enabled", "ipv6_disabled_root", "link_exists", "netns_exists", "netns_path",
    "routes_in",
]
