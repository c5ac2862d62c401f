"""``MigrationData``: what one ``migrate()`` call is about, handed to every hook and callback."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..aio import first_done
from ..blocking import BlockingInWorkers, on_loop
from ..errors import ScenarioError
from ..migration import BaseMigration, MigrationParams, MigrationResult, Phase

if TYPE_CHECKING:
    from ..hosts import SSHHost
    from ..hypervisor import GuestVM


@dataclass(eq=False)
class MigrationData(BlockingInWorkers):
    """One ``migrate(vms, src, dst)`` call.

    ``vms`` are the VM objects (they follow their VM to the destination), ``vm_ports`` the
    destination ports once each destination listens, ``migrations`` the engine objects (for
    ``cancel()`` or progress), ``results`` the result records once each migration ended.
    """

    vm_names: list[str]
    src: "SSHHost"
    dst: "SSHHost"
    mig_id: str
    params: MigrationParams
    vms: list["GuestVM"] = field(default_factory=list)
    #: served before lower ones when migrations wait for slots (``queue.*``), then in order
    priority: int = 0
    #: why :meth:`cancel` was called (None: it was not)
    stop_asked: str | None = None
    migrations: dict[str, BaseMigration] = field(default_factory=dict)
    results: dict[str, MigrationResult] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    #: the call has ended (a VM without a migration by then never gets one)
    _ended: bool = field(default=False, repr=False)
    #: why the call is being cancelled, when its instance knows (see :meth:`_interrupting`)
    _interrupt_reason: str | None = field(default=None, repr=False)

    @property
    def vm_ports(self) -> dict[str, int]:
        """``{vm: port}`` of each destination that listens (QMP: once LISTENING; libvirt: once
        data flows, found from the destination QEMU's socket)."""
        return {n: m.result.port for n, m in list(self.migrations.items()) if m.result.port}

    @property
    def moved(self) -> list["GuestVM"]:
        """The VMs the checks after the call look at: the ones it migrated (a
        ``migrate_vms_src`` hook may migrate a subset with ``vm.migrate``; the others stay
        where they are), or every VM when none went through the engine (a hook that moves
        them its own way)."""
        migrated = [vm for vm in self.vms if vm.name in self.migrations]
        return migrated or list(self.vms)

    @property
    def hosts(self) -> list["SSHHost"]:
        return [self.src, self.dst]

    def is_src(self, host) -> bool:
        return getattr(host, "name", host) == self.src.name

    def is_dst(self, host) -> bool:
        return getattr(host, "name", host) == self.dst.name

    def __str__(self) -> str:
        return f"{self.mig_id} ({','.join(self.vm_names)} {self.src.name}->{self.dst.name})"

    # -- called by the framework ---------------------------------------------------------------

    def _track(self, mig: BaseMigration) -> None:
        self.migrations[mig.src_vm.name] = mig
        mig.interrupt_reason = self._interrupt_reason
        mig.observers.append(self._on_phase)
        self._pulse()

    def _interrupting(self, reason: str) -> None:
        """The call is about to be cancelled for ``reason`` (its instance's sync failed): its
        migrations, and one made from now on, say so when the cancellation reaches them."""
        self._interrupt_reason = reason
        for mig in self.migrations.values():
            mig.interrupt_reason = reason

    def _on_phase(self, mig: BaseMigration, phase: Phase) -> None:
        self._pulse()

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _end(self) -> None:
        """The call is over, however it ended: waits for migrations that never started
        return (``wait_ended``) or fail (``wait_phase``) instead of waiting forever."""
        self._ended = True
        self._pulse()

    # -- for hooks -----------------------------------------------------------------------------

    @on_loop
    def cancel(self, reason: str = "cancelled by the scenario", vm: str | None = None) -> None:
        """Cancel the running migration of ``vm`` (default: all of this call's): each one
        rolls back, keeping its VM on the source. A call that fails because it was asked to
        stop does not stop the calls running beside it, as a failure does."""
        self.stop_asked = reason
        for name, mig in self.migrations.items():
            if vm is None or name == vm:
                mig.cancel(reason)

    async def wait_ended(self, vm: str | None = None) -> None:
        """Wait until the migration of ``vm`` (default: every VM of this call) has ended,
        whichever way (a final phase: cleaned, rolled back, split, landed, unresolved), or
        the call ended before its migration started. Never raises."""
        names = [vm] if vm else self.vm_names
        while True:
            pending = [n for n in names
                       if (n not in self.migrations and not self._ended)
                       or (n in self.migrations and not self.migrations[n].phase.is_final)]
            if not pending:
                return
            await self._wait_any(pending)

    async def _wait_any(self, pending: list[str]) -> None:
        await first_done(self._changed.wait(), *(self.migrations[n].wait_changed()
                                                 for n in pending if n in self.migrations))

    async def wait_phase(self, phase: Phase, vm: str | None = None,
                         transferred: int = 0) -> None:
        """Wait until the migration of ``vm`` (default: every VM of this call) has reached
        ``phase`` and, if given, moved at least ``transferred`` bytes.

        :raise ScenarioError: when a migration ended without getting there.
        """
        names = [vm] if vm else self.vm_names
        while True:
            pending = []
            for name in names:
                mig = self.migrations.get(name)
                if mig is None:
                    if self._ended:
                        raise ScenarioError(f"{name}: migration {self.mig_id} ended before "
                                            f"its migration started")
                    pending.append(name)
                    continue
                reached = any(p is phase for p, _, _ in mig.history)
                moved = mig.records[-1].transferred if mig.records else 0
                if reached and moved >= transferred:
                    continue
                if mig.phase.is_final or mig.phase is Phase.ROLLING_BACK:
                    raise ScenarioError(f"{name}: migration {self.mig_id} ended in "
                                        f"{mig.phase.value} before reaching {phase.value}"
                                        + (f" with {transferred} bytes moved" if transferred
                                           else ""))
                pending.append(name)
            if not pending:
                return
            await self._wait_any(pending)
