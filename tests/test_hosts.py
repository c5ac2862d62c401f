"""The SSH host layer against real sshd in the session lab's hosts."""

import asyncio
import hashlib
import io
import logging
import os
import secrets
import socket
import stat

import pytest

from migrator.config import Config
from migrator.hypervisor.qemu import alive_test
from migrator.errors import (CommandError, ConfigError, HostAuthError, HostConnectError,
                             HostError, HostKeyError)
from migrator.hosts import Installable, SSHHost, parallel, quote, run_on
from migrator.lab import hostproc, network
from migrator.lab.system import Proc, is_alive, processes_in_netns, stop_processes

HOSTS = ["hostA", "hostB", "hostC"]


@pytest.fixture
async def hosts(inventory):
    hs = [SSHHost.from_inventory(n, inventory) for n in HOSTS]
    yield hs
    for h in hs:
        await h.close()


@pytest.fixture
async def host(hosts):
    return hosts[0]


# -- commands ----------------------------------------------------------------------------------

async def test_exit_status_and_separate_streams(host):
    r = await host.run("echo to-out; echo to-err >&2; exit 7")
    assert (r.exit_status, r.stdout, r.stderr, r.aborted, r.timed_out) == \
        (7, "to-out\n", "to-err\n", 0, False)
    assert r.host == "hostA" and r.command == "echo to-out; echo to-err >&2; exit 7"
    assert r.duration > 0 and not r.ok
    text = str(r)
    for part in ("hostA", "Exit status: 7", "to-out", "to-err", "Duration", "Timed out: no"):
        assert part in text
    ok = await host.run("true")
    assert ok.ok and ok.stdout == "" and ok.stderr == ""


async def test_killed_by_signal_is_reported(host):
    r = await host.run("kill -TERM $$")
    assert r.aborted == 15 and r.exit_status == -1 and not r.ok


async def test_large_binary_output_arrives_intact(host):
    tmp = await host.get_tmp_dir()
    await host.run(f"head -c 8388608 /dev/urandom > {tmp}/blob", check=True)
    remote_sum = (await host.run(f"sha256sum {tmp}/blob", check=True)).stdout.split()[0]
    r = await host.run(f"cat {tmp}/blob", encoding=None, check=True)
    assert isinstance(r.stdout, bytes) and len(r.stdout) == 8 * 2**20
    assert hashlib.sha256(r.stdout).hexdigest() == remote_sum
    lines = await host.run("seq 1 200000", check=True)
    assert lines.stdout.splitlines()[-1] == "200000" and len(lines.stdout.splitlines()) == 200000


async def test_stdin_is_delivered_then_closed(host):
    data = secrets.token_bytes(3 * 2**20)
    r = await host.run("sha256sum", stdin=data, check=True)
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    empty = await host.run("cat", timeout=30)                 # no stdin: EOF at once
    assert empty.ok and not empty.timed_out and empty.stdout == ""
    assert (await host.run("cat", stdin="", timeout=30)).ok


async def test_timeout_kills_the_remote_process_group(host):
    tmp = await host.get_tmp_dir()
    r = await host.run(f"echo started; sleep 1001 & echo $! > {tmp}/bg; echo $$ > {tmp}/fg; "
                       "sleep 1002", timeout=1)
    assert r.timed_out and r.aborted == 9 and r.exit_status == -1
    assert r.stdout == "started\n"                      # output before the deadline is kept
    assert r.duration >= 1
    check = await host.run(f"for p in $(cat {tmp}/bg {tmp}/fg); do "
                           f"if {alive_test('$p')}; "
                           "then echo alive $p; fi; done; pgrep -x -f 'sleep 100[12]' || true")
    assert check.stdout.strip() == ""


async def test_a_cancelled_command_is_ended_on_the_host(host, inventory):
    """A run whose caller is cancelled (a Ctrl-C, a failing sibling in a task group) has its
    command's process group killed on the host before the cancellation goes on: nothing it
    started keeps acting for a caller that stopped. More at once than the host's channel
    slots: each is ended through its own slot (none waits for another's), those queued for a
    slot never start. And one cancelled while its channel opens: the command, started or
    not, does not run on."""
    tmp = await host.get_tmp_dir()
    slots = host.config.limits.ssh_channels_per_host
    runs = [asyncio.ensure_future(host.run(
        f"sleep 300{i % 10} & echo $! > {tmp}/bg{i}; echo $$ > {tmp}/fg{i}; sleep 400{i % 10}"))
        for i in range(slots + 3)]
    async with SSHHost.from_inventory("hostA", inventory) as watcher:  # (the slots are full)
        await watcher.run(f"until [ $(ls {tmp} | grep -c ^fg) -ge {slots} ]; do sleep 0.05; "
                          "done", timeout=60, check=True)
        for r in runs:
            r.cancel()
        await asyncio.wait(runs)
        assert all(r.cancelled() for r in runs)
        files = (await watcher.run(f"ls {tmp}", check=True)).stdout.split()
        assert sorted(files) == sorted([f"bg{i}" for i in range(slots)] +
                                       [f"fg{i}" for i in range(slots)])  # queued: never ran
        check = await watcher.run(f"for p in $(cat {tmp}/bg* {tmp}/fg*); do "
                                  f"if {alive_test('$p')}; then echo alive $p; fi; done")
        assert check.stdout == "", check.stdout
        # cancelled at once: while its channel opens, before the shell said its group
        opening = asyncio.ensure_future(host.run(f"echo $$ > {tmp}/early; exec sleep 5009"))
        await asyncio.sleep(0)
        opening.cancel()
        await asyncio.wait([opening])
        assert opening.cancelled()
        left = await watcher.run(f"cat {tmp}/early 2>/dev/null; pgrep -x -f 'sleep 5009'")
        assert left.exit_status == 1 and left.stdout.count("\n") <= 1, left.stdout
    assert (await host.run("echo slots free", timeout=30)).stdout == "slots free\n"


async def test_check_true_raises_with_the_whole_result(host):
    with pytest.raises(CommandError) as info:
        await host.run("echo partial; echo 'no such thing' >&2; exit 4", check=True)
    err = info.value
    assert err.host == "hostA"
    assert err.result.exit_status == 4 and err.result.stdout == "partial\n"
    assert str(err) == ("hostA: command failed (exit status 4): \"echo partial; echo 'no such "
                        "thing' >&2; exit 4\" no such thing")
    with pytest.raises(CommandError, match="timed out after"):
        await host.run("sleep 30", timeout=0.5, check=True)


HOSTILE = ["two words", "it's", 'say "hi"', "a;b", "$(touch /tmp/pwned)", "`touch /tmp/pwned`",
           "back\\slash", "*", "new\nline", "tab\there", "--option", "-", "ünïcödé ☃", "'\"'\"'",
           "$HOME", "!!", "a|b&c>d<e", ""]


async def test_hostile_strings_are_quoted(host):
    for value in HOSTILE:
        r = await host.run(f"printf %s {quote(value)}", check=True)
        assert r.stdout == value, value
        r = await host.run('printf %s "$V"', env={"V": value}, check=True)
        assert r.stdout == value, value
    assert (await host.run("test -e /tmp/pwned")).exit_status == 1
    with pytest.raises(ValueError, match="bad environment variable name"):
        await host.run("true", env={"A;B": "x"})


# -- files -------------------------------------------------------------------------------------

def _tree(root):
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = (hashlib.sha256(open(p, "rb").read()).hexdigest(),
                                             stat.S_IMODE(os.stat(p).st_mode))
    return out


async def test_file_and_directory_round_trip(host, tmp_path):
    src = tmp_path / "payload"
    (src / "sub").mkdir(parents=True)
    (src / "data.bin").write_bytes(secrets.token_bytes(1_500_000))
    (src / "sub" / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    os.chmod(src / "sub" / "tool.sh", 0o750)
    (src / "secret").write_bytes(b"x" * 10)
    os.chmod(src / "secret", 0o600)
    tmp = await host.get_tmp_dir()
    await host.send_file(src, f"{tmp}/payload")
    remote = await host.run(f"cd {tmp}/payload && find . -type f | sort | xargs sha256sum; "
                            f"stat -c '%a %n' sub/tool.sh secret", check=True)
    assert (await host.run(f"{tmp}/payload/sub/tool.sh", check=True)).stdout == "tool\n"
    assert "750 sub/tool.sh" in remote.stdout and "600 secret" in remote.stdout
    back = tmp_path / "back"
    await host.get_file(f"{tmp}/payload", back)
    assert _tree(back) == _tree(src)
    single = tmp_path / "one.bin"
    await host.get_file(f"{tmp}/payload/data.bin", single)
    assert single.read_bytes() == (src / "data.bin").read_bytes()
    with pytest.raises(HostError, match="hostA: sftp get /nonexistent"):
        await host.get_file("/nonexistent", tmp_path / "nope")


async def test_tmp_dirs_are_removed_on_close(inventory):
    h = SSHHost.from_inventory("hostB", inventory)
    dirs = [await h.get_tmp_dir(), await h.get_tmp_dir()]
    assert dirs[0] != dirs[1]
    assert (await h.run(f"test -d {dirs[0]} && test -d {dirs[1]}")).ok
    await h.close()
    async with SSHHost.from_inventory("hostB", inventory) as other:
        assert (await other.run(f"test -e {dirs[0]} || test -e {dirs[1]}")).exit_status == 1
    await h.close()                                     # idempotent


async def test_close_runs_a_last_command_with_the_tmp_dirs_removal(inventory):
    """close(last): the command's result, the tmp dirs removed in the same round trip,
    whatever the command did (here it fails); the connection closed."""
    h = SSHHost.from_inventory("hostB", inventory)
    tmp = await h.get_tmp_dir()
    r = await h.close(f"ls -d {tmp}; echo gone >&2; exit 7")
    assert r.exit_status == 7 and r.stdout.strip() == tmp and r.stderr.strip() == "gone"
    assert not h.connected
    async with SSHHost.from_inventory("hostB", inventory) as other:
        assert (await other.run(f"test -e {tmp}")).exit_status == 1
    r = await h.close("echo again")                     # no tmp dirs left: the command alone
    assert r.ok and r.stdout == "again\n"
    assert await h.close() is None


# -- connection errors -------------------------------------------------------------------------

async def test_unknown_host_names(inventory):
    with pytest.raises(ConfigError, match="unknown host 'hostZ'.*hostA, hostB, hostC"):
        SSHHost.from_inventory("hostZ", inventory)
    h = SSHHost("no-such-host.invalid", known_hosts=inventory.ssh.known_hosts,
                client_keys=[inventory.ssh.identity_file])
    with pytest.raises(HostConnectError, match=r"^no-such-host.invalid: cannot connect"):
        await h.run("true")


async def test_auth_failure_and_host_key_mismatch(inventory, tmp_path):
    import subprocess
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    address = inventory.hosts["hostA"].address
    h = SSHHost("hostA", address, known_hosts=inventory.ssh.known_hosts,
                client_keys=[tmp_path / "k"])
    with pytest.raises(HostAuthError, match=f"hostA: authentication failed for root@{address}"):
        await h.run("true")
    pub = (tmp_path / "k.pub").read_text().split()
    (tmp_path / "kh").write_text(f"hostA,{address} {pub[0]} {pub[1]}\n")
    h = SSHHost("hostA", address, known_hosts=tmp_path / "kh",
                client_keys=[inventory.ssh.identity_file])
    with pytest.raises(HostKeyError, match="hostA: host key not verifiable"):
        await h.run("true")


async def test_connect_timeout_against_a_silent_server(inventory):
    # a real socket that accepts TCP and never says anything (no SSH banner)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        config = Config.load(overrides={"timeouts.ssh_connect_s": 1})
        h = SSHHost("silent", "127.0.0.1", port=server.getsockname()[1], config=config,
                    known_hosts=inventory.ssh.known_hosts)
        with pytest.raises(HostConnectError, match=r"^silent: no SSH connection to 127.0.0.1:\d+ "
                                                   r"within 1 s"):
            await h.run("true")
    finally:
        server.close()


async def test_insecure_mode_is_loud_and_secrets_stay_out_of_logs(inventory, caplog):
    key_text = inventory.ssh.identity_file.read_text()
    secret_line = [ln for ln in key_text.splitlines() if ln and "PRIVATE" not in ln][0]
    caplog.set_level(logging.DEBUG)
    async with SSHHost("hostA", inventory.hosts["hostA"].address, insecure_no_host_key_check=True,
                       client_keys=[inventory.ssh.identity_file]) as h:
        assert (await h.run("hostname", check=True)).stdout.strip() == "hostA"
    assert "host key verification is OFF" in caplog.text
    assert secret_line not in caplog.text


# -- liveness ----------------------------------------------------------------------------------

async def test_wait_up_on_a_stopped_sshd_times_out_naming_the_host(lab, inventory):
    h = SSHHost.from_inventory("hostC", inventory)
    lab.control("hostC", "sshd stop")
    try:
        assert not await h.is_up()
        await h.wait_down(timeout=10)
        with pytest.raises(HostConnectError, match=r"^hostC: not up within 1 s"):
            await h.wait_up(timeout=1)
        with pytest.raises(HostConnectError, match="hostC: connection refused"):
            await h.run("true")
    finally:
        lab.control("hostC", "sshd start")
    await h.wait_up(timeout=30)
    assert (await h.run("hostname", check=True)).stdout.strip() == "hostC"
    await h.close()


async def test_reconnect_after_sshd_restart_drops_the_connection(lab, inventory):
    h = SSHHost.from_inventory("hostB", inventory)
    assert (await h.run("true")).ok
    first = await h.connect()
    # restart sshd the hard way: stop the listener, kill the session processes (our
    # connection drops), start sshd again
    lab.control("hostB", "sshd stop")
    netns = lab.state().host("hostB").netns
    sessions = [p for p in processes_in_netns(network.netns_path(netns))
                if open(f"/proc/{p.pid}/comm").read().strip() == "sshd"]
    assert sessions
    assert await stop_processes(sessions, 10) == []
    await asyncio.wait_for(first.wait_closed(), 30)
    lab.control("hostB", "sshd start")
    r = await h.run("hostname", check=True)            # transparently on a new connection
    assert r.stdout.strip() == "hostB"
    assert await h.connect() is not first
    await h.close()


async def test_reboot_round_trip(lab, inventory):
    hostdir = lab.host_dir("hostB")
    async with SSHHost.from_inventory("hostB", inventory) as h:
        before = await h.boot_id()
        tmp = await h.get_tmp_dir()
        sleeper = (await h.run("setsid sleep 999 </dev/null >/dev/null 2>&1 & echo $!",
                               check=True)).stdout.strip()
        sshd_before = hostproc.daemon_proc(hostdir, "sshd")
        await h.reboot(timeout=120)
        assert await h.boot_id() != before
        assert (await h.run(f"test -e {tmp}")).exit_status == 1          # /tmp was wiped
        assert not is_alive(Proc.of(int(sleeper)))                      # processes stopped
        assert not is_alive(sshd_before)                                  # sshd restarted
        assert is_alive(hostproc.daemon_proc(hostdir, "sshd"))
        assert (await h.run("hostname", check=True)).stdout.strip() == "hostB"


async def test_get_num_cpu(host):
    assert await host.get_num_cpu() == os.cpu_count()


# -- fan-out -----------------------------------------------------------------------------------

async def test_run_on_all_hosts_with_one_failing(lab, hosts):
    lab.control("hostB", "sshd stop")
    try:
        results = await run_on(hosts, "hostname")
        assert results[0].stdout.strip() == "hostA" and results[2].stdout.strip() == "hostC"
        assert isinstance(results[1], HostConnectError) and results[1].host == "hostB"
        with pytest.raises(HostConnectError, match="^hostB: connection refused"):
            await run_on(hosts, "hostname", fail_fast=True)
    finally:
        lab.control("hostB", "sshd start")


async def test_parallel_order_limit_and_fail_fast():
    running = peak = 0

    async def job(i, delay, fail=False):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(delay)
            if fail:
                raise RuntimeError(f"job {i} failed")
            return i
        finally:
            running -= 1

    assert await parallel([job(0, 0.03), job(1, 0.01), job(2, 0.02)]) == [0, 1, 2]
    await parallel([job(i, 0.01) for i in range(10)], limit=3)
    assert peak == 3
    results = await parallel([job(0, 0.01), job(1, 0.0, fail=True), job(2, 0.01)])
    assert results[0] == 0 and results[2] == 2 and str(results[1]) == "job 1 failed"
    cancelled = asyncio.Event()

    async def slow():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(RuntimeError, match="job 1 failed"):
        await parallel([slow(), job(1, 0.01, fail=True)], fail_fast=True)
    assert cancelled.is_set()


# -- installables ------------------------------------------------------------------------------

async def test_installables_fetched_once_and_installed_on_all_hosts(hosts, tmp_path):
    tool = tmp_path / "tool.sh"
    tool.write_text("#!/bin/sh\necho v1 on $(hostname)\n")
    os.chmod(tool, 0o755)
    tree = tmp_path / "bundle"
    (tree / "lib").mkdir(parents=True)
    (tree / "lib" / "data.txt").write_text("bundle-data\n")
    script = Installable.get(tool)
    bundle = Installable.get(tree)
    note = Installable.get("plain content\n", name="note.txt")
    fileobj = Installable.get(io.BytesIO(b"\x00\x01binary"), name="blob.bin")
    tool.write_text("#!/bin/sh\necho v2\n")          # later changes are not shipped
    paths = await script.install_on(hosts)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["tool.sh"] * 3
    for h, p in zip(hosts, paths):
        assert (await h.run(p, check=True)).stdout == f"v1 on {h.name}\n"
    assert await script.install(hosts[0]) == paths[0]              # once per host
    bpath = await bundle.install(hosts[1])
    assert (await hosts[1].run(f"cat {bpath}/lib/data.txt", check=True)).stdout == "bundle-data\n"
    npath = await note.install(hosts[2])
    assert (await hosts[2].run(f"cat {npath}", check=True)).stdout == "plain content\n"
    fpath = await fileobj.install(hosts[2])
    r = await hosts[2].run(f"cat {fpath}", encoding=None, check=True)
    assert r.stdout == b"\x00\x01binary"
    with pytest.raises(ValueError, match="name= is required"):
        Installable.get("not a path and no name")
    await hosts[0].close()                                          # tmp dir removed ...
    assert await script.install(hosts[0]) != paths[0]              # ... so it is installed anew


async def test_stopped_helper_processes_are_gone():
    # the helpers used above really stop what they are given (no zombie counted as alive)
    proc = await asyncio.create_subprocess_exec("sleep", "60")
    p = Proc.of(proc.pid)
    assert is_alive(p)
    assert await stop_processes([p], 5) == []
    await proc.wait()
