"""A sweep's comparison (``<sweep>/comparison.html``, and the table ``migrate-run sweep``
prints): per setting, the median with min–max of each figure over every repetition.

Figures: QEMU's total time and downtime (ms), the guest-visible blackout where probed,
throughput (Mbit/s), the whole migration (setup to cleanup, s), what the migration cost
QEMU in CPU on the hosts (both sides' CPU seconds outside their vCPU threads, see
:mod:`migrator.migration.cpu`) — each over the completed migrations of every run of the
setting — and per run the controller's CPU seconds (the ``migrate-run`` process, user +
system) and its wall time. Runs that did not pass are
counted and kept out of nothing: their completed migrations still count, their failures are
shown.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from ..plan.sweep import Sweep, SweepRun, label
from . import plots
from .html import guarded, template
from .svgplot import Chart
from .table import text_table

#: (key, title, unit, where from: "migration" figures or "run" figures)
FIGURES = (("total_time_ms", "total time", "ms", "migration"),
           ("downtime_ms", "downtime", "ms", "migration"),
           ("blackout_ms", "blackout", "ms", "migration"),
           ("throughput_mbps", "throughput", "Mbit/s", "migration"),
           ("run_s", "whole migration", "s", "migration"),
           ("migration_cpu_s", "QEMU CPU outside vCPUs", "s", "migration"),
           ("xbzrle_pages", "XBZRLE deltas", "pages", "migration"),
           ("controller_cpu_s", "controller CPU per run", "s", "run"),
           ("wall_s", "run wall time", "s", "run"))


def summarize(sweep: Sweep, runs: list[SweepRun]) -> list[dict]:
    """One row per setting: ``label``, ``setting``, ``runs``, ``passed``, ``migrations``,
    ``completed``, and per figure ``{"median", "min", "max", "n"}`` (None: no sample)."""
    rows = []
    for setting in sweep.settings():
        mine = [r for r in runs if r.setting == setting and r.exit_status is not None]
        migs = [m for r in mine for m in r.migrations]
        done = [m for m in migs if m.get("status") == "completed"]
        row = {"label": label(setting), "setting": setting, "runs": len(mine),
               "passed": sum(r.verdict == "passed" for r in mine),
               "migrations": len(migs), "completed": len(done)}
        for key, _title, _unit, where in FIGURES:
            values = [m[key] for m in done if m.get(key) is not None] if where == "migration" \
                else [getattr(r, key) for r in mine]
            row[key] = {"median": statistics.median(values), "min": min(values),
                        "max": max(values), "n": len(values)} if values else None
        rows.append(row)
    return rows


def _cell(stat: dict | None, unit: str) -> str:
    if stat is None:
        return "-"
    fmt = "{:,.0f}" if unit in ("ms", "Mbit/s", "pages") else "{:,.2f}"
    return f"{fmt.format(stat['median'])} ({fmt.format(stat['min'])}–{fmt.format(stat['max'])})"


def table(rows: list[dict]) -> str:
    """The comparison as text: medians (min–max)."""
    shown = [f for f in FIGURES if any(r[f[0]] for r in rows)]
    head = ("setting", "passed", "migrations") + tuple(f"{t} {u}" for _k, t, u, _w in shown)
    body = [(r["label"], f"{r['passed']}/{r['runs']}", f"{r['completed']}/{r['migrations']}",
             *(_cell(r[k], u) for k, _t, u, _w in shown)) for r in rows]
    return "\n".join(text_table(head, body)) + "\n(median, min–max over every repetition)"


def figure_plot(rows: list[dict], key: str, title: str, unit: str) -> str | None:
    """Median per setting with min–max bars."""
    have = [r for r in rows if r[key]]
    if not have:
        return None
    chart = Chart(min(12.0, max(4.5, 0.9 * len(have) + 2)), 2.6)
    ax = chart.panels[0]
    xs = list(range(len(have)))
    ax.errorbars(xs, [r[key]["median"] for r in have], [r[key]["min"] for r in have],
                 [r[key]["max"] for r in have], plots.COLORS["remaining"])
    chart.categories = [r["label"] for r in have]
    chart.rotation = 20 if len(have) > 4 else 0
    chart.xlim = (-0.6, len(have) - 0.4)
    ax.ylim = (0, max(r[key]["max"] for r in have) * 1.12 or 1)
    ax.ylabel = unit
    ax.title = title
    return chart.svg(title)


def write_comparison(out_dir: Path, sweep: Sweep, runs: list[SweepRun]) -> Path:
    """``out_dir/comparison.html``: the table and a plot per figure."""
    rows = summarize(sweep, runs)
    figures = [(key, title, unit, guarded(figure_plot, rows, key, title, unit))
               for key, title, unit, _w in FIGURES]
    shown = [f for f in FIGURES if any(r[f[0]] for r in rows)]
    html = template("comparison.html.j2").render(
        sweep=sweep.to_json(), rows=rows,
        runs=[r.to_json() | {"href": os.path.relpath(Path(r.run_dir) / "report.html", out_dir)
                             if r.run_dir else None} for r in runs],
        columns=[(k, f"{t} ({u})", u) for k, t, u, _w in shown], cell=_cell,
        plots=[(k, t, svg) for k, t, _u, svg in figures if svg])
    path = out_dir / "comparison.html"
    path.write_text(html, encoding="utf-8")
    return path


__all__ = ["FIGURES", "figure_plot", "summarize", "table", "write_comparison"]
