"""Migration parameters, validated before anything starts."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

#: "no cap": QEMU's default of 128 MiB/s is lifted deliberately, to 1 TiB/s (explicit, rather
#: than relying on 0 meaning "disabled")
UNCAPPED_BYTES_S = 1 << 40
MIB = 1 << 20


@dataclass(frozen=True)
class MigrationParams:
    """How one migration is run.

    ===================  =====================================================================
    bandwidth_mibs       cap in MiB/s; None = no cap (QEMU's 128 MiB/s default is lifted)
    downtime_limit_ms    maximum tolerated downtime; None = QEMU's default (300 ms)
    auto_converge        throttle the guest's vCPUs when it dirties faster than we send
    postcopy_after_s     switch to postcopy after this many seconds of precopy; None = never
    postcopy_recoveries  how often a stuck postcopy link is recovered (qemu driver) before
                         the migration is reported SPLIT
    multifd_channels     parallel TCP channels (set on both ends); None = off
    xbzrle_cache_mib     XBZRLE delta compression with this cache; None = off
    ===================  =====================================================================
    """

    bandwidth_mibs: float | None = None
    downtime_limit_ms: int | None = None
    auto_converge: bool = False
    postcopy_after_s: float | None = None
    postcopy_recoveries: int = 1
    multifd_channels: int | None = None
    xbzrle_cache_mib: int | None = None

    def __post_init__(self) -> None:
        if self.bandwidth_mibs is not None and not 0 < self.bandwidth_mibs <= 1 << 20:
            raise ConfigError(f"bandwidth_mibs {self.bandwidth_mibs}: must be in (0, 1048576]")
        if self.downtime_limit_ms is not None and not 1 <= self.downtime_limit_ms <= 2000:
            raise ConfigError(f"downtime_limit_ms {self.downtime_limit_ms}: QEMU accepts 1..2000")
        if self.postcopy_after_s is not None and self.postcopy_after_s < 0:
            raise ConfigError("postcopy_after_s must be >= 0")
        if self.postcopy_recoveries < 0:
            raise ConfigError("postcopy_recoveries must be >= 0")
        if self.multifd_channels is not None and not 1 <= self.multifd_channels <= 255:
            raise ConfigError(f"multifd_channels {self.multifd_channels}: QEMU accepts 1..255")
        if self.multifd_channels is not None and self.postcopy_after_s is not None:
            raise ConfigError("multifd and postcopy together are not supported here")
        if self.xbzrle_cache_mib is not None and self.xbzrle_cache_mib < 1:
            raise ConfigError("xbzrle_cache_mib must be >= 1")

    def capabilities(self) -> dict[str, bool]:
        """Capabilities to set (on both ends: postcopy-ram and multifd must match)."""
        caps = {"events": True}
        if self.auto_converge:
            caps["auto-converge"] = True
        if self.postcopy_after_s is not None:
            caps["postcopy-ram"] = True
        if self.multifd_channels is not None:
            caps["multifd"] = True
        if self.xbzrle_cache_mib is not None:
            caps["xbzrle"] = True
        return caps

    def source_parameters(self) -> dict[str, int]:
        p = {"max-bandwidth": int(self.bandwidth_mibs * MIB) if self.bandwidth_mibs
             else UNCAPPED_BYTES_S}
        if self.bandwidth_mibs and self.postcopy_after_s is not None:
            # QEMU applies its own, uncapped, limit once postcopy runs: a cap is a cap
            p["max-postcopy-bandwidth"] = int(self.bandwidth_mibs * MIB)
        if self.downtime_limit_ms is not None:
            p["downtime-limit"] = self.downtime_limit_ms
        if self.multifd_channels is not None:
            p["multifd-channels"] = self.multifd_channels
        if self.xbzrle_cache_mib is not None:
            p["xbzrle-cache-size"] = self.xbzrle_cache_mib * MIB
        return p

    def destination_parameters(self) -> dict[str, int]:
        return ({"multifd-channels": self.multifd_channels}
                if self.multifd_channels is not None else {})
