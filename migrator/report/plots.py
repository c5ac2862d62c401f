"""The report's plots, drawn by matplotlib as SVG (no pyplot: no global figure state; the
text stays text, so the file stays small and searchable).

Each function takes the records as ``results/<run>/`` holds them (dicts) and returns one
``<svg>`` element as a string, or None when there is nothing to draw.
"""

from __future__ import annotations

import functools
import io
import re

MIB = 2 ** 20
PAGE = 4096
#: phases marked on a migration's plots (the others are before 'migrate' or after the end)
MARKED = ("MIRRORING", "MIGRATING", "POSTCOPY", "COMPLETED", "ROLLING_BACK")
COLORS = {"remaining": "#1f77b4", "disk": "#9467bd", "throughput": "#2ca02c",
          "dirty": "#d62728", "throttle": "#ff7f0e", "guest": "#8c564b", "downtime": "#1f77b4",
          "blackout": "#d62728", "total": "#7f7f7f"}


#: every plot's style (:func:`styled`): text stays <text> (small, searchable), and names
#: are never read as TeX math ("$x$")
STYLE = {"svg.fonttype": "none", "text.parse_math": False, "svg.hashsalt": None,
         # one family, not matplotlib's list of eleven fallbacks in every <text>
         "font.family": "sans-serif", "font.sans-serif": ["DejaVu Sans"]}
#: matplotlib's own group ids (figure_1, xtick_3 ...): unused, and repeated in every plot
_AUTO_ID = re.compile(r' id="(?:figure|axes|patch|line2d|text|matplotlib\.axis|xtick|ytick'
                      r'|legend|PolyCollection|LineCollection)_\d+"')
#: geometry attributes, whose numbers are kept to 0.1 pt (matplotlib writes 6 decimals)
_GEOMETRY = re.compile(r'(\s(?:d|x|y|x1|x2|y1|y2|transform|points)=")([^"]*)(")')
_DECIMALS = re.compile(r"(\d+\.\d)\d+")


def styled(draw):
    """``draw`` under :data:`STYLE` (matplotlib reads some of it when a text is made, the
    rest when the figure is saved): no global setting is changed."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        import matplotlib
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)
    return wrapper


def figure(width: float, height: float, rows: int = 1):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=8)
    return fig, axes


def svg(fig, title: str) -> str:
    """``fig`` as an ``<svg>`` element for a page: no prolog, no indentation, no unused
    ids, geometry to 0.1 pt (text content is never touched)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None,
                                             "Type": None, "Title": title})
    text = buf.getvalue()
    text = text[text.index("<svg"):]                      # no XML prolog inside HTML
    text = re.sub(r">\s+<", "><", text)                   # indentation only, no content
    text = _AUTO_ID.sub("", text)
    return _GEOMETRY.sub(lambda m: m.group(1) + _DECIMALS.sub(r"\1", m.group(2)) + m.group(3),
                         text)


@styled
def warm_up() -> None:
    """Draw a small plot and throw it away: matplotlib imported, its fonts found (the first
    text of a process scores every installed font) before the first real plot."""
    fig, (ax,) = figure(2, 1)
    ax.plot([0, 1], [0, 1], label="x")
    ax.set_xlabel("t (s)")
    svg(fig, "warm-up")


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


#: the record's fields :func:`migration_plot` draws from (a plot drawn ahead is the page's
#: while these are unchanged: :func:`migrator.report.html.draw_ahead`)
PLOT_FIELDS = ("mig_id", "vm", "src", "dst", "progress", "dirtier", "phases", "decisions")

#: the fields of each record :func:`downtime_plot` and :func:`total_time_plot` draw from
#: (the run's plots drawn ahead are the page's while these, in the run's order, are
#: unchanged: :func:`migrator.report.html.draw_run_plots_ahead`)
RUN_PLOT_FIELDS = ("mig_id", "vm", "downtime_ms", "blackout_ms", "run_s", "total_time_ms")


@styled
def migration_plot(mig: dict, gid: str = "mig") -> str | None:
    """Remaining bytes (RAM, and the disk while it is copied), throughput, and the guest's
    dirty rate (QEMU's estimate; the guest dirtier's own rate per host, where it runs; the
    auto-converge throttle) against seconds since 'migrate', each phase change and policy
    step marked."""
    progress = mig.get("progress") or []
    if len(progress) < 2:
        return None
    t = [s["t"] for s in progress]
    dots = {"marker": ".", "ms": 3} if len(t) <= 30 else {}    # a dot per sample, if few
    fig, (rem, rate, dirty) = figure(7.2, 4.6, rows=3)
    rem.plot(t, [s["remaining_bytes"] / MIB for s in progress], color=COLORS["remaining"],
             lw=1.4, **dots, label="RAM remaining", gid=f"{gid}-remaining")
    disk = [(s["t"], (s["disk_total_bytes"] - s["disk_transferred_bytes"]) / MIB)
            for s in progress if s.get("disk_total_bytes")]
    if disk:
        rem.plot(*zip(*disk), color=COLORS["disk"], lw=1.4, **dots, label="disk remaining")
        rem.legend(fontsize=7, frameon=False, loc="upper right")
    rem.set_ylabel("remaining\nMiB", fontsize=8)
    rate.plot(t, [s["transfer_rate_mbs"] for s in progress], color=COLORS["throughput"],
              lw=1.4, **dots, gid=f"{gid}-throughput")
    rate.set_ylabel("throughput\nMbit/s", fontsize=8)
    dirty.plot(t, [s["dirty_rate_pps"] * PAGE / MIB for s in progress],
               color=COLORS["dirty"], lw=1.4, **dots, label="dirty rate",
               gid=f"{gid}-dirty")
    guest = [d for d in mig.get("dirtier") or () if d.get("t") is not None]
    if guest:
        for i, host in enumerate(sorted({d["host"] for d in guest})):
            mine = [d for d in guest if d["host"] == host]
            dirty.plot([d["t"] for d in mine], [d["rate_mibs"] for d in mine],
                       ls="none", marker="x^"[i % 2], ms=4, color=COLORS["guest"],
                       label=f"guest's dirtier on {host}", gid=f"{gid}-guest-{i}")
        stale = [d for d in guest if d["stale_pages"]]
        if stale:
            dirty.annotate(f"{stale[0]['stale_pages']} stale pages",
                           (stale[0]["t"], stale[0]["rate_mibs"]), fontsize=7,
                           color=COLORS["dirty"])
        dirty.legend(fontsize=7, frameon=False, loc="upper left")
    dirty.set_ylabel("dirty rate\nMiB/s", fontsize=8)
    if any(s.get("throttle_pcent") for s in progress):
        throttle = dirty.twinx()
        throttle.plot(t, [s.get("throttle_pcent") or 0 for s in progress],
                      color=COLORS["throttle"], lw=1, ls=":", label="throttle %")
        throttle.set_ylim(0, 100)
        throttle.set_ylabel("throttle %", fontsize=8)
        throttle.tick_params(labelsize=8)
        throttle.spines[["top"]].set_visible(False)
    dirty.set_xlabel("seconds since migrate", fontsize=8)
    for ax in (rem, rate, dirty):
        ax.set_ylim(bottom=0)
    marks = phase_marks(mig) + policy_marks(mig)
    for x, name in marks:
        for ax in (rem, rate, dirty):
            ax.axvline(x, color="0.55", lw=0.8, ls="--")
        rem.annotate(name, (x, 1), xycoords=("data", "axes fraction"), rotation=90,
                     fontsize=7, color="0.35", va="top", ha="right")
    fig.tight_layout(h_pad=0.4)
    return svg(fig, f"{mig['mig_id']} {mig['vm']} {mig['src']}->{mig['dst']}")


@styled
def downtime_plot(migs: list[dict]) -> str | None:
    """Per completed migration: QEMU's downtime beside the guest-visible blackout (where
    probed), in ms, in the run's order."""
    done = [m for m in migs if m.get("downtime_ms") is not None]
    if not done:
        return None
    blackout = any(m.get("blackout_ms") is not None for m in done)
    width = min(12.0, max(5.0, 0.32 * len(done) + 2))
    fig, (ax,) = figure(width, 2.8)
    xs = range(len(done))
    w = 0.4 if blackout else 0.7
    ax.bar([x - (w / 2 if blackout else 0) for x in xs], [m["downtime_ms"] for m in done],
           width=w, color=COLORS["downtime"], label="downtime (QEMU)")
    if blackout:
        ax.bar([x + w / 2 for x in xs], [m.get("blackout_ms") or 0 for m in done], width=w,
               color=COLORS["blackout"], label="blackout (guest, ICMP)")
    ax.set_xlim(-0.75, max(len(done), 6) - 0.25)         # a few bars keep their width
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
    ax.set_ylabel("ms", fontsize=8)
    if len(done) <= 40:
        ax.set_xticks(list(xs), [f"{m['mig_id']} {m['vm']}" for m in done], rotation=60,
                      ha="right", fontsize=7)
    else:
        ax.set_xlabel("migrations, in the run's order", fontsize=8)
    fig.tight_layout()
    return svg(fig, "downtime vs blackout")


@styled
def total_time_plot(migs: list[dict]) -> str | None:
    """Per migration: its whole time (setup to cleanup) and QEMU's total time, s."""
    timed = [m for m in migs if m.get("run_s") is not None]
    if not timed:
        return None
    width = min(12.0, max(5.0, 0.32 * len(timed) + 2))
    fig, (ax,) = figure(width, 2.6)
    xs = list(range(len(timed)))
    ax.bar(xs, [m["run_s"] for m in timed], width=0.7, color=COLORS["total"],
           label="whole migration")
    ax.bar(xs, [(m.get("total_time_ms") or 0) / 1000 for m in timed], width=0.4,
           color=COLORS["throughput"], label="QEMU total time")
    ax.set_xlim(-0.75, max(len(timed), 6) - 0.25)
    ax.set_ylabel("s", fontsize=8)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
    if len(timed) <= 40:
        ax.set_xticks(xs, [f"{m['mig_id']} {m['vm']}" for m in timed], rotation=60,
                      ha="right", fontsize=7)
    fig.tight_layout()
    return svg(fig, "time per migration")


__all__ = ["STYLE", "figure", "styled", "svg", "downtime_plot", "migration_plot", "phase_marks", "policy_marks",
           "total_time_plot"]
