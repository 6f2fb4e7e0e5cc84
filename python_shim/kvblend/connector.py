"""kvblend.Connector: the blending state of one model (a chunk store and a separator).

It wraps the extension's C ``Connector`` (creation, ``begin`` and the per-layer
hooks of its ``Request``, all with the GIL released) and makes every other
call on the same ``kvb_connector`` through ctypes (:mod:`kvblend._clib`):
lookup, separator, statistics, tiers.  Token ids may be any sequence of ints
or integer buffer; they are converted here to the flat int32 array C takes.
"""

from __future__ import annotations

import array
import ctypes
from typing import Any, Mapping

from . import _clib, _ext


class Connector:
    """Connector(config_items, num_layers, num_q_heads, num_kv_heads, head_size,
    dtype, rotary_dim, rope_style, inv_freq, attention_factor=1.0, device=-1,
    architecture=None).

    ``config_items`` maps LMCACHE_*/KVBLEND_* names to values (parsed and
    validated as :meth:`kvblend.Config.from_items` does); ``dtype`` and
    ``rope_style`` are the extension's DTYPE_* / ROPE_* constants;
    ``inv_freq`` holds ``rotary_dim / 2`` RoPE frequencies; ``device`` is -1
    for the CPU path, else a CUDA device ordinal.
    """

    __slots__ = ("_c", "_handle")

    def __init__(self, config_items: Mapping[str, Any] | None, num_layers: int, num_q_heads: int,
                 num_kv_heads: int, head_size: int, dtype: int, rotary_dim: int, rope_style: int,
                 inv_freq, attention_factor: float = 1.0, device: int = -1,
                 architecture: str | None = None) -> None:
        self._c = _ext.load().Connector(
            _clib.parse_config(config_items), num_layers, num_q_heads, num_kv_heads, head_size,
            dtype, rotary_dim, rope_style, _clib.float32_array(inv_freq, "inv_freq"),
            attention_factor, device, architecture)
        self._handle = self._c._handle

    # --- what C owns: the request and its per-layer hooks ----------------------

    def begin(self, tokens, spans=None, blend_end: int = -1, save: bool = True,
              namespace: int = 0):
        """Start one prefill's worker-side state and return its ``Request``.

        ``blend_end >= 0`` is the row count the scheduler promised the
        engine; below 0 the lookup's reuse end is used.  Use the request as
        a context manager, or call ``finish(commit)``."""
        return self._c.begin(_clib.int32_tokens(tokens),
                             None if spans is None else _clib.span_array(spans),
                             blend_end, save, namespace)

    @property
    def device(self) -> int:
        """-1 for the CPU path, else the CUDA device ordinal."""
        return self._c.device

    @property
    def tier_key(self) -> int:
        """The key of this model and shard in the disk and remote tiers."""
        return self._c.tier_key

    @property
    def fingerprint(self) -> int:
        """The model's fingerprint (architecture, shape, dtype, RoPE)."""
        return self._c.fingerprint

    # --- calls on the same kvb_connector through ctypes ----------------------------

    def set_separator(self, tokens) -> None:
        """The separator's token ids (an empty list disables splitting)."""
        sep = _clib.int32_tokens(tokens, "separator")
        _clib.lib().kvb_connector_set_separator(self._handle, _clib._addr(sep), len(sep))

    def lookup(self, tokens, spans=None, namespace: int = 0) -> tuple[list[tuple[int, int, bool]], int]:
        """Which segments of ``tokens`` are stored, free of side effects:
        ``([(start, end, hit), ...], reuse_end)``."""
        t = _clib.int32_tokens(tokens)
        sp = None if spans is None else _clib.span_array(spans)
        cap = max(1, len(sp) // 2 if sp is not None else len(t) // 2 + 1)
        segs, hit = array.array("q", bytes(16 * cap)), (ctypes.c_uint8 * cap)()
        n_segs, reuse_end = ctypes.c_int64(), ctypes.c_int64()
        _clib.lib().kvb_connector_lookup(
            self._handle, namespace, _clib._addr(t), len(t),
            None if sp is None else _clib._addr(sp), 0 if sp is None else len(sp) // 2,
            _clib._addr(segs), ctypes.addressof(hit), cap, ctypes.byref(n_segs),
            ctypes.byref(reuse_end))
        return ([(segs[2 * i], segs[2 * i + 1], bool(hit[i])) for i in range(n_segs.value)],
                reuse_end.value)

    def set_shard(self, rank: int, world: int) -> None:
        """The tensor-parallel shard (rank of world) whose KV heads this
        connector stores; sets the tier key."""
        _clib.lib().kvb_connector_set_shard(self._handle, rank, world)

    def set_model_id(self, digest: bytes) -> None:
        """Mix an identity of the model's weights into the tier key."""
        if not isinstance(digest, bytes):
            raise TypeError(f"set_model_id() takes bytes, not {type(digest).__name__}")
        _clib.lib().kvb_connector_set_model_id(self._handle, digest, len(digest))

    def store_stats(self) -> dict:
        """The store's counters and sizes."""
        s = _clib.StoreStats()
        _clib.lib().kvb_store_get_stats(self._store(), ctypes.byref(s))
        return _clib.as_dict(s)

    def store_clear(self) -> None:
        """Remove every unpinned entry."""
        _clib.lib().kvb_store_clear(self._store())

    def tier_stats(self) -> dict | None:
        """The disk and remote tiers' counters, or None without them."""
        return _clib.tier_stats(_clib.lib().kvb_connector_tiers(self._handle))

    def flush_tiers(self) -> None:
        """Wait until queued disk and remote writes are done."""
        tiers = _clib.lib().kvb_connector_tiers(self._handle)
        if tiers:
            _clib.lib().kvb_tiers_flush(tiers)

    def watch_store(self, enabled: bool) -> None:
        """Start or stop the store's event log (see :meth:`take_store_events`)."""
        _clib.lib().kvb_store_watch(self._store(), 1 if enabled else 0)

    def take_store_events(self) -> tuple[list[tuple[int, int, bool]], bool]:
        """``([(hash, num_tokens, added), ...], lost)``: every event since the
        last call, oldest first; ``lost`` when some were dropped."""
        batch, events, lost_any = 256, [], False
        buf, n, lost = (_clib.StoreEvent * batch)(), ctypes.c_int64(batch), ctypes.c_int()
        while n.value == batch:
            _clib.lib().kvb_store_take_events(self._store(), buf, batch, ctypes.byref(n),
                                              ctypes.byref(lost))
            lost_any |= bool(lost.value)
            events += [(e.hash, e.num_tokens, e.kind == 1) for e in buf[:n.value]]
        return events, lost_any

    def _store(self) -> int:
        return _clib.lib().kvb_connector_store(self._handle)
