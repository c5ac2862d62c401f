"""Autotest's multi-host example, pasted, run by ``migrate-run`` on the session lab: its ``def``
scenario and callbacks in worker threads, ``mig.join()``, ``self.params.get("hosts")``, the
control file's own ``mig = TestX(test, params, env); mig.run()``, on 4 hosts (two pairs) and
with ``-a all``; the same scenario made ``async def``, whose ``time.sleep(20)`` is reported
naming its line; a ``def migrate_vms_src`` hook migrating with ``vm.migrate``, and
``self.exchange``. Without a lab: tests/test_blocking.py."""

import asyncio
import json
import textwrap
from pathlib import Path

from .test_framework import migrate_run, the_run

SEED = Path(__file__).parent / "scenarios" / "autotest_seed.py"


def seed_made_async(path: Path) -> Path:
    """The seed with ``async def migration_scenario`` and ``await`` before the two calls that
    wait (``migrate_wait``, ``join``), written to ``path``; nothing else changed: its def
    callbacks and its ``time.sleep(20)`` stay."""
    text = SEED.read_text()
    for old, new in [("    def migration_scenario(self):", "    async def migration_scenario(self):"),
                     ("        self.migrate_wait([", "        await self.migrate_wait(["),
                     ("        mig2.join()", "        await mig2.join()"),
                     ("        mig1.join()", "        await mig1.join()")]:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


def line_of(path: Path, text: str) -> int:
    (n,) = [i for i, ln in enumerate(path.read_text().splitlines(), 1) if text in ln]
    return n


def seed_migrations(migs: list[dict], instance: str, hosts: list[str]) -> None:
    """What the seed does on one pair: vm1 and vm2 together, then vm1 and vm2 again (each
    booted afresh on the source: Autotest's preparation), all from the first host."""
    src, dst = hosts
    mine = [(m["mig_id"], m["vm"], m["src"], m["dst"], m["status"]) for m in migs
            if m["mig_id"].startswith(instance + "-")]
    assert sorted(mine) == [(f"{instance}-1", "vm1", src, dst, "completed"),
                            (f"{instance}-1", "vm2", src, dst, "completed"),
                            (f"{instance}-2", "vm1", src, dst, "completed"),
                            (f"{instance}-3", "vm2", src, dst, "completed")], mine


async def test_the_autotest_seed_pasted_on_four_hosts_and_made_async_with_dash_a_all(
        inventory, tmp_path, no_leaks):
    """Two runs at once (each waits out the seed's ``time.sleep(20)``; runs are isolated):

    (a) the seed as pasted: two pairs, the control file executed once for each. The worker
    starts dd on vm1 and check_worker kills it on the destination (``killall -9 dd`` fails if
    dd is not running there), so a green run proves the def callbacks ran on the right VMs.
    The sleep runs in its worker thread: the event loop is never blocked.

    (b) the seed made async, with ``-a all`` on two hosts: in async code the sleep blocks the
    event loop (every migration in flight stops being driven): the run still passes, and
    says where it was blocked."""
    seed_async = seed_made_async(tmp_path / "seed_async.py")
    (rc, out, err), (rc_b, out_b, err_b) = await asyncio.gather(
        migrate_run(inventory, tmp_path / "a", "-m", "hostA,hostB,hostC,hostD", str(SEED)),
        migrate_run(inventory, tmp_path / "b", "-a", "all", "-m", "hostA,hostB",
                    str(seed_async)))
    # (a)
    assert rc == 0, out + err
    run, migs, junit = the_run(tmp_path / "a")
    assert run["class"] == "TestMultihostMigration" and run["verdict"] == "passed"
    assert run["instances_hosts"] == {"pair1": ["hostA", "hostB"], "pair2": ["hostC", "hostD"]}
    seed_migrations(migs, "pair1", ["hostA", "hostB"])
    seed_migrations(migs, "pair2", ["hostC", "hostD"])
    assert run["warnings"] == [], run["warnings"]
    # vm1 and vm2 were on the destination when migrated again from the source: said so
    assert out.count("stopped there, to boot afresh on") == 4, out
    # (b)
    assert rc_b == 0, out_b + err_b
    run, migs, _ = the_run(tmp_path / "b")
    assert run["instances_hosts"] == {"all": ["hostA", "hostB"]} and run["all_hosts"]
    seed_migrations(migs, "all", ["hostA", "hostB"])
    where = f"{seed_async}:{line_of(seed_async, 'time.sleep(20)')} (migration_scenario)"
    (warning,) = run["warnings"]
    assert "the event loop was blocked for " in warning and where in warning, warning
    seconds = float(warning.split("blocked for ")[1].split(" s ")[0])
    assert 19 < seconds < 40, warning
    assert f"WARNING: {warning}" in out_b


async def test_a_def_hook_migrates_with_vm_migrate_and_hosts_exchange_data(
        inventory, tmp_path, no_leaks):
    scenario = tmp_path / "hooks.py"
    scenario.write_text(textwrap.dedent('''
        from migrator import MultihostMigration


        class Hooks(MultihostMigration):
            def migrate_vms_src(self, mig_data):        # the seed's override, as a def
                vm = mig_data.vms[0]
                vm.migrate(mig_data.dst, mig_data.vm_ports)

            async def migration_scenario(self):
                a, b = self.params.get("hosts")
                got = await self.exchange("roles", {a: {"role": "src"}, b: [1, 2]})
                self.context.say(f"exchanged {got}")
                md = await self.migrate_wait(["vm1"], a, b)
                self.context.say(f"vm1 on {md.vms[0].host.name}: {md.results['vm1'].status}")
        '''))
    rc, out, err = await migrate_run(inventory, tmp_path / "r", "-m", "hostA,hostB",
                                     str(scenario))
    assert rc == 0, out + err
    assert "exchanged {'hostA': {'role': 'src'}, 'hostB': [1, 2]}" in out, out
    assert "vm1 on hostB: completed" in out, out
    run, migs, _ = the_run(tmp_path / "r")
    assert [(m["vm"], m["status"]) for m in migs] == [("vm1", "completed")]
    journal = [json.loads(ln) for ln in
               (tmp_path / "r" / run["run_id"] / "journal.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "exchange" and r["name"] == "roles" for r in journal)


async def test_an_async_scenario_that_forgets_await_fails_naming_the_line(
        inventory, tmp_path, no_leaks):
    scenario = tmp_path / "forgot.py"
    scenario.write_text(textwrap.dedent('''
        from migrator import MultihostMigration


        class Forgot(MultihostMigration):
            async def migration_scenario(self):
                self.migrate_wait(["vm1"], self.hosts[0], self.hosts[1])
        '''))
    rc, out, err = await migrate_run(inventory, tmp_path / "r", "-m", "hostA,hostB",
                                     str(scenario))
    assert rc == 1, out + err
    run, migs, _ = the_run(tmp_path / "r")
    assert migs == []
    (inst,) = run["instances"]
    assert inst["error"] == (
        f"ScenarioError: [pair1] never awaited: migrate_wait() at {scenario}:"
        f"{line_of(scenario, 'self.migrate_wait')}. In an async def migration_scenario each "
        "call that waits needs await (await self.migrate_wait(...), await handle.join()); or "
        "write migration_scenario as a plain def: it then runs in a worker thread, where these "
        "calls block"), inst["error"]
