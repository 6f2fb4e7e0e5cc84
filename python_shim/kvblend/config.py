"""kvblend's configuration, read from LMCACHE_* / KVBLEND_* variables.

Parsing and validation happen in one place, the C library
(``kvb_config_set`` / ``kvb_config_validate``), so the Python view and the
connector can never disagree; a bad value raises
:class:`kvblend.InvalidError` (a ``ValueError``) whose message names the
variable and the value.
"""

from __future__ import annotations

import os
from dataclasses import FrozenInstanceError
from typing import Any, Iterable, Mapping

from . import _ext

# Variables kvblend reads; other LMCACHE_* names are ignored by the parser.
ENV_PREFIXES = ("LMCACHE_", "KVBLEND_")


class Config:
    """Every kvblend setting, read only (fields: :meth:`fields`).

    The fields are those of the C library's settings table (the C struct
    ``kvb_config``, through ``kvb_config_get``): ``enable_blending``,
    ``check_layers`` (a tuple), ``recompute_ratios`` (a tuple),
    ``deviation`` ("k"/"v"/"kv"), ``local_disk`` (None when unset) and so on;
    README.md lists each variable.  Build it with :meth:`from_env` or
    :meth:`from_items`; ``items`` keeps the raw ``(name, value)`` pairs it
    was parsed from, so a Connector can be created from exactly the same
    values (``Connector(dict(cfg.items), ...)``).
    """

    __slots__ = ("_values", "items")

    def __init__(self, values: Mapping[str, Any], items: tuple[tuple[str, str], ...] = ()):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "items", items)

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(f"Config has no setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}: a Config is read only")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}: a Config is read only")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return self._values == other._values and self.items == other.items

    def __hash__(self) -> int:
        return hash((tuple(sorted(self._values.items())), self.items))

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

    def __reduce__(self):
        return (Config, (self._values, self.items))

    def fields(self) -> dict[str, Any]:
        """The settings as a new dict, field name -> value."""
        return dict(self._values)

    @classmethod
    def from_items(cls, items: Mapping[str, str] | Iterable[tuple[str, str]]) -> "Config":
        """Parse and validate ``name -> value`` pairs with the C parser.

        Names outside LMCACHE_*/KVBLEND_* are rejected by the parser only if
        they start with KVBLEND_; unknown LMCACHE_* names are ignored.
        Raises kvblend.InvalidError naming the variable on a bad value.
        """
        pairs = tuple(sorted(dict(items).items()))
        fields = _ext.load().config_parse(dict(pairs))
        return cls({k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}, pairs)

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
