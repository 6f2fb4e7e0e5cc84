"""What an engine hands kvblend in its own process.

The engine (or kvblend's vLLM plugin, which wraps the model runner's
``load_model`` in each worker process) hands the loaded model over with
``set_model``; a worker connector binds it when the engine registers its KV
caches.  The built-in engine also finds each request's blend figures here
(``request_stats``).  Scheduler and worker connectors share nothing through
this module: they meet only through vLLM's own channels.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

_lock = threading.Lock()
_model: Any = None
_tokenizer: Any = None
_request_stats: dict[str, dict] = {}
_MAX_STATS = 4096
_worker: "weakref.ref | None" = None  # this process's latest worker connector


def set_model(model: Any, tokenizer: Any = None) -> None:
    """Record the model the engine loaded (and its tokenizer, if known)."""
    global _model, _tokenizer
    with _lock:
        _model = model
        if tokenizer is not None:
            _tokenizer = tokenizer


def get_model() -> Any:
    """Return the model handed over by ``set_model`` (None before)."""
    return _model


def get_tokenizer() -> Any:
    """Return the tokenizer handed over by ``set_model`` (None if none)."""
    return _tokenizer


def record_request_stats(req_id: str, stats: dict) -> None:
    """Keep the blend statistics of a finished prefill (bounded history)."""
    with _lock:
        if len(_request_stats) >= _MAX_STATS:
            _request_stats.pop(next(iter(_request_stats)))
        _request_stats[req_id] = stats


def request_stats(req_id: str) -> dict | None:
    """Return the statistics recorded for ``req_id``, or None."""
    with _lock:
        return _request_stats.get(req_id)


def register_worker(connector: Any) -> None:
    """Remember this process's worker connector (weakly) for ``store_stats``."""
    global _worker
    with _lock:
        _worker = weakref.ref(connector)


def store_stats() -> dict | None:
    """The chunk store of this process's worker connector, per tier:
    ``{"memory": {...}, "disk": {...} | None, "remote": {...} | None}``
    (hits, misses, bytes, errors, ...; see README), or None when no worker
    connector with a store lives in this process (a vLLM scheduler process,
    or blending off)."""
    w = _worker() if _worker is not None else None
    conn = getattr(w, "_conn", None)
    if conn is None:
        return None
    tiers = conn.tier_stats() or {}
    out = {"memory": conn.store_stats()}
    for name in ("disk", "remote"):
        t = tiers.get(name)
        out[name] = t if t is not None and t["enabled"] else None
    return out
