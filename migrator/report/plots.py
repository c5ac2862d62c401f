"""The report's plots, each an ``<svg>`` element written by :mod:`.svgplot` (no plotting
library: a page's plots take milliseconds, and nothing is imported for them).

Each function takes the records as ``results/<run>/`` holds them (dicts) and returns one
``<svg>`` element as a string, or None when there is nothing to draw.

:raise ValueError: a record holds a figure that is not a finite number (the page leaves
    that plot out and says so: :func:`migrator.report.html.guarded`).
"""

from __future__ import annotations

from .svgplot import Chart

MIB = 2 ** 20
PAGE = 4096
#: phases marked on a migration's plots (the others are before 'migrate' or after the end)
MARKED = ("MIRRORING", "MIGRATING", "POSTCOPY", "COMPLETED", "ROLLING_BACK")
COLORS = {"remaining": "#1f77b4", "disk": "#9467bd", "throughput": "#2ca02c",
          "dirty": "#d62728", "throttle": "#ff7f0e", "guest": "#8c564b", "downtime": "#1f77b4",
          "blackout": "#d62728", "total": "#7f7f7f"}


def phase_marks(mig: dict) -> list[tuple[float, str]]:
    """(seconds on the progress axis, phase) of the phases worth marking: the samples' ``t``
    counts from 'migrate' issued, the phases carry the wall clock; both are the
    controller's."""
    progress = mig.get("progress") or []
    if not progress:
        return []
    offset = progress[0]["now"] - progress[0]["t"]        # wall clock at t = 0
    return [(wall - offset, phase) for phase, _mono, wall in mig.get("phases") or ()
            if phase in MARKED]


def policy_marks(mig: dict) -> list[tuple[float, str]]:
    """(t, action) of the convergence policy's steps other than downtime ramps."""
    return [(d["t"], d["action"]) for d in mig.get("decisions") or ()
            if d.get("action") != "downtime" and d.get("t") is not None]


def migration_plot(mig: dict, gid: str = "mig") -> str | None:
    """Remaining bytes (RAM, and the disk while it is copied), throughput, and the guest's
    dirty rate (QEMU's estimate; the guest dirtier's own rate per host, where it runs; the
    auto-converge throttle) against seconds since 'migrate', each phase change and policy
    step marked."""
    progress = mig.get("progress") or []
    if len(progress) < 2:
        return None
    t = [s["t"] for s in progress]
    dots = len(t) <= 30                                  # a dot per sample, if few
    chart = Chart(7.2, 4.6, rows=3)
    rem, rate, dirty = chart.panels
    rem.line(t, [s["remaining_bytes"] / MIB for s in progress], COLORS["remaining"],
             dots=dots, label="RAM remaining", gid=f"{gid}-remaining")
    disk = [(s["t"], (s["disk_total_bytes"] - s["disk_transferred_bytes"]) / MIB)
            for s in progress if s.get("disk_total_bytes")]
    if disk:
        rem.line(*zip(*disk), COLORS["disk"], dots=dots, label="disk remaining",
                 gid=f"{gid}-disk")
        rem.legend = "upper right"
    rem.ylabel = "remaining\nMiB"
    rate.line(t, [s["transfer_rate_mbs"] for s in progress], COLORS["throughput"],
              dots=dots, gid=f"{gid}-throughput")
    rate.ylabel = "throughput\nMbit/s"
    dirty.line(t, [s["dirty_rate_pps"] * PAGE / MIB for s in progress], COLORS["dirty"],
               dots=dots, label="dirty rate", gid=f"{gid}-dirty")
    guest = [d for d in mig.get("dirtier") or () if d.get("t") is not None]
    if guest:
        for i, host in enumerate(sorted({d["host"] for d in guest})):
            mine = [d for d in guest if d["host"] == host]
            dirty.points([d["t"] for d in mine], [d["rate_mibs"] for d in mine],
                         COLORS["guest"], marker="x^"[i % 2],
                         label=f"guest's dirtier on {host}", gid=f"{gid}-guest-{i}")
        stale = [d for d in guest if d["stale_pages"]]
        if stale:
            dirty.note(stale[0]["t"], stale[0]["rate_mibs"],
                       f"{stale[0]['stale_pages']} stale pages", COLORS["dirty"])
        dirty.legend = "upper left"
    dirty.ylabel = "dirty rate\nMiB/s"
    if any(s.get("throttle_pcent") for s in progress):
        throttle = dirty.twin()
        throttle.line(t, [s.get("throttle_pcent") or 0 for s in progress],
                      COLORS["throttle"], width=1, dash="1 1.65", label="throttle %",
                      gid=f"{gid}-throttle")
        throttle.ylim = (0, 100)
        throttle.ylabel = "throttle %"
    chart.xlabel = "seconds since migrate"
    for x, name in phase_marks(mig) + policy_marks(mig):
        chart.mark(x, name)
    return chart.svg(f"{mig['mig_id']} {mig['vm']} {mig['src']}->{mig['dst']}")


def _run_chart(migs: list[dict], height: float) -> Chart:
    """One panel, a category per migration (its name under the axis while they fit)."""
    chart = Chart(min(12.0, max(5.0, 0.32 * len(migs) + 2)), height)
    chart.xlim = (-0.75, max(len(migs), 6) - 0.25)       # a few bars keep their width
    if len(migs) <= 40:
        chart.categories = [f"{m['mig_id']} {m['vm']}" for m in migs]
        chart.rotation = 60
    else:
        chart.categories = [""] * len(migs)
        chart.xlabel = "migrations, in the run's order"
    chart.panels[0].legend = "outside"
    return chart


def downtime_plot(migs: list[dict]) -> str | None:
    """Per completed migration: QEMU's downtime beside the guest-visible blackout (where
    probed), in ms, in the run's order."""
    done = [m for m in migs if m.get("downtime_ms") is not None]
    if not done:
        return None
    blackout = any(m.get("blackout_ms") is not None for m in done)
    chart = _run_chart(done, 2.8)
    ax = chart.panels[0]
    xs = range(len(done))
    w = 0.4 if blackout else 0.7
    ax.bars([x - (w / 2 if blackout else 0) for x in xs], [m["downtime_ms"] for m in done],
            COLORS["downtime"], width=w, label="downtime (QEMU)")
    if blackout:
        ax.bars([x + w / 2 for x in xs], [m.get("blackout_ms") or 0 for m in done],
                COLORS["blackout"], width=w, label="blackout (guest, ICMP)")
    ax.ylabel = "ms"
    return chart.svg("downtime vs blackout")


def total_time_plot(migs: list[dict]) -> str | None:
    """Per migration: its whole time (setup to cleanup) and QEMU's total time, s."""
    timed = [m for m in migs if m.get("run_s") is not None]
    if not timed:
        return None
    chart = _run_chart(timed, 2.6)
    ax = chart.panels[0]
    xs = list(range(len(timed)))
    ax.bars(xs, [m["run_s"] for m in timed], COLORS["total"], width=0.7,
            label="whole migration")
    ax.bars(xs, [(m.get("total_time_ms") or 0) / 1000 for m in timed], COLORS["throughput"],
            width=0.4, label="QEMU total time")
    ax.ylabel = "s"
    return chart.svg("time per migration")


__all__ = ["COLORS", "downtime_plot", "migration_plot",
           "phase_marks", "policy_marks", "total_time_plot"]
