"""``results/<run>/report.html``: one self-contained page per run, for a person.

::

    write_html(Path("results/20261201-043539-36df"))     # from the run's own records

Made from the files of the run's directory only (``run.json``, ``migrations/*.json``,
``tasks.json``), so an old run's report can be made again (``migrate-run report RUN_DIR``).
It opens offline: no script, no stylesheet or font from elsewhere; the plots are inline
SVG (:mod:`.plots`), the page by a Jinja2 template
(``templates/report.html.j2``, autoescaped).

What it shows: the verdict, hosts, times and warnings; the instances; the summary table
(one row per migration, linked to its section); every migration that did not complete
(those its scenario expected say so), each with its host route, VM, the phase it failed in
and where it ended, and its error; the run's plots (time
per migration, downtime beside the guest-visible blackout); then per migration its figures,
its phases, and its plots of remaining bytes, throughput and dirty rate against time with
the phase changes and policy steps marked.

:raise ConfigError: (:func:`write_html`, :func:`load_run`) the directory's ``run.json``
    is missing or unreadable. A migration record that cannot be read or drawn is shown as
    such; the page is still written.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from ..errors import ConfigError
from . import plots
from .results import failure_labels, policy_steps

log = logging.getLogger(__name__)

REPORT = "report.html"


def load_run(run_dir: Path) -> tuple[dict, list[dict], list[dict]]:
    """(run.json, the migration records in the run's order, tasks.json or []).

    :raise ConfigError: ``run.json`` or ``tasks.json`` missing, unreadable or not a run's.
    """
    try:
        run = json.loads((run_dir / "run.json").read_text())
        if not isinstance(run, dict) or "run_id" not in run:
            raise ValueError("not a run's record (no run_id)")
        tasks_path = run_dir / "tasks.json"
        tasks = json.loads(tasks_path.read_text()) if tasks_path.exists() else []
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{run_dir}: cannot read the run's records: {exc}") from None
    migs = []
    for m in run.get("migrations", []):
        path = run_dir / "migrations" / f"{m['mig_id']}-{m['vm']}.json"
        try:
            migs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            log.warning("report: %s unreadable: %s", path, exc)
            migs.append({**m, "error": f"record unreadable: {exc}"})
    return run, migs, tasks


def _row(m: dict) -> dict:
    """What the summary table and a migration's section show of one record."""
    def ms(v):
        return "-" if v is None else f"{v:,.0f} ms"
    failed = not m.get("passed", m.get("status") == "completed")
    reason = failure_labels(m) if m.get("status") != "completed" else None
    return {
        "anchor": _anchor(m), "mig_id": m["mig_id"], "vm": m["vm"],
        "route": f"{m['src']} → {m['dst']}", "status": m.get("status", "?"),
        "handled": m.get("handled_by_scenario", False), "failed": failed,
        "driver": m.get("driver", "?"), "storage": m.get("storage", "shared"),
        "total": ms(m.get("total_time_ms")), "downtime": ms(m.get("downtime_ms")),
        "blackout": ms(m.get("blackout_ms")),
        "mib": "-" if m.get("transferred_bytes") is None
        else f"{m['transferred_bytes'] / 2**20:,.1f}",
        "mbps": "-" if m.get("throughput_mbps") is None else f"{m['throughput_mbps']:,.0f}",
        "iterations": m.get("iterations") if m.get("iterations") is not None else "-",
        "policy": policy_steps(m) or "-", "error": m.get("error"),
        "failed_in": reason[1] if reason else None, "reason": reason[0] if reason else None,
        "final": m.get("phase", "?"),
        "phases": [(p, f"{t:.3f}") for p, t, _w in m.get("phases") or ()],
        "figures": [(k, m[k]) for k in ("wall_s", "run_s", "overhead_s", "queued_s",
                                        "migration_cpu_s",
                                        "setup_time_ms", "downtime_events_ms",
                                        "max_cpu_throttle", "postcopy_switched",
                                        "postcopy_requests", "mirror_s", "disk_bytes",
                                        "disk_switchover_ms")
                    if m.get(k) is not None]
        + ([("xbzrle", xbzrle_text(m["xbzrle"]))] if m.get("xbzrle") else []),
    }


def xbzrle_text(x: dict) -> str:
    """XBZRLE's figures in words (see ``MigrationResult.xbzrle``)."""
    return (f"{x.get('pages') or 0:,} pages as deltas ({(x.get('bytes') or 0) / 2**20:,.1f} "
            f"MiB), {x.get('cache_miss') or 0:,} not cached, {x.get('overflow') or 0:,} "
            f"overflowed; cache {(x.get('cache_size') or 0) / 2**20:,.0f} MiB")


def prefetch() -> None:
    """Import what drawing the page takes and compile its template (Jinja2: about 0.1 s),
    which ``migrate-run`` does in a thread while its first guest boots rather than after its
    last migration. Never raises: the page is drawn all the same, only later."""
    try:
        template("report.html.j2")
    except Exception:  # noqa: BLE001 - best effort, see above
        log.debug("report: prefetch failed", exc_info=True)


@functools.lru_cache(maxsize=None)
def template(name: str):
    """A page template of ``templates/`` (autoescaped; an undefined name is an error)."""
    import jinja2
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("migrator.report", "templates"),
        autoescape=jinja2.select_autoescape(default=True), trim_blocks=True,
        lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return env.get_template(name)


def _anchor(m: dict) -> str:
    return f"mig-{m['mig_id']}-{m['vm']}"


def render_html(run: dict, migs: list[dict], tasks: list[dict]) -> str:
    """The page, as a string (its plots drawn now: about a millisecond each)."""
    rows = [_row(m) for m in migs]
    sections = [{**row, "plot": guarded(plots.migration_plot, m, row["anchor"]),
                 "samples": len(m.get("progress") or ())} for m, row in zip(migs, rows)]
    return template("report.html.j2").render(
        run=run, rows=rows, sections=sections, tasks=tasks,
        failures=[r for r in rows if r["status"] != "completed"],
        instance_failures=[i for i in run.get("instances", []) if i.get("status") != "passed"],
        downtime_plot=guarded(plots.downtime_plot, migs),
        time_plot=guarded(plots.total_time_plot, migs),
        blackout=any(m.get("blackout_ms") is not None for m in migs))


def guarded(draw, *args) -> str | None:
    """A plot, or None (logged) when its records cannot be drawn: one bad record never
    costs the page."""
    try:
        return draw(*args)
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning("report: %s not drawn: %s", draw.__name__, exc)
        return None


def write_html(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` from the run's records; return its path."""
    run, migs, tasks = load_run(run_dir)
    path = run_dir / REPORT
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_html(run, migs, tasks), encoding="utf-8")
    tmp.replace(path)
    return path


__all__ = ["REPORT", "guarded", "load_run", "prefetch", "render_html", "template", "write_html"]
