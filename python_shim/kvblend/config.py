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

from . import _clib

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
        fields = _clib.config_dict(_clib.parse_config(dict(pairs)))
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


# ------------------------------------------------- per-engine options
# The "kvblend.*" keys of vLLM's kv_connector_extra_config, one row each:
# key -> (default, check).  A check returns None for a good value, else what
# is wrong.  They are JSON values, not variables, and configure one engine;
# engine_options() is their only reader.
def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "expected true or false"


def _settings(v: Any) -> str | None:
    ok = isinstance(v, dict) and all(isinstance(k, str) and k.startswith(ENV_PREFIXES) for k in v)
    return None if ok else "expected a dict of LMCACHE_*/KVBLEND_* variable names to values"


def _list_of(v: Any, what: str, one: str, ok) -> str | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not v:
        return f"expected a non-empty list of {what}"
    for i, x in enumerate(v):
        if isinstance(x, bool) or not ok(x):
            return f"entry {i} ({x!r}) is not {one}"
    return None


def _ratios(v: Any) -> str | None:
    return _list_of(v, "ratios in [0, 1]", "a ratio in [0, 1]", lambda r: isinstance(r, (int, float)) and 0.0 <= r <= 1.0)


def _token_ids(v: Any) -> str | None:
    return _list_of(v, "token ids (ints >= 0)", "a token id (an int >= 0)", lambda t: isinstance(t, int) and t >= 0)


def _subset_attention(v: Any) -> str | None:
    from .model.attention import SUBSET_ATTENTIONS

    return None if v in SUBSET_ATTENTIONS else "expected one of " + ", ".join(map(repr, SUBSET_ATTENTIONS))


ENGINE_OPTIONS: dict[str, tuple[Any, Any]] = {
    "kvblend.settings": ({}, _settings),
    "kvblend.recompute_ratios": (None, _ratios),
    "kvblend.separator_ids": (None, _token_ids),
    "kvblend.namespace": ("", lambda v: None if isinstance(v, str) else "expected a str"),
    "kvblend.save": (True, _flag),
    "kvblend.timing": (False, _flag),
    "kvblend.profile": (None, lambda v: None if v is None or (isinstance(v, str) and v)
                        else "expected a file path (str)"),
    # None: compiled under the built-in engine, eager under vLLM (there it
    # measured no TTFT gain and cost 30-45 s of worker start-up)
    "kvblend.compile": (None, lambda v: None if v is None or isinstance(v, bool)
                        else "expected true, false or null (the default)"),
    "kvblend.cuda_graph_max_tokens": (2048, lambda v: None if isinstance(v, int) and not isinstance(
        v, bool) and v >= 0 else "expected an int >= 0"),
    "kvblend.kv_layout": (None, lambda v: None if v is None or isinstance(v, str)
                          else "expected a layout name (str)"),
    "kvblend.subset_attention": ("flex", _subset_attention),
    "kvblend.pipeline_loads": (True, _flag),
}


def engine_options(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The ``kvblend.*`` options of a kv_connector_extra_config, checked,
    with defaults for the missing ones; keys lose their ``kvblend.`` prefix.

    Other keys (another connector's) are left alone; an unknown ``kvblend.``
    key or a bad value raises ValueError naming it (a typo must not be
    silently ignored, and ``"kvblend.save": "false"`` is refused, not true).
    """
    for key in extra:
        if isinstance(key, str) and key.startswith("kvblend.") and key not in ENGINE_OPTIONS:
            raise ValueError(f"kv_connector_extra_config: unknown option {key!r}; known: "
                             + ", ".join(ENGINE_OPTIONS))
    out = {}
    for key, (default, check) in ENGINE_OPTIONS.items():
        value = extra.get(key, default)
        wrong = check(value)
        if wrong is not None:
            raise ValueError(f"kv_connector_extra_config {key!r}={value!r}: {wrong}")
        out[key[len("kvblend."):]] = value
    return out
