"""kvblend: CacheBlend-style KV cache blending for LLM serving.

Importing this package has no side effects: neither torch nor the C
extension is loaded until a name that needs them is used (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Names served by the C extension, loaded on first use.
_EXT_NAMES = frozenset({
    "Error", "InvalidError", "NoMemoryError", "UnsupportedError", "CudaError",
    "NotFoundError", "InternalError", "Request",
})
# Submodules reachable as attributes without an explicit import.
_SUBMODULES = frozenset({"config", "ops"})

__all__ = sorted(_EXT_NAMES | {"Config", "Connector", "__version__", "store_stats"})


def __getattr__(name: str) -> Any:
    """Resolve extension names, ``Config`` and submodules on first access."""
    if name in _EXT_NAMES:
        from ._ext import load
        return getattr(load(), name)
    if name == "Config":
        from .config import Config
        return Config
    if name == "Connector":
        from .connector import Connector
        return Connector
    if name == "store_stats":
        from .runtime import store_stats
        return store_stats
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'kvblend' has no attribute {name!r}")


def __dir__() -> list[str]:
    """List the lazy names next to the loaded ones."""
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
