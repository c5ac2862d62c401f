"""The one typed config object (timeouts, limits, defaults) and the inventory format.

Two kinds of input live here:

* :class:`Config` -- how migrator behaves: every timeout and limit, each field named with its
  unit and documented with why its default is what it is. Code takes timeouts from here and
  nowhere else.
* :class:`Inventory` -- where things are: hosts, their addresses, SSH settings, the shared
  storage path, the guest image. ``migrate-lab up`` writes one for its lab; for real hosts users
  write one by hand (see ``configs/inventory.example.yaml``).

Both are YAML, validated strictly: an unknown key is an error naming the key, never ignored.

Every part of migrator finds the inventory the same way (:func:`find_inventory`): an explicit
argument, else ``$MIGRATOR_INVENTORY``, else the default lab's inventory file.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, InventoryError

#: Where labs live unless ``--dir`` says otherwise: ``/srv/migrator/<lab name>``. Not under /tmp:
#: sshd's StrictModes refuses an AuthorizedKeysFile below a world-writable directory.
LAB_BASE_DIR = Path(os.environ.get("MIGRATOR_LAB_BASE", "/srv/migrator"))
DEFAULT_LAB_NAME = "mlab"
INVENTORY_FILE = "inventory.yaml"
ENV_INVENTORY = "MIGRATOR_INVENTORY"
#: the default guest's kernel command line: its console on the first serial port, quiet, a
#: reboot at once on panic; ``cryptomgr.notests`` skips the kernel's crypto self-tests at boot,
#: 0.6 s of the lab guest's ~4.6 s under TCG (Debian's 6.1 kernel; initcall_debug showed them
#: as its longest initcalls). Not ``rodata=off`` (its W+X check, 0.3 s more): it keeps 3 MB
#: the kernel otherwise frees, and a 128 MiB lab guest with a 32 MiB dirtier and a 16 MiB
#: memsum pattern then OOM-kills its dirtier
GUEST_KERNEL_APPEND = "console=ttyS0 quiet panic=-1 cryptomgr.notests"

_HOST_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,62}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# Config: timeouts and limits
# --------------------------------------------------------------------------------------------

class Timeouts(_Strict):
    """Every timeout migrator applies, in seconds. 0 is not allowed: a wait must end."""

    ssh_connect_s: float = Field(15.0, gt=0)
    """TCP connect + key exchange + auth. A lab sshd answers in ~20 ms; real hosts over a WAN
    and a busy 2-core controller with 16 parallel handshakes need a few seconds."""

    guest_boot_s: float = Field(90.0, gt=0)
    """QEMU start until the guest's shell prompt. Measured 2 s under TCG for the lab guest
    (recipe 6.1); the margin covers a 2-core machine that also runs other guests."""

    guest_cmd_s: float = Field(30.0, gt=0)
    """One command on a guest's serial console. Lab commands take milliseconds."""

    kvm_probe_s: float = Field(20.0, gt=0)
    """How long ``--accel auto`` lets a KVM guest try to print its ready marker. A working KVM
    boots the lab guest in well under a second; the PVM /dev/kvm here hangs forever."""

    sshd_ready_s: float = Field(20.0, gt=0)
    """A lab host's sshd accepting connections after it was started (measured: ~10 ms)."""

    libvirtd_ready_s: float = Field(30.0, gt=0)
    """A lab host's libvirtd socket appearing after it was started (measured: 0.08 s)."""

    dhcp_ready_s: float = Field(20.0, gt=0)
    """The lab's dnsmasq writing its pid file (its DHCP socket bound) after it was started."""

    process_exit_s: float = Field(10.0, gt=0)
    """A process to exit after SIGTERM before it gets SIGKILL (sshd/qemu exit in ms)."""

    qemu_stop_s: float = Field(15.0, gt=0)
    """A guest's QEMU to exit after ``quit``/SIGTERM."""

    host_wait_s: float = Field(300.0, gt=0)
    """Default for ``wait_up``/``wait_down``: a real server may take minutes to POST."""

    host_reboot_s: float = Field(600.0, gt=0)
    """Default for ``reboot``: going down, firmware, boot, sshd. A lab host takes ~0.2 s."""

    migration_setup_s: float = Field(60.0, gt=0)
    """Starting the destination QEMU and getting it listening."""

    migration_cancel_s: float = Field(30.0, gt=0)
    """QEMU to acknowledge migrate_cancel (it answers in milliseconds; the guard is for a
    wedged QEMU, as KubeVirt guards libvirt's abortJob)."""

    progress_interval_s: float = Field(0.05, gt=0)
    """How often a running migration is polled (query-migrate) for progress records."""

    host_cleanup_s: float = Field(30.0, gt=0)
    """Cleanup commands on close (removing tmp dirs, killing a timed-out command's group)."""

    libvirt_call_s: float = Field(60.0, gt=0)
    """One libvirt API call other than the migration itself (define, start, job stats,
    abortJob ...). They answer in milliseconds; a hung daemon must not hang the run (KubeVirt
    guards abortJob the same way)."""

    libvirt_event_s: float = Field(5.0, gt=0)
    """An event libvirt has already sent: the source's job-completed event, which carries the
    migration's final figures and may reach the controller just after ``migrate3`` returned
    (measured: milliseconds). Past it, the destination's figures are taken (no disk mirror
    figures in them)."""

    qmp_probe_s: float = Field(30.0, gt=0)
    """Asking a QEMU found by ``recover`` where it stands (QMP query-status, query-migrate):
    answered in milliseconds, unless its main thread is blocked, e.g. a postcopy destination
    waiting for pages that cannot come. Then the VM is reported unresolved, never waited on."""

    barrier_s: float = Field(120.0, gt=0)
    """A framework barrier (hosts meeting between steps). Hosts arrive within milliseconds
    of each other unless one is slow or gone; the server names whoever is missing."""

    disk_prepare_s: float = Field(120.0, gt=0)
    """Preparing the run's disks (qcow2 overlays on shared storage) and the storage check."""

    guest_probe_s: float = Field(5.0, gt=0)
    """A guest used as a host is up when its console's shell answers within this."""

    loop_stall_warn_s: float = Field(3.0, gt=0)
    """The event loop not answering for longer than this is reported as a warning naming
    the file and line it was blocked at: a blocking call (``time.sleep``) in async scenario
    code freezes every migration, barrier and progress line in flight. The loop's own work
    takes milliseconds; a loaded two-core machine stays well under a second."""

    worker_cancel_s: float = Field(10.0, gt=0)
    """A ``def`` callback or hook (run in a worker thread) that is cancelled: how long its
    thread is given to return. Its calls into migrator raise CancelledError at once; code
    that never calls back cannot be stopped, and is reported with where it runs."""

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, where in MOVED_TO_POLICY.items():
                if key in data:
                    raise ValueError(f"timeouts.{key} is now migration.policy.{where} (the "
                                     "convergence policy decides when a migration has "
                                     "taken too long)")
            if "report_page_s" in data:
                raise ValueError("timeouts.report_page_s is gone: report.html is drawn by "
                                 "migrate-run itself at the run's end (no drawer process "
                                 "to wait for); remove the key")
        return data


#: timeouts that became part of the convergence policy, and their new names
MOVED_TO_POLICY = {"migration_s": "completion_s", "migration_s_per_gib": "completion_s_per_gib",
                   "migration_stall_s": "stall_s"}


class Limits(_Strict):
    """Bounds on concurrency and sizes."""

    ssh_channels_per_host: int = Field(8, ge=1)
    """Concurrent command/SFTP channels on one host's connection. OpenSSH's sshd allows 10
    sessions per connection by default (MaxSessions); 8 leaves room for interactive use."""

    console_file_mib: float = Field(4.0, gt=0)
    """The largest file a guest used as a host sends or receives over its serial console
    (base64: some tens of KiB/s under TCG, a MiB in about 30 s); a larger one is refused
    before it starts."""

    vm_launches_per_host: int = Field(2, ge=1)
    """QEMU launches at once on one host (``qemu -daemonize``; libvirt's define and create):
    the critical section DTS guarded with a lock around VM creation. Every start of a run
    takes it, whatever started it (parallel VM tasks, a ``migrate()``'s side-by-side
    starts, a migration's destination)."""

    vm_boots_per_host: int = Field(4, ge=1)
    """VMs between launch and an answering console shell at once on one host. A TCG boot is
    CPU-bound (about 2 s of one core for the lab guest); more at once only stretch each
    toward ``timeouts.guest_boot_s``."""


class QueueSettings(_Strict):
    """How many migrations run at once (``queue``), across every run on the same hosts: the
    slots are files on the inventory's shared storage, claimed under a lock, so every
    controller sees them (KubeVirt: 2 outbound per node, 5 per cluster). A migration beyond a
    limit waits in its run's queue, by ``priority`` then in order of asking; a waiting
    migration can be cancelled without ever starting."""

    per_source: int = Field(2, ge=1)
    """Migrations at once out of one host (KubeVirt's parallelOutboundMigrationsPerNode)."""
    per_destination: int = Field(2, ge=1)
    """Migrations at once into one host."""
    per_cluster: int = Field(5, ge=1)
    """Migrations at once among all hosts sharing the shared storage (KubeVirt's
    parallelMigrationsPerCluster)."""
    poll_s: float = Field(0.5, gt=0)
    """A waiting migration looks again this often for slots another controller freed (a
    slot this run frees wakes it at once)."""
    prepare_while_queued: bool = True
    """Start the destination and let it listen while the migration waits for its slot, so
    the transfer starts the moment one frees (the destination's memory is taken meanwhile);
    false: wait first, then prepare."""


class LabDefaults(_Strict):
    """Defaults for ``migrate-lab up`` when the command line does not say."""

    name: str = DEFAULT_LAB_NAME
    hosts: int = Field(2, ge=1)
    subnet: str = "10.77.0.0/24"
    first_host_offset: int = Field(11, ge=2)
    """hostA gets network+11 (10.77.0.11), as in the recipe; the bridge gets network+1."""
    guest_subnet: str | None = None
    """The lab's guest network (VM NICs with ``network: bridge``); default: the lab subnet
    moved up by 2^16 addresses (10.77.0.0/24 -> 10.78.0.0/24)."""
    run_tmpfs_mib: int = Field(64, ge=8)
    """Size of each host's private /run (sockets, pidfiles, VM run dirs)."""
    tmp_tmpfs_mib: int = Field(1024, ge=16)
    """Size limit of each host's private /tmp (memory is used only as files are written)."""
    guest_mem_mib: int = Field(128, ge=32)


#: what a convergence policy can do when a limit is hit, in the order given
POLICY_ACTIONS = ("auto-converge", "postcopy", "pause", "abort")


class DowntimeRamp(_Strict):
    """Nova's downtime steps (``live_migration_downtime*``): the tolerated downtime starts
    low and is raised in ``steps`` equal steps to ``max_ms``, one step every
    ``delay_s_per_gib`` seconds per GiB of guest memory."""

    max_ms: int = Field(500, ge=1, le=2000)
    """The last step (Nova: ``live_migration_downtime``, 500 ms). QEMU accepts up to 2000."""
    steps: int = Field(10, ge=1, le=100)
    """How many raises (Nova: ``live_migration_downtime_steps``, 10)."""
    delay_s_per_gib: float = Field(75.0, gt=0)
    """Seconds between two steps per GiB of guest memory (Nova:
    ``live_migration_downtime_delay``, 75)."""
    start_ms: int | None = Field(None, ge=1, le=2000)
    """The first step; None: ``max_ms / steps`` as Nova does."""

    @model_validator(mode="after")
    def _rising(self) -> "DowntimeRamp":
        if self.start_ms is not None and self.start_ms > self.max_ms:
            raise ValueError(f"start_ms ({self.start_ms}) is above max_ms ({self.max_ms})")
        return self

    def schedule(self, mem_mib: int) -> list[tuple[float, int]]:
        """(seconds after 'migrate', downtime ms) of every step, the first at 0."""
        base = self.start_ms if self.start_ms is not None else max(1, self.max_ms // self.steps)
        delay = self.delay_s_per_gib * mem_mib / 1024
        return [(delay * i, round(base + (self.max_ms - base) * i / self.steps))
                for i in range(self.steps + 1)]


class ConvergencePolicy(_Strict):
    """What to do with a migration that does not converge (``migration.policy``): two limits,
    an ordered list of actions taken one per limit hit, and a downtime ramp.

    * **completion**: not completed ``completion_s`` + ``completion_s_per_gib`` per GiB of
      guest memory after 'migrate' (Nova: 800 s/GiB, KubeVirt: 150 s/GiB);
    * **progress**: the remaining bytes did not reach a new low for ``progress_timeout_s``
      (KubeVirt's progressTimeout, 150 s; off by default).

    Each hit takes the next action and starts both clocks again. ``auto-converge`` throttles
    the guest's vCPUs (raised at every pass), ``postcopy`` switches to postcopy, ``pause``
    stops the guest so the rest is sent while it does not run (Nova's force-complete, virsh
    ``--timeout-suspend``), ``abort`` rolls the migration back (the VM stays on its source).
    The list ends in an action that ends the migration (``postcopy``, ``pause`` or ``abort``);
    a hit after ``pause`` aborts; in postcopy only the completion limit applies, and a hit
    there gives the migration up (SPLIT: nothing can be rolled back after the switchover). Decisions are taken at the iteration boundaries QEMU reports
    (``abort`` at once); one pass that runs past a limit by a tenth of it is not waited for.

    ``stall_s`` is not a convergence limit: no byte moved at all means a dead link or a hung
    destination, which no throttle helps: precopy is rolled back, a postcopy recovered.

    The defaults are migrator's behaviour before policies existed: abort (roll back) after
    600 s + 60 s per GiB, or after 60 s without a byte moved.
    """

    completion_s: float = Field(600.0, gt=0)
    """The completion limit's fixed part: a lab guest migrates in under a second; a busy
    16 GiB guest over 10 Gbit/s in tens of seconds; auto-converge can take minutes."""
    completion_s_per_gib: float = Field(60.0, ge=0)
    """Added per GiB of guest memory: at the ~1 Gbit/s of a TCG lab a GiB takes ~10 s."""
    progress_timeout_s: float | None = Field(None, gt=0)
    """The progress limit; None: off."""
    stall_s: float = Field(60.0, gt=0)
    """No byte moved for this long: the link is blocked or the destination hung (TCP alone
    would retry for ~15 minutes)."""
    actions: list[str] = ["abort"]
    """Taken one per limit hit, in this order (from :data:`POLICY_ACTIONS`)."""
    throttle_initial: int = Field(20, ge=1, le=99)
    """``auto-converge``: the first throttle, percent (QEMU's default; applies when QEMU had
    not throttled yet, else the increment does)."""
    throttle_increment: int = Field(10, ge=1, le=99)
    """``auto-converge``: added each time QEMU finds the guest still dirtying too fast (every
    second pass), up to 99 % (QEMU's default 10: a large guest on a slow link needs minutes
    to reach a throttle that converges)."""
    downtime_ramp: DowntimeRamp | None = None
    """Raise the tolerated downtime step by step; None: ``downtime_limit_ms`` throughout."""

    @field_validator("actions")
    @classmethod
    def _ordered(cls, actions: list[str]) -> list[str]:
        if not actions:
            raise ValueError("give at least one action (e.g. [abort])")
        for a in actions:
            if a not in POLICY_ACTIONS:
                raise ValueError(f"unknown action {a!r}: use {', '.join(POLICY_ACTIONS)}")
        if len(set(actions)) != len(actions):
            raise ValueError(f"an action is listed twice: {actions}")
        if actions[-1] == "auto-converge":
            raise ValueError(f"{actions} ends without an action that ends the migration: "
                             "add postcopy, pause or abort after auto-converge")
        why = {"abort": "the migration ends there",
               "postcopy": "a postcopy cannot be throttled, paused or rolled back",
               "pause": "the paused guest no longer dirties memory: only abort can follow"}
        for a, after in zip(actions, actions[1:]):
            if a in ("abort", "postcopy") or (a == "pause" and after != "abort"):
                raise ValueError(f"{after!r} can never be taken after {a!r} ({why[a]})")
        return actions

    def completion_for(self, mem_mib: int) -> float:
        """The completion limit for a guest of ``mem_mib``."""
        return self.completion_s + self.completion_s_per_gib * mem_mib / 1024

    def deadline_for(self, mem_mib: int) -> float:
        """How long a migration may run in all, whatever it does: one completion window per
        action and one more after the last, each with its tenth of grace. Never reached by a
        policy that acts (it is the backstop should a driver fail to)."""
        return self.completion_for(mem_mib) * 1.1 * (len(self.actions) + 1)


class MigrationSettings(_Strict):
    """The knobs of one migration, their bounds and the rules between them: the one
    definition. It is the config's ``migration`` section (the defaults of every migration of a
    run, checked when the config is loaded) and the base of
    :class:`migrator.migration.params.MigrationParams`, which adds what the knobs mean to QEMU
    and libvirt. (It lives here because the migration engine imports this module.)"""

    bandwidth_mibs: float | None = Field(None, gt=0, le=1 << 20)
    """Bandwidth cap in MiB/s; None: no cap (QEMU's 128 MiB/s default is lifted)."""
    downtime_limit_ms: int | None = Field(None, ge=1, le=2000)
    """Maximum tolerated downtime (QEMU accepts 1..2000); None: QEMU's default (300 ms)."""
    auto_converge: bool = False
    """Throttle the guest's vCPUs when it dirties memory faster than it is sent."""
    postcopy_after_s: float | None = Field(None, ge=0)
    """Switch to postcopy after this many seconds of precopy; None: never."""
    postcopy_recoveries: int = Field(1, ge=0)
    """How often a stuck postcopy link is recovered (qemu driver) before the migration is
    reported SPLIT."""
    multifd_channels: int | None = Field(None, ge=1, le=255)
    """Parallel TCP channels, set on both ends (QEMU accepts 1..255); None: multifd off."""
    xbzrle_cache_mib: int | None = Field(None, ge=1)
    """XBZRLE delta compression with a cache of this size; None: off."""
    policy: ConvergencePolicy = ConvergencePolicy()
    """What to do when the migration does not converge (see :class:`ConvergencePolicy`)."""
    tls: bool = False
    """The migration stream over TLS, x509 credentials from each host's ``tls_dir`` in the
    inventory (the destination the server, the source the client; each verifies the other's
    certificate against its CA)."""
    tls_hostname: str | None = None
    """The name the destination's certificate must carry; None: the address the source
    dials (the destination's migration address)."""
    storage: Literal["shared", "copy-all", "copy-incremental"] = "shared"
    """Where the VM's disk is during a migration. ``shared``: on storage both hosts see
    (the inventory's ``shared_dir``). ``copy-all``: each host has its own; the whole disk is
    mirrored to a new disk of the same size at the same path on the destination (over NBD,
    TLS when ``tls``) while the guest runs, then the memory migrates. ``copy-incremental``:
    only the disk's top overlay is mirrored; its backing image must already be on the
    destination at the same path (checked before anything starts). After a copy the
    source's disk is removed once its QEMU is known gone (the VM no longer runs there)."""

    @model_validator(mode="after")
    def _compatible(self) -> "MigrationSettings":
        if self.storage != "shared" and self.may_postcopy_setting():
            raise ValueError(f"storage {self.storage} and postcopy cannot be combined (the "
                             "disk mirror must finish before the switchover, which postcopy "
                             "makes early): drop one of them")
        if self.tls_hostname is not None and not self.tls:
            raise ValueError("tls_hostname is for migrations over TLS: set tls too")
        if self.policy.downtime_ramp is not None and self.downtime_limit_ms is not None:
            raise ValueError("downtime_limit_ms and policy.downtime_ramp cannot be combined "
                             "(the ramp sets the downtime): set one of them")
        if self.multifd_channels is not None and "postcopy" in self.policy.actions:
            raise ValueError("multifd_channels and the policy action 'postcopy' cannot be "
                             "combined (multifd and postcopy together are not supported "
                             "here): drop one of them")
        if self.multifd_channels is not None:
            if self.postcopy_after_s is not None:
                raise ValueError("multifd_channels and postcopy_after_s cannot be combined "
                                 "(multifd and postcopy together are not supported here): "
                                 "set one of them")
            if self.xbzrle_cache_mib is not None:
                raise ValueError("multifd_channels and xbzrle_cache_mib cannot be combined "
                                 "(QEMU refuses multifd with xbzrle): set one of them")
        return self

    def may_postcopy_setting(self) -> bool:
        """Postcopy is asked for (by time) or may be (by the policy)."""
        return self.postcopy_after_s is not None or "postcopy" in self.policy.actions


#: a unicast MAC as VMs take it: six lowercase hex pairs joined by ':', the first octet even
MAC_PATTERN = re.compile(r"[0-9a-f][02468ace](:[0-9a-f]{2}){5}")


def mac_number(mac: str) -> int:
    """``02:00:00:00:00:0a`` -> 0x02000000000a."""
    return int(mac.replace(":", ""), 16)


def mac_text(number: int) -> str:
    """0x02000000000a -> ``02:00:00:00:00:0a``."""
    return ":".join(f"{(number >> s) & 0xFF:02x}" for s in range(40, -8, -8))


def check_interface_address(value: str) -> None:
    """A VM's address, ``ADDRESS/PREFIX`` (IPv4). :raise ValueError: saying what is wrong."""
    try:
        ipaddress.IPv4Interface(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IPv4 ADDRESS/PREFIX: {exc}") from None
    if "/" not in value:
        raise ValueError(f"{value!r}: give the prefix too (ADDRESS/PREFIX)")


class LoginSettings(_Strict):
    """How to log in on a VM's serial console when it asks (``vms.<name>.login``)."""

    user: str = "root"
    password: str = ""
    prompt: str | None = None
    """The shell prompt, a regular expression (default: a line ending in ``# `` or ``$ ``)."""

    @field_validator("prompt")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value


class VMSettings(_Strict):
    """A VM of a run (``vms.<name>.*``). Unset boot fields come from the inventory's guest."""

    mem_mib: int = Field(128, ge=32)
    vcpus: int = Field(1, ge=1)
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    """Kernel command line; default: the inventory guest's, plus ``lab.out=ttyS1``."""
    image: Path | None = None
    """A base qcow2 image on shared storage: the run gives the VM its own overlay over it."""
    extra_args: list[str] = []
    """More QEMU arguments (qemu driver only), e.g. ``["-device", "virtio-rng-pci"]``."""
    qemu: str | None = None
    """The QEMU binary on every host the VM runs on (default: the host's ``qemu`` in the
    inventory, else ``qemu-system-x86_64`` from PATH)."""
    machine: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """QEMU's machine type (qemu driver), e.g. ``pc-i440fx-7.2``; default ``pc``: the newest
    i440fx of the QEMU it starts on. A migration starts the destination with the source's
    very type; to migrate between QEMU versions, pin one that both have."""
    cpu_model: str | None = None
    """QEMU's ``-cpu`` model (default: ``qemu64`` under TCG, ``host`` under KVM)."""
    cpu_affinity: str | None = None
    """Host CPUs QEMU's threads may run on, as ``taskset -c`` takes them (``0-1``, ``0,2``);
    the destination of a migration gets the same."""
    hugepages: bool = False
    """Back guest memory with the host's hugetlbfs (``/dev/hugepages``, preallocated); a host
    with too few free huge pages refuses the start."""
    mac: str | None = None
    """A virtio NIC with this MAC, or ``auto``: a locally administered MAC derived from the
    run id and the VM's name (unique per run, the same on every host)."""
    network: str | None = None
    """``none``, ``user`` (restricted user-mode networking) or ``bridge`` (a tap on the
    inventory's ``guest_network.bridge`` on each host). Default: ``user`` with a MAC, else
    ``none`` (a VM gets a network only when asked)."""
    ip: str | None = None
    """``network: bridge``: the guest's address, ``ADDRESS/PREFIX`` inside the inventory's
    ``guest_network.subnet`` (the lab guest configures it from ``lab.ip=``), or ``auto``: the
    next address of the run instance's range (``network.pools``); kept wherever the VM
    migrates, probed during each migration (``network.probe``)."""
    dhcp: bool = False
    """The guest gets ``ip`` from the guest network's DHCP server instead of its command
    line (the lab guest: ``lab.ip=dhcp``). With ``ip: auto`` the run writes its range's
    static leases where the inventory's ``guest_network.dhcp`` says (the lab's dnsmasq);
    otherwise the site's DHCP server must give the VM's MAC that address."""
    login: LoginSettings | None = None
    """User, password and prompt, for a guest whose console asks for a login (the lab guest
    does with ``append: "... lab.login=USER lab.password=PASSWORD"``)."""

    @field_validator("cpu_affinity")
    @classmethod
    def _cpu_list(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*",
                                                  value):
            raise ValueError(f"{value!r} is not a CPU list (as taskset -c takes: 0-1,3)")
        return value

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is not None and value != "auto":
            if not MAC_PATTERN.fullmatch(value):
                raise ValueError(f"{value!r} is not a unicast MAC (six lowercase hex pairs "
                                 "joined by ':', the first octet even) or auto")
        return value

    @field_validator("network")
    @classmethod
    def _network(cls, value: str | None) -> str | None:
        if value is not None and value not in ("none", "user", "bridge"):
            raise ValueError(f"{value!r}: network is none, user or bridge")
        return value

    @field_validator("ip")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is not None and value != "auto":
            check_interface_address(value)
        return value

    @model_validator(mode="after")
    def _nic(self) -> "VMSettings":
        if self.network in ("bridge", "user") and self.mac is None:
            raise ValueError(f"network: {self.network} needs a mac (or mac: auto)")
        if self.network == "none" and self.mac is not None:
            raise ValueError("a mac with network: none (a NIC needs network: user or bridge)")
        if self.ip is not None and self.network != "bridge":
            raise ValueError("ip needs network: bridge")
        if self.dhcp and self.ip is None:
            raise ValueError("dhcp needs ip (auto, or the address the DHCP server gives)")
        return self

    @field_validator("cpu_model")
    @classmethod
    def _cpu_model(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.,=+-]*", value):
            raise ValueError(f"{value!r} is not a QEMU CPU model")
        return value


class SyncSettings(_Strict):
    """The run's embedded sync server."""

    bind: str | None = None
    """Address to bind; default: the controller's own address on the hosts' network (the
    local end of its SSH connection to the first host), never every interface."""
    port: int = Field(0, ge=0, le=65535)
    """0: the system picks a free port (two runs on one controller never collide)."""
    heartbeat_s: float = Field(5.0, gt=0)


class LibvirtSettings(_Strict):
    """How the libvirt driver reaches and migrates (``libvirt.*``)."""

    p2p: bool = False
    """Peer-to-peer migration (``migrateToURI3``: the source libvirtd opens the destination
    itself with the same transport, so the key and known_hosts paths must exist on the source
    host; ``openssh``'s wrapper is written into the VM's run dir there); default managed (``migrate3``: the controller drives both daemons)."""
    unsafe: bool = False
    """Migrate disks on storage libvirt does not recognise as shared (a local directory shared
    by other means, as in the lab; qcow2 with cache=none is safe there)."""
    transport: str = "openssh"
    """``openssh``: libvirt runs OpenSSH (``qemu+ext``) with the inventory's key and
    known_hosts (host keys verified); a closed connection ends its sshd session. ``libssh``:
    libvirt's built-in SSH client with the same key and known_hosts (libvirt 11.3 keeps the
    socket of a closed connection until the process exits). ``ssh``: libvirt runs ``ssh``
    with the user's own ~/.ssh configuration. See ``migrator/hypervisor/libvirt_uri.py``."""
    keepalive_interval_s: int = Field(5, ge=1)
    keepalive_count: int = Field(3, ge=1)

    @field_validator("transport")
    @classmethod
    def _known_transport(cls, v: str) -> str:
        if v not in ("openssh", "libssh", "ssh"):
            raise ValueError(f"transport must be 'openssh', 'libssh' or 'ssh', not {v!r}")
        return v


class ReportSettings(_Strict):
    results_dir: Path = Path("results")
    """Where ``migrate-run`` writes ``<run-id>/`` (JSON records, JUnit XML, logs)."""
    keep_disks: bool = False
    """Keep the run's disk overlays on shared storage after the run (for post-mortems)."""
    progress_interval_s: float = Field(1.0, gt=0)
    """How often a running migration's progress line is printed (and a sample kept in its
    record's ``progress`` history)."""
    display: Literal["auto", "live", "lines"] = "auto"
    """``migrate-run``'s terminal output: ``live`` bars per migration in flight, redrawn in
    place, with the run's lines above them; ``lines``: timestamped lines only (a progress
    line per ``progress_interval_s``); ``auto``: live when stdout is a terminal."""
    live_refresh_s: float = Field(0.25, gt=0, le=10)
    """How often the live view is redrawn."""
    dirtier_series: bool = True
    """When the lab's dirtier runs in a migrating VM: keep its rate and stale pages, stamped
    on the hosts as its lines arrive, in the migration's record (``dirtier``)."""


class Checks(_Strict):
    """What the framework checks after every completed migration, beside the engine's own
    (the destination running, the source paused) and the scenario's."""

    dirtier: bool = True
    """Where a VM runs the lab's dirtier (``lab.dirty=N lab.out=ttyS1``): the guest's own
    check of every page it keeps dirty must pass on the destination, one whole pass after
    the guest resumed there. A stale page (a write the migration lost), or no such pass in
    time, fails the migration (phase VERIFIED)."""
    dirtier_wait_s: float = Field(30.0, gt=0)
    """How long that pass is waited for, beyond two passes at the dirtier's ``lab.rate``."""


_COMPARE_RATIOS = {"total_time_ms": 1.25, "downtime_ms": 1.5, "blackout_ms": 1.5,
                   "throughput_mbps": 0.8, "iterations": 1.5}
_COMPARE_SLACK = {"total_time_ms": 100.0, "downtime_ms": 20.0, "blackout_ms": 50.0,
                  "throughput_mbps": 50.0, "iterations": 2.0}


class CompareSettings(_Strict):
    """``migrate-run compare``: when run B's migrations are a regression against run A's
    (:mod:`migrator.report.baseline`). Per metric, a ratio of the medians and an absolute
    slack, both exceeded for a regression (B/A above the ratio for times and iterations,
    below it for throughput); a stale page more than A is always one."""

    ratios: dict[str, float] = _COMPARE_RATIOS
    """Per metric; those not given keep their defaults."""
    slack: dict[str, float] = _COMPARE_SLACK
    baselines_dir: Path = Path("results/baselines")
    """Where ``--baseline save NAME`` keeps baselines (NAME/run.json, NAME/migrations/)."""

    @field_validator("ratios", "slack", mode="before")
    @classmethod
    def _over_defaults(cls, given, info):
        defaults = _COMPARE_RATIOS if info.field_name == "ratios" else _COMPARE_SLACK
        if not isinstance(given, dict):
            return given
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ValueError(f"unknown metric(s) "
                             f"{', '.join(unknown)} (known: {', '.join(defaults)})")
        return {**defaults, **given}

    @model_validator(mode="after")
    def _every_metric(self) -> "CompareSettings":
        for what, given in (("ratios", self.ratios), ("slack", self.slack)):
            if any(v < 0 for v in given.values()):
                raise ValueError(f"compare.{what}: no negative value")
        if self.ratios["throughput_mbps"] > 1 or any(
                v < 1 for k, v in self.ratios.items() if k != "throughput_mbps"):
            raise ValueError("compare.ratios: at least 1 for times and iterations, at most 1 "
                             "for throughput (B/A past it is a regression)")
        return self


class PlanSettings(_Strict):
    """Test plans (``migrate-run --plan``)."""

    default_test_s: float = Field(60.0, gt=0)
    """A test's expected duration when neither its history nor its ``expected_s`` says."""
    stop_s: float = Field(600.0, gt=0)
    """How long an interrupted test (of a plan, or a run of a sweep) may take to roll back
    and clean up before it is killed."""


def _default_state_dir() -> Path:
    return Path("/var/lib/migrator") if os.geteuid() == 0 else \
        Path("~/.local/state/migrator").expanduser()


class AddressPool(_Strict):
    """One range of MACs and IPs (``network.pools.<name>``): ``range_size`` consecutive
    MACs from ``base_mac`` and IPs from ``base_ip``. A run instance owns one range."""

    base_mac: str
    base_ip: ipaddress.IPv4Address
    range_size: int = Field(ge=1, le=65536)

    @field_validator("base_mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        v = v.lower()
        if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", v):
            raise ValueError(f"{v!r} is not a MAC (six hex pairs)")
        first = int(v[:2], 16)
        if first & 1:
            raise ValueError(f"{v} is a multicast MAC (the first octet's low bit is set)")
        if not first & 2:
            raise ValueError(f"{v} is not locally administered (the first octet's second "
                             "bit must be set: 02:..., 06:..., ...)")
        return v

    @model_validator(mode="after")
    def _fits(self) -> "AddressPool":
        if mac_number(self.base_mac) % 2**40 + self.range_size > 2**40:
            raise ValueError(f"{self.range_size} MACs from {self.base_mac} leave its first "
                             "octet")
        if int(self.base_ip) + self.range_size > 2**32:
            raise ValueError(f"{self.range_size} addresses from {self.base_ip} overflow IPv4")
        return self

    def macs(self) -> range:
        first = mac_number(self.base_mac)
        return range(first, first + self.range_size)

    def ips(self) -> range:
        return range(int(self.base_ip), int(self.base_ip) + self.range_size)


class NetworkSettings(_Strict):
    """Guest networking (VMs with ``network: bridge`` and an address)."""

    pools: dict[str, AddressPool] = {}
    """Named address ranges (seed 004's per-queue MAC ranges, with IPs): each run instance
    claims one on the guest network (on shared storage, so concurrent runs never share
    one); its VMs with ``mac: auto`` / ``ip: auto`` take the next MAC/IP of it."""

    probe: bool = True
    """Measure the blackout of every migration of a VM with an address: ICMP echo from the
    controller (its address on the inventory's guest network), in a process of its own."""
    probe_interval_ms: float = Field(5.0, ge=1.0, le=1000.0)
    """Time between two probes: the blackout's resolution."""
    probe_tcp_port: int | None = Field(None, ge=1, le=65535)
    """Also hold a TCP stream open across each migration, through an echo listener the
    scenario runs in the guest on this port (the lab guest: ``nc -ll -p PORT -e cat &``)."""
    probe_from: str = "controller"
    """Where the prober runs: ``controller`` (its ``guest_network.controller_address``), a
    host of the inventory (over SSH, with ``python3``; the host needs an address on the
    guest network: real fleets, where the controller has none), or ``vm:NAME``, a peer
    guest of the run (busybox-style ``ping -i`` on its console: the blackout from the
    longest run of lost pings, at the ping interval's resolution)."""

    @field_validator("probe_from")
    @classmethod
    def _probe_from(cls, v: str) -> str:
        if not re.fullmatch(r"controller|vm:[A-Za-z0-9][A-Za-z0-9_.-]*|[A-Za-z0-9][A-Za-z0-9_.-]*",
                            v):
            raise ValueError(f"probe_from is controller, a host's name or vm:NAME, not {v!r}")
        return v

    @model_validator(mode="after")
    def _disjoint_pools(self) -> "NetworkSettings":
        names = list(self.pools)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                pa, pb = self.pools[a], self.pools[b]
                for what, ra, rb in (("MACs", pa.macs(), pb.macs()),
                                     ("addresses", pa.ips(), pb.ips())):
                    if ra.start < rb.stop and rb.start < ra.stop:
                        raise ValueError(f"pools {a} and {b} overlap in their {what}")
        return self


class JournalSettings(_Strict):
    """Where runs keep their crash-safe state (``journal.*``)."""

    state_dir: Path = Field(default_factory=_default_state_dir)
    """The index of live runs (``runs/<run-id>/``: lock, pointer to the journal), read by
    ``migrate-run recover`` and by every new run (default /var/lib/migrator as root, else
    ~/.local/state/migrator)."""
    recover_on_start: bool = True
    """A new run first recovers the dead runs it finds on its hosts (and says so)."""
    stop_after: str | None = None
    """Fault injection (tests, ``bench/``): the controller stops itself (SIGSTOP) right after
    the journal record ``EVENT:VALUE[@N]`` is durable — ``phase:LISTENING``,
    ``barrier:migration_finished``, ``vm:started``; ``@N``: the Nth such record — so a
    fault (e.g. SIGKILL) lands exactly there, before the step the record names."""

    @field_validator("stop_after")
    @classmethod
    def _stop_point(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z_]+:[A-Za-z0-9_:.-]+(@[1-9][0-9]*)?", v):
            raise ValueError(f"stop_after must be EVENT:VALUE[@N] (phase:MIGRATING), not {v!r}")
        return v


class Config(_Strict):
    """The one config object. ``Config()`` gives the defaults; :meth:`load` reads YAML."""

    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    queue: QueueSettings = QueueSettings()
    lab: LabDefaults = LabDefaults()
    driver: str = "qemu"
    """How VMs are driven: ``qemu`` (QEMU started over SSH, QMP through SSH socket forwarding)
    or ``libvirt`` (libvirt-python, one libvirtd per host)."""
    libvirt: LibvirtSettings = LibvirtSettings()
    migration: MigrationSettings = MigrationSettings()
    vms: dict[str, VMSettings] = {}
    """Declared VMs. Undeclared names ``vm1`` ... ``vmN`` are lab guests of the default size."""
    sync: SyncSettings = SyncSettings()
    report: ReportSettings = ReportSettings()
    checks: Checks = Checks()
    compare: CompareSettings = CompareSettings()
    journal: JournalSettings = JournalSettings()
    plan: PlanSettings = PlanSettings()
    network: NetworkSettings = NetworkSettings()
    scenario: dict[str, Any] = {}
    """Free-form settings of the scenario being run (``-p scenario.rounds=5``)."""

    def migration_finished_for(self, mem_mib: int) -> float:
        """How long a host waits at a pair's "migration finished" barrier: the whole
        migration (setup, the policy's deadline, checks) of the largest VM."""
        return (self.timeouts.migration_setup_s + self.migration.policy.deadline_for(mem_mib)
                + self.timeouts.guest_boot_s)

    @field_validator("driver")
    @classmethod
    def _known_driver(cls, v: str) -> str:
        if v not in ("qemu", "libvirt"):
            raise ValueError(f"driver must be 'qemu' or 'libvirt', not {v!r}")
        return v

    @model_validator(mode="after")
    def _distinct_addresses(self) -> "Config":
        """Two declared VMs never share a MAC or an address (within one run; pools keep
        runs apart)."""
        for attr in ("mac", "ip"):
            seen: dict[str, str] = {}
            for name, vm in self.vms.items():
                value = getattr(vm, attr)
                if value is None or value == "auto":
                    continue
                key = value.split("/")[0].lower()
                if key in seen:
                    raise ValueError(f"vms.{seen[key]} and vms.{name} have the same "
                                     f"{'MAC' if attr == 'mac' else 'address'} {key}")
                seen[key] = name
                number = (mac_number(key) if attr == "mac"
                          else int(ipaddress.IPv4Address(key)))
                for pool_name, pool in self.network.pools.items():
                    if number in (pool.macs() if attr == "mac" else pool.ips()):
                        raise ValueError(f"vms.{name}: {key} is inside pool {pool_name} (give "
                                         f"it one outside the pools, or {attr}: auto)")
        if self.network.pools:
            auto = [n for n, vm in self.vms.items() if vm.ip == "auto" or vm.mac == "auto"]
            small = min(self.network.pools.items(), key=lambda kv: kv[1].range_size)
            if len(auto) > small[1].range_size:
                raise ValueError(f"{len(auto)} VMs take addresses from the pools "
                                 f"({', '.join(auto)}) but pool {small[0]} holds "
                                 f"{small[1].range_size}")
        elif any(vm.ip == "auto" for vm in self.vms.values()):
            raise ValueError("ip: auto needs address pools (network.pools)")
        return self

    @classmethod
    def load(cls, path: str | os.PathLike | None = None,
             overrides: dict[str, Any] | None = None) -> "Config":
        """Read a YAML config file (optional) and apply dotted ``key=value`` overrides.

        :raise ConfigError: when the file is unreadable, a key is unknown or a value invalid;
            the message names the key.
        """
        data: dict[str, Any] = {}
        if path is not None:
            data = _read_yaml(Path(path), ConfigError, "config")
        for dotted, value in (overrides or {}).items():
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"config key {dotted!r}: {part!r} is not a section")
            node[leaf] = value
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"config: {validation_message(exc)}") from exc


# --------------------------------------------------------------------------------------------
# Inventory: where hosts and shared things are
# --------------------------------------------------------------------------------------------

class SSHSettings(_Strict):
    """How to reach a host over SSH. Host keys are always verified against ``known_hosts``."""

    user: str = "root"
    port: int = Field(22, ge=1, le=65535)
    identity_file: Path | None = None
    known_hosts: Path | None = None
    """None means the user's ~/.ssh/known_hosts (verification stays on)."""
    config_file: Path | None = None
    """An OpenSSH client config for tools that run plain ``ssh`` (``migrate-lab ssh``)."""


class HostCapacity(_Strict):
    """``capacity: {cpus, mem_mib}`` of an inventory host."""

    cpus: float = Field(gt=0)
    mem_mib: int = Field(gt=0)


class HostEntry(_Strict):
    """One host of the inventory."""

    address: str
    """IP address or DNS name that SSH and migration traffic use."""
    migration_address: str | None = None
    """Where the destination QEMU listens for migrations, if not ``address``."""
    ssh: SSHSettings | None = None
    """Per-host SSH settings; fields not given here come from the inventory's ``ssh``."""
    qemu: str | None = None
    """This host's QEMU binary (qemu driver), for the VMs that do not name their own
    (``vms.X.qemu``): e.g. an older QEMU on one host, to migrate across versions
    (``migrate-lab up --qemu hostA=7.2``). Default: ``qemu-system-x86_64`` from PATH."""
    capacity: HostCapacity | None = None
    """What the host may give to tests: a plan's ``queues: auto`` sizes its queues from it
    (lab hosts share one machine, so what a host reports is not its capacity)."""
    tls_dir: Path | None = None
    """The directory on the host holding its x509 credentials for migration over TLS, as
    QEMU's ``tls-creds-x509`` reads them: ``ca-cert.pem``, ``server-cert.pem``,
    ``server-key.pem``, ``client-cert.pem``, ``client-key.pem`` (the lab makes them)."""


class DhcpServer(_Strict):
    """A dnsmasq on the controller serving the guest network (``guest_network.dhcp``): a run
    that claims an address range writes the range's static leases (``MAC,IP`` lines) into a
    file of ``hosts_dir`` (dnsmasq ``--dhcp-hostsdir`` reads new files at once) and removes
    it when it gives the range back, then asks dnsmasq to forget them (SIGHUP to the process
    in ``pid_file``)."""

    hosts_dir: Path
    pid_file: Path | None = None


class GuestNetwork(_Strict):
    """The L2 segment the hosts' guest bridges share: VMs with ``network: bridge`` get their
    addresses in ``subnet`` and keep them wherever they migrate."""

    subnet: str
    bridge: str = "gbr0"
    """The bridge's name, the same on every host (a VM's NIC joins a bridge of this name
    wherever it migrates)."""
    controller_address: str | None = None
    """The controller's own address on the segment (it probes guests from there); None: the
    controller cannot reach guests (probes need a host or a peer guest)."""
    dhcp: DhcpServer | None = None
    """A DHCP server on the segment whose static leases the runs write (the lab's dnsmasq);
    None: the site's DHCP server, if any, serves VMs with ``dhcp: true``."""

    @field_validator("bridge")
    @classmethod
    def _bridge_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", v):
            raise ValueError(f"{v!r} is not an interface name (at most 15 characters)")
        return v

    def reserved(self) -> dict[ipaddress.IPv4Address, str]:
        """The subnet's addresses no guest may take, and what each is."""
        subnet = ipaddress.ip_network(self.subnet)
        reserved = {subnet.network_address: "its network address",
                    subnet.broadcast_address: "its broadcast address"}
        if self.controller_address:
            reserved[ipaddress.IPv4Address(self.controller_address)] = \
                "the controller's address"
        return reserved


class GuestImage(_Strict):
    """The kernel + initramfs guest that lab scenarios boot by default."""

    kernel: Path
    initrd: Path
    append: str = GUEST_KERNEL_APPEND


class LabInfo(_Strict):
    """Present only in inventories that ``migrate-lab`` wrote."""

    name: str
    dir: Path
    subnet: str
    bridge: str
    guest_bridge: str | None = None
    """The root namespace's guest bridge (the controller's side of the guest network)."""


class Inventory(_Strict):
    """Hosts and shared resources; the format users write by hand for real hosts.

    Relative paths are resolved against the inventory file's directory.
    """

    version: int = 1
    hosts: dict[str, HostEntry]
    ssh: SSHSettings = SSHSettings()
    shared_dir: Path | None = None
    """Shared storage: the same path on every host, holding VM disks and run data."""
    local_dir: Path | None = None
    """Each host's own storage for VM disks that migrate with their VM
    (``migration.storage: copy-all | copy-incremental``): the same path on every host, a
    different disk behind it on each."""
    run_dir: Path = Path("/run/migrator")
    """Per-host private directory where VMs keep sockets and pidfiles (reached over SSH)."""
    guest: GuestImage | None = None
    accel: str = "tcg"
    drivers: list[str] = ["qemu"]
    lab: LabInfo | None = None
    guest_network: GuestNetwork | None = None
    source: Path | None = Field(None, exclude=True)
    """The file this inventory was read from (not part of the format)."""

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"unsupported inventory version {v} (this migrator reads version 1)")
        return v

    @field_validator("hosts")
    @classmethod
    def _valid_hosts(cls, hosts: dict[str, HostEntry]) -> dict[str, HostEntry]:
        if not hosts:
            raise ValueError("no hosts")
        for name in hosts:
            if not _HOST_NAME.match(name):
                raise ValueError(f"bad host name {name!r} (letters, digits and '-', "
                                 "starting with a letter)")
        return hosts

    @field_validator("accel")
    @classmethod
    def _valid_accel(cls, v: str) -> str:
        if v not in ("tcg", "kvm"):
            raise ValueError(f"accel must be 'tcg' or 'kvm', not {v!r}")
        return v

    @field_validator("drivers")
    @classmethod
    def _valid_drivers(cls, v: list[str]) -> list[str]:
        bad = [d for d in v if d not in ("qemu", "libvirt")]
        if bad:
            raise ValueError(f"unknown driver(s) {bad} (known: qemu, libvirt)")
        return v

    @model_validator(mode="after")
    def _unique_addresses(self) -> "Inventory":
        seen: dict[str, str] = {}
        for name, entry in self.hosts.items():
            key = f"{entry.address}:{(entry.ssh or self.ssh).port}"
            if key in seen:
                raise ValueError(f"hosts {seen[key]!r} and {name!r} have the same address {key}")
            seen[key] = name
        return self

    @model_validator(mode="after")
    def _guest_network(self) -> "Inventory":
        gn = self.guest_network
        if gn is not None:
            try:
                net = validate_subnet(gn.subnet)
            except ConfigError as exc:
                raise ValueError(f"guest_network: {exc}") from None
            if gn.controller_address is not None:
                try:
                    inside = ipaddress.ip_address(gn.controller_address) in net
                except ValueError as exc:
                    raise ValueError(f"guest_network.controller_address: {exc}") from None
                if not inside:
                    raise ValueError(f"guest_network.controller_address "
                                     f"{gn.controller_address} is not in {net}")
        return self

    # -- lookups -------------------------------------------------------------------------------

    def guest_bridge_of(self, host: str) -> str | None:
        """The bridge ``host``'s VM NICs join (None: the inventory has no guest network)."""
        self.host(host)
        return self.guest_network.bridge if self.guest_network is not None else None

    def host(self, name: str) -> HostEntry:
        """The entry for ``name``. :raise ConfigError: naming the known hosts if unknown."""
        try:
            return self.hosts[name]
        except KeyError:
            raise ConfigError(f"unknown host {name!r} (inventory {self.source or '<memory>'} "
                              f"has: {', '.join(self.hosts)})") from None

    def ssh_for(self, name: str) -> SSHSettings:
        """SSH settings for one host: its own fields over the inventory-wide ones."""
        entry = self.host(name)
        if entry.ssh is None:
            return self.ssh
        merged = self.ssh.model_dump() | entry.ssh.model_dump(exclude_unset=True)
        return SSHSettings.model_validate(merged)

    # -- files ----------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Inventory":
        """Read and validate an inventory file.

        :raise InventoryError: when the file is missing, not YAML, or invalid; the message names
            the file and the offending key.
        """
        path = Path(path)
        data = _read_yaml(path, InventoryError, "inventory")
        _resolve_paths(data, path.parent)
        try:
            inv = cls.model_validate(data)
        except ValidationError as exc:
            raise InventoryError(f"inventory {path}: {validation_message(exc)}") from exc
        return inv.model_copy(update={"source": path})

    def dump(self, path: str | os.PathLike, header: str = "") -> None:
        """Write the inventory as YAML (atomically: a reader never sees half a file)."""
        path = Path(path)
        data = self.model_dump(mode="json", exclude_none=True, exclude={"source"})
        text = header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def default_inventory_path(lab_name: str = DEFAULT_LAB_NAME) -> Path:
    return LAB_BASE_DIR / lab_name / INVENTORY_FILE


def find_inventory(explicit: str | os.PathLike | None = None) -> Path:
    """Where the inventory is: ``explicit``, else ``$MIGRATOR_INVENTORY``, else the default lab's.

    :raise InventoryError: when the chosen file does not exist; the message says how it was
        chosen and how to make one.
    """
    if explicit:
        path, how = Path(explicit), "given explicitly"
    elif os.environ.get(ENV_INVENTORY):
        path, how = Path(os.environ[ENV_INVENTORY]), f"from ${ENV_INVENTORY}"
    else:
        path, how = default_inventory_path(), "the default lab's"
    if not path.is_file():
        hint = ("run 'migrate-lab up' to make the default lab"
                if how == "the default lab's" else "check the path")
        raise InventoryError(f"inventory {path} ({how}) does not exist: {hint}")
    return path


def load_inventory(explicit: str | os.PathLike | None = None) -> Inventory:
    """:func:`find_inventory` then :meth:`Inventory.load`."""
    return Inventory.load(find_inventory(explicit))


def load_any_inventory(explicit: str | os.PathLike | None = None) -> Inventory:
    """Like :func:`load_inventory`, also accepting an Ansible inventory (YAML or INI).

    From Ansible, hosts keep their inventory order and take ``ansible_host``,
    ``ansible_port``, ``ansible_user``, ``ansible_ssh_private_key_file`` and
    ``migration_address``; ``migrator_shared_dir``, ``migrator_local_dir``, ``migrator_known_hosts`` and
    ``migrator_accel`` may be set as variables of ``all``. Host keys are still verified.

    :raise InventoryError: as :meth:`Inventory.load`, or an Ansible file migrator cannot read.
    """
    path = find_inventory(explicit)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InventoryError(f"cannot read inventory {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict) and "hosts" in data and "all" not in data:
        return Inventory.load(path)
    hosts, all_vars = (_ansible_yaml(data) if isinstance(data, dict) and "all" in data
                       else _ansible_ini(text, path))
    if not hosts:
        raise InventoryError(f"inventory {path}: neither a migrator inventory (no 'hosts') nor "
                             "an Ansible inventory with hosts")
    ssh = {k: v for k, v in (("known_hosts", all_vars.get("migrator_known_hosts")),
                             ("identity_file", all_vars.get("ansible_ssh_private_key_file")),
                             ("user", all_vars.get("ansible_user"))) if v}
    inv: dict[str, Any] = {"hosts": {}, "ssh": ssh}
    for name, hv in hosts.items():
        entry: dict[str, Any] = {"address": str(hv.get("ansible_host", name))}
        if hv.get("migration_address"):
            entry["migration_address"] = str(hv["migration_address"])
        hssh = {k: hv[a] for k, a in (("port", "ansible_port"), ("user", "ansible_user"),
                                      ("identity_file", "ansible_ssh_private_key_file"))
                if a in hv and hv[a] != all_vars.get(a)}
        if hssh:
            entry["ssh"] = hssh
        inv["hosts"][name] = entry
    if all_vars.get("migrator_shared_dir"):
        inv["shared_dir"] = all_vars["migrator_shared_dir"]
    if all_vars.get("migrator_local_dir"):
        inv["local_dir"] = all_vars["migrator_local_dir"]
    if all_vars.get("migrator_accel"):
        inv["accel"] = all_vars["migrator_accel"]
    _resolve_paths(inv, path.parent)
    try:
        return Inventory.model_validate(inv).model_copy(update={"source": path})
    except ValidationError as exc:
        raise InventoryError(f"inventory {path} (Ansible): {validation_message(exc)}") from exc


def _ansible_yaml(data: dict) -> tuple[dict[str, dict], dict]:
    hosts: dict[str, dict] = {}

    def walk(group: dict, inherited: dict) -> None:
        group = group or {}
        gvars = {**inherited, **(group.get("vars") or {})}
        for name, hv in (group.get("hosts") or {}).items():
            hosts[name] = {**gvars, **hosts.get(name, {}), **(hv or {})}
        for child in (group.get("children") or {}).values():
            walk(child, gvars)
    all_group = data.get("all") or {}
    walk(all_group, {})
    return hosts, dict(all_group.get("vars") or {})


def _ansible_ini(text: str, path: Path) -> tuple[dict[str, dict], dict]:
    hosts: dict[str, dict] = {}
    all_vars: dict[str, Any] = {}
    section = "ungrouped"
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        if section.endswith(":children"):
            continue
        if section == "all:vars" or section.endswith(":vars"):
            key, sep, value = line.partition("=")
            if not sep:
                raise InventoryError(f"inventory {path} line {n}: expected key=value")
            if section == "all:vars":
                all_vars[key.strip()] = yaml.safe_load(value.strip())
            continue
        name, *pairs = line.split()
        hv = hosts.setdefault(name, {})
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise InventoryError(f"inventory {path} line {n}: {pair!r} is not key=value")
            hv[key] = yaml.safe_load(value)
    return hosts, all_vars


def default_guest_subnet(lab_subnet: str) -> str:
    """The lab subnet moved up by 2^16 addresses: 10.77.240.0/24 -> 10.78.240.0/24.

    :raise ConfigError: the lab subnet is larger than a /16 (say ``--guest-subnet``)."""
    net = validate_subnet(lab_subnet)
    if net.prefixlen < 16:
        raise ConfigError(f"lab subnet {net} is larger than a /16: give the guest network's "
                          "subnet (--guest-subnet)")
    return str(ipaddress.ip_network(f"{net.network_address + 2 ** 16}/{net.prefixlen}"))


def validate_subnet(text: str) -> ipaddress.IPv4Network:
    """A lab subnet: IPv4, private, at most /29. :raise ConfigError: saying what is wrong."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(f"bad subnet {text!r}: {exc}") from None
    if net.version != 4:
        raise ConfigError(f"subnet {text}: the lab uses IPv4 only")
    if not net.is_private or net.is_loopback or net.is_link_local:
        raise ConfigError(f"subnet {text} is not a private range (use e.g. 10.77.0.0/24)")
    if net.prefixlen > 29:
        raise ConfigError(f"subnet {text} is too small (at most /29)")
    return net


# --------------------------------------------------------------------------------------------

def _read_yaml(path: Path, error: type[ConfigError], what: str) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise error(f"cannot read {what} file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{what} file {path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{what} file {path}: top level must be a mapping")
    return data


_PATH_KEYS = {"identity_file", "known_hosts", "config_file", "shared_dir", "local_dir", "kernel",
              "initrd"}


def _resolve_paths(node: Any, base: Path) -> None:
    """Make relative paths in inventory data relative to the inventory file's directory."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _PATH_KEYS and isinstance(value, str) and not os.path.isabs(value):
                node[key] = str(base / os.path.expanduser(value))
            else:
                _resolve_paths(value, base)


def validation_message(exc: ValidationError, root: str = "", show_input: bool = False) -> str:
    """One line for a pydantic error: its first error (an unknown key first), naming the key
    dotted below ``root``; ``show_input`` adds the refused value (``bandwidth_mibs -1: ...``)."""
    errors = exc.errors()
    # a misspelt key also makes the real key "missing": name the misspelling first
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = ".".join(p for p in (root, *(str(p) for p in err["loc"])) if p) or "top level"
    if err["type"] == "extra_forbidden":
        return f"unknown key {where!r}"
    if err["type"] == "missing":
        return f"missing key {where!r}"
    msg = err["msg"].removeprefix("Value error, ")
    if show_input and err["loc"]:
        return f"{where} {err['input']!r}: {msg}"
    return f"{where}: {msg}"
