"""report.html's plots as migrator/report/svgplot.py writes them, laid out by a real browser.

No lab: the records are a real run's (``tests/data/report-run``) and records made to
exercise every part of a chart (the disk copied, a throttle on a right-hand axis, the guest's
dirtier on two hosts, policy marks, sixty migrations, a sweep's comparison).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from migrator.report import comparison, html, plots
from migrator.report.svgplot import Chart, nice_ticks, tick_label

from .chromium import Chromium

RUN = Path(__file__).parent / "data" / "report-run"


@given(st.floats(-1e6, 1e6), st.floats(1e-3, 1e7))
def test_ticks_are_round_inside_and_few(lo, span):
    hi = lo + span
    ticks = nice_ticks(lo, hi, most=5)
    assert 1 <= len(ticks) <= 6 + 1
    assert all(lo - span * 1e-6 <= t <= hi + span * 1e-6 for t in ticks)
    if len(ticks) > 1:
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 2.5, 5, 10))
        assert all(math.isclose(b - a, step, rel_tol=1e-6, abs_tol=step * 1e-6)
                   for a, b in zip(ticks, ticks[1:]))
        labels = [tick_label(t, step) for t in ticks]
        assert len(set(labels)) == len(labels), labels     # as many decimals as needed
        assert all(math.isclose(float(label), t, rel_tol=1e-6, abs_tol=step * 1e-3)
                   for label, t in zip(labels, ticks))


def test_labels_are_plain():
    assert [tick_label(v, 2.5) for v in (0, 2.5, 5.0, 7.5)] == ["0", "2.5", "5.0", "7.5"]
    assert [tick_label(v, 500) for v in (0, 500, 1000)] == ["0", "500", "1000"]
    assert tick_label(-0.0, 0.2) == "0"


def _records() -> tuple[list[dict], dict, list[dict], list[dict]]:
    """The real run's records; one record with every series; sixty migrations; a sweep's
    rows."""
    migs = [json.loads(p.read_text()) for p in sorted((RUN / "migrations").glob("*.json"))]
    m = json.loads(json.dumps(migs[1]))
    t0 = m["progress"][0]["now"]
    n = 40
    m["progress"] = [{"t": i * 0.25, "now": t0 + i * 0.25,
                      "remaining_bytes": (n - i) * 2 ** 22,
                      "transfer_rate_mbs": 800 + 100 * math.sin(i),
                      "dirty_rate_pps": 3000 * (1 + math.cos(i / 5)),
                      "throttle_pcent": min(99, i * 3), "disk_total_bytes": 2 ** 30,
                      "disk_transferred_bytes": min(2 ** 30, i * 2 ** 25)} for i in range(n)]
    # stale pages found at the end (after the switchover, as they are): the note at the
    # plot's right edge
    m["dirtier"] = [{"t": i * 0.5, "host": h, "rate_mibs": 10 + i,
                     "stale_pages": 1234 if i == 19 else 0}
                    for i in range(20) for h in ("hostA", "hostB")]
    m["decisions"] = [{"t": 3.0, "action": "auto-converge"}, {"t": 6.0, "action": "postcopy"}]
    many = [dict(migs[0], mig_id=f"pair{i}-{i}", downtime_ms=100 + i, blackout_ms=200 + i,
                 run_s=1 + i / 50, total_time_ms=800) for i in range(60)]
    rows = [{"label": f"bandwidth_mibs={b}", "t": {"median": b * 2, "min": b, "max": b * 3}}
            for b in (24, 128, 256, 512, 1024)]
    # long names, turned: they reach left of their tick, past the axis
    rows += [{"label": f"multifd_channels=4 bandwidth_mibs={b}",
              "t": {"median": b * 2, "min": b, "max": b * 3}} for b in (100, 200, 300, 400)]
    return migs, m, many, rows


# every <text> of every plot: inside its plot; no two ticks or axis labels over each other
# (each text's own box, turned as it is drawn: corners through its transform; two boxes
# overlap unless one of their edges' normals separates them)
LAYOUT = """(() => {
  const inside = (r, box) => r.left >= box.left - 1 && r.right <= box.right + 1
                             && r.top >= box.top - 1 && r.bottom <= box.bottom + 1;
  const corners = (t) => {
    const b = t.getBBox(), m = t.getCTM();
    const shrink = 0.5;           // glyph boxes carry a little space around the ink
    return [[b.x + shrink, b.y + shrink], [b.x + b.width - shrink, b.y + shrink],
            [b.x + b.width - shrink, b.y + b.height - shrink],
            [b.x + shrink, b.y + b.height - shrink]]
      .map(([x, y]) => [m.a * x + m.c * y + m.e, m.b * x + m.d * y + m.f]);
  };
  const separated = (p, q) => [p, q].some(poly => poly.some((a, i) => {
    const b = poly[(i + 1) % 4], n = [b[1] - a[1], a[0] - b[0]];
    const proj = (pts) => pts.map(([x, y]) => x * n[0] + y * n[1]);
    const pp = proj(p), qq = proj(q);
    return Math.max(...pp) <= Math.min(...qq) || Math.max(...qq) <= Math.min(...pp);
  }));
  return [...document.querySelectorAll('svg')].map(svg => {
    const box = svg.getBoundingClientRect();
    const texts = [...svg.querySelectorAll('text')];
    const outside = texts.filter(t => !inside(t.getBoundingClientRect(), box))
                         .map(t => t.textContent);
    const fixed = texts.filter(t => ['tick', 'label', 'title'].includes(t.getAttribute('class')))
                       .map(t => [t.textContent, corners(t)]);
    const clashes = [];
    fixed.forEach(([a, pa], i) => fixed.slice(i + 1).forEach(([b, pb]) => {
      if (!separated(pa, pb)) clashes.push([a, b]);
    }));
    const series = [...svg.querySelectorAll('g[id] > path')].map(p => {
      const r = p.getBoundingClientRect();
      return {id: p.parentNode.id, points: (p.getAttribute('d').match(/[ML]/g) || []).length,
              inside: inside(r, box)};
    });
    return {title: svg.querySelector('title').textContent, width: box.width,
            height: box.height, texts: texts.map(t => t.textContent), outside, clashes,
            series};
  });
})()"""


async def test_every_plot_laid_out_inside_itself_in_a_browser(tmp_path):
    """Each kind of plot, in Chromium: every text inside its plot, no tick or axis label
    over another, each series a line through every sample, inside the plot; the marks,
    legends and the right-hand axis named."""
    migs, full, many, rows = _records()
    svgs = [plots.migration_plot(migs[0], "real"), plots.migration_plot(full, "full"),
            plots.downtime_plot(migs), plots.total_time_plot(migs),
            plots.downtime_plot(many[:7]), plots.downtime_plot(many),
            plots.total_time_plot(many), comparison.figure_plot(rows[:5], "t", "total time", "ms"),
            comparison.figure_plot(rows[5:], "t", "long names", "ms"),
            # no right-hand axis: the note at the right end has only the plot's margin
            plots.migration_plot(dict(migs[0], dirtier=[
                {"t": migs[0]["progress"][-1]["t"], "host": "hostB", "rate_mibs": 8.0,
                 "stale_pages": 123456}]), "late"),
            plots.downtime_plot([dict(m, mig_id=f"a-rather-long-name-{i}") for m in many[:3]
                                 for i in range(1)] + many[3:5])]
    assert all(svgs)
    page = tmp_path / "plots.html"
    page.write_text("<!doctype html><html><body>" + "".join(f"<div>{s}</div>" for s in svgs)
                    + "</body></html>")
    async with Chromium() as browser:
        loaded = await browser.load(page)
        seen = await loaded.evaluate(LAYOUT)
        await loaded.screenshot(tmp_path / "plots.png")
    assert not loaded.errors, loaded.errors
    assert len(seen) == len(svgs)
    for plot in seen:
        assert plot["width"] > 300 and plot["height"] > 150, plot
        assert not plot["outside"], (plot["title"], plot["outside"])
        assert not plot["clashes"], (plot["title"], plot["clashes"])
        assert all(s["inside"] for s in plot["series"]), (plot["title"], plot["series"])
    real, everything = seen[0], seen[1]
    samples = {s["id"]: s["points"] for s in real["series"]}
    assert samples["real-remaining"] == len(migs[0]["progress"]), samples
    assert {"MIGRATING", "COMPLETED", "seconds since migrate"} <= set(real["texts"])
    samples = {s["id"]: s["points"] for s in everything["series"]}
    assert samples["full-remaining"] == samples["full-disk"] == samples["full-throttle"] == 40
    assert {"auto-converge", "postcopy", "throttle %", "1234 stale pages", "disk remaining",
            "guest's dirtier on hostA", "guest's dirtier on hostB"} <= set(everything["texts"])
    assert "downtime (QEMU)" in seen[5]["texts"] and "pair59-59 vm1" not in seen[5]["texts"]
    assert "pair6-6 vm1" in seen[4]["texts"]            # named while they fit
    assert {"total time", "bandwidth_mibs=1024"} <= set(seen[7]["texts"])


def test_a_record_that_cannot_be_drawn_costs_its_plot_not_the_page(tmp_path, caplog):
    """A figure that is not a number: that plot is left out (a warning naming it), the page
    and the other plots are written."""
    run_dir = tmp_path / "run"
    shutil.copytree(RUN, run_dir)
    path = next((run_dir / "migrations").glob("*.json"))
    record = json.loads(path.read_text())
    record["progress"][1]["transfer_rate_mbs"] = float("nan")
    path.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="migrator.report.html"):
        page = html.write_html(run_dir).read_text()
    assert "report: migration_plot not drawn: " in caplog.text
    assert "not a finite number" in caplog.text
    migs = len(list((run_dir / "migrations").glob("*.json")))
    assert page.count("<svg") == migs - 1 + 2           # the others, and the run's two
    assert "matplotlib" not in sys.modules


def test_a_chart_with_no_room_says_so():
    chart = Chart(1.0, 0.5, rows=3)
    chart.panels[0].line([0, 1], [0, 1], "#000")
    with pytest.raises(ValueError, match="no room"):
        chart.svg("tiny")
