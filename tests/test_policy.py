"""The convergence policy (issue 18, part 1).

The tracker's rules, fed progress records on a clock of the test's choosing; then each
action carried out by each driver on real migrations of a lab guest that cannot converge
(it dirties memory many times faster than the capped link sends it), with the memory checksum
and the dirtier's stale-page count on the side it lands on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from migrator.config import ConvergencePolicy
from migrator.errors import MigrationError
from migrator.migration import MigrationParams, Phase, make_migration
from migrator.migration.engine import ProgressRecord
from migrator.migration.oracles import dirtier_report, wait_dirtying, wait_tick_after
from migrator.migration.policy import PolicyTracker
from migrator.report.results import policy_steps

from . import test_drivers

#: the driver contract's fixtures: a lab guest on hostA through each driver, leak-checked
#: (``hosts`` comes from conftest)
vm, vm_mac, vm_net = test_drivers.vm, test_drivers.vm_mac, test_drivers.vm_net

MIB = 2**20


def rec(iteration: int, remaining_mib: float, throttle: int = 0,
        status: str = "active") -> ProgressRecord:
    return ProgressRecord(t=0, status=status, transferred=64 * MIB,
                          remaining=int(remaining_mib * MIB), total=128 * MIB,
                          dirty_pages_rate=5000, mbps=64.0, iteration=iteration,
                          expected_downtime_ms=0, cpu_throttle=throttle)


# -- the rules -------------------------------------------------------------------------------

def test_default_policy_aborts_at_the_completion_limit_at_once_mid_pass():
    """Today's behaviour kept: 600 s + 60 s/GiB, then abort, without waiting for the pass."""
    t = PolicyTracker(ConvergencePolicy(), 1024, t0=0.0)
    assert t.step(rec(1, 50), now=659.0) == []
    (d,) = t.step(rec(1, 40), now=660.0)           # same pass: abort does not wait
    assert (d.trigger, d.action, d.t) == ("completion", "abort", 660.0)
    assert "limit 660 s" in d.reason
    assert t.done and t.step(rec(2, 40), now=2000.0) == []


def test_progress_limit_escalates_at_iteration_boundaries_and_restarts_the_clocks():
    policy = ConvergencePolicy(progress_timeout_s=10, actions=["auto-converge", "postcopy"])
    t = PolicyTracker(policy, 128, t0=0.0)
    assert t.step(rec(1, 100), now=1) == []        # lowest so far: 100 MiB at 1 s
    assert t.step(rec(1, 90), now=2) == []         # a new low at 2 s
    assert t.step(rec(2, 95), now=11.9) == []      # 9.9 s without a new low
    assert t.step(rec(2, 95), now=12.0) == []      # passed, mid-pass: waits for the boundary
    (d,) = t.step(rec(3, 96), now=12.5)
    assert (d.trigger, d.action, d.iteration) == ("progress", "auto-converge", 3)
    assert "not lower for 10.5 s" in d.reason and "lowest 90 MiB" in d.reason
    assert t.step(rec(4, 99), now=13.0) == []      # the clocks started again: a first low
    assert t.step(rec(5, 99), now=22.9) == []
    (d,) = t.step(rec(6, 99), now=23.0)
    assert d.action == "postcopy" and t.in_postcopy and not t.done


def test_a_long_pass_is_not_waited_for_beyond_a_tenth_of_the_limit():
    policy = ConvergencePolicy(completion_s=100, completion_s_per_gib=0,
                               actions=["auto-converge", "abort"])
    t = PolicyTracker(policy, 128, t0=0.0)
    assert t.step(rec(1, 60), now=50) == []        # the first pass begins
    assert t.step(rec(1, 50), now=100) == []       # passed mid-pass
    assert t.step(rec(1, 50), now=109.9) == []
    (d,) = t.step(rec(1, 50), now=110)             # a tenth of 100 s later: taken anyway
    assert d.action == "auto-converge"


def test_a_limit_passed_after_pause_aborts():
    policy = ConvergencePolicy(completion_s=10, completion_s_per_gib=0, actions=["pause"])
    t = PolicyTracker(policy, 128, t0=0.0)
    (d,) = t.step(rec(2, 50), now=10)
    assert d.action == "pause" and t.paused
    (d,) = t.step(rec(3, 50), now=20)
    assert d.action == "abort" and "after the guest was paused" in d.reason


def test_downtime_ramp_follows_novas_steps():
    policy = ConvergencePolicy(downtime_ramp={"max_ms": 500, "steps": 10,
                                              "delay_s_per_gib": 75})
    t = PolicyTracker(policy, 2048, t0=0.0)        # 150 s per step for 2 GiB
    assert t.initial_downtime_ms() == 50           # max / steps
    assert t.step(rec(1, 100), now=149) == []
    (d,) = t.step(rec(1, 100), now=150)
    assert (d.trigger, d.action, d.downtime_ms) == ("downtime-ramp", "downtime", 95)
    assert "step 1 of 10" in d.reason
    steps = [x.downtime_ms for x in t.step(rec(9, 100), now=10_000) if x.action == "downtime"]
    assert steps == [140, 185, 230, 275, 320, 365, 410, 455, 500]


def test_in_postcopy_only_the_completion_limit_applies_and_it_gives_up():
    policy = ConvergencePolicy(completion_s=10, completion_s_per_gib=0, progress_timeout_s=1,
                               actions=["auto-converge", "postcopy"])
    t = PolicyTracker(policy, 128, t0=0.0)
    assert t.step(rec(1, 10, status="postcopy-active"), now=5, postcopy=True) == []
    assert t.step(rec(1, 10, status="postcopy-active"), now=9.9, postcopy=True) == []
    (d,) = t.step(rec(1, 10, status="postcopy-active"), now=10, postcopy=True)
    assert (d.trigger, d.action) == ("completion", "abort") and d.reason.endswith("in postcopy")


@pytest.mark.parametrize("override, message", [
    ("migration.policy.actions=[auto-converge]",
     "ends without an action that ends the migration"),
    ("migration.policy.actions=[abort,pause]", "'pause' can never be taken after 'abort'"),
    ("migration.policy.actions=[slow-down,abort]", "unknown action 'slow-down'"),
    ("migration.policy.progress_timeout_s=0", "greater than 0"),
    ("timeouts.migration_stall_s=5", "is now migration.policy.stall_s"),
    # (not the policy's: a removed key named with why, as the moved ones are)
    ("timeouts.report_page_s=60", "timeouts.report_page_s is gone: report.html is drawn by "
                                  "migrate-run itself"),
])
def test_a_bad_policy_is_one_line_and_exit_2_before_anything_starts(override, message):
    r = subprocess.run([str(Path(sys.executable).parent / "migrate-run"), "-m", "hostA,hostB",
                        "-p", override, "ping_pong"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_postcopy_in_the_policy_with_multifd_is_refused():
    with pytest.raises(Exception, match="multifd_channels and the policy action 'postcopy'"):
        MigrationParams(multifd_channels=2, policy={"actions": ["postcopy"]})


# -- each action, carried out by each driver ------------------------------------------------

DRIVERS = ["qemu", "libvirt"]


@pytest.fixture
def guest_args():
    """The guest dirties 32 MiB without a break: many times what the capped link sends."""
    return "lab.dirty=32"


async def _with_pattern(vm):
    session = await vm.wait_for_login()
    await session.cmd("memsum write 16 7")
    await wait_dirtying(vm, 60)
    return session


def _migration(vm, hosts, inventory, **params):
    return make_migration(vm, hosts["hostB"], inventory.hosts["hostB"].address,
                          MigrationParams(**params), vm.config)


async def _landed_whole(m, vm) -> None:
    """The VM runs on hostB with its memory intact and no stale page, and its clock ticks."""
    assert m.phase is Phase.CLEANED and vm.host.name == "hostB"
    session = await vm.wait_for_login()
    assert (await session.cmd("memsum verify")).split()[-1] == "ok=1"
    await wait_tick_after(vm, None, 60)
    await wait_dirtying(vm, 60)                 # its first report there
    assert (await dirtier_report(vm))[1] == 0


@pytest.mark.parametrize("vm", DRIVERS, indirect=True)
async def test_auto_converge_is_held_until_the_policy_releases_it_then_postcopy(
        vm, hosts, inventory):
    """[auto-converge, postcopy] on 8 s windows: QEMU's throttle stays at its 1 % floor until
    the first limit, rises after it (QEMU raises it at each pass), and the second limit
    switches to postcopy; the downtime ramp's steps go out on their times."""
    await _with_pattern(vm)
    m = _migration(vm, hosts, inventory, bandwidth_mibs=16, policy={
        "completion_s": 8, "completion_s_per_gib": 0, "actions": ["auto-converge", "postcopy"],
        "downtime_ramp": {"max_ms": 400, "steps": 4, "delay_s_per_gib": 16}})
    result = await m.run()
    actions = [(d["trigger"], d["action"]) for d in result.decisions]
    assert [a for a in actions if a[1] != "downtime"] == [("completion", "auto-converge"),
                                                          ("completion", "postcopy")]
    ramp = [d["downtime_ms"] for d in result.decisions if d["action"] == "downtime"]
    assert len(ramp) >= 2 and ramp == [175, 250, 325, 400][:len(ramp)]   # 2 s apart
    released = next(d["t"] for d in result.decisions if d["action"] == "auto-converge")
    assert max(r.cpu_throttle for r in m.records if r.t < released) <= 1
    assert max(r.cpu_throttle for r in m.records) > 1, "the throttle never rose"
    assert result.postcopy_switched
    switched = next(d["t"] for d in result.decisions if d["action"] == "postcopy")
    assert policy_steps(result.to_json()).split() == [f"auto-converge@{released:.0f}s",
                                                      f"postcopy@{switched:.0f}s"]
    await _landed_whole(m, vm)
    await vm.stop()


@pytest.mark.parametrize("vm", DRIVERS, indirect=True)
async def test_pause_forces_completion_and_the_guest_runs_again_on_the_destination(
        vm, hosts, inventory):
    """[pause, abort]: the guest is stopped at the limit, the rest is sent while it does not
    run, and the destination is resumed; the guest's downtime counts from the pause."""
    await _with_pattern(vm)
    m = _migration(vm, hosts, inventory, bandwidth_mibs=16, policy={
        "completion_s": 5, "completion_s_per_gib": 0, "actions": ["pause", "abort"]})
    result = await m.run()
    (pause,) = result.decisions
    assert pause["action"] == "pause" and pause["trigger"] == "completion"
    # the guest stood still from the pause until the destination ran it (QEMU's own downtime
    # leaves the pause out; libvirt's counts it)
    assert result.downtime_events_ms is not None
    assert result.downtime_events_ms >= (result.wall_s - pause["t"]) * 1000 - 250
    await _landed_whole(m, vm)
    await vm.stop()


@pytest.mark.parametrize("vm", ["libvirt"], indirect=True)
async def test_progress_limit_then_abort_rolls_back_with_the_reason(vm, hosts, inventory):
    """[abort] on a 2 s progress limit: rolled back, VM intact on its source, the error
    names the limit with host, VM and phase."""
    session = await _with_pattern(vm)
    m = _migration(vm, hosts, inventory, bandwidth_mibs=8, policy={"progress_timeout_s": 2})
    with pytest.raises(MigrationError, match=r"hostA->hostB \[MIGRATING\]: convergence "
                       r"policy: remaining bytes not lower for [\d.]+ s \(limit 2 s"):
        await m.run()
    assert m.phase is Phase.ROLLED_BACK and vm.host.name == "hostA"
    assert [d["trigger"] for d in m.result.decisions] == ["progress"]
    assert (await session.cmd("memsum verify")).split()[-1] == "ok=1"
    await wait_tick_after(vm, None, 60)
    await vm.stop()


def test_the_released_throttle_is_the_policys():
    params = MigrationParams(policy={"actions": ["auto-converge", "abort"],
                                     "throttle_initial": 50, "throttle_increment": 25})
    assert params.capabilities()["auto-converge"] and params.source_parameters()[
        "max-cpu-throttle"] == 1                                  # held until released
    assert params.throttle_on() == {"cpu-throttle-initial": 50, "cpu-throttle-increment": 25,
                                    "max-cpu-throttle": 99}
    # QEMU's own rule had started the held throttle (1 %): QEMU then raises it by the
    # increment instead of starting at the initial, so the first step is made to reach 50 %
    # (seen in bench/converge.py: released at 1 %, QEMU went to 26 %), then the policy's
    assert params.throttle_on(1) == {"cpu-throttle-initial": 50, "cpu-throttle-increment": 49,
                                     "max-cpu-throttle": 99}
    assert params.throttle_caught_up() == {"cpu-throttle-increment": 25}
    assert params.throttle_on(60)["cpu-throttle-increment"] == 25
