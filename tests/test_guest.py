"""The lab guest: boots to its shell on a lab host and answers; its oracles work; the image
is reproducible; the accelerator is chosen by a real probe."""

import asyncio
import os
import re
from pathlib import Path

import pytest

from migrator.hosts.ssh import SSHHost
from migrator.lab.accel import choose_accel
from migrator.lab.boot import boot_and_run
from migrator.lab.image import _initramfs, _source, ensure_image

from .conftest import SESSION_LAB, cli


async def _no_guest_left(inventory, host: str) -> None:
    async with SSHHost.from_inventory(host, inventory) as h:
        r = await h.run("ls -A /run/migrator; pgrep -x qemu-system-x86 || true", check=True)
        # pgrep lists zombies too: keep only live ones
        live = []
        for pid in r.stdout.split():
            if pid.isdigit():
                st = await h.run(f"grep '^State:' /proc/{pid}/status", check=False)
                if st.ok and "Z" not in st.stdout.split()[1]:
                    live.append(pid)
        assert live == [], f"qemu still running on {host}: {live}"
        assert [x for x in r.stdout.split() if not x.isdigit()] == []


async def test_guest_boots_and_answers_on_serial_console(lab, inventory, config):
    result = await boot_and_run(lab, "hostB", "echo answer-$((6*7)); hostname", 128, config)
    assert result.exit_status == 0
    assert result.output.split() == ["answer-42", "lab-guest"]
    assert 0 < result.ready_uptime_s < result.boot_to_shell_s + 1
    await _no_guest_left(inventory, "hostB")


async def test_guest_oracles_memsum_and_dirtier(lab, inventory, config):
    command = ("memsum verify; echo no-holder=$?; memsum write 16 7 && memsum verify && "
               "dirtier 8 & sleep 3; kill %1; wait; memsum stop")
    result = await boot_and_run(lab, "hostC", command, 128, config)
    assert result.exit_status == 0, result.output
    out = result.output
    assert "no-holder=2" in out
    written = re.search(r"MEMSUM wrote mib=16 seed=7 sum=([0-9a-f]{16})", out)
    verified = re.search(r"MEMSUM verify sum=([0-9a-f]{16}) expected=([0-9a-f]{16}) "
                         r"bad_pages=(\d+) ok=(\d)", out)
    assert written and verified, out
    assert verified.group(1) == verified.group(2) == written.group(1)
    assert verified.group(3) == "0" and verified.group(4) == "1"
    dirty = re.findall(r"DIRTY t=[\d.]+ pass=(\d+) rate=\d+MB/s bad=(\d+)", out)
    assert len(dirty) >= 1, out
    assert all(bad == "0" for _, bad in dirty)
    assert int(dirty[-1][0]) > 0
    await _no_guest_left(inventory, "hostC")


async def test_dirtier_paced_by_work(lab, inventory, config):
    """``dirtier SIZE RATE cpu``: calibrated at its start (the PACE line), then dirtying
    without stale pages; 'cpu' without a rate, or another third word, is a usage error. (How
    its rate follows a throttle is bench/converge.py's auto-converge row.)"""
    command = ("dirtier 4 0 cpu; echo no-rate=$?; dirtier 4 8 fast; echo bad-word=$?; "
               "dirtier 4 16 cpu > /tmp/d.log 2>&1 & "
               "until grep -q '^DIRTY' /tmp/d.log; do sleep 0.1; done; kill %1; wait; "
               "cat /tmp/d.log")
    result = await boot_and_run(lab, "hostC", command, 128, config)
    out = result.output
    assert "no-rate=2" in out and "'cpu' pacing needs a rate" in out, out
    assert "bad-word=2" in out, out
    pace = re.search(r"PACE cpu loops_per_page=(\d+) target=16MB/s", out)
    assert pace and int(pace.group(1)) >= 1, out
    dirty = re.findall(r"DIRTY t=[\d.]+ pass=(\d+) rate=\d+MB/s bad=(\d+)", out)
    assert dirty and all(bad == "0" for _, bad in dirty), out
    await _no_guest_left(inventory, "hostC")


def test_memsum_verify_right_after_write_always_finds_its_holder(tmp_path):
    """The memsum holder's request FIFO has a reader from before it reports on: a client's
    non-blocking open for writing fails (ENXIO) whenever none has it open, and with the FIFO
    opened per request a verify right after the write, or right after another verify, said
    "no holder running" (1 suite run in ~40; natively 3 of 2000 verifies); and a write right
    after a stop had its new FIFOs unlinked by the old holder still leaving. The tool is
    compiled for this machine and run 2000 times: 0 may fail (the old holder fails this test
    with ~95 % probability)."""
    import subprocess
    src = Path(__file__).parent.parent / "migrator" / "lab" / "guestsrc" / "labtools.c"
    binary = tmp_path / "memsum"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(src)], check=True)
    script = ("fails=0; for i in $(seq 1000); do "
              f"{binary} write 1 $i >/dev/null && {{ {binary} verify >/dev/null 2>&1 || "
              "fails=$((fails+1)); }; "
              f"{binary} verify >/dev/null 2>&1 || fails=$((fails+1)); "
              f"{binary} stop >/dev/null 2>&1; done; echo $fails")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.stdout.split() == ["0"], r


async def test_a_background_job_has_started_when_the_next_command_runs(lab, config):
    """'nohup dd ... &' then 'killall -0 dd', as the Autotest seed's worker types them: the
    lab guest runs a forked job first (sched_child_runs_first), so the job exists when the
    shell reads its next line; before, 17 of 60 tries found no dd (one vCPU, the shell went
    on first; test_seed failed once on it)."""
    loop = ("cd /tmp; r=0; for i in $(seq 30); do nohup dd if=/dev/zero of=/dev/null "
            "2>/dev/null & killall -0 dd 2>/dev/null || r=$((r+1)); killall -9 dd 2>/dev/null; "
            "wait; done; echo RACES $r")
    slow = config.model_copy(update={"timeouts": config.timeouts.model_copy(
        update={"guest_cmd_s": 120})})
    result = await boot_and_run(lab, "hostB", loop, 128, slow)
    assert "RACES 0" in result.output, result.output


async def test_a_guest_kernel_that_crashed_fails_the_next_check_naming_it(lab, inventory,
                                                                        config):
    """The lab guest's kernel made to panic (sysrq 'c'; panic=-1 reboots it at once): the
    shell answers again after the reboot, but the next check (VM.answers, what a migration's
    checks run) fails naming the kernel's own report, read off the serial console on the
    way; the check after that passes (each report is said once). Autotest's
    verify_kernel_crash looked for the same lines."""
    from migrator.errors import GuestError
    from migrator.hypervisor.qemu import QemuVM, VMSpec
    spec = VMSpec(name=f"crash{os.getpid()}", mem_mib=128, kernel=str(inventory.guest.kernel),
                  initrd=str(inventory.guest.initrd),
                  append=inventory.guest.append + " lab.tick=0", accel=inventory.accel)
    assert "panic=-1" in spec.append                   # a panic reboots it, as in any run
    async with SSHHost.from_inventory("hostA", inventory, config) as host:
        vm = QemuVM(spec, host, str(inventory.run_dir), config)
        await vm.start()
        try:
            session = await vm.wait_for_login()
            await vm.answers()                          # a healthy guest passes
            assert session.kernel_faults == []
            await session.sendline("echo c > /proc/sysrq-trigger")
            # the new boot's init says LAB-READY, then its shell prompts
            await session.read_until(r"LAB-READY", config.timeouts.guest_boot_s)
            await session.wait_for_shell(config.timeouts.guest_boot_s)
            with pytest.raises(GuestError, match=r"crash\d+ on hostA: the guest's kernel "
                               r"reported a failure on its console: \[.*'Kernel panic - not "
                               r"syncing: sysrq triggered crash"):
                await vm.answers()
            await vm.answers()                          # said once; the guest runs again
            assert any(f.startswith("Kernel panic") for f in session.kernel_faults)
        finally:
            await vm.stop()
    await _no_guest_left(inventory, "hostA")


def test_the_kernels_reports_are_found_wherever_the_console_prints_them():
    """The console's scan of what it reads (no guest needed: the lines a kernel prints): a
    report split across reads, printed over an idle shell's prompt, with printk's caller
    field; ordinary output is not one; an error naming reports does not say them (its
    caller may catch it), a check does, once; past the cap, a new report is still said."""
    from migrator.guest.console import KERNEL_FAULTS_KEPT, SerialConsole
    console = SerialConsole(None, None, host="hostB", vm="vm1")
    for chunk in ("[   10.552146] kernel tried to execute NX-protected page\n[   10.55",
                  "8443] Oops: 0011 [#1] PREEMPT SMP NOPTI\n/ # [   45.1] BUG: scheduling ",
                  "while atomic\n[    1.2][    T1] general protection fault, probably\n",
                  "echo BUG: not one; DEBUG: x\nOops\nBUGS\n"):
        console._scan_for_faults(chunk)
    said = ["Oops: 0011 [#1] PREEMPT SMP NOPTI", "BUG: scheduling while atomic",
            "general protection fault, probably"]
    assert console.kernel_faults == said
    assert "the guest's kernel reported a failure: " + repr(said) in console._with_faults("x")
    assert console.take_kernel_faults() == said and console.take_kernel_faults() == []
    for i in range(KERNEL_FAULTS_KEPT + 3):
        console._scan_for_faults(f"BUG: soft lockup {i}\n")
    console.take_kernel_faults()
    console._scan_for_faults("Kernel panic - not syncing: Fatal exception\n")
    assert console.take_kernel_faults() == ["Kernel panic - not syncing: Fatal exception"]
    assert len(console.kernel_faults) == KERNEL_FAULTS_KEPT


async def test_failing_console_command_reports_status(lab, config):
    result = await boot_and_run(lab, "hostA", "ls /nonexistent", 128, config)
    assert result.exit_status != 0
    assert "No such file" in result.output


async def test_migrate_lab_boot_cli(lab):
    result = await cli("boot", "--name", SESSION_LAB, "--dir", str(lab.dir), "hostA",
                       "-c", "echo cli-$((40+2))")
    assert result.returncode == 0, result.stderr
    assert "cli-42" in result.stdout
    assert "shell prompt after" in result.stdout


async def test_boot_on_unknown_host_is_a_clear_error(lab):
    result = await cli("boot", "--name", SESSION_LAB, "--dir", str(lab.dir), "hostZ")
    assert result.returncode == 2
    assert "unknown host 'hostZ'" in result.stderr and "hostA, hostB, hostC" in result.stderr


async def test_initramfs_is_reproducible():
    image = await ensure_image()
    tools = b"\x7fELF fake tools"
    first = await _initramfs(tools, _source("init.sh"))
    second = await _initramfs(tools, _source("init.sh"))
    assert first == second
    assert image.initrd.stat().st_size > 100_000
    assert image.kernel.read_bytes()[:4] == b"\x7fELF"       # PVH-bootable ELF, not bzImage


class _Tee:
    """A subprocess's StreamReader that keeps a copy of everything read from it."""

    def __init__(self, reader):
        self._reader, self.data = reader, bytearray()

    def __getattr__(self, name):
        attr = getattr(self._reader, name)
        if name not in ("read", "readline", "readuntil", "readexactly"):
            return attr

        async def reading(*args, **kwargs):
            chunk = await attr(*args, **kwargs)
            self.data += chunk
            return chunk
        return reading


def _kvm_opens() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return False
    return True


async def test_accel_auto_really_probes(config, lab, monkeypatch):
    """``auto`` asks a fresh probe (the cache bypassed), and its answer follows what really
    happened: without a usable /dev/kvm no KVM guest is tried and TCG is chosen; with one, a
    QEMU with -accel kvm boots the lab guest, and KVM is chosen exactly when that QEMU's
    console showed the guest's ready marker. A probe answering a fixed value fails this."""
    image = await ensure_image()
    launched = []                          # (argv, what the probe read from its console)
    real_exec = asyncio.create_subprocess_exec

    async def recording_exec(program, *args, **kwargs):
        proc = await real_exec(program, *args, **kwargs)
        if os.path.basename(str(program)).startswith("qemu-system"):
            proc.stdout = tee = _Tee(proc.stdout)
            launched.append(([str(program), *map(str, args)], tee))
        return proc
    monkeypatch.setattr(asyncio, "create_subprocess_exec", recording_exec)
    kvm_usable = _kvm_opens()              # observed here, not by the code under test
    choice = await choose_accel("auto", image, config.timeouts.kvm_probe_s, use_cache=False)
    monkeypatch.undo()
    assert not choice.cached and choice.reason
    if not kvm_usable:
        assert launched == [], "no KVM guest can be tried without a usable /dev/kvm"
        assert choice.accel == "tcg" and "/dev/kvm" in choice.reason, choice
    else:
        assert len(launched) == 1, \
            f"the probe started {len(launched)} QEMUs, not one: {[a for a, _ in launched]}"
        argv, console = launched[0]
        assert "-accel" in argv and argv[argv.index("-accel") + 1] == "kvm", argv
        assert str(image.kernel) in argv and str(image.initrd) in argv, argv
        booted = b"LAB-READY" in console.data
        assert choice.accel == ("kvm" if booted else "tcg"), (
            f"{choice} but the guest {'did' if booted else 'did not'} boot under KVM; "
            f"console ended with {bytes(console.data[-300:])!r}")
        assert choice.probed_s > 0
    # the session lab (its choice possibly from this boot's cache) agrees with the fresh probe
    assert lab.state().accel == choice.accel
    if choice.accel == "tcg":
        # explicitly asking for KVM where it does not work is refused before anything starts
        with pytest.raises(ValueError, match="KVM cannot run the lab guest here"):
            await choose_accel("kvm", image, config.timeouts.kvm_probe_s)
