"""Status and cancel for running work, from another terminal (``migrate-run status``,
``migrate-run cancel MIG-ID|RUN-ID``).

::

    await publish(ctx, cancel_run=main_task.cancel)   # the run: serve its control calls
    ...
    for run in live_runs(config):                      # another process
        print(await ask(run, "status"))
        await ask(run, "cancel", {"target": "pair1-2"})

A live run serves ``/v1/control/status`` and ``/v1/control/cancel`` on its sync server (the
same token as everything else there; the ``migrate-run drain`` controller starts one on
loopback for this alone). Where to reach it is written in the run's index entry,
``<journal.state_dir>/runs/<run-id>/control.json``, readable by its owner only (it holds the
token).

``status`` answers what runs now: each migration in flight with its phase, why it waits when
it is queued, its last progress (sent, remaining, total, rate, dirty rate, iteration,
throttle; the disk copied while it is copied) and the policy's steps; and the run's open
barrier rounds, each with whom it waits on. The live view (:mod:`migrator.report.live`)
draws the same answer. ``cancel`` takes a migration id (``pair1-2``, ``drain-3``: the ids the run
prints; the call's migrations roll back, or a queued one ends before it starts) or the run's
own id (the whole run, as Ctrl-C at its terminal does).

Errors (client side): :class:`ControlError` (a :class:`~migrator.errors.ConfigError`: exit
2) for an unknown run or target (its message lists what is in flight);
:class:`RunUnreachable` (exit 1) for a live run that does not answer.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError, MigratorError
from .journal import list_runs

CONTROL_FILE = "control.json"


class ControlError(ConfigError):
    """No such live run or migration, or the run refused the request (the message says
    why)."""


class RunUnreachable(MigratorError):
    """A live run does not answer its control address."""


def status_of(ctx) -> dict[str, Any]:
    """What ``ctx``'s run does now (the ``status`` answer)."""
    from ..report.results import policy_steps
    rows = []
    for (mig_id, vm), (md, mig) in sorted(ctx.live.items()):
        last = mig.records[-1] if mig.records else None
        ticket = mig.slot
        rows.append({
            "mig_id": mig_id, "vm": vm, "src": md.src.name, "dst": md.dst.name,
            "phase": mig.phase.value, "priority": md.priority,
            "waiting_for": ticket.why_waiting() if ticket is not None and mig.phase.value
            == "QUEUED" else None,
            "elapsed_s": round(time.monotonic() - mig.history[0][1], 1),
            "transferred": last.transferred if last else None,
            "remaining": last.remaining if last else None,
            "total": last.total if last else None,
            "mbps": round(last.mbps, 1) if last else None,
            "dirty_rate_pps": last.dirty_pages_rate if last else None,
            "iteration": last.iteration if last else None,
            "cpu_throttle": last.cpu_throttle if last else None,
            "disk": list(disk) if (disk := mig.disk_progress()) is not None else None,
            "policy": policy_steps({"decisions": mig.result.decisions}) or None,
            "cancel_asked": md.stop_asked})
    server = ctx.server
    return {"run_id": ctx.run_id, "pid": os.getpid(), "migrations": rows,
            "completed": sum(m.status == "completed" for m in ctx.migrations),
            "failed": sum(m.status != "completed" for m in ctx.migrations),
            # the scenario instances sync as <run-id>.<instance>
            "barriers": server.registry.open_rounds(ctx.run_id, with_parts=True)
            if server is not None else []}


def cancel_in(ctx, target: str, reason: str,
              cancel_run: Callable[[], Any] | None) -> tuple[int, dict]:
    """Cancel ``target`` (a migration id, or the run's id) in ``ctx``'s run."""
    if target == ctx.run_id:
        if cancel_run is None:
            return 409, {"type": "Refused", "message": f"run {target} cannot be cancelled "
                                                       "from outside"}
        cancel_run()
        return 200, {"cancelled": target, "what": "run"}
    canceller = ctx.cancellers.get(target)
    live = [(md, vm) for (mig_id, vm), (md, _m) in ctx.live.items() if mig_id == target]
    if canceller is None and not live:
        flying = sorted({m for m, _v in ctx.live} | set(ctx.cancellers))
        return 404, {"type": "NotFound", "message": f"no migration {target} in flight in run "
                     f"{ctx.run_id} (in flight: {', '.join(flying) or 'none'})"}
    if canceller is not None:
        canceller(reason)
    else:
        live[0][0].cancel(reason)
    return 200, {"cancelled": target, "what": "migration"}


async def publish(ctx, cancel_run: Callable[[], Any] | None = None) -> None:
    """Serve ``ctx``'s control calls on its sync server (started) and say where, in its
    index entry (a run without a journal serves them but is not found by others)."""
    async def handler(name: str, body: dict) -> tuple[int, dict]:
        if name == "status":
            return 200, status_of(ctx)
        if name == "cancel":
            target = body.get("target")
            if not isinstance(target, str) or not target:
                return 400, {"type": "BadRequest", "message": "cancel needs a 'target'"}
            reason = str(body.get("reason") or "cancelled with migrate-run cancel")
            ctx.say(f"cancel {target} asked from outside: {reason}")
            return cancel_in(ctx, target, reason, cancel_run)
        return 404, {"type": "NotFound", "message": f"no control call {name!r}"}
    ctx.set_control(handler)
    if ctx.journal is not None:
        path = ctx.journal.entry.dir / CONTROL_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": ctx.sync_url, "token": ctx.token}, f)


@dataclass
class LiveRun:
    run_id: str
    url: str
    token: str
    hosts: list[str]


def live_runs(state_dir) -> list[LiveRun]:
    """The runs of the index whose controller lives and serves control calls."""
    out = []
    for entry in list_runs(state_dir):
        path = entry.dir / CONTROL_FILE
        if not path.exists() or not entry.is_alive():
            continue
        try:
            where = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out.append(LiveRun(entry.run_id, where["url"], where["token"],
                           entry.info.get("hosts", [])))
    return out


async def ask(run: LiveRun, name: str, body: dict | None = None,
              timeout: float = 10) -> dict:
    """One control call to ``run``.

    :raise ControlError: the run refused (its message).
    :raise RunUnreachable: the run does not answer.
    """
    import aiohttp
    headers = {"Authorization": f"Bearer {run.token}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.request("POST" if body is not None else "GET",
                                 f"{run.url}/v1/control/{name}", json=body,
                                 headers=headers) as r:
                reply = await r.json(content_type=None)
                if r.status != 200:
                    raise ControlError(f"run {run.run_id}: {reply.get('message', reply)}")
                return reply
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise RunUnreachable(f"run {run.run_id} does not answer at {run.url}: "
                           f"{exc or type(exc).__name__}") from None


__all__ = ["ControlError", "RunUnreachable", "LiveRun", "ask", "cancel_in", "live_runs", "publish", "status_of"]
