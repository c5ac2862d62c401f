"""Prometheus metrics of a live run (``migrate-run --metrics ADDR:PORT``).

::

    async with serve_metrics(ctx, "127.0.0.1", 9464):
        ...                       # GET http://127.0.0.1:9464/metrics while the run runs

Served by aiohttp in the run's event loop (the official ``prometheus_client`` renders it),
read-only and without a token, on the address given only: every figure is read from the
run's state at the scrape, nothing is updated from the migrations' loops. Names follow
KubeVirt's migration metrics where they fit (``kubevirt_vmi_migration_*`` ->
``migrator_migration_*``):

Gauges, per migration in flight (labels ``mig_id``, ``vm``, ``src``, ``dst``):
``migrator_migration_data_processed_bytes`` (RAM sent), ``..._data_remaining_bytes``,
``..._data_total_bytes`` (the guest's RAM), ``..._memory_transfer_rate_bytes`` (bytes/s),
``..._dirty_memory_rate_bytes`` (bytes/s: QEMU's dirty pages/s x 4 KiB),
``..._iteration``, ``..._cpu_throttle_percent``, ``..._disk_processed_bytes`` and
``..._disk_total_bytes`` (while the disk is copied, storage copy-*).

Gauges of the run: ``migrator_migrations_in_pending_phase`` (queued for a slot; the same
count as ``migrator_migration_queue_length``), ``..._in_scheduling_phase`` (destination
being prepared), ``..._in_running_phase`` (copying: MIRRORING, MIGRATING, POSTCOPY).

Counters: ``migrator_migration_started_total`` (migrations that started copying),
``migrator_migration_succeeded_total``,
``migrator_migration_failed_total`` (labels ``reason``: ``cancelled`` | ``policy_abort`` |
``error``; ``phase``: the phase it failed in; ``outcome``: its final phase, ROLLED_BACK ...).

Histograms of the ended migrations: ``migrator_migration_downtime_seconds`` (QEMU's),
``migrator_migration_blackout_seconds`` (the guest-visible one, where probed),
``migrator_migration_total_time_seconds``.

And the run's sync server's own metrics (``migrator_sync_*``: open barriers, waiters,
``migrator_sync_barrier_wait_seconds``, release latency; see
:class:`syncserver.server.SyncCollector`).

:raise ConfigError: (:func:`serve_metrics`) the address cannot be bound (in use, not
    local): exit 2 before anything starts.
"""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator

from ..errors import ConfigError
from .results import failure_labels

log = logging.getLogger(__name__)

PAGE = 4096
DOWNTIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TOTAL_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
SCHEDULING = {"PENDING", "PREPARING_DEST", "CONFIGURED", "LISTENING"}
RUNNING = {"MIRRORING", "MIGRATING", "POSTCOPY"}
LABELS = ["mig_id", "vm", "src", "dst"]


def _histogram(name: str, doc: str, values: list[float], buckets: tuple[float, ...]):
    """A histogram family of ``values``, counted as the sync server counts its own."""
    from syncserver.server import Histogram
    counts = Histogram(buckets)
    for v in values:
        counts.observe(v)
    return counts.family(name, doc)


class RunCollector:
    """A run's metrics, read from ``ctx`` at each scrape (from the event loop's thread)."""

    def __init__(self, ctx):
        self.ctx = ctx

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from ..framework.control import status_of
        ctx = self.ctx
        status = status_of(ctx)
        flying = status["migrations"]
        gauges = {key: GaugeMetricFamily(f"migrator_migration_{key}", doc, labels=LABELS)
                  for key, doc in (
                      ("data_processed_bytes", "RAM sent so far (QEMU's transferred)."),
                      ("data_remaining_bytes", "RAM still to send."),
                      ("data_total_bytes", "The guest's RAM."),
                      ("memory_transfer_rate_bytes", "Throughput, bytes per second."),
                      ("dirty_memory_rate_bytes", "The guest's dirty rate, bytes per second."),
                      ("iteration", "Dirty-bitmap syncs so far."),
                      ("cpu_throttle_percent", "The auto-converge throttle."),
                      ("disk_processed_bytes", "Disk copied (storage copy-*)."),
                      ("disk_total_bytes", "Disk to copy in all (storage copy-*)."))}
        for m in flying:
            labels = [m["mig_id"], m["vm"], m["src"], m["dst"]]
            values = {"data_processed_bytes": m["transferred"],
                      "data_remaining_bytes": m["remaining"],
                      "data_total_bytes": m["total"],
                      "memory_transfer_rate_bytes": m["mbps"] * 1e6 / 8
                      if m["mbps"] is not None else None,
                      "dirty_memory_rate_bytes": m["dirty_rate_pps"] * PAGE
                      if m["dirty_rate_pps"] is not None else None,
                      "iteration": m["iteration"], "cpu_throttle_percent": m["cpu_throttle"],
                      "disk_processed_bytes": m["disk"][0] if m["disk"] else None,
                      "disk_total_bytes": m["disk"][1] if m["disk"] else None}
            for key, value in values.items():
                if value is not None:
                    gauges[key].add_metric(labels, value)
        yield from gauges.values()
        phases = [m["phase"] for m in flying]
        for name, doc, n in (
                ("pending", "Migrations queued for a migration slot.",
                 phases.count("QUEUED")),
                ("scheduling", "Migrations whose destination is being prepared.",
                 sum(p in SCHEDULING for p in phases)),
                ("running", "Migrations copying: disk, memory, postcopy.",
                 sum(p in RUNNING for p in phases))):
            yield GaugeMetricFamily(f"migrator_migrations_in_{name}_phase", doc, value=n)
        yield GaugeMetricFamily("migrator_migration_queue_length",
                                "Migrations waiting for a slot (the pending phase's count).",
                                value=phases.count("QUEUED"))
        ended = list(ctx.migrations)
        copied = sum(any(p in RUNNING for p, *_ in m.result.get("phases") or ())
                     for m in ended) + \
            sum(any(p.value in RUNNING for p, *_ in mig.history)
                for _md, mig in ctx.live.values())
        yield CounterMetricFamily("migrator_migration_started",
                                  "Migrations that started copying (in flight and ended; "
                                  "not those that ended queued or preparing).", value=copied)
        yield CounterMetricFamily("migrator_migration_succeeded", "Migrations completed.",
                                  value=sum(m.status == "completed" for m in ended))
        failed = CounterMetricFamily("migrator_migration_failed",
                                     "Migrations that did not complete.",
                                     labels=["reason", "phase", "outcome"])
        counts: dict[tuple[str, str, str], int] = {}
        for m in ended:
            if m.status != "completed":
                key = failure_labels(m.result)
                counts[key] = counts.get(key, 0) + 1
        for key, n in sorted(counts.items()):
            failed.add_metric(list(key), n)
        yield failed
        done = [m.result for m in ended if m.status == "completed"]
        yield _histogram("migrator_migration_downtime_seconds", "QEMU's downtime.",
                         [r["downtime_ms"] / 1000 for r in done
                          if r.get("downtime_ms") is not None], DOWNTIME_BUCKETS)
        yield _histogram("migrator_migration_blackout_seconds",
                         "The guest-visible blackout (longest gap of ICMP replies).",
                         [r["blackout_ms"] / 1000 for r in done
                          if r.get("blackout_ms") is not None], DOWNTIME_BUCKETS)
        yield _histogram("migrator_migration_total_time_seconds", "QEMU's total time.",
                         [r["total_time_ms"] / 1000 for r in done
                          if r.get("total_time_ms") is not None], TOTAL_BUCKETS)


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[v6]:PORT``) of ``--metrics``; port 0: the system picks one (the
    run says which). :raise ConfigError: malformed."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--metrics {text!r}: expected ADDR:PORT (127.0.0.1:9464)")
    if int(port) == 0:
        import ipaddress
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"--metrics {text!r}: port 0 needs an IP address (a name may "
                              "stand for several, each given its own port)") from None
    return host, int(port)


@contextlib.asynccontextmanager
async def serve_metrics(ctx, host: str, port: int) -> AsyncIterator[str]:
    """Serve ``ctx``'s metrics on ``http://host:port/metrics`` while the block runs;
    yields that URL. The run's sync server's metrics are included once it is started.

    :raise ConfigError: ``host:port`` cannot be bound.
    """
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    from ..aio import shielded

    class SyncServerOfRun:
        def collect(self):
            if ctx.server is not None:
                yield from ctx.server.collector.collect()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(ctx))
    registry.register(SyncServerOfRun())

    async def metrics(_request):
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"--metrics {host}:{port}: cannot listen there: "
                              f"{exc.strerror or exc}") from None
        bound = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{bound}/metrics"
    finally:
        await shielded(runner.cleanup())


__all__ = ["RunCollector", "parse_address", "serve_metrics"]
