"""``migrate-run compare`` (issue 23): a run slowed on purpose (a bandwidth cap) is flagged
as a regression, metric by metric; two runs of the same build pass within the noise; and
the same through a saved baseline, as CI would use it. (The runs are QEMU 10 to QEMU 10:
their recorded versions are checked here too.)"""

import asyncio
import re

from .conftest import BIN
from .test_framework import migrate_run, the_run


async def compare(*args: str, cwd=None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "compare", *args, cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    return proc.returncode, out.decode()


def run_dir(results):
    (d,) = list(results.iterdir())
    return str(d)


async def test_a_capped_run_is_a_regression_and_the_same_build_is_not(inventory, tmp_path,
                                                                       no_leaks):
    dirs = {}
    for name, cap in (("a", 64), ("a2", 64), ("slow", 24)):
        rc, out, err = await migrate_run(inventory, tmp_path / name, "-m", "hostA,hostB",
                                         "ping_pong", "-p", "scenario.rounds=1",
                                         "-p", f"migration.bandwidth_mibs={cap}")
        assert rc == 0, out + err
        dirs[name] = run_dir(tmp_path / name)
    # what ran, recorded: the same QEMU on both ends, the machine type resolved
    run, migs, junit = the_run(tmp_path / "a")
    for host in ("hostA", "hostB"):
        assert run["versions"]["hosts"][host]["qemu"]["version"].startswith("10."), run
        assert run["versions"]["hosts"][host]["kernel"], run
    assert run["versions"]["migrator"], run
    for m in migs:
        assert m["qemu"]["src"]["version"] == m["qemu"]["dst"]["version"], m["qemu"]
        assert re.fullmatch(r"pc-i440fx-\d+\.\d+", m["machine"]), m["machine"]
    # the same build, twice: within the noise
    rc, out = await compare(dirs["a"], dirs["a2"])
    assert rc == 0 and out.rstrip().endswith("no regression"), out
    # capped: slower and thinner, on both routes, each named
    rc, out = await compare(dirs["a"], dirs["slow"])
    assert rc == 1, out
    for route in ("hostA->hostB", "hostB->hostA"):
        assert re.search(rf"^ping_pong {route} vm1 +total time +[\d,]+ .*REGRESSION \(> 1\.25x",
                         out, re.M), out
        assert re.search(rf"^ping_pong {route} vm1 +throughput +.*REGRESSION \(< 0\.8x", out,
                         re.M), out
        assert re.search(rf"^ping_pong {route} vm1 +completed +1/1 +1/1 +- +ok$", out, re.M), out
    assert re.search(r"^\d+ regression\(s\)$", out, re.M), out
    # the other way round it is better, not a regression
    rc, out = await compare(dirs["slow"], dirs["a"])
    assert rc == 0 and re.search(r"total time .* better$", out, re.M), out
    # through a baseline (compare.baselines_dir, relative to where it runs)
    rc, out = await compare("--baseline", "save", "nightly", dirs["a"], cwd=tmp_path)
    assert rc == 0 and "baseline nightly: results/baselines/nightly" in out, out
    assert (tmp_path / "results" / "baselines" / "nightly" / "run.json").is_file()
    rc, out = await compare("--baseline", "nightly", dirs["slow"], cwd=tmp_path)
    assert rc == 1 and "REGRESSION" in out, out
    rc, out = await compare("--baseline", "nightly", dirs["a2"], cwd=tmp_path)
    assert rc == 0, out


async def test_bad_input_is_one_line_and_exit_2(tmp_path):
    for args, message in (
            ([str(tmp_path)], "compare RUN_A RUN_B"),
            ([str(tmp_path), str(tmp_path)], "not a run's results directory"),
            (["--baseline", "nope", str(tmp_path)], "no baseline 'nope'"),
            (["--baseline", "save", "../x", str(tmp_path)], "not a run's results directory"),
            (["-p", "compare.ratios.total_time_ms=0.5", str(tmp_path), str(tmp_path)],
             "at least 1 for times"),
            (["-p", "compare.slack.nope=1", str(tmp_path), str(tmp_path)],
             "unknown metric(s) nope")):
        rc, out = await compare(*args, cwd=tmp_path)
        assert rc == 2 and out.count("\n") == 1 and message in out, (args, out)
