"""kvblend as a vLLM KV connector.

``kv_transfer_config=KVTransferConfig(kv_connector="KVBlendConnector",
kv_connector_module_path="kvblend.vllm", kv_role="kv_both")`` loads
``KVBlendConnector`` from here.  Importing this package imports nothing
heavy until the class is used.
"""

from __future__ import annotations


def __getattr__(name):
    if name in ("KVBlendConnector", "KVBlendMetadata"):
        from . import connector

        return getattr(connector, name)
    raise AttributeError(f"module 'kvblend.vllm' has no attribute {name!r}")


__all__ = ["KVBlendConnector", "KVBlendMetadata"]
