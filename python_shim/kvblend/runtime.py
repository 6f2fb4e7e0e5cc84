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
from typing import Any

_lock = threading.Lock()
_model: Any = None
_tokenizer: Any = None
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
