"""A guest used as a host (``GuestHost``, Autoserv's ``KVMGuest``) on a real lab guest that asks
for a login on its console: the whole host interface, through the serial console."""

import asyncio
import hashlib
import os
import re

import pytest

from migrator import GuestHost
from migrator.config import Config
from migrator.errors import CommandError, GuestError
from migrator.guest.console import LOGIN_PROMPT
from migrator.framework.env import Env
from migrator.hosts import SSHHost, run_on
from migrator.hypervisor import make_vm
from migrator.hypervisor.vm import VMSpec

PASSWORD = "s3cret-pw"
HOST = "hostD"


def login_spec(inventory, name: str, password: str | None, user: str | None = "root",
               vcpus: int = 2) -> VMSpec:
    return VMSpec(name, vcpus=vcpus, kernel=str(inventory.guest.kernel),
                  initrd=str(inventory.guest.initrd),
                  append=f"{inventory.guest.append} lab.out=ttyS1 lab.login=root "
                         f"lab.password={PASSWORD}",
                  login_user=user, login_password=password)


@pytest.fixture
async def guest(lab, inventory, config, no_leaks):
    async with SSHHost.from_inventory(HOST, inventory, config) as host:
        vm = make_vm("qemu", login_spec(inventory, "gh1", PASSWORD), host,
                     str(inventory.run_dir), config)
        await vm.start()
        try:
            yield GuestHost(vm)
        finally:
            await vm.stop()


async def test_a_guest_is_used_like_a_host(guest, tmp_path, inventory, config):
    """The whole interface on one guest that asks for a login on its console."""
    g = guest
    await g.wait_up()
    assert await g.is_up()
    # run: exit status, stdout and stderr apart, duration
    r = await g.run("echo out; echo err >&2; exit 3")
    assert (r.exit_status, r.stdout, r.stderr, r.host) == (3, "out\n", "err\n", "gh1")
    assert not r.ok and r.duration > 0 and not r.timed_out
    with pytest.raises(CommandError, match=r"gh1 \(a guest on hostD\).*exit status 3"):
        await g.run("exit 3", check=True)
    # a command past its timeout is interrupted, and the console goes on
    r = await g.run("sleep 30", timeout=1)
    assert r.timed_out and r.aborted == 2 and r.exit_status == -1 and 1 <= r.duration < 10
    assert (await g.run("echo still here")).stdout == "still here\n"
    # past the shell's line editor, or with newlines: staged as a script, run the same
    long = "echo " + "x" * 3000 + "; printf 'a\\tb\\n'\necho second line >&2"
    r = await g.run(long)
    assert r.stdout == "x" * 3000 + "\na\tb\n" and r.stderr == "second line\n", r
    # files: a round trip through the console, bytes exact
    payload = os.urandom(100_000) + b"\r\n\x03\x04\x1b[6n"
    (tmp_path / "up.bin").write_bytes(payload)
    tmp = await g.get_tmp_dir()
    assert tmp.startswith("/tmp/migrator.")
    await g.send_file(tmp_path / "up.bin", f"{tmp}/payload")
    r = await g.run(f"sha256sum {tmp}/payload", check=True)
    assert r.stdout.split()[0] == hashlib.sha256(payload).hexdigest()
    await g.get_file(f"{tmp}/payload", tmp_path / "down.bin")
    assert (tmp_path / "down.bin").read_bytes() == payload
    # over the console limit: refused before anything is sent, naming VM, host and step
    small = GuestHost(g.vm)
    small.config = config.model_copy(update={"limits": config.limits.model_copy(
        update={"console_file_mib": 0.05})})
    with pytest.raises(GuestError) as err:
        await small.send_file(tmp_path / "up.bin", f"{tmp}/too-big")
    assert str(err.value) == (f"gh1 on hostD: send_file {tmp_path / 'up.bin'}: 100008 bytes "
                              "is over the console transfer limit of 0.05 MiB "
                              "(limits.console_file_mib)")
    with pytest.raises(GuestError, match=r"^gh1 on hostD: get_file /nope: .*No such file"):
        await g.get_file("/nope", tmp_path / "x")
    with pytest.raises(GuestError, match=r"^gh1 on hostD: send_file .*: cannot write "
                                         r"/nodir/x.migrator-part: .*nonexistent directory"):
        await g.send_file(tmp_path / "up.bin", "/nodir/x")
    assert (await g.run("echo the console is fine")).stdout == "the console is fine\n"
    assert await g.get_num_cpu() == 2
    # fan-out like hosts: a guest and an SSH host side by side
    async with SSHHost.from_inventory(HOST, inventory, config) as host:
        names = await run_on([g, host], "hostname")
    assert [r.stdout.strip() for r in names] == ["lab-guest", HOST]
    # reboot and hard reset: each returns once a new boot answers (logged in again)
    first = await g.boot_id()
    await g.reboot()
    second = await g.boot_id()
    await g.hardreset()
    third = await g.boot_id()
    assert len({first, second, third}) == 3
    assert (await g.run("id -un")).stdout == "root\n"
    # a login refused, or asked for with none configured: one line naming VM and host
    vm = g.vm
    session = await vm.wait_for_login()
    await session.sendline("exit")                  # back to the login prompt
    await session.read_until(LOGIN_PROMPT, 30)
    vm._close_session()
    for password, user, message in [
            ("wrong", "root", "gh1 on hostD: logging in as 'root': refused (wrong password?)"),
            (None, None, "gh1 on hostD: the console asks for a login, and the VM's config has "
                         "none (vms.<vm>.login: {user, password})")]:
        other = make_vm("qemu", login_spec(inventory, "gh1", password, user), vm.host,
                        str(inventory.run_dir), config)
        with pytest.raises(GuestError) as err:
            await other.wait_for_login(30)
        other._close_session()
        assert str(err.value) == message
    # and the right one still logs in
    assert await g.is_up()


async def test_a_command_reading_the_terminal_is_interrupted_and_the_console_goes_on(guest):
    """A command past its timeout that reads the console's terminal itself, and ends at its
    SIGINT trap only when its read returns (the multinode shim does this: it waits for the
    controller's answer on /dev/tty): the resync line must not be typed into its read, or
    the shell never answers (found as a 30 s 'console did not answer' in a VM group run)."""
    await guest.wait_up()
    reader = ("trap 'exit 130' INT; exec 3<>/dev/tty; while IFS= read -r l <&3; do :; done")
    r = await guest.run(reader, timeout=1)
    assert r.timed_out and r.aborted == 2, r
    assert r.duration < 10                     # answered again in seconds, not at a timeout
    assert (await guest.run("echo still here")).stdout == "still here\n"


def test_a_vms_login_config_reaches_its_spec():
    config = Config.model_validate({"vms": {"vm1": {"login": {"user": "qe", "password": "pw",
                                                              "prompt": r"\$ $"}}}})
    from migrator.config import Inventory
    inv = Inventory(hosts={"a": {"address": "192.0.2.1"}},
                    guest={"kernel": "/k", "initrd": "/i"})
    spec = Env(config, inv, "/run/x", None).spec("vm1")
    assert (spec.login_user, spec.login_password, spec.prompt) == ("qe", "pw", r"\$ $")
    with pytest.raises(Exception, match="not a regular expression"):
        Config.model_validate({"vms": {"vm1": {"login": {"prompt": "("}}}})


async def test_a_commands_start_is_seen_before_a_request_it_prints_is_answered(guest):
    """The guest's begin marker and a multinode request of the same command in one read
    (the controller was busy while the guest printed both): the command counts as begun
    at once, and the request's answer (a key nobody sends) is waited for after it, so the
    command's timeout says it timed out while running, not that the shell never took it
    (a VM group's test saw that once, under load: the answer was awaited before the marker
    already read was looked at)."""
    import secrets
    import time

    from migrator.guest import multinode
    from migrator.guest.console import ConsoleTimeout
    await guest.wait_up()
    nonce = secrets.token_hex(8)
    await multinode.install(guest, nonce, env={"MIGRATE_SYNC_MEMBER": "gh1"})
    session = await guest._session()
    asked = asyncio.Event()

    async def never_answered(op: str, args: list[str]):
        asked.set()
        await asyncio.Event().wait()            # a key nobody sends

    multinode.serve(session, nonce, never_answered)
    seen_before = len("".join(session.transcript))
    command = asyncio.create_task(session.cmd("migrate-sync wait nobody-sends-this", 5))
    # a few steps of the loop: the command's line typed, the task waits on the console's
    # read (a round trip to the guest takes far longer); then the controller busy while the
    # guest prints its begin marker and the request after it
    for _ in range(20):
        await asyncio.sleep(0)
    assert not command.done()
    time.sleep(2)
    with pytest.raises(ConsoleTimeout) as raised:
        await command
    assert raised.value.started, raised.value            # begun: its marker was read
    assert asked.is_set()                                # and the request was read too
    both = "".join(session.transcript)[seen_before:]
    assert re.search(r"__MB\d+__\r?\n.*<MN:" + nonce, both, re.S), both
    # interrupted as GuestHost.run does at a command's timeout: the console goes on
    await guest._interrupt(session)
    r = await guest.run("echo still here")
    assert r.stdout == "still here\n"
