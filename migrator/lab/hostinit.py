"""The init of one lab host: holds its namespaces, supervises its daemons, performs reboots.

Run by ``migrate-lab up`` inside the host's network namespace and a new mount + UTS namespace::

    ip netns exec NS unshare --mount --uts --propagation private -- \\
        python -m migrator.lab.hostinit serve --host hostA --hostdir DIR --address 10.77.0.11 ...

Once (for the host's whole life) it sets the hostname and bind-mounts the host's own
``/etc/hosts``, local storage (``<hostdir>/local`` on ``--local-dir``), libvirt directories, ``/usr/local/sbin`` (whose ``reboot`` asks this init for a
lab reboot), ``boot_id`` over ``/proc/sys/kernel/random/boot_id``, and root's ``.bashrc`` and
``.profile`` as on a fresh install (``/etc/skel``). Then it *boots*: a fresh
private tmpfs on ``/run`` and ``/tmp``, a new boot id, sshd (and libvirtd) started as its own
children. It prints ``ready`` on stdout when sshd accepts connections.

A **lab reboot** is real and observable: every process of the host except this init (sshd,
ssh sessions, libvirtd, guests) is stopped, ``/run`` and ``/tmp`` are wiped, a new boot id is
written, and the daemons start again with the same host keys. It never touches the machine:
``reboot`` inside a lab host resolves to the lab's script, not to systemd (this machine kind
grants CAP_SYS_BOOT, so a real reboot(2) would restart the whole machine).

It is also a child subreaper: orphans of the host (daemonized QEMUs, session leftovers) are
reparented to it and reaped, so they do not linger as zombies under the machine's PID 1.

Control socket (``<hostdir>/control.sock``, root only), one line per request:
``reboot``, ``sshd stop``, ``sshd start``, ``libvirtd stop``, ``libvirtd start``, ``status``
(answers JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from .system import Proc, is_alive, processes_in_netns, stop_processes, tcp_port_open

PR_SET_CHILD_SUBREAPER = 36
CONTROL_SOCKET = "control.sock"
LIBVIRT_MOUNTS = {"etc": "/etc/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt",
                  "cache": "/var/cache/libvirt"}


def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} hostinit[{os.getpid()}]: {msg}", file=sys.stderr,
          flush=True)


def _sh(*args: str) -> None:
    done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")


def _write_in_place(path: Path, text: str) -> None:
    """Rewrite a file without replacing its inode (it may be bind-mounted elsewhere)."""
    with open(path, "r+" if path.exists() else "w") as f:
        f.seek(0)
        f.write(text)
        f.truncate()


class HostInit:
    def __init__(self, a: argparse.Namespace):
        self.host = a.host
        self.dir = Path(a.hostdir)
        self.address = a.address
        self.run_mib = a.run_mib
        self.tmp_mib = a.tmp_mib
        self.libvirt = a.libvirt
        self.local_dir = a.local_dir
        self.ready_timeout_s = a.ready_timeout_s
        self.exit_timeout_s = a.exit_timeout_s
        self.sshd: Proc | None = None
        self.libvirtd: Proc | None = None
        self.boots = 0
        self.busy = asyncio.Lock()

    # -- once per host life --------------------------------------------------------------------

    def mount_once(self) -> None:
        socket.sethostname(self.host)
        _sh("mount", "--bind", str(self.dir / "hosts"), "/etc/hosts")
        for sub, target in LIBVIRT_MOUNTS.items():
            if os.path.isdir(target):
                _sh("mount", "--bind", str(self.dir / f"libvirt-{sub}"), target)
        if os.path.isdir("/usr/local/sbin") and not os.path.islink("/usr/local/sbin"):
            _sh("mount", "--bind", str(self.dir / "sbin"), "/usr/local/sbin")
        _write_in_place(self.dir / "boot_id", str(uuid.uuid4()) + "\n")
        _sh("mount", "--bind", str(self.dir / "boot_id"), "/proc/sys/kernel/random/boot_id")
        if self.local_dir:      # this host's own disk: the same path on every host, private
            own = self.dir / "local"
            own.mkdir(exist_ok=True)
            _sh("mount", "--bind", str(own), self.local_dir)
        # root's shell start-up files as on a freshly installed host (/etc/skel), not the
        # controller's (this machine's pyenv set-up costs 140 ms per ssh command)
        for name in (".bashrc", ".profile"):
            target, skel = Path("/root", name), Path("/etc/skel", name)
            if target.is_file() and not target.is_symlink():
                own = self.dir / f"root{name}"
                own.write_bytes(skel.read_bytes() if skel.is_file() else b"")
                _sh("mount", "--bind", str(own), str(target))

    # -- boot and reboot -----------------------------------------------------------------------

    def _fresh_tmpfs(self) -> None:
        for target, mode, mib in (("/run", "0755", self.run_mib), ("/tmp", "1777", self.tmp_mib)):
            if self.boots:
                _sh("umount", "-l", target)
            _sh("mount", "-t", "tmpfs", "-o", f"mode={mode},size={mib}m",
                f"lab-{self.host}-{target.strip('/')}", target)
        for d in ("/run/sshd", "/run/migrator", "/run/libvirt", "/run/lock"):
            os.makedirs(d, exist_ok=True)
        os.chmod("/run/migrator", 0o700)

    async def boot(self) -> None:
        self._fresh_tmpfs()
        if self.boots:
            _write_in_place(self.dir / "boot_id", str(uuid.uuid4()) + "\n")
        self.boots += 1
        await self.start_sshd()
        if self.libvirt:
            await self.start_libvirtd()
        _log(f"boot {self.boots} done (boot_id {(self.dir / 'boot_id').read_text().strip()})")

    def _spawn(self, args: list[str], log_name: str) -> Proc:
        with open(self.dir / log_name, "ab") as log:
            child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     close_fds=True)
        return Proc.of(child.pid) or Proc(child.pid, -1)

    def _record(self, name: str, proc: Proc | None) -> None:
        path = self.dir / f"{name}.pid"
        if proc is None:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(proc.to_json()))
        os.replace(tmp, path)

    async def start_sshd(self) -> None:
        if self.sshd and is_alive(self.sshd):
            return
        self.sshd = self._spawn(["/usr/sbin/sshd", "-D", "-e", "-f",
                                 str(self.dir / "sshd_config")], "sshd.log")
        await self._wait(lambda: tcp_port_open(self.address, 22), self.sshd, "sshd listening on port 22")
        self._record("sshd", self.sshd)

    async def stop_sshd(self) -> None:
        if self.sshd is not None:
            await self._stop([self.sshd])
        self.sshd = None
        self._record("sshd", None)

    async def start_libvirtd(self) -> None:
        self.libvirtd = self._spawn(["libvirtd", "-f", "/etc/libvirt/libvirtd.conf"],
                                    "libvirtd.log")
        await self._wait(lambda: os.path.exists("/run/libvirt/libvirt-sock"), self.libvirtd,
                         "libvirtd socket")
        self._record("libvirtd", self.libvirtd)

    async def _wait(self, ready, proc: Proc, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout_s
        delay = 0.005
        while not ready():
            if not is_alive(proc):
                raise RuntimeError(f"{what}: process exited (see logs in {self.dir})")
            if loop.time() > deadline:
                raise RuntimeError(f"no {what} within {self.ready_timeout_s} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _stop(self, procs: list[Proc]) -> None:
        left = await stop_processes(procs, self.exit_timeout_s)
        if left:
            _log(f"processes {[p.pid for p in left]} survived SIGKILL")

    async def reboot(self) -> None:
        async with self.busy:
            _log("reboot requested: stopping every process of the host")
            me = os.getpid()
            victims = [p for p in processes_in_netns("/proc/self/ns/net") if p.pid != me]
            await self._stop(victims)
            self.sshd = self.libvirtd = None
            self._record("sshd", None)
            self._record("libvirtd", None)
            await self.boot()

    # -- control socket ----------------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = (await reader.readline()).decode().strip()
            if request == "reboot":
                writer.write(b"ok rebooting\n")
                await writer.drain()
                writer.close()
                await self.reboot()
                return
            if request == "sshd stop":
                async with self.busy:
                    await self.stop_sshd()
                reply = "ok sshd stopped"
            elif request == "sshd start":
                async with self.busy:
                    await self.start_sshd()
                reply = "ok sshd started"
            elif request in ("libvirtd stop", "libvirtd start") and not self.libvirt:
                reply = "error this lab runs no libvirtd (migrate-lab up --libvirt)"
            elif request == "libvirtd stop":
                async with self.busy:
                    if self.libvirtd is not None:
                        await self._stop([self.libvirtd])
                    self.libvirtd = None
                    self._record("libvirtd", None)
                reply = "ok libvirtd stopped"
            elif request == "libvirtd start":
                async with self.busy:
                    if not (self.libvirtd and is_alive(self.libvirtd)):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink("/run/libvirt/libvirt-sock")
                        await self.start_libvirtd()
                reply = "ok libvirtd started"
            elif request == "status":
                reply = json.dumps({
                    "host": self.host, "boots": self.boots,
                    "boot_id": (self.dir / "boot_id").read_text().strip(),
                    "sshd": self.sshd.to_json() if self.sshd and is_alive(self.sshd) else None,
                    "libvirtd": (self.libvirtd.to_json()
                                 if self.libvirtd and is_alive(self.libvirtd) else None)})
            else:
                reply = f"error unknown request {request!r}"
        except Exception as exc:  # noqa: BLE001 - reported to the requester, init keeps running
            reply = f"error {exc}"
            _log(f"request failed: {exc}")
        writer.write(reply.encode() + b"\n")
        await writer.drain()
        writer.close()

    def reap(self) -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    async def serve(self) -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        self.mount_once()
        await self.boot()
        path = self.dir / CONTROL_SOCKET
        path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self.handle, path=str(path))
        os.chmod(path, 0o600)
        print("ready", flush=True)
        os.close(1)
        async with server:
            await stop.wait()
        _log("SIGTERM: stopping the host's processes")
        me = os.getpid()
        await self._stop([p for p in processes_in_netns("/proc/self/ns/net") if p.pid != me])


def request(socket_path: str, line: str) -> str:
    """Send one control request to a host init; return its answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(socket_path)
        s.sendall(line.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode().strip()


REBOOT_SCRIPT = """#!/bin/sh
# 'reboot' of migrator lab host {host}: restarts every process of this host (sshd, sessions,
# libvirtd, guests) with a fresh /run and /tmp and a new boot_id. The real machine is not
# touched. Written by migrate-lab up. Only system tools: the migrator checkout (and its venv)
# may live under /tmp, which is private to each lab host.
printf 'reboot\n' | exec socat -t 30 - UNIX-CONNECT:{socket}
"""

REFUSE_SCRIPT = """#!/bin/sh
# '{name}' on migrator lab host {host} is refused: it would act on the whole machine.
echo "{name}: refused on lab host {host} (use 'reboot', or 'migrate-lab down')" >&2
exit 1
"""


def write_sbin(hostdir: Path, host: str) -> None:
    """The host's own /usr/local/sbin: a lab ``reboot``; poweroff/halt/shutdown refused."""
    sbin = hostdir / "sbin"
    sbin.mkdir(exist_ok=True)
    scripts = {"reboot": REBOOT_SCRIPT.format(host=host,
                                              socket=shlex.quote(str(hostdir / CONTROL_SOCKET)))}
    for name in ("poweroff", "halt", "shutdown"):
        scripts[name] = REFUSE_SCRIPT.format(name=name, host=host)
    for name, text in scripts.items():
        (sbin / name).write_text(text)
        os.chmod(sbin / name, 0o755)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m migrator.lab.hostinit")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", required=True)
    s.add_argument("--hostdir", required=True)
    s.add_argument("--address", required=True)
    s.add_argument("--run-mib", type=int, required=True)
    s.add_argument("--tmp-mib", type=int, required=True)
    s.add_argument("--libvirt", action="store_true")
    s.add_argument("--local-dir", default="")
    s.add_argument("--ready-timeout-s", type=float, required=True)
    s.add_argument("--exit-timeout-s", type=float, required=True)
    r = sub.add_parser("request")
    r.add_argument("socket")
    r.add_argument("line", nargs="+")
    a = p.parse_args(argv)
    if a.cmd == "request":
        try:
            answer = request(a.socket, " ".join(a.line))
        except OSError as exc:
            print(f"lab host init not reachable at {a.socket}: {exc}", file=sys.stderr)
            return 1
        print(answer)
        return 0 if answer.startswith(("ok", "{")) else 1
    try:
        asyncio.run(HostInit(a).serve())
    except Exception as exc:  # noqa: BLE001 - reported on stderr (the lab shows the log)
        _log(f"failed: {exc}")
        try:
            print(f"failed: {exc}", flush=True)
        except OSError:
            pass  # stdout already closed after 'ready'
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
