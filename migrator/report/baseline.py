"""Did this build get worse? Two runs' migrations compared (``migrate-run compare``), or a
run against a saved baseline.

Migrations are matched by scenario, route and VM (``ping_pong hostA->hostB vm1``): every
migration of that key in a run is one sample. Per key and metric, the median with min–max
of each run, the ratio B/A of the medians, and a verdict from ``compare.*`` in the config:

* times (``total_time_ms``, ``downtime_ms``, ``blackout_ms``) and ``iterations`` regress
  when B's median exceeds A's times the metric's ratio *and* by more than its slack (the
  noise of small figures: 1 ms against 3 ms of downtime is no regression);
* ``throughput_mbps`` regresses when B's median is below A's times its ratio, by more than
  its slack;
* ``stale_pages`` (the dirtier's check: pages the migration lost) regresses on any increase.

A key only one run has is listed, not judged. Figures come from completed migrations; a key
whose migrations all failed in B but not in A is a regression (``completed`` count).

A baseline is a copy of a run's records (``run.json``, ``migrations/``) under
``compare.baselines_dir``/NAME, made by ``--baseline save NAME RUN``.

:raise ConfigError: (:func:`load`, :func:`save_baseline`, :func:`baseline_dir`) a directory
    that holds no run, an unknown or badly named baseline.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

#: metric -> (title, unit, higher is better)
METRICS = {"total_time_ms": ("total time", "ms", False),
           "downtime_ms": ("downtime", "ms", False),
           "blackout_ms": ("blackout", "ms", False),
           "throughput_mbps": ("throughput", "Mbit/s", True),
           "iterations": ("iterations", "", False),
           "stale_pages": ("stale pages", "", False)}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Run:
    """One run's records: where, its scenario, and its migrations (dicts)."""

    path: Path
    run_id: str
    scenario: str
    migrations: list[dict]


@dataclass
class Row:
    """One metric of one key: the samples of A and B, and the verdict."""

    key: str
    metric: str
    a: list[float]
    b: list[float]
    verdict: str                 # ok | REGRESSION | better | only A | only B | no data
    why: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.a or not self.b:
            return None
        ma = statistics.median(self.a)
        return statistics.median(self.b) / ma if ma else None


def load(path: str | Path) -> Run:
    """A run's records from its results directory (or a baseline's).

    :raise ConfigError: no run.json there, or unreadable records.
    """
    path = Path(path)
    try:
        run = json.loads((path / "run.json").read_text())
        migs = [json.loads((path / "migrations" / f"{m['mig_id']}-{m['vm']}.json").read_text())
                for m in run["migrations"]]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path}: not a run's results directory ({exc})") from None
    return Run(path, run.get("run_id", path.name), str(run.get("scenario", "?")), migs)


def figure(mig: dict, metric: str) -> float | None:
    if metric == "stale_pages":
        check = mig.get("dirtier_check") or {}
        return check.get("new_stale_pages")
    value = mig.get(metric)
    return float(value) if value is not None else None


def samples(run: Run) -> dict[str, list[dict]]:
    """Key (``scenario src->dst vm``) -> that key's migrations, in the run's order."""
    out: dict[str, list[dict]] = {}
    for m in run.migrations:
        out.setdefault(f"{Path(run.scenario).stem} {m['src']}->{m['dst']} {m['vm']}",
                       []).append(m)
    return out


def compare(a: Run, b: Run, settings) -> list[Row]:
    """Every key's metrics, A against B, judged by ``settings`` (``config.compare``)."""
    sa, sb = samples(a), samples(b)
    rows = []
    for key in list(sa) + [k for k in sb if k not in sa]:
        ma, mb = sa.get(key, []), sb.get(key, [])
        if not ma or not mb:
            rows.append(Row(key, "completed", [], [], "only A" if ma else "only B"))
            continue
        done_a = [m for m in ma if m.get("status") == "completed"]
        done_b = [m for m in mb if m.get("status") == "completed"]
        worse = len(done_b) / len(mb) < len(done_a) / len(ma)
        rows.append(Row(key, "completed", [len(done_a), len(ma)], [len(done_b), len(mb)],
                        "REGRESSION" if worse else "ok",
                        "fewer completed" if worse else ""))
        for metric in METRICS:
            # stale pages: every migration the check judged (a lost page fails it)
            pool_a, pool_b = (ma, mb) if metric == "stale_pages" else (done_a, done_b)
            va = [v for v in (figure(m, metric) for m in pool_a) if v is not None]
            vb = [v for v in (figure(m, metric) for m in pool_b) if v is not None]
            if not va and not vb:
                continue
            rows.append(judge(Row(key, metric, va, vb, "no data"), settings))
    return rows


def judge(row: Row, settings) -> Row:
    if not row.a or not row.b:
        return row
    ma, mb = statistics.median(row.a), statistics.median(row.b)
    if row.metric == "stale_pages":
        row.verdict = "REGRESSION" if max(row.b) > max(row.a) else "ok"
        row.why = f"{max(row.b):g} stale against {max(row.a):g}" if row.verdict != "ok" else ""
        return row
    ratio, slack = settings.ratios[row.metric], settings.slack[row.metric]
    higher_better = METRICS[row.metric][2]
    if higher_better:
        worse = mb < ma * ratio and ma - mb > slack
        better = mb > ma / ratio and mb - ma > slack
        limit = f"< {ratio:g}x"
    else:
        worse = mb > ma * ratio and mb - ma > slack
        better = mb < ma / ratio and ma - mb > slack
        limit = f"> {ratio:g}x"
    row.verdict = "REGRESSION" if worse else "better" if better else "ok"
    row.why = f"{limit} and by more than {slack:g}" if worse else ""
    return row


def table(a: Run, b: Run, rows: list[Row]) -> str:
    """The comparison as text: a line per key and metric."""
    from .table import text_table

    def stat(values: list[float], unit: str, metric: str = "") -> str:
        if metric == "completed":
            return f"{values[0]:g}/{values[1]:g}" if values else "-"
        if not values:
            return "-"
        return (f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"
                f"{' ' + unit if unit else ''}")
    lines = [f"A: {a.path} ({a.run_id})", f"B: {b.path} ({b.run_id})"]
    out = [["migrations", "metric", "A median (min–max)", "B median (min–max)", "B/A",
            "verdict"]]
    for r in rows:
        title, unit, _ = METRICS.get(r.metric, ("completed", "", True))
        ratio = f"{r.ratio:.2f}" if r.ratio is not None and r.metric != "completed" else "-"
        out.append([r.key, title, stat(r.a, unit, r.metric), stat(r.b, unit, r.metric), ratio,
                    r.verdict + (f" ({r.why})" if r.why else "")])
    regressions = sum(r.verdict == "REGRESSION" for r in rows)
    return "\n".join(lines + text_table(out[0], out[1:])) + (
        f"\n{regressions} regression(s)" if regressions else "\nno regression")


def baseline_dir(root: Path, name: str) -> Path:
    """Where baseline ``name`` lives. :raise ConfigError: a name that is no plain name."""
    if not _NAME.match(name):
        raise ConfigError(f"baseline name {name!r}: letters, digits, '.', '_', '-' only")
    return root / name


def save_baseline(run: Run, root: Path, name: str) -> Path:
    """Copy ``run``'s records to baseline ``name`` (replacing one of that name)."""
    out = baseline_dir(root, name)
    tmp = out.with_name(f".{name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(run.path / "run.json", tmp / "run.json")
    shutil.copytree(run.path / "migrations", tmp / "migrations")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


__all__ = ["METRICS", "Row", "Run", "baseline_dir", "compare", "load", "save_baseline",
           "table"]
