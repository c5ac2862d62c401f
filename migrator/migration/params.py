"""Migration parameters, validated before anything starts.

The knobs, their bounds and the rules between them are defined once, by
:class:`migrator.config.MigrationSettings`: the config's ``migration`` section is checked by
them when the config is loaded, and :class:`MigrationParams` is that model plus what each knob
means to QEMU.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..config import MigrationSettings, validation_message
from ..errors import ConfigError

#: "no cap": QEMU's default of 128 MiB/s is lifted deliberately, to 1 TiB/s (explicit, rather
#: than relying on 0 meaning "disabled")
UNCAPPED_BYTES_S = 1 << 40
MIB = 1 << 20

#: auto-converge held back until the policy asks for it: QEMU's smallest throttle (its
#: parameters accept 1..99), so the capability can be on from the start (capabilities cannot
#: change while a migration runs) without QEMU throttling the guest on its own rule
THROTTLE_HELD = {"cpu-throttle-initial": 1, "cpu-throttle-increment": 1, "max-cpu-throttle": 1}


class MigrationParams(MigrationSettings):
    """How one migration is run: exactly the fields, bounds and cross-field rules of
    :class:`~migrator.config.MigrationSettings` (each field is documented there), frozen, plus
    the capabilities and parameters QEMU is given for them.

    A bad value, an unknown key or a conflict raises :class:`ConfigError` naming the key
    (``MigrationParams(**config.migration.model_dump() | overrides)`` checks a per-call
    override by the same rules). ``model_copy(update=...)`` does not validate: build a new one.
    """

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(validation_message(exc, "migration", show_input=True)) from exc

    @property
    def may_postcopy(self) -> bool:
        """Postcopy is asked for (by time) or may be (by the policy): postcopy-ram is on."""
        return self.postcopy_after_s is not None or "postcopy" in self.policy.actions

    @property
    def throttle_held(self) -> bool:
        """auto-converge is on only for the policy to release later."""
        return not self.auto_converge and "auto-converge" in self.policy.actions

    def throttle_on(self, current: int = 0) -> dict[str, int]:
        """The throttle released by the policy: ``policy.throttle_initial`` %, raised by
        ``policy.throttle_increment`` % each time QEMU finds the guest still too fast (at
        every second pass), up to 99 %.

        QEMU starts a throttle at ``cpu-throttle-initial`` only when none is active; one
        already active is raised by the increment. While held, QEMU's own rule may have
        started it at the held 1 % (``current``): then this first step's increment is what
        reaches ``throttle_initial`` from there (the caller sets the policy's increment back
        once QEMU took that step: :meth:`throttle_caught_up`)."""
        initial, step = self.policy.throttle_initial, self.policy.throttle_increment
        if 0 < current < initial:
            step = initial - current
        return {"cpu-throttle-initial": initial, "cpu-throttle-increment": step,
                "max-cpu-throttle": 99}

    def throttle_caught_up(self) -> dict[str, int]:
        """The policy's own increment, for the steps after the first (see
        :meth:`throttle_on`)."""
        return {"cpu-throttle-increment": self.policy.throttle_increment}

    def capabilities(self) -> dict[str, bool]:
        """Capabilities to set (on both ends: postcopy-ram and multifd must match), each
        one migrator uses given explicitly, off too: a QEMU keeps the capabilities of its
        last migration (a VM that came in with multifd would refuse postcopy-ram next)."""
        return {"events": True,
                "auto-converge": self.auto_converge or self.throttle_held,
                "postcopy-ram": self.may_postcopy,
                "multifd": self.multifd_channels is not None,
                "xbzrle": self.xbzrle_cache_mib is not None}

    def source_parameters(self) -> dict[str, int]:
        p = {"max-bandwidth": int(self.bandwidth_mibs * MIB) if self.bandwidth_mibs
             else UNCAPPED_BYTES_S}
        if self.bandwidth_mibs and self.may_postcopy:
            # QEMU applies its own, uncapped, limit once postcopy runs: a cap is a cap
            p["max-postcopy-bandwidth"] = int(self.bandwidth_mibs * MIB)
        if self.downtime_limit_ms is not None:
            p["downtime-limit"] = self.downtime_limit_ms
        if self.throttle_held:
            p.update(THROTTLE_HELD)
        if not self.tls:    # a QEMU keeps its last migration's: no TLS left from one
            p.update({"tls-creds": "", "tls-hostname": ""})
        if self.multifd_channels is not None:
            p["multifd-channels"] = self.multifd_channels
        if self.xbzrle_cache_mib is not None:
            p["xbzrle-cache-size"] = self.xbzrle_cache_mib * MIB
        return p

    def destination_parameters(self) -> dict[str, int]:
        return ({"multifd-channels": self.multifd_channels}
                if self.multifd_channels is not None else {})
