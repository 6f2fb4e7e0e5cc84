"""vLLM general plugin: registers KVBlendConnector with vLLM's factory.

Declared as the ``vllm.general_plugins`` entry point ``kvblend``.  vLLM calls
``register()`` once in every process it starts; it is idempotent, cheap and
does nothing unless vLLM is importable.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("kvblend")
_registered = False


def register() -> None:
    """Register the connector under the name 'KVBlendConnector'."""
    global _registered
    if _registered:
        return
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    except ImportError:
        return
    try:
        KVConnectorFactory.register_connector("KVBlendConnector", "kvblend.vllm.connector",
                                              "KVBlendConnector")
    except ValueError:
        pass  # already registered in this process
    _registered = True
