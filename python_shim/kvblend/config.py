"""kvblend's configuration, read from LMCACHE_* / KVBLEND_* variables.

Parsing and validation happen in one place, the C library
(``kvb_config_set`` / ``kvb_config_validate``), so the Python view and the
connector can never disagree; a bad value raises
:class:`kvblend.InvalidError` (a ``ValueError``) whose message names the
variable and the value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping

from . import _ext

# Variables kvblend reads; other LMCACHE_* names are ignored by the parser.
ENV_PREFIXES = ("LMCACHE_", "KVBLEND_")


@dataclass(frozen=True)
class Config:
    """Every kvblend setting (see csrc/include/kvblend.h for the variables).

    Build it with :meth:`from_env` or :meth:`from_items`; ``items`` keeps the
    raw ``(name, value)`` pairs it was parsed from, so a Connector can be
    created from exactly the same values (``Connector(dict(cfg.items), ...)``).
    """

    enable_blending: bool
    blend_special_str: str
    use_layerwise: bool
    check_layers: tuple[int, ...]
    recompute_ratios: tuple[float, ...]
    thresholds: tuple[float, ...] | None
    chunk_size: int
    local_cpu: bool
    max_local_cpu_size_gb: float
    enable_sparse: bool
    max_device_size_gb: float
    deviation: str
    selection: str
    boundary_tokens: int
    self_test: bool
    num_threads: int
    log_level: str
    verify_checksums: str
    local_disk: str | None = None
    max_local_disk_size_gb: float = 0.0
    remote_url: str | None = None
    remote_timeout_ms: int = 1000
    remote_part_size_mb: float = 8.0
    items: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_items(cls, items: Mapping[str, str] | Iterable[tuple[str, str]]) -> "Config":
        """Parse and validate ``name -> value`` pairs with the C parser.

        Names outside LMCACHE_*/KVBLEND_* are rejected by the parser only if
        they start with KVBLEND_; unknown LMCACHE_* names are ignored.
        Raises kvblend.InvalidError naming the variable on a bad value.
        """
        pairs = tuple(sorted(dict(items).items()))
        fields = _ext.load().config_parse(dict(pairs))
        fields["check_layers"] = tuple(fields["check_layers"])
        fields["recompute_ratios"] = tuple(fields["recompute_ratios"])
        if fields["thresholds"] is not None:
            fields["thresholds"] = tuple(fields["thresholds"])
        return cls(items=pairs, **fields)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Config":
        """Collect the LMCACHE_*/KVBLEND_* variables of ``environ`` (default
        ``os.environ``) and parse them with :meth:`from_items`."""
        env = os.environ if environ is None else environ
        return cls.from_items({k: v for k, v in env.items() if k.startswith(ENV_PREFIXES)})

    @classmethod
    def default(cls) -> "Config":
        """The configuration with every variable unset."""
        return cls.from_items({})

    def ratio_at(self, i: int) -> float:
        """Recompute ratio at check-layer index ``i``: ratios[i], or the single
        ratio when one is given for all check layers."""
        if not 0 <= i < len(self.check_layers):
            raise IndexError(f"check layer index {i} outside [0, {len(self.check_layers)})")
        return self.recompute_ratios[0] if len(self.recompute_ratios) == 1 else self.recompute_ratios[i]
