"""Address pools (the KVM-Autotest parallel-queues proposal, seed 004): named ranges of MACs
and IPs on the guest network; a run instance owns one range; every VM it starts with
``mac: auto`` / ``ip: auto`` takes the next MAC/IP of its range and keeps it wherever it
migrates (and when it is booted again).

::

    check_pools(config, inventory)                       # before anything starts (exit 2)
    claim = await claim_range(ctx, instance, host)       # on shared storage, journaled
    env.use_range(claim.range)
    ...
    await release(host, claim)                           # cleanup; recover does it too

**Claims.** Two runs (on one controller or several) on one guest network never hand out the
same address: a range is claimed by renaming a directory holding ``owner.json`` (run,
instance, controller) to ``<shared_dir>/migrator-pools/<segment>/<pool>`` on shared storage
(``rename`` is atomic, on NFS too, and fails onto a held claim); ``<segment>`` names the
guest subnet. The claim is a resource of the run journal (``kind: pool_claim``): cleanup removes
it, and so does ``recover`` for a run that died.

What can go wrong: a pool outside the guest subnet, holding the controller's address or the
subnet's own network/broadcast address (:class:`ConfigError` from :func:`check_pools`); every
range claimed by live runs (:class:`ConfigError` naming them); shared storage missing or
unwritable (:class:`ConfigError` / :class:`CommandError`).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import AddressPool, Config, Inventory
from ..errors import ConfigError
from ..hosts import SSHHost, quote
from .journal import controller_identity

if TYPE_CHECKING:
    from .context import RunContext


@dataclass(frozen=True)
class AddressRange:
    """A claimed pool: the ``i``-th MAC and IP of it."""

    name: str
    pool: AddressPool
    prefixlen: int

    def mac(self, i: int) -> str:
        n = self.pool.macs()[i]
        return ":".join(f"{(n >> s) & 0xFF:02x}" for s in range(40, -8, -8))

    def ip(self, i: int) -> str:
        return f"{ipaddress.IPv4Address(self.pool.ips()[i])}/{self.prefixlen}"

    @property
    def size(self) -> int:
        return self.pool.range_size


@dataclass(frozen=True)
class Claim:
    range: AddressRange
    path: str


def check_pools(config: Config, inventory: Inventory) -> None:
    """The pools fit the inventory's guest network: inside its subnet, not its network or
    broadcast address, not the controller's address. (Disjointness, MAC kinds and sizes are
    the config's own checks.)

    :raise ConfigError: one line naming the pool and the address.
    """
    if not config.network.pools:
        return
    gn = inventory.guest_network
    if gn is None:
        raise ConfigError("network.pools need the inventory's guest_network (its subnet)")
    if inventory.shared_dir is None:
        raise ConfigError("network.pools need the inventory's shared_dir (where runs claim "
                          "their ranges, so that two runs never share one)")
    subnet = ipaddress.ip_network(gn.subnet)
    reserved = {int(subnet.network_address): "its network address",
                int(subnet.broadcast_address): "its broadcast address"}
    if gn.controller_address:
        reserved[int(ipaddress.IPv4Address(gn.controller_address))] = "the controller's address"
    for name, pool in config.network.pools.items():
        ips = pool.ips()
        last = ipaddress.IPv4Address(ips.stop - 1)
        if pool.base_ip not in subnet or last not in subnet:
            raise ConfigError(f"network.pools.{name}: {pool.base_ip}..{last} is not inside "
                              f"the guest network {subnet}")
        for number, what in reserved.items():
            if number in ips:
                raise ConfigError(f"network.pools.{name}: {pool.base_ip}..{last} holds "
                                  f"{ipaddress.IPv4Address(number)}, {what} on {subnet}")


def _segment_dir(inventory: Inventory) -> str:
    subnet = ipaddress.ip_network(inventory.guest_network.subnet)
    return f"{inventory.shared_dir}/migrator-pools/{subnet.network_address}_{subnet.prefixlen}"


async def claim_range(ctx: "RunContext", instance: str, host: SSHHost) -> Claim | None:
    """Claim the first free range of the config's pools for ``instance`` (through ``host``,
    which sees the shared storage), journaled before it is made. None: no pools.

    :raise ConfigError: every range is claimed (naming by whom).
    :raise CommandError: the shared storage cannot be written.
    """
    pools = ctx.config.network.pools
    if not pools:
        return None
    prefixlen = ipaddress.ip_network(ctx.inventory.guest_network.subnet).prefixlen
    seg = _segment_dir(ctx.inventory)
    owner = json.dumps({"run_id": ctx.run_id, "instance": instance,
                        "controller": controller_identity()})
    taken = []
    for name, pool in pools.items():
        path = f"{seg}/{name}"
        ctx.record("resource", kind="pool_claim", host=host.name, path=path,
                   instance=instance)
        # atomic: the claim appears whole (owner.json inside) by a rename onto a name that
        # does not exist, or not at all; a rename onto a held claim fails (not empty)
        tmp = quote(f"{seg}/.{name}.{ctx.run_id}.{instance}")
        r = await host.run(f"mkdir -p {quote(seg)} && rm -rf {tmp} && mkdir {tmp} && "
                           f"cat > {tmp}/owner.json && mv -T {tmp} {quote(path)} "
                           f"|| {{ s=$?; rm -rf {tmp}; exit $s; }}", stdin=owner,
                           timeout=ctx.config.timeouts.host_cleanup_s)
        if r.ok:
            ctx.say(f"[{instance}] address range {name}: {pool.base_mac}, {pool.base_ip} "
                    f"(+{pool.range_size})")
            return Claim(AddressRange(name, pool, prefixlen), path)
        who = await host.run(f"cat {quote(path + '/owner.json')}")
        try:
            holder = json.loads(who.stdout)
            taken.append(f"{name} by run {holder['run_id']} ({holder['instance']})")
        except (ValueError, KeyError):
            taken.append(f"{name} ({(r.stderr.strip() or 'unreadable claim')[-120:]})")
    raise ConfigError(f"no free address range for {instance}: {'; '.join(taken)} "
                      f"(claims under {seg}; a dead run's are freed by migrate-run recover)")


def release_command(path: str, run_id: str) -> str:
    """Shell: remove the claim at ``path`` if ``run_id`` holds it (never another run's: a
    claim that failed because another run holds the range is journaled too)."""
    return (f"grep -qF {quote(json.dumps(run_id))} {quote(path + '/owner.json')} 2>/dev/null "
            f"&& rm -rf {quote(path)}; true")


async def release(host: SSHHost, claim: Claim, run_id: str, timeout: float) -> None:
    """Give the range back (cleanup). :raise CommandError: it could not be removed."""
    await host.run(release_command(claim.path, run_id), check=True, timeout=timeout)


__all__ = ["AddressRange", "Claim", "check_pools", "claim_range", "release",
           "release_command"]
