"""Process-wide state shared by kvblend's connector instances.

vLLM builds one connector for its scheduler and one per worker.  When they
live in the same process (the built-in engine, vLLM's in-process executor)
they share one chunk store through this module, so the scheduler's lookup
sees what the worker stored.  The engine (or kvblend's vLLM plugin, which
wraps the model runner's ``load_model``) hands the loaded model over with
``set_model`` so the blend can run the model's own layers.
"""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_model: Any = None
_tokenizer: Any = None
_states: dict[str, Any] = {}
_request_stats: dict[str, dict] = {}
_MAX_STATS = 4096


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


def get_state(key: str) -> Any:
    """Return the shared blend state registered under ``key``, or None."""
    with _lock:
        return _states.get(key)


def put_state(key: str, state: Any) -> Any:
    """Register ``state`` under ``key`` unless one exists; return the one kept."""
    with _lock:
        return _states.setdefault(key, state)


def drop_state(key: str) -> None:
    """Forget the state under ``key`` (its store is freed with it)."""
    with _lock:
        _states.pop(key, None)


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
