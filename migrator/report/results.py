"""``results/<run-id>/``: what a run leaves for people and for CI.

::

    results/<run-id>/run.json                   the run: hosts, scenario, verdict, instances
    results/<run-id>/migrations/<mig>-<vm>.json one record per migration (every engine metric,
                                                phase timestamps, error)
    results/<run-id>/tasks.json                 parallel VM tasks: one record per task (status,
                                                duration, output, error, each command)
    results/<run-id>/junit.xml                  a testsuite per instance, a testcase per
                                                migration and per task, plus one for the
                                                scenario itself
    results/<run-id>/report.html                the page for a person: verdict, tables,
                                                failures, plots (:mod:`.html`)
    results/<run-id>/run.log                    the debug log (written by the CLI)
"""

from __future__ import annotations

import json
import logging
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .table import text_table

if TYPE_CHECKING:       # `migrate-run report` imports this module: not the framework
    from ..framework.context import RunContext

log = logging.getLogger(__name__)


def run_versions(ctx: RunContext) -> dict:
    """What the run ran: migrator's version, Python's, each host's kernel, QEMU and libvirt
    (``ctx.versions``), and each VM's machine type (as its migrations found it)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version
    try:
        mine = version("migrator")
    except PackageNotFoundError:
        mine = None
    machines: dict[str, str] = {}
    for m in ctx.migrations:
        if m.result.get("machine"):
            machines[m.vm] = m.result["machine"]
    return {"migrator": mine, "python": platform.python_version(),
            "hosts": dict(sorted(ctx.versions.items())), "vms": machines}


def version_properties(ctx: RunContext) -> list[tuple[str, str]]:
    """The versions as JUnit properties: ``migrator``, ``hostA.qemu``, ``hostA.kernel`` ..."""
    v = run_versions(ctx)
    props = [("migrator", v["migrator"] or "?")]
    for host, hv in v["hosts"].items():
        props += [(f"{host}.qemu", f"{hv['qemu']['version'] or '?'} ({hv['qemu']['binary']})"),
                  (f"{host}.kernel", hv["kernel"] or "?")]
        if hv.get("libvirt"):
            props.append((f"{host}.libvirt", hv["libvirt"]))
    return props


def migration_body(ctx: RunContext, rec) -> dict:
    """What ``migrations/<mig>-<vm>.json`` holds for the migration record ``rec``."""
    return {"run_id": ctx.run_id, "instance": rec.instance, "mig_id": rec.mig_id,
            "vm": rec.vm, "src": rec.src, "dst": rec.dst, "status": rec.status,
            "passed": rec.passed, "handled_by_scenario": rec.handled, "error": rec.error,
            **{k: v for k, v in rec.result.items() if k not in ("vm", "src", "dst",
                                                                 "status", "error")}}


def write_results(ctx: RunContext, out_dir: Path, meta: dict[str, Any]) -> Path:
    """Write the run's records under ``out_dir`` (created); return it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mig_dir = out_dir / "migrations"
    mig_dir.mkdir(exist_ok=True)
    for rec in ctx.migrations:
        write_json(mig_dir / f"{rec.mig_id}-{rec.vm}.json", migration_body(ctx, rec))
    run = {"run_id": ctx.run_id, "verdict": "passed" if ctx.verdict else "failed", **meta,
           "instances": [vars(i) for i in ctx.instances],
           "migrations": [{"mig_id": m.mig_id, "vm": m.vm, "src": m.src, "dst": m.dst,
                           "status": m.status, "passed": m.passed} for m in ctx.migrations],
           "warnings": list(ctx.warnings),
           "versions": run_versions(ctx),
           "config": ctx.config.model_dump(mode="json")}
    if ctx.tasks:
        run["tasks"] = {status: len([t for t in ctx.tasks if t.status == status])
                        for status in sorted({t.status for t in ctx.tasks})}
        write_json(out_dir / "tasks.json", [t.to_json() for t in ctx.tasks])
    write_json(out_dir / "run.json", run)
    (out_dir / "junit.xml").write_text(junit_xml(ctx, meta.get("scenario", "scenario")))
    return out_dir


async def write_page(ctx: RunContext, out_dir: Path) -> Path | None:
    """``report.html`` from the records :func:`write_results` wrote, drawn in a thread (a
    long run's page takes a while; the event loop goes on serving, e.g. metrics). A page
    that cannot be made is a warning (the records are written), never the run's failure."""
    import asyncio

    from ..aio import shielded
    from .html import write_html
    try:
        return await shielded(asyncio.to_thread(write_html, out_dir))
    except Exception as exc:  # noqa: BLE001 - see above
        log.exception("report.html not written")
        ctx.say(f"WARNING: {out_dir}/report.html not written: {exc}")
        return None


#: the phases a failed migration passes through after its failure
ENDING_PHASES = {"ROLLING_BACK", "ROLLED_BACK", "SPLIT", "LANDED", "UNRESOLVED", "LOST"}


def failure_labels(result: dict) -> tuple[str, str, str]:
    """(reason, phase it failed in, outcome: its final phase) of an ended migration that
    did not complete; reason ``cancelled``, ``policy_abort`` (its convergence policy
    aborted it) or ``error``."""
    if result.get("status") == "cancelled":
        reason = "cancelled"
    elif any(d.get("action") == "abort" for d in result.get("decisions") or ()):
        reason = "policy_abort"
    else:
        reason = "error"
    before = [p for p, *_ in result.get("phases") or () if p not in ENDING_PHASES]
    return reason, before[-1] if before else "PENDING", result.get("phase") or "?"


def policy_steps(result: dict) -> str:
    """What a migration's convergence policy did, in short (``auto-converge@12s
    postcopy@24s``; downtime ramp steps are left out), or ""."""
    return " ".join(f"{d['action']}@{d['t']:.0f}s" for d in result.get("decisions") or ()
                    if d["action"] != "downtime")


def junit_xml(ctx: RunContext, scenario: str) -> str:
    """JUnit XML: one testsuite per instance; a testcase per migration and one for the
    instance's scenario as a whole (its error, or cleanup problems)."""
    suites = ET.Element("testsuites", name=f"migrate-run {ctx.run_id}")
    for inst in ctx.instances:
        migs = [m for m in ctx.migrations if m.instance == inst.instance]
        suite = ET.SubElement(suites, "testsuite", name=f"{scenario}.{inst.instance}",
                              hostname=",".join(inst.hosts),
                              timestamp=time.strftime("%Y-%m-%dT%H:%M:%S",
                                                      time.localtime(inst.started)))
        suite_props = ET.SubElement(suite, "properties")   # what ran: versions per host
        for name, value in version_properties(ctx):
            if "." not in name or name.split(".")[0] in inst.hosts:
                ET.SubElement(suite_props, "property", name=f"version.{name}", value=value)
        failures = 0
        for m in migs:
            case = ET.SubElement(suite, "testcase", classname=f"{scenario}.{inst.instance}",
                                 name=f"{m.mig_id} {m.vm} {m.src}->{m.dst}",
                                 time=f"{m.result.get('run_s') or 0:.3f}")
            blackout = m.result.get("blackout") or {}
            decided = policy_steps(m.result)
            qemu = m.result.get("qemu") or {}
            if blackout or decided or qemu or m.result.get("machine"):
                props = ET.SubElement(case, "properties")
            for side in ("src", "dst"):         # what migrated: each side's QEMU
                if (qemu.get(side) or {}).get("version"):
                    ET.SubElement(props, "property", name=f"qemu.{side}",
                                  value=qemu[side]["version"])
            if m.result.get("machine"):
                ET.SubElement(props, "property", name="machine", value=m.result["machine"])
            if decided:                 # what the convergence policy did
                ET.SubElement(props, "property", name="policy.decisions", value=decided)
            if blackout:                # the guest-visible blackout, next to QEMU's downtime
                for name in ("downtime_ms", "blackout_ms"):
                    if m.result.get(name) is not None:
                        ET.SubElement(props, "property", name=name,
                                      value=f"{m.result[name]:g}")
                for name in ("lost", "replies_after_switchover", "tcp_survived", "error"):
                    if blackout.get(name) is not None:
                        ET.SubElement(props, "property", name=f"blackout.{name}",
                                      value=str(blackout[name]))
            if not m.passed:
                failures += 1
                ET.SubElement(case, "failure", message=m.error or m.status).text = m.error
            elif m.handled:
                ET.SubElement(case, "system-out").text = (
                    f"{m.status}, as the scenario expected: {m.error}")
        tasks = [t for t in ctx.tasks if t.instance == inst.instance]
        for t in tasks:
            case = ET.SubElement(suite, "testcase", classname=f"{scenario}.{inst.instance}",
                                 name=f"#{t.index} {t.action} {t.host}/{t.vm}"
                                      + (f"->{t.to}" if t.to else ""),
                                 time=f"{t.duration_s:.3f}")
            if t.status == "skipped":
                ET.SubElement(case, "skipped", message=t.error or "skipped")
            elif not t.passed:
                failures += 1
                ET.SubElement(case, "failure", message=t.error or t.status,
                              type=t.status).text = t.error
            if t.output:
                ET.SubElement(case, "system-out").text = t.output[-4096:]
        case = ET.SubElement(suite, "testcase", classname=f"{scenario}.{inst.instance}",
                             name="scenario", time=f"{inst.duration_s:.3f}")
        if inst.status != "passed":
            failures += 1
            ET.SubElement(case, "failure", message=f"{inst.status}: {inst.error_type}",
                          type=inst.error_type or inst.status).text = inst.error
        if inst.cleanup_problems:
            ET.SubElement(case, "system-err").text = "\n".join(inst.cleanup_problems)
        suite.set("tests", str(len(migs) + len(tasks) + 1))
        suite.set("failures", str(failures))
        suite.set("errors", "0")
        suite.set("time", f"{inst.duration_s:.3f}")
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, "unicode") + "\n"


def summary_table(ctx: RunContext) -> str:
    """The final table: one row per migration, then one per instance, then the verdict."""
    rows = [("migration", "vm", "route", "status", "total", "downtime", "blackout", "MiB",
             "Mbit/s", "iter", "overhead")]
    for m in ctx.migrations:
        r = m.result
        status = m.status + (" (expected)" if m.handled and m.status != "completed" else "")
        rows.append((m.mig_id, m.vm, f"{m.src}->{m.dst}", status,
                     _ms(r.get("total_time_ms")), _ms(r.get("downtime_ms")),
                     _ms(r.get("blackout_ms")),
                     f"{(r.get('transferred_bytes') or 0) / 2**20:.1f}"
                     if r.get("transferred_bytes") else "-",
                     f"{r['throughput_mbps']:.0f}" if r.get("throughput_mbps") else "-",
                     str(r.get("iterations") or "-"),
                     f"{r['overhead_s']:.3f} s" if r.get("overhead_s") is not None else "-"))
    if any(policy_steps(m.result) for m in ctx.migrations):
        rows = [rows[0] + ("policy",)] + [row + (policy_steps(m.result) or "-",)
                                          for row, m in zip(rows[1:], ctx.migrations)]
    lines = text_table(rows[0], rows[1:])
    if ctx.tasks:
        from ..framework.tasks import TaskResults
        lines += ["", TaskResults(ctx.tasks).table(), ""]
    for inst in ctx.instances:
        lines.append(f"{inst.instance} ({','.join(inst.hosts)}): {inst.status} in "
                     f"{inst.duration_s:.1f} s" + (f": {inst.error}" if inst.error else ""))
        for p in inst.cleanup_problems:
            lines.append(f"  cleanup: {p}")
    lines.append(f"verdict: {'PASSED' if ctx.verdict else 'FAILED'}")
    return "\n".join(lines)


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.0f} ms" if isinstance(v, float) else f"{v} ms"


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
