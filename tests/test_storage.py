"""Live migration without shared storage: the disk migrates with the VM
(``migration.storage: copy-all | copy-incremental``), through both drivers, between lab hosts
that each have their own disk directory (``<lab>/local``: the same path on every host, a
different directory behind it on each).

The oracle is the guest's own: ``diskcheck`` writes sequence-stamped blocks through O_DIRECT
without pause while the disk is copied and the memory migrates, and on the destination every
block must hold the last stamp the guest wrote to it (and a block it never wrote, what the
disk held at the start). Every test ends with no QEMU, run dir, domain or disk file left.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from migrator.errors import MigrationError
from migrator.hypervisor import make_vm
from migrator.hypervisor.vm import VMSpec
from migrator.migration import MigrationParams, Phase, make_migration

from .conftest import running
from .controller import Controller, recover_cli
from .test_drivers import leftovers

#: the guest's oracle: 32 MiB of the disk, rewritten at 4 MiB/s
ORACLE = "diskcheck write /dev/vda 32 4"


def local(lab, host: str) -> Path:
    """Host ``host``'s own disk directory, as the controller reaches it."""
    return lab.host_dir(host) / "local"


def make_base(path: Path) -> None:
    """A 64 MiB qcow2 with 8 MiB of data (what an incremental copy must find on the
    destination, and a full copy must carry over)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 8M", str(path)], check=True,
                   stdout=subprocess.DEVNULL)


def disk_spec(inventory, name: str, disk: str) -> VMSpec:
    return VMSpec(name, kernel=str(inventory.guest.kernel), initrd=str(inventory.guest.initrd),
                  append=f"{inventory.guest.append} lab.out=ttyS1", disk=disk)


@pytest.fixture
async def disk_vm(request, lab, hosts, inventory, config):
    """``(driver, mode) -> VM`` started on hostA with its disk on hostA's own storage: a
    fresh 64 MiB qcow2 (``copy-all``), or an overlay over a base image that every host has
    (``copy-incremental``). Afterwards: nothing of it left anywhere, disk files included."""
    made: list = []
    base = "inc-base.qcow2"

    async def make(driver: str, mode: str):
        name = f"s{driver[0]}{mode[5]}"
        disk = f"{inventory.local_dir}/{name}.qcow2"
        a_disk = local(lab, "hostA") / f"{name}.qcow2"
        if mode == "copy-incremental":
            make_base(local(lab, "hostA") / base)
            shutil.copyfile(local(lab, "hostA") / base, local(lab, "hostB") / base)
            # made here, where the base's path (as hosts see it) does not resolve: -u
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-u", "-b",
                            f"{inventory.local_dir}/{base}", str(a_disk), "64M"], check=True)
        else:
            make_base(a_disk)
        vm = make_vm(driver, disk_spec(inventory, name, disk), hosts["hostA"],
                     str(inventory.run_dir), config)
        made.append((driver, vm))
        await vm.start()
        return vm
    yield make
    own = set()         # each VM's own disk, where it runs now: every other file is a leak
    for driver, vm in made:
        own.add(f"{vm.host.name}: {Path(vm.spec.disk).name}")
        await vm.stop()
        for h in ("hostA", "hostB"):
            await make_vm(driver, vm.spec, hosts[h], str(inventory.run_dir), config).stop()
    left = await leftovers(lab, hosts, inventory)
    files = [f"{h}: {p.name}" for h in ("hostA", "hostB") for p in local(lab, h).iterdir()
             if p.name != base and f"{h}: {p.name}" not in own]
    for h in ("hostA", "hostB"):
        for p in local(lab, h).iterdir():
            p.unlink()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.passed:
        assert left == [] and files == [], f"left behind: {left + files}"


def exports(ss: str, address: str) -> list[str]:
    """The listening sockets on ``address`` in ``ss -Hltn`` output, but sshd's."""
    return [line for line in ss.splitlines()
            if f" {address}:" in line and f" {address}:22 " not in line]


def writes(status: str) -> int:
    return int(re.search(r"writes=(\d+)", status).group(1))


async def source_nodes(vm) -> list[str]:
    """The qemu driver's source: the names of its block nodes and jobs (none of the disk
    copy's may be left after a rollback)."""
    qmp = await vm.qmp()
    nodes = [n.get("node-name", "") for n in
             await qmp.execute("query-named-block-nodes", {"flat": True})]
    return nodes + [j["device"] for j in await qmp.execute("query-block-jobs")]


CASES = [("qemu", "copy-all", False), ("qemu", "copy-incremental", True),
         ("libvirt", "copy-all", True), ("libvirt", "copy-incremental", False)]


@pytest.mark.parametrize("driver, mode, tls", CASES,
                         ids=[f"{d}-{m}{'-tls' if t else ''}" for d, m, t in CASES])
async def test_the_disk_moves_with_the_vm_and_every_write_arrives(
        lab, hosts, inventory, config, disk_vm, driver, mode, tls):
    """While the guest writes stamped blocks without pause, its disk is copied to hostB
    (over TLS in two of the cases) and the VM moves: on hostB every block holds its last
    stamp, the guest wrote during the move, the disk is on hostB only; and back to hostA."""
    vm = await disk_vm(driver, mode)
    session = await vm.wait_for_login()
    assert "DISKCHECK started blocks=8192" in await session.cmd(ORACLE)
    before = writes(await session.cmd("diskcheck status"))
    result = await make_migration(vm, hosts["hostB"], inventory.hosts["hostB"].address,
                                  MigrationParams(storage=mode, tls=tls), config).run()
    assert result.phase == "CLEANED" and vm.host.name == "hostB"
    assert result.storage == mode and result.disk_size == 64 << 20
    assert result.mirror_s is not None and result.disk_bytes > 0
    assert result.source_disk_removed is True
    if driver == "qemu":
        assert "MIRRORING" in [p for p, _m, _w in result.phases]
    checked = await session.cmd("diskcheck verify")
    assert "ok=1" in checked and " bad=0 " in checked, checked
    assert writes(checked) > before                     # it wrote while it moved
    name = Path(vm.spec.disk).name
    assert not (local(lab, "hostA") / name).exists() and (local(lab, "hostB") / name).exists()
    if mode == "copy-incremental":                      # only the overlay moved
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(local(lab, "hostB") / name)],
            capture_output=True, text=True, check=True).stdout)
        assert info["backing-filename"].endswith("inc-base.qcow2")
        assert result.disk_bytes < 32 << 20           # not the base's 8 MiB plus everything
    # and back: the other direction, onto the host whose copy was removed
    mid = writes(checked)
    back = await make_migration(vm, hosts["hostA"], inventory.hosts["hostA"].address,
                                MigrationParams(storage=mode, tls=tls), config).run()
    assert back.phase == "CLEANED" and vm.host.name == "hostA"
    checked = await session.cmd("diskcheck verify")
    assert "ok=1" in checked and writes(checked) > mid, checked
    assert (local(lab, "hostA") / name).exists() and not (local(lab, "hostB") / name).exists()


@pytest.mark.parametrize("driver", ["qemu", "libvirt"])
async def test_a_cancelled_disk_copy_leaves_the_source_whole_and_the_destination_clean(
        lab, hosts, inventory, config, disk_vm, driver):
    """Cancelled while the disk is being copied (capped at 2 MiB/s, 24 MiB of it written by
    the guest first): rolled back; the VM runs on hostA with every block right; hostB has no
    disk file and no listening export; the source QEMU kept nothing of the copy; a second
    migration then succeeds. (qemu: over TLS, and meanwhile the export refuses a client
    without it.)"""
    vm = await disk_vm(driver, "copy-all")
    session = await vm.wait_for_login()
    await session.cmd("dd if=/dev/urandom of=/dev/vda bs=1M seek=40 count=24 oflag=direct "
                      "2>/dev/null")
    await session.cmd(ORACLE)
    m = make_migration(vm, hosts["hostB"], inventory.hosts["hostB"].address,
                       MigrationParams(storage="copy-all", bandwidth_mibs=2,
                                       tls=driver == "qemu"), config)

    def copying() -> bool:
        if driver == "qemu":        # the mirror's progress, as the driver polls it
            return m.phase is Phase.MIRRORING and m._mirror.offset > 0
        return bool(m.records) and m.records[-1].disk_transferred > 0

    async with running(m.run()) as task:
        while not copying():
            assert not task.done(), task
            await asyncio.sleep(0.05)
        if driver == "qemu":
            plain = await hosts["hostB"].run(
                "qemu-img info --image-opts driver=nbd,server.type=inet,server.host="
                f"{inventory.hosts['hostB'].address},server.port={m._nbd_port},"
                "export=migrator-disk0")
            assert not plain.ok and "TLS" in plain.stderr, plain
        m.cancel("test")
        with pytest.raises(MigrationError, match="cancelled: test") as info:
            await task
    assert m.phase is Phase.ROLLED_BACK and vm.host.name == "hostA"
    outcome = info.value.outcome
    assert "VM running on hostA" in outcome and "destination disk" in outcome, outcome
    name = Path(vm.spec.disk).name
    assert not (local(lab, "hostB") / name).exists()
    listening = (await hosts["hostB"].run("ss -Hltn", check=True)).stdout
    assert exports(listening, inventory.hosts["hostB"].address) == [], listening
    if driver == "qemu":
        assert not [n for n in await source_nodes(vm) if n.startswith("migrator-")]
    checked = await session.cmd("diskcheck verify")
    assert "ok=1" in checked, checked
    again = await make_migration(vm, hosts["hostB"], inventory.hosts["hostB"].address,
                                 MigrationParams(storage="copy-all"), config).run()
    assert again.phase == "CLEANED"
    assert "ok=1" in await session.cmd("diskcheck verify")


@pytest.mark.parametrize("driver", ["qemu", "libvirt"])
async def test_a_disk_copy_that_cannot_be_made_is_refused_before_anything_moves(
        lab, hosts, inventory, config, disk_vm, driver):
    """A file already at the disk's path on hostB is never overwritten; an incremental copy
    whose backing image hostB lacks is refused. Both before the destination is started:
    the error names VM, hosts and phase, and the VM runs on hostA untouched."""
    vm = await disk_vm(driver, "copy-incremental")
    name = Path(vm.spec.disk).name
    (local(lab, "hostB") / "inc-base.qcow2").unlink()
    with pytest.raises(MigrationError) as info:
        await make_migration(vm, hosts["hostB"], inventory.hosts["hostB"].address,
                             MigrationParams(storage="copy-incremental"), config).run()
    err = info.value
    assert (err.phase, err.vm, err.dst) == ("PREPARING_DEST", vm.name, "hostB")
    assert "backing image" in err.message and "not on hostB" in err.message, err.message
    assert "VM running on hostA" in err.outcome and vm.host.name == "hostA"
    (local(lab, "hostB") / name).write_text("someone else's")
    with pytest.raises(MigrationError, match="a file is already at .* on hostB: not "
                                             "overwritten") as info:
        await make_migration(vm, hosts["hostB"], inventory.hosts["hostB"].address,
                             MigrationParams(storage="copy-all"), config).run()
    assert info.value.phase == "PREPARING_DEST"
    assert (local(lab, "hostB") / name).read_text() == "someone else's"
    (local(lab, "hostB") / name).unlink()
    assert await vm.status() == "running" and "ok" in await (await vm.wait_for_login()).cmd(
        "dd if=/dev/vda bs=1M count=1 2>/dev/null | wc -c && echo ok")


COPY_ALL = ["-p", "migration.storage=copy-all"]


@pytest.mark.parametrize("driver", ["qemu", "libvirt"])
async def test_sigkill_while_the_disk_is_mirrored_then_recover_removes_the_copy(
        lab, inventory, tmp_path, no_leaks, driver):
    """A run without shared storage (an inventory with no shared_dir): vm1's overlay on
    hostA's own disk, the controller SIGKILLed while migrating (the disk mirror running,
    the destination exporting its new disk). ``recover`` keeps vm1 on hostA with its memory
    intact and removes the destination's disk copy and export; ``--stop`` then removes the
    rest (the overlay, on every host)."""
    inv = yaml_without_shared(inventory, tmp_path)
    base = local(lab, "hostA") / "run-base.qcow2"
    make_base(base)
    try:
        ctl = Controller(tmp_path, inv, driver, [
            *COPY_ALL, "-p", "migration.bandwidth_mibs=4", "-p", f"vms.vm1.image={inventory.local_dir}/run-base.qcow2",
            "-p", "journal.stop_after=phase:MIGRATING"])
        await ctl.killed_at_stop_point()
        run_id = ctl.run_id()
        copy = [e for e in ctl.journal() if e.get("kind") == "disk_copy"]
        assert [(c["src"], c["host"]) for c in copy] == [("hostA", "hostB")], copy
        path = copy[0]["path"]
        rel = Path(path).relative_to(inventory.local_dir)
        assert (local(lab, "hostB") / rel).exists()            # the copy being made
        rc, out, err = await recover_cli(ctl, run_id)
        assert rc == 0 and "UNRESOLVED" not in out, out + err
        assert f"disk copy {path} removed from hostB" in out, out
        if driver == "qemu":
            assert "disk mirror cancelled" in out, out
        assert not (local(lab, "hostB") / rel).exists() and (local(lab, "hostA") / rel).exists()
        listening = subprocess.run(["ip", "netns", "exec", "mtest-hostB", "ss", "-Hltn"],
                                   capture_output=True, text=True).stdout
        assert exports(listening, inventory.hosts["hostB"].address) == [], listening
        rc, out, err = await recover_cli(ctl, "--stop", run_id)
        assert rc == 0 and "stopped on hostA" in out, out + err
        assert not (local(lab, "hostA") / rel).exists()
    finally:
        base.unlink()


def yaml_without_shared(inventory, tmp_path: Path) -> Path:
    """The session lab's inventory as a lab without shared storage has it
    (``migrate-lab up --no-shared``)."""
    data = inventory.model_dump(mode="json", exclude_none=True)
    data.pop("shared_dir", None)
    path = tmp_path / "inventory.yaml"
    path.write_text(json.dumps(data))
    return path


async def test_hosts_without_shared_storage_are_told_to_copy_disks(lab, inventory, tmp_path,
                                                                    no_leaks):
    """The storage check is a choice: a run whose VM has an image, on an inventory without
    shared storage, is told to use copy-all (exit 2, before anything starts); copy-all over a
    local_dir that the hosts' probe finds shared fails the instance before any VM starts,
    saying to use shared; with copy-all the run passes and leaves no disk anywhere."""
    base = local(lab, "hostA") / "run-base.qcow2"
    make_base(base)
    shutil.copyfile(base, local(lab, "hostB") / "run-base.qcow2")
    inv = yaml_without_shared(inventory, tmp_path)
    image = ["-p", f"vms.vm1.image={inventory.local_dir}/run-base.qcow2"]
    try:
        rc, out, err = await migrate_run_inv(inv, tmp_path / "r1", *image, "-m", "hostA,hostB")
        assert rc == 2 and "migration.storage: copy-all" in err and "Traceback" not in err, err
        shared = json.loads(inv.read_text()) | {"local_dir": str(inventory.shared_dir)}
        inv2 = tmp_path / "shared-as-local.yaml"
        inv2.write_text(json.dumps(shared))
        rc, out, err = await migrate_run_inv(inv2, tmp_path / "r2", *image, *COPY_ALL,
                                             "-m", "hostA,hostB")
        # found by probing the hosts, in the run's preparation: the instance fails with it
        assert rc == 1 and "is shared: a file written on hostA is seen on hostB" in out + err \
            and "use migration.storage: shared" in out + err, out + err
        rc, out, err = await migrate_run_inv(inv, tmp_path / "r3", *image, *COPY_ALL,
                                             "-p", "scenario.rounds=1", "-m", "hostA,hostB")
        assert rc == 0, out + err
        migs = [json.loads(p.read_text()) for p in (tmp_path / "r3").glob("*/migrations/*")]
        assert len(migs) == 2 and all(m["storage"] == "copy-all" and m["source_disk_removed"]
                                      for m in migs), migs
        for h in ("hostA", "hostB"):       # the run's disks gone, its slots given back
            d = local(lab, h)
            assert sorted(p.name for p in d.iterdir()) in (
                ["migrator-runs", "migrator-slots", "run-base.qcow2"],
                ["migrator-runs", "run-base.qcow2"]), list(d.iterdir())
            assert list((d / "migrator-runs").iterdir()) == []
            assert list((d / "migrator-slots").glob("*.slot*")) == []
    finally:
        for h in ("hostA", "hostB"):
            (local(lab, h) / "run-base.qcow2").unlink(missing_ok=True)


async def migrate_run_inv(inv: Path, results: Path, *args: str):
    """``migrate-run`` of the ready ping-pong scenario with inventory ``inv``."""
    from .conftest import BIN
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "migrate-run"), "-i", str(inv), "-o", str(results),
        "-p", f"journal.state_dir={results}/state", *args, "ping_pong",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


def test_the_disk_oracle_finds_a_lost_write_and_a_changed_block(tmp_path):
    """The guest's diskcheck, run here against a file: it verifies while it writes; a
    block that lost its last write (back to what it held before), or one it never wrote
    that changed, fails it, named."""
    src = Path(__file__).parent.parent / "migrator/lab/guestsrc/labtools.c"
    binary = tmp_path / "labtools"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(src)], check=True)
    tool = tmp_path / "diskcheck"
    tool.symlink_to(binary)
    # O_DIRECT: not on tmpfs (/tmp)
    disk = Path("/var/tmp") / f"diskcheck-{tmp_path.name}.img"
    subprocess.run(["truncate", "-s", "8M", str(disk)], check=True)

    def dc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(tool), *args], capture_output=True, text=True, timeout=60)
    try:
        # 4 MiB: 1024 blocks, written in the order k * 7919 mod 1024, about one a second
        started = dc("write", str(disk), "4", "0.004")
        assert started.returncode == 0 and "blocks=1024" in started.stdout, started
        second = dc("write", str(disk), "4")
        assert second.returncode == 2 and "running already" in second.stderr, second
        first = [k * 7919 % 1024 for k in range(100)]       # the blocks of its first writes
        while " writes=0" in dc("status").stdout:     # its first write is on its way
            time.sleep(0.01)
        ok = dc("verify")
        assert ok.returncode == 0 and "ok=1" in ok.stdout, ok
        never = next(b for b in range(1024) if b not in first)
        with open(disk, "r+b") as f:
            f.seek(first[0] * 4096)             # written first: its write is lost
            f.write(bytes(4096))
            f.seek(never * 4096 + 100)          # never written: changed behind its back
            f.write(b"changed")
        bad = dc("verify")
        assert bad.returncode == 1 and "bad=2 ok=0" in bad.stdout, bad
        assert f"bad block={first[0]} has=- want=1" in bad.stdout, bad.stdout
        assert f"bad block={never} has=- want=-" in bad.stdout, bad.stdout
    finally:
        dc("stop")
        disk.unlink()
