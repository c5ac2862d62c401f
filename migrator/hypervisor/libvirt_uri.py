"""How the controller (and, for peer-to-peer migration, a source libvirtd) reaches a host's
libvirtd: one URI per transport (``libvirt.transport``).

* ``openssh`` (default): ``qemu+ext://<address>/system?command=<wrapper>``. libvirt runs a two-line
  wrapper that execs OpenSSH with the inventory's key, port, user and known_hosts
  (``StrictHostKeyChecking=yes``, ``BatchMode=yes``; no ~/.ssh/config is read) and
  ``virt-ssh-helper qemu:///system`` on the host. Closing the connection ends that ssh
  process (libvirt kills and reaps it), so the TCP connection and the sshd session end too.
  Wrappers are content-addressed files (``~/.cache/migrator/libvirt-ssh/<hash>``): the same
  host settings give the same file, written once, atomically, holding paths and no secret.
* ``libssh``: libvirt's built-in SSH client (``qemu+libssh://``) with the same key and
  known_hosts. Known defect of libvirt 11.3 with libssh 0.10.6: closing a connection does not
  close its TCP socket (libvirt hands the socket to libssh with ``ownsFd = false``, "libssh
  closes it", and libssh's ``ssh_disconnect`` does not), so each closed connection keeps a
  socket in the process and an sshd session on the host until the process exits.
* ``ssh``: libvirt runs ``ssh`` itself with the user's own ~/.ssh configuration and
  known_hosts (``qemu+ssh://``); the inventory's known_hosts is not used.

Needs ``virt-ssh-helper`` on the hosts (libvirt >= 6.8) for ``openssh``.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import tempfile
from pathlib import Path
from urllib.parse import quote as urlquote

from ..hosts.ssh import SSHHost

TRANSPORTS = ("openssh", "libssh", "ssh")
WRAPPER_DIR = Path("~/.cache/migrator/libvirt-ssh")


def ssh_argv(host: SSHHost, connect_timeout_s: float) -> list[str]:
    """The OpenSSH command line that reaches ``host``'s libvirtd (``virt-ssh-helper``)."""
    argv = ["ssh", "-F", "none", "-T", "-e", "none", "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR", "-o", f"ConnectTimeout={max(1, round(connect_timeout_s))}"]
    if host.known_hosts is None:                        # insecure_no_host_key_check=True
        argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    else:
        argv += ["-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=none",
                 "-o", f"UserKnownHostsFile={host.known_hosts}"]
    for key in host.client_keys:
        argv += ["-i", key]
    if host.client_keys:
        argv += ["-o", "IdentitiesOnly=yes"]
    argv += ["-p", str(host.port), "-l", host.user, "--", host.address,
             "virt-ssh-helper", "qemu:///system"]
    return argv


def wrapper_script(host: SSHHost, connect_timeout_s: float) -> str:
    """The wrapper libvirt's ``ext`` transport runs (it takes no arguments)."""
    return "#!/bin/sh\nexec " + shlex.join(ssh_argv(host, connect_timeout_s)) + "\n"


def wrapper_name(script: str) -> str:
    return "ssh-" + hashlib.sha256(script.encode()).hexdigest()[:20]


def local_wrapper(host: SSHHost, connect_timeout_s: float) -> Path:
    """The controller's wrapper file for ``host`` (written if missing; atomic, mode 0700).

    :raise OSError: the cache directory cannot be written.
    """
    script = wrapper_script(host, connect_timeout_s)
    directory = WRAPPER_DIR.expanduser()
    path = directory / wrapper_name(script)
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".new-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(script)
        os.chmod(tmp, 0o700)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _uri_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def ext_uri(host: SSHHost, wrapper: str | os.PathLike) -> str:
    """``qemu+ext://<address>/system?command=<wrapper>``. The ext transport ignores the
    address, but libvirt refuses a peer-to-peer migration to a URI without one ("Attempt to
    migrate guest to the same host"), and messages name the host."""
    return f"qemu+ext://{_uri_host(host.address)}/system?command={urlquote(str(wrapper))}"


def host_uri(host: SSHHost, transport: str = "openssh", connect_timeout_s: float = 10) -> str:
    """The URI of ``host``'s system libvirtd, as this process opens it.

    :raise OSError: ``openssh``: the wrapper cannot be written.
    """
    netloc = f"{urlquote(host.user)}@{_uri_host(host.address)}:{host.port}"
    if transport == "openssh":
        return ext_uri(host, local_wrapper(host, connect_timeout_s))
    if transport == "ssh":
        query = f"?keyfile={urlquote(host.client_keys[0])}" if host.client_keys else ""
        return f"qemu+ssh://{netloc}/system{query}"
    params = []
    if host.known_hosts:
        params.append(f"known_hosts={urlquote(host.known_hosts)}")
    if host.client_keys:
        params += [f"keyfile={urlquote(host.client_keys[0])}", "sshauth=privkey"]
    return f"qemu+libssh://{netloc}/system" + ("?" + "&".join(params) if params else "")


async def remote_uri(via: SSHHost, directory: str, host: SSHHost, transport: str,
                     connect_timeout_s: float = 10) -> str:
    """The URI of ``host``'s libvirtd as libvirtd on ``via`` opens it (peer-to-peer
    migration). ``openssh``: the wrapper is written on ``via`` in ``directory`` (a run dir
    removed with the VM); key and known_hosts paths must exist there too.

    :raise HostError: the wrapper cannot be written on ``via``.
    """
    if transport != "openssh":
        return host_uri(host, transport, connect_timeout_s)
    script = wrapper_script(host, connect_timeout_s)
    path = f"{directory}/{wrapper_name(script)}"
    await via.write_file(path, script.encode(), mode=0o700)
    return ext_uri(host, path)


__all__ = ["TRANSPORTS", "ext_uri", "host_uri", "local_wrapper", "remote_uri", "ssh_argv",
           "wrapper_script"]
