"""A migration's progress history, as its record keeps it (``MigrationResult.progress``).

The driver polls its migration every ``timeouts.progress_interval_s`` (QEMU's
``query-migrate``, libvirt's job stats); the record keeps one sample per
``report.progress_interval_s`` of those, plus the first and the last, so a plot of a long
migration stays small. Each sample is a dict, with QEMU's guestperf names where they match
(``tests/migration/guestperf/progress.py``):

``t``                     seconds since ``migrate`` was issued (the controller's monotonic clock)
``now``                   the controller's wall clock, seconds since the epoch (to line samples
                          up with other records: the guest's clock stops while it is paused)
``status``                QEMU's migration status (``setup``, ``active``, ``postcopy-active``,
                          ``completed`` ...; libvirt: ``active`` / ``postcopy-active``)
``transferred_bytes``     RAM sent so far
``remaining_bytes``       RAM still to send
``total_bytes``           the guest's RAM
``dirty_rate_pps``        pages the guest dirties per second (QEMU's estimate)
``transfer_rate_mbs``     QEMU's throughput estimate, Mbit/s (guestperf's name, QEMU's unit)
``iterations``            dirty-bitmap syncs so far
``downtime_expected``     QEMU's expected downtime, ms (libvirt: 0, not reported)
``throttle_pcent``        the auto-converge throttle, percent
``disk_transferred_bytes`` / ``disk_total_bytes``
                          the disk copied so far / to copy (``storage`` copy-*, libvirt: the same
                          job; the qemu driver copies the disk before the memory, phase
                          MIRRORING, and reports it in ``mirror_s`` and ``disk_bytes``)
"""

from __future__ import annotations

from typing import Iterable


def sample(record) -> dict:
    """One :class:`~.engine.ProgressRecord` in the record's names."""
    s = {"t": round(record.t, 3), "now": round(record.wall, 3), "status": record.status,
         "transferred_bytes": record.transferred, "remaining_bytes": record.remaining,
         "total_bytes": record.total, "dirty_rate_pps": record.dirty_pages_rate,
         "transfer_rate_mbs": round(record.mbps, 1), "iterations": record.iteration,
         "downtime_expected": record.expected_downtime_ms,
         "throttle_pcent": record.cpu_throttle}
    if record.disk_total:
        s |= {"disk_transferred_bytes": record.disk_transferred,
              "disk_total_bytes": record.disk_total}
    return s


def timeline(records: Iterable, interval_s: float) -> list[dict]:
    """The samples kept of ``records`` (in order): the first, then each at least
    ``interval_s`` after the last kept, and the last."""
    kept: list = []
    records = list(records)
    for i, r in enumerate(records):
        if not kept or r.t - kept[-1].t >= interval_s or i == len(records) - 1:
            kept.append(r)
    return [sample(r) for r in kept]


__all__ = ["sample", "timeline"]
