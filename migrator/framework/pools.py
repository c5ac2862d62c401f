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

With a DHCP server on the guest network (``guest_network.dhcp``), a claim also publishes the
range's static leases (:mod:`.dhcp_leases`) and giving it back withdraws them.

**Claims.** Two runs (on one controller or several, with the same pools or others) on one
guest network never hand out the same address: under the segment's lock (``flock`` on
``<shared_dir>/migrator-pools/<segment>/.lock``; ``<segment>`` names the guest subnet), a
range is claimed only when no claim there overlaps its IPs or MACs, by writing
``<pool>.<run-id>.<instance>.claim`` (its bounds, then run, instance and controller). The
claim is a resource of the run journal (``kind: pool_claim``): cleanup removes it, and so
does ``recover`` for a run that died.

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

from ..config import AddressPool, Config, Inventory, mac_text
from ..errors import CommandError, ConfigError
from ..hosts import SSHHost, quote
from . import dhcp_leases
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
        return mac_text(self.pool.macs()[i])

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
    if gn.dhcp is not None:
        dhcp_leases.check_writable(gn.dhcp)
    subnet = ipaddress.ip_network(gn.subnet)
    reserved = gn.reserved()
    for name, pool in config.network.pools.items():
        ips = pool.ips()
        last = ipaddress.IPv4Address(ips.stop - 1)
        if pool.base_ip not in subnet or last not in subnet:
            raise ConfigError(f"network.pools.{name}: {pool.base_ip}..{last} is not inside "
                              f"the guest network {subnet}")
        for address, what in reserved.items():
            if int(address) in ips:
                raise ConfigError(f"network.pools.{name}: {pool.base_ip}..{last} holds "
                                  f"{address}, {what} on {subnet}")


def _segment_dir(inventory: Inventory) -> str:
    subnet = ipaddress.ip_network(inventory.guest_network.subnet)
    return f"{inventory.shared_dir}/migrator-pools/{subnet.network_address}_{subnet.prefixlen}"


#: the claim command's exit status when another run's claim overlaps the range
_TAKEN = 7


def _claim_script(seg: str, path: str, pool: AddressPool, owner: str) -> str:
    """Shell, run on a host that sees the shared storage: under the segment's lock (flock
    on ``<seg>/.lock``), refuse when any claim's IPs or MACs overlap ``pool`` (exit
    :data:`_TAKEN`, printing the holder), else write the claim (atomically: a temporary file
    renamed). A claim file's first line is its bounds: ``ip0 ip1 mac0 mac1`` (decimal)."""
    ips, macs = pool.ips(), pool.macs()
    bounds = f"{ips.start} {ips.stop - 1} {macs.start} {macs.stop - 1}"
    tmp = quote(f"{path}.tmp")
    return (f"set -e; seg={quote(seg)}; mkdir -p \"$seg\"; exec 9>\"$seg/.lock\"; "
            f"flock -w 30 9; set -- {bounds}; "
            "for f in \"$seg\"/*.claim; do [ -e \"$f\" ] || continue; "
            "read a b c d < \"$f\"; "
            "if { [ \"$a\" -le \"$2\" ] && [ \"$1\" -le \"$b\" ]; } || "
            "{ [ \"$c\" -le \"$4\" ] && [ \"$3\" -le \"$d\" ]; }; then "
            f"sed -n 2p \"$f\"; exit {_TAKEN}; fi; done; "
            f"{{ echo \"$1 $2 $3 $4\"; cat; }} > {tmp}; mv {tmp} {quote(path)}")


async def claim_range(ctx: "RunContext", instance: str, host: SSHHost) -> Claim | None:
    """Claim the first free range of the config's pools for ``instance`` (through ``host``,
    which sees the shared storage), journaled before it is made. A range is free when no
    claim of any run on this guest network overlaps its IPs or its MACs (whatever its
    pools are called there). None: no pools.

    :raise ConfigError: every range is claimed (naming by whom).
    :raise CommandError: the shared storage cannot be written, or its lock not taken.
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
        path = f"{seg}/{name}.{ctx.run_id}.{instance}.claim"
        ctx.record("resource", kind="pool_claim", host=host.name, path=path,
                   instance=instance)
        r = await host.run(_claim_script(seg, path, pool, owner), stdin=owner + "\n",
                           timeout=ctx.config.timeouts.host_cleanup_s)
        if r.ok:
            ctx.say(f"[{instance}] address range {name}: {pool.base_mac}, {pool.base_ip} "
                    f"(+{pool.range_size})")
            claim = Claim(AddressRange(name, pool, prefixlen), path)
            server = ctx.inventory.guest_network.dhcp
            if server is not None:
                leases = dhcp_leases.hosts_file(server, claim)
                ctx.record("resource", kind="dhcp_hosts", path=str(leases),
                           pid_file=str(server.pid_file or ""), instance=instance)
                try:
                    dhcp_leases.publish(server, claim)
                except ConfigError:
                    await release(host, claim, ctx.run_id, ctx.config.timeouts.host_cleanup_s)
                    raise
            return claim
        if r.exit_status != _TAKEN:
            raise CommandError(host.name, r)
        try:
            holder = json.loads(r.stdout)
            taken.append(f"{name} by run {holder['run_id']} ({holder['instance']})")
        except (ValueError, KeyError):
            taken.append(f"{name} (held: {r.stdout.strip()[-120:]})")
    raise ConfigError(f"no free address range for {instance}: {'; '.join(taken)} "
                      f"(claims under {seg}; a dead run's are freed by migrate-run recover)")


def release_command(path: str, run_id: str) -> str:
    """Shell: remove the claim at ``path`` (its name holds ``run_id``: a run only ever
    removes its own; a claim that failed was never written)."""
    if f".{run_id}." not in path:
        raise ValueError(f"{path} is not a claim of run {run_id}")
    return f"rm -f {quote(path)} {quote(path + '.tmp')}"


async def release(host: SSHHost, claim: Claim, run_id: str, timeout: float) -> None:
    """Give the range back (cleanup). :raise CommandError: it could not be removed."""
    await host.run(release_command(claim.path, run_id), check=True, timeout=timeout)


def withdraw_leases(inventory: Inventory, claim: Claim) -> str | None:
    """Remove the range's static DHCP leases, if the inventory's DHCP server has them; a
    problem, as a sentence (never raises)."""
    server = inventory.guest_network.dhcp if inventory.guest_network else None
    if server is None:
        return None
    return dhcp_leases.withdraw(server, dhcp_leases.hosts_file(server, claim))


__all__ = ["AddressRange", "Claim", "check_pools", "claim_range", "release",
           "release_command", "withdraw_leases"]
