"""The fault matrix's controller rows (issue 13): faults on ``migrate-run`` itself.

Each cell is a real ``migrate-run`` of ``test_recover``'s one-migration scenario
(``tests/controller.py``: vm1 hostA -> hostB holding a 32 MiB memsum pattern), capped at
8 MiB/s, into which one fault lands at one moment:

* ``ctl-sigint``: Ctrl-C (SIGINT) to the controller;
* ``ctl-sigkill-recover``: SIGKILL, then ``migrate-run recover``, which must keep exactly one
  copy (memory checked), then ``recover --stop``;
* ``participant-killed``: hostB's sync participant SIGKILLed at one of the run's barriers.

Landing: the controller stops itself (``journal.stop_after``) right after the journal
record of its moment is durable; the fault is injected while it is stopped, then it is let
go (SIGCONT). Moments: ``setup`` (qemu: LISTENING, libvirt: PREPARING_DEST); ``precopy``
and ``postcopy`` are not stopped, since libvirt's managed migrate3 runs its steps (Finish3,
which resumes the destination) in the controller: the MIGRATING or POSTCOPY record, then
>= 2 MiB more received by hostB over its link (libvirt postcopy: and the destination's
domain says post-copy), then the fault, into the running controller; for the participant
the barriers ``disks_prepared``, ``migration_finished``, ``all_done``.

A run's own cleanup stops its VMs: after a SIGINT or a failed barrier no copy may be left,
and the memory of the copy the migration left is not readable (the run stopped it; the
engine-level cells and tests check it). After ``recover`` it is.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
from pathlib import Path

from migrator.config import Config, Inventory
from migrator.framework.journal import find_run
from migrator.framework.recover import recover
from migrator.hosts import SSHHost
from migrator.hypervisor import VMSpec, make_vm
from migrator.lab import Lab, processes
from tests.controller import Controller

CAP_MIBS = 8

# -- what each cell must end in, written before it runs ------------------------------------------
# (the migration's final phase in the run's report, or for recover what it did; where a copy
#  runs after it all; memory of that copy)
RUN_ENDS = (None, None)          # the run's cleanup stops its VMs: no copy, memory not read
CONTROLLER_EXPECTED: dict[str, dict[str, tuple]] = {
    # Ctrl-C: before the switchover the migration is rolled back; after it, it cannot be,
    # so the postcopy is finished and the VM lands on the destination; then the run's
    # cleanup stops it, and the run says "interrupted" (exit 130)
    "ctl-sigint": {"setup": ("ROLLED_BACK", *RUN_ENDS), "precopy": ("ROLLED_BACK", *RUN_ENDS),
                   "postcopy": ("LANDED", *RUN_ENDS)},
    # SIGKILL: nothing of the run's own cleanup runs; recover keeps the copy that holds the
    # VM (the source before the switchover, the destination after), memory intact
    "ctl-sigkill-recover": {"setup": ("RECOVERED", "source", "intact"),
                            "precopy": ("RECOVERED", "source", "intact"),
                            "postcopy": ("RECOVERED", "destination", "intact")},
    # hostB's participant dies at a barrier: the barrier fails naming hostB, the run fails
    # (exit 1) and cleans up. At disks_prepared (met while the first guest boots) nothing
    # was migrated yet (no migration record); at the later two the migration itself had
    # completed (CLEANED)
    "participant-killed": {"disks_prepared": ("no migration", *RUN_ENDS),
                           "migration_finished": ("CLEANED", *RUN_ENDS),
                           "all_done": ("CLEANED", *RUN_ENDS)},
}
# moments of the host faults the controller rows do not repeat, and why
CONTROLLER_NOT_APPLICABLE = {
    "precopy-late": "controller faults land at journal records, which mark phases, not "
                    "passes: a controller fault takes the same path in every precopy pass",
}


def controller_cells(drivers: list[str]):
    """(fault, moment, driver, expected) of every controller cell."""
    for fault, moments in CONTROLLER_EXPECTED.items():
        for moment, expected in moments.items():
            for d in drivers:
                yield fault, moment, d, expected


def received(lab: Lab, host: str) -> int:
    """Bytes sent into ``host`` over its link (the root side of its veth pair transmits what
    the host receives): the migration stream, mostly. (QEMU reads its stream with recvmsg,
    which its /proc io counters do not count.)"""
    veth = next(h.veth for h in lab.state().hosts if h.name == host)
    return int(Path(f"/sys/class/net/{veth}/statistics/tx_bytes").read_text())


async def wait_received(lab: Lab, more_than: int, timeout: float = 60) -> int:
    """Wait until hostB received ``more_than`` bytes more than now; return how many."""
    start = received(lab, "hostB")
    async with asyncio.timeout(timeout):
        while (n := received(lab, "hostB") - start) < more_than:
            await asyncio.sleep(0.05)
    return n


async def memsum(inv: Inventory, driver: str, host: str, run_id: str, config: Config) -> str:
    spec = VMSpec("vm1", kernel=str(inv.guest.kernel))
    async with SSHHost.from_inventory(host, inv, config) as h:
        vm = make_vm(driver, spec, h, f"{inv.run_dir}/{run_id}", config)
        try:
            out = await (await vm.wait_for_login(60)).cmd("memsum verify")
            return "intact" if "ok=1" in out else f"BAD ({out.strip()[:40]})"
        except Exception as exc:  # noqa: BLE001 - recorded
            return f"unreadable ({type(exc).__name__})"
        finally:
            vm._close_session()
            await vm.disconnect()


async def run_controller_cell(cell, lab: Lab, inv: Inventory, config: Config) -> None:
    """Run one controller cell; fill ``cell`` (observed, landed, memory, copies, named,
    error). Leaks are checked by the caller."""
    driver, fault, moment = cell.driver, cell.fault, cell.moment
    args: list[str] = []
    if fault == "participant-killed":
        stop = f"barrier:{moment}"
    elif moment == "setup":
        stop = "phase:LISTENING" if driver == "qemu" else "phase:PREPARING_DEST"
    elif moment == "precopy":
        stop = None     # not stopped: libvirt's migrate3 runs its steps in the controller
    else:
        stop, args = None, ["-p", "migration.postcopy_after_s=0"]
    with tempfile.TemporaryDirectory(prefix="mfault-ctl.") as tmp:
        args += ["-p", f"migration.bandwidth_mibs={CAP_MIBS}"]
        ctl = Controller(Path(tmp), lab.inventory_path, driver,
                         [*args, "-p", f"journal.stop_after={stop}"] if stop else args)
        await ctl.start()
        try:
            if stop:
                await ctl.wait_stopped()
                landed = stop.split(":", 1)[1]
            else:       # the phase's record, then bytes flowing: injected while it runs
                phase = "MIGRATING" if moment == "precopy" else "POSTCOPY"
                await ctl.wait_for(lambda r: r.get("event") == "phase"
                                   and r.get("phase") == phase)
                landed = f"{phase} + {await wait_received(lab, 2 * 2**20) / 2**20:.0f}MiB"
            if moment == "postcopy" and driver == "libvirt":
                async with SSHHost.from_inventory("hostB", inv, config) as b:
                    async with asyncio.timeout(60):
                        while "post-copy" not in (await b.run("virsh domstate --reason vm1")
                                                  ).stdout:
                            await asyncio.sleep(0.1)
                landed += " + dst post-copy"
            cell.landed = landed
            if fault == "ctl-sigint":
                ctl.signal(signal.SIGINT)
                ctl.signal(signal.SIGCONT)
                rc = await ctl.wait()
                cell.observed = _migration_phase(ctl) or f"exit {rc}"
                _named(cell, ctl, rc, want_rc=130)
            elif fault == "participant-killed":
                (pid,) = [p.pid for p in processes.host_processes(lab)
                          if p.host == "hostB" and processes.is_participant(p)]
                os.kill(pid, signal.SIGKILL)
                ctl.signal(signal.SIGCONT)
                rc = await ctl.wait()
                cell.observed = _migration_phase(ctl) or "no migration"
                out = ctl.output()
                named = rc == 1 and "hostB" in out and moment in out
                cell.named = "yes" if named else "no"
                cell.error = "; ".join(line.strip() for line in out.splitlines()
                                       if "barrier" in line)[:300]
            else:
                await ctl.kill()
                run_id = ctl.run_id()
                report = await recover(config.model_copy(update={"journal": config.journal
                                       .model_copy(update={"state_dir": ctl.state})}),
                                       run_id)
                cell.error = report.table()
                (o,) = report.outcomes
                cell.observed = "RECOVERED" if o.problem is None else "UNRESOLVED"
                cell.named = "-"
                copies = [p.host for p in processes.vm_processes(lab, "vm1")]
                cell.copies = copies
                if len(copies) == 1:
                    cell.memory = await memsum(inv, driver, copies[0], run_id, config)
                stopped = await recover(config.model_copy(update={"journal": config.journal
                                        .model_copy(update={"state_dir": ctl.state})}),
                                        run_id, stop=True)
                if not stopped.ok or find_run(ctl.state, run_id) is not None:
                    cell.leaks.append(f"recover --stop did not end the run: {stopped.table()}")
                return
            cell.copies = [p.host for p in processes.vm_processes(lab, "vm1")]
        finally:
            if ctl.proc is not None and ctl.proc.returncode is None:
                ctl.signal(signal.SIGCONT)
                await ctl.kill()
                cell.leaks.append("controller did not end by itself")


def _migration_phase(ctl: Controller) -> str | None:
    found = list(ctl.results.glob("*/migrations/*.json"))
    if not found:
        return None
    return json.loads(found[0].read_text()).get("phase")


def _named(cell, ctl: Controller, rc: int, want_rc: int) -> None:
    found = list(ctl.results.glob("*/migrations/*.json"))
    error = json.loads(found[0].read_text()).get("error") or "" if found else ""
    cell.error = error[:400] + f" (exit {rc})"
    named = rc == want_rc and all(x in error for x in ("hostA", "hostB", "vm1", "["))
    cell.named = "yes" if named else "no"


__all__ = ["CONTROLLER_EXPECTED", "CONTROLLER_NOT_APPLICABLE", "controller_cells",
           "run_controller_cell"]
