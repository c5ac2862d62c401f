"""The processes that make a network namespace a "host": host init, sshd, libvirtd.

A lab host is a network namespace plus a long-lived *host init* process that holds the host's
own mount and UTS namespaces. Inside it:

* the hostname is the host's name;
* ``/run`` is a private tmpfs: the host's sockets, pidfiles and ``/run/migrator`` (where VMs
  keep their QMP and serial sockets) are invisible to the controller and to other hosts, so
  migrator must reach them over SSH, exactly as on real hosts;
* ``/etc/hosts`` and libvirt's ``/etc``, ``/var/lib``, ``/var/log`` and ``/var/cache``
  directories are bind mounts of the host's own copies under the lab directory.

Every other process of the host (sshd, libvirtd, and whatever sshd sessions start) enters that
init with ``nsenter -t <init> -n -m -u``, so it sees the same view.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

from ..errors import LabError
from .system import Proc, is_alive, spawn_daemon

#: libvirt directories that get a per-host bind mount (only those present on this machine)
LIBVIRT_DIRS = {"etc": "/etc/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt",
                "cache": "/var/cache/libvirt"}

_INIT_SCRIPT = r'''
set -eu
host=$1 hostdir=$2 run_mib=$3
hostname "$host"
mount -t tmpfs -o mode=0755,size=${run_mib}m "lab-$host-run" /run
mkdir -p /run/sshd /run/migrator /run/libvirt /run/lock
chmod 0700 /run/migrator
mount --bind "$hostdir/hosts" /etc/hosts
for pair in etc:/etc/libvirt lib:/var/lib/libvirt log:/var/log/libvirt cache:/var/cache/libvirt; do
  target=${pair#*:}
  if [ -d "$target" ]; then mount --bind "$hostdir/libvirt-${pair%%:*}" "$target"; fi
done
echo ready
exec sleep infinity </dev/null >/dev/null 2>&1
'''


async def start_host_init(host: str, netns: str, hostdir: Path, run_mib: int,
                          timeout_s: float) -> Proc:
    """Start ``host``'s init in ``netns`` and wait until its mounts are in place.

    :raise LabError: when it exits or does not report ready within ``timeout_s``.
    """
    for sub in LIBVIRT_DIRS:
        (hostdir / f"libvirt-{sub}").mkdir(exist_ok=True)
    log = hostdir / "init.log"
    args = ["ip", "netns", "exec", netns, "unshare", "--mount", "--uts", "--propagation",
            "private", "--", "sh", "-c", _INIT_SCRIPT, "host-init", host, str(hostdir),
            str(run_mib)]
    with open(log, "ab") as err:
        child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=err, start_new_session=True, close_fds=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout_s)
    except TimeoutError:
        child.kill()
        raise LabError(f"{host}: host init did not get ready in {timeout_s} s; see {log}") from None
    finally:
        child.stdout.close()
    if line.strip() != b"ready":
        child.wait()
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise LabError(f"{host}: host init failed: {tail[0]} (log: {log})")
    proc = Proc.of(child.pid)
    if proc is None:
        raise LabError(f"{host}: host init exited right after start; see {log}")
    return proc


def enter_args(init: Proc) -> list[str]:
    """The command prefix that runs a program inside the host of ``init``."""
    return ["nsenter", "-t", str(init.pid), "-n", "-m", "-u", "--"]


def sshd_config(address: str, hostdir: Path, authorized_keys: Path) -> str:
    return f"""# sshd of lab host {hostdir.name}; written by migrate-lab
ListenAddress {address}
Port 22
HostKey {hostdir / 'ssh_host_ed25519_key'}
PidFile none
AuthorizedKeysFile {authorized_keys}
StrictModes yes
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
MaxSessions 64
MaxStartups 64:30:256
AcceptEnv LANG LC_*
AllowStreamLocalForwarding yes
Subsystem sftp internal-sftp
LogLevel INFO
"""


async def start_sshd(host: str, init: Proc, hostdir: Path, address: str,
                     timeout_s: float) -> Proc:
    """Start ``host``'s sshd (foreground mode, our own PID) and wait until it accepts TCP.

    :raise LabError: when it exits (the message quotes its log) or never listens.
    """
    log = hostdir / "sshd.log"
    proc = spawn_daemon(enter_args(init) + ["/usr/sbin/sshd", "-D", "-e", "-f",
                                            str(hostdir / "sshd_config")], log)
    await _wait_listening(host, proc, address, 22, log, timeout_s)
    return proc


async def _wait_listening(host: str, proc: Proc, address: str, port: int, log: Path,
                          timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.005
    last_error: BaseException | None = None
    while True:
        if not is_alive(proc):
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise LabError(f"{host}: sshd exited: {tail[0]} (log: {log})")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 1.0)
            writer.close()
            await writer.wait_closed()
            return
        except (OSError, TimeoutError) as exc:
            last_error = exc
        if loop.time() >= deadline:
            raise LabError(f"{host}: sshd did not listen on {address}:{port} within "
                           f"{timeout_s} s ({last_error!r}; log: {log})")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


def libvirt_configs(hostdir: Path, address: str, host_uuid: str) -> None:
    """Write the host's libvirtd.conf and qemu.conf (recipe 5.6 and pitfall 4)."""
    etc = hostdir / "libvirt-etc"
    (etc / "qemu").mkdir(parents=True, exist_ok=True)
    (etc / "libvirtd.conf").write_text(f"""# libvirtd of lab host {hostdir.name}
host_uuid = "{host_uuid}"
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
""")
    (etc / "qemu.conf").write_text(f"""# no systemd, AppArmor or dbus in a lab host: see lab-recipe pitfall 4
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
namespaces = [ ]
cgroup_controllers = [ ]
migration_address = "{address}"
migration_host = "{address}"
""")


async def start_libvirtd(host: str, init: Proc, hostdir: Path, timeout_s: float) -> Proc:
    """Start ``host``'s libvirtd in the foreground and wait for its socket.

    The socket lives in the host's private /run; it is found through ``/proc/<init>/root``.

    :raise LabError: when libvirtd exits or its socket does not appear in time.
    """
    log = hostdir / "libvirtd.log"
    proc = spawn_daemon(enter_args(init) + ["libvirtd", "-f", "/etc/libvirt/libvirtd.conf"], log)
    sock = Path(f"/proc/{init.pid}/root/run/libvirt/libvirt-sock")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.005
    while not sock.exists():
        if not is_alive(proc):
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise LabError(f"{host}: libvirtd exited: {tail[0]} (log: {log})")
        if loop.time() >= deadline:
            raise LabError(f"{host}: libvirtd socket did not appear within {timeout_s} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)
    return proc


def tcp_port_open(address: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False
