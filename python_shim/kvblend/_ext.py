"""Lazy loader of kvblend's C extension.

Importing :mod:`kvblend` never loads the shared objects (vLLM imports plugin
modules in several processes, some of which never blend); the first call of
:func:`load` does, and caches the module.
"""

from __future__ import annotations

import types

_module: types.ModuleType | None = None


def load() -> types.ModuleType:
    """Return the ``kvblend._kvblend`` extension module, importing it once.

    Raises ImportError with a build hint when the extension (or the
    ``libkvblend.so`` it links against) cannot be loaded.
    """
    global _module
    if _module is None:
        try:
            from . import _kvblend
        except ImportError as exc:
            raise ImportError(
                f"kvblend's C extension kvblend._kvblend could not be loaded ({exc}). "
                "Build and install the package with `pip install .`, or build with "
                "`cmake -DKVB_PYTHON=ON` and place libkvblend.so and _kvblend*.so "
                "next to kvblend/__init__.py."
            ) from exc
        _module = _kvblend
    return _module
