"""Network continuity: a bridged guest ping-pongs between the first two hosts while a peer
guest on a third host pings it and the controller probes it (ICMP every 5 ms, and a TCP
stream through an echo listener in the guest).

Needs bridged VMs with addresses and a TCP probe port: ``configs/network.example.yaml``
declares them (``mover``, ``peer``: ``network: bridge``, ``mac``/``ip: auto`` from a pool of
the lab's default guest network; move ``network.pools.*.base_ip`` into your inventory's
``guest_network.subnet`` for another lab) and sets ``network.probe_tcp_port: 7000``::

    migrate-run -a all -m hostA,hostB,hostC -c configs/network.example.yaml network_continuity \\
        [-p scenario.rounds=2] [-p scenario.ping_interval_s=0.01]

After every hop ``check_worker`` requires: the prober's TCP stream survived, whole and in
order; replies came after the switchover (from the destination); the peer guest's pings
resumed. The prober runs where ``network.probe_from`` says: the controller (default) or a host
with an address on the guest network (``-p network.probe_from=hostD``). It reports the
blackout seen by the prober (the longest run of lost probes) and by
the peer (longest run of lost pings times the ping interval) next to QEMU's downtime, and at
the end the percentiles of both.
"""

import re
import statistics

from migrator import MultihostMigration
from migrator.errors import ScenarioError


def longest_loss(seqs: list[int]) -> tuple[int, int]:
    """(pings lost, the longest run of consecutive lost ones) between the first and the last
    reply's sequence numbers."""
    got = sorted(set(seqs))
    if not got:
        return 0, 0
    lost = (got[-1] - got[0] + 1) - len(got)
    run = max((b - a - 1 for a, b in zip(got, got[1:])), default=0)
    return lost, run


def pcts(values: list[float]) -> str:
    if not values:
        return "-"
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 \
        else [values[0]] * 99
    return f"p50 {q[49]:.0f} ms, p95 {q[94]:.0f} ms, max {max(values):.0f} ms"


class NetworkContinuity(MultihostMigration):
    async def migration_scenario(self):
        if len(self.hosts) < 3:
            raise ScenarioError("network_continuity needs three hosts: two to migrate "
                                "between and one for the peer guest (-a all -m A,B,C)")
        rounds = int(self.params.scenario.get("rounds", 1))
        interval = float(self.params.scenario.get("ping_interval_s", 0.01))
        port = self.params.network.probe_tcp_port
        a, b, c = self.hosts[:3]
        peer = await self.env.ensure_running("peer", c)
        mover = await self.env.ensure_running("mover", a)
        if self.params.network.probe_from.startswith("vm:"):
            raise ScenarioError("network_continuity pings from its peer guest itself; its "
                                "prober (network.probe_from) is the controller or a host")
        if mover.address is None or peer.address is None or port is None:
            raise ScenarioError("mover and peer need network: bridge with an ip, and "
                                "network.probe_tcp_port set (configs/network.example.yaml)")
        session = await mover.wait_for_login(timeout=self.login_timeout)
        await session.cmd(f"nc -ll -p {port} -e cat </dev/null >/dev/null 2>&1 &")
        await mover.wait_reachable()
        views: dict[str, list[float]] = {"prober": [], "peer": [], "downtime": []}
        prober = self.params.network.probe_from           # controller, or a host

        async def worker(mig_data):
            ps = await peer.wait_for_login(timeout=self.login_timeout)
            await ps.cmd(f"rm -f /tmp/ping.log; ping -i {interval:g} {mover.address} "
                         f">/tmp/ping.log 2>&1 </dev/null & echo $! > /tmp/ping.pid")
            await ps.cmd("until grep -q 'seq=' /tmp/ping.log; do sleep 0.05; done")

        async def check_worker(mig_data):
            r = mig_data.results["mover"]
            report = r.blackout or {}
            where = f"{mig_data.src.name}->{mig_data.dst.name}"
            if report.get("error"):
                raise ScenarioError(f"{where}: the blackout was not measured: "
                                    f"{report['error']}")
            if not report.get("tcp_survived"):
                raise ScenarioError(f"{where}: the TCP stream did not survive: "
                                    f"{report.get('tcp')}")
            if not report.get("replies_after_switchover") or not report.get("recovered"):
                raise ScenarioError(f"{where}: no reply from the destination: {report}")
            ps = await peer.wait_for_login(timeout=self.login_timeout)
            # the peer's pings resumed: five more replies after this moment, then stop it
            await ps.cmd("n=$(grep -c 'seq=' /tmp/ping.log); "
                         "until [ $(grep -c 'seq=' /tmp/ping.log) -gt $((n + 5)) ]; "
                         "do sleep 0.05; done; kill $(cat /tmp/ping.pid)")
            log = await ps.cmd("cat /tmp/ping.log")
            lost, run = longest_loss([int(s) for s in re.findall(r"seq=(\d+)", log)])
            peer_ms = (run + 1) * interval * 1000
            views["prober"].append(r.blackout_ms)
            views["peer"].append(peer_ms)
            views["downtime"].append(float(r.downtime_ms or 0))
            self.context.say(
                f"[{self.name}] {where}: blackout {r.blackout_ms:.0f} ms from {prober} "
                f"({report['lost']} probes lost), ~{peer_ms:.0f} ms from the peer ({lost} "
                f"pings lost); QEMU downtime {r.downtime_ms} ms; TCP stream survived")

        src, dst = a, b
        for _ in range(2 * rounds):
            await self.migrate_wait(["mover"], src, dst, worker, check_worker)
            src, dst = dst, src
        self.context.say(f"[{self.name}] blackout over {len(views['prober'])} hops: "
                         f"{prober} {pcts(views['prober'])}; peer "
                         f"{pcts(views['peer'])}; QEMU downtime {pcts(views['downtime'])}")
