"""Starting a lab host's init, and the files it needs (sshd and libvirt configs).

A lab host is a network namespace plus a long-lived *host init* (:mod:`.hostinit`) holding
the host's own mount and UTS namespaces: its hostname, ``/etc/hosts``, libvirt directories,
``/usr/local/sbin`` (lab ``reboot``), boot id, and private ``/run`` and ``/tmp``. The init
starts sshd (and libvirtd) as its children, so every ssh session sees the host's view.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from ..aio import wait_for
from ..errors import LabError
from . import hostinit
from .system import Proc

#: libvirt directories that get a per-host bind mount (only those present on this machine)
LIBVIRT_DIRS = {"etc": "/etc/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt",
                "cache": "/var/cache/libvirt"}


async def start_host_init(host: str, netns: str, hostdir: Path, address: str, *,
                          run_mib: int, tmp_mib: int, libvirt: bool, ready_timeout_s: float,
                          exit_timeout_s: float, local_dir: Path | None = None) -> Proc:
    """Start ``host``'s init (:mod:`.hostinit`) in ``netns``; wait until its sshd listens.

    :raise LabError: when it fails (the message quotes its log) or is not ready in time.
    """
    for sub in LIBVIRT_DIRS:
        (hostdir / f"libvirt-{sub}").mkdir(exist_ok=True)
    hostinit.write_sbin(hostdir, host)
    log = hostdir / "init.log"
    args = ["ip", "netns", "exec", netns, "unshare", "--mount", "--uts", "--propagation",
            "private", "--", sys.executable, "-m", "migrator.lab.hostinit", "serve",
            "--host", host, "--hostdir", str(hostdir), "--address", address,
            "--run-mib", str(run_mib), "--tmp-mib", str(tmp_mib),
            "--ready-timeout-s", str(ready_timeout_s), "--exit-timeout-s", str(exit_timeout_s)]
    if libvirt:
        args.append("--libvirt")
    if local_dir is not None:       # the host's own storage appears there (see hostinit)
        args += ["--local-dir", str(local_dir)]
    with open(log, "ab") as err:
        child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=err, start_new_session=True, close_fds=True)
    budget = ready_timeout_s * (2 if libvirt else 1) + exit_timeout_s
    try:
        line = await wait_for(asyncio.to_thread(child.stdout.readline), budget)
    except TimeoutError:
        child.kill()
        raise LabError(f"{host}: host init not ready within {budget:g} s; see {log}") from None
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


def daemon_proc(hostdir: Path, name: str) -> Proc | None:
    """The running ``name`` (sshd, libvirtd) of a host, as its init recorded it."""
    try:
        data = json.loads((hostdir / f"{name}.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return Proc(int(data["pid"]), int(data["start"]))


def control(hostdir: Path, line: str) -> str:
    """Send a control request (``reboot``, ``sshd stop``, ``sshd start``, ``status``) to a
    host's init. :raise LabError: when the init cannot be reached or refuses."""
    try:
        answer = hostinit.request(str(hostdir / hostinit.CONTROL_SOCKET), line)
    except OSError as exc:
        raise LabError(f"{hostdir.name}: host init not reachable: {exc}") from exc
    if not answer.startswith(("ok", "{")):
        raise LabError(f"{hostdir.name}: {line!r} failed: {answer}")
    return answer


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
# migration over TLS (VIR_MIGRATE_TLS): this host's own credentials (lab.py: _make_pki)
migrate_tls_x509_cert_dir = "{hostdir / 'pki'}"
migrate_tls_x509_verify = 1
""")
