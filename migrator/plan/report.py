"""The plan's one merged report, next to each test's own results directory.

* ``plan.json``: the plan, the set, every queue and its range, and per test its queues and
  hosts, status, exit status, start, duration (and what was expected), its results directory;
  the predicted and the real makespan, the sum of test times, the packing bound.
* ``junit.xml``: one ``testsuite`` per test (its run's suites, renamed ``<set>.<test>``, or
  one made for a test that errored before writing any, or was skipped), with properties
  ``plan.test``, ``plan.queues``, ``plan.hosts``, ``plan.status``.
* :func:`summary_table`: per queue, tests passed / failed / errored / skipped and busy time;
  then the wall time and the makespan against the sum of the tests' times.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from pathlib import Path

from ..report.results import write_json
from ..report.table import text_table
from .model import Plan
from .runner import TestRun
from .schedule import makespan, packing_bound

COUNTED = ("passed", "failed", "errored", "interrupted", "skipped")


def figures(plan: Plan, runs: list[TestRun]) -> dict:
    ran = [r for r in runs if r.started_s is not None and r.duration_s is not None]
    held = sum(r.duration_s * len(r.placement.queues) for r in ran)
    real = max((r.started_s + r.duration_s for r in ran), default=0.0)
    bound = held / max(1, len(plan.queues))
    return {"predicted_makespan_s": round(makespan([r.placement for r in runs]), 3),
            "makespan_s": round(real, 3),
            "sum_test_s": round(sum(r.duration_s for r in ran), 3),
            "queue_time_s": round(held, 3),
            "packing_bound_s": round(bound, 3),
            "makespan_over_bound": round(real / bound, 3) if bound else None}


def write_plan_results(plan: Plan, runs: list[TestRun], out_dir: Path, meta: dict) -> dict:
    """Write ``plan.json`` and ``junit.xml`` under ``out_dir``; return the plan.json data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"plan": str(plan.path), "set": plan.set_name, **meta,
            "queues": {q: plan.queue_range.get(q) for q in plan.queues},
            **figures(plan, runs),
            "counts": {s: sum(r.status == s for r in runs) for s in COUNTED},
            "tests": [{"name": r.name, "queues": r.placement.queues,
                       "hosts": r.placement.hosts, "scenario": r.placement.test.scenario,
                       "tags": r.placement.test.spec.tags, "status": r.status,
                       "exit_status": r.exit_status,
                       "predicted_start_s": round(r.placement.start, 3),
                       "expected_s": round(r.placement.expected, 3),
                       "started_s": None if r.started_s is None else round(r.started_s, 3),
                       "duration_s": None if r.duration_s is None else round(r.duration_s, 3),
                       "results": str(r.results_dir() or r.dir or "")} for r in runs]}
    write_json(out_dir / "plan.json", data)
    (out_dir / "junit.xml").write_text(junit_xml(plan, runs))
    return data


def junit_xml(plan: Plan, runs: list[TestRun]) -> str:
    root = ET.Element("testsuites", name=f"plan {plan.path.name}: {plan.set_name}")
    for r in runs:
        suites = []
        rd = r.results_dir()
        if rd is not None and (rd / "junit.xml").is_file():
            try:
                own = ET.parse(rd / "junit.xml").getroot()
                suites = [own] if own.tag == "testsuite" else list(own.iter("testsuite"))
            except ET.ParseError:
                suites = []
        if not suites:
            suite = ET.Element("testsuite", name=r.name, tests="1",
                               failures="0", errors="0", skipped="0")
            case = ET.SubElement(suite, "testcase", classname=f"{plan.set_name}.{r.name}",
                                 name=r.name, time=f"{r.duration_s or 0:.3f}")
            if r.status == "skipped":
                ET.SubElement(case, "skipped", message="not started (the plan stopped)")
                suite.set("skipped", "1")
            elif r.status != "passed":
                ET.SubElement(case, "error", message=f"{r.status} (exit {r.exit_status}): "
                              f"see {r.dir / 'output.log' if r.dir else 'its output'}")
                suite.set("errors", "1")
            suites = [suite]
        for suite in suites:
            suite.set("name", f"{plan.set_name}.{r.name}.{suite.get('name', '')}".rstrip("."))
            props = suite.find("properties")
            if props is None:
                props = ET.Element("properties")
                suite.insert(0, props)
            for name, value in (("plan.test", r.name),
                                ("plan.queues", " ".join(r.placement.queues)),
                                ("plan.hosts", " ".join(r.placement.hosts)),
                                ("plan.status", r.status)):
                ET.SubElement(props, "property", name=name, value=value)
            root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def summary_table(plan: Plan, runs: list[TestRun], wall_s: float) -> str:
    cols = ["queue", "range", "tests", *COUNTED, "busy s"]
    rows = []
    for q in plan.queues:
        mine = [r for r in runs if q in r.placement.queues]
        rows.append([q, plan.queue_range.get(q) or "-", str(len(mine)),
                     *(str(sum(r.status == s for r in mine)) for s in COUNTED),
                     f"{sum(r.duration_s or 0 for r in mine):.1f}"])
    lines = text_table(cols, rows)
    f = figures(plan, runs)
    counts = ", ".join(f"{sum(r.status == s for r in runs)} {s}" for s in COUNTED
                       if any(r.status == s for r in runs))
    ratio = f" = {f['makespan_over_bound']:.2f} x" if f["makespan_over_bound"] else ""
    lines.append(f"set {plan.set_name}: {len(runs)} tests ({counts}) on {len(plan.queues)} "
                 f"queues in {wall_s:.1f} s; makespan {f['makespan_s']:.1f} s (predicted "
                 f"{f['predicted_makespan_s']:.1f} s), sum of test times "
                 f"{f['sum_test_s']:.1f} s, packing bound {f['packing_bound_s']:.1f} s"
                 f"{ratio}")
    return "\n".join(lines)


def dry_run_table(plan: Plan, placements) -> str:
    """The assignment ``--dry-run`` prints: per test its queues, predicted start and end."""
    cols = ["#", "test", "hosts", "queues", "start s", "end s", "expected s"]
    rows = [[str(p.order + 1), p.test.name, str(p.test.spec.hosts), " ".join(p.queues),
             f"{p.start:.0f}", f"{p.end:.0f}", f"{p.expected:.0f}"] for p in placements]
    lines = text_table(cols, rows)
    bound = packing_bound(placements, len(plan.queues))
    span = makespan(placements)
    lines.append(f"set {plan.set_name}: {len(placements)} tests on {len(plan.queues)} queues; "
                 f"predicted makespan {span:.0f} s, packing bound {bound:.0f} s"
                 + (f" ({span / bound:.2f} x)" if bound else ""))
    return "\n".join(lines)


def stamp_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


__all__ = ["dry_run_table", "figures", "junit_xml", "stamp_now", "summary_table",
           "write_plan_results"]
