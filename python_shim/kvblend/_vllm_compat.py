"""vLLM's KV-connector types, or small stand-ins when vLLM is absent.

When ``vllm`` imports, ``KVConnectorBase_V1``, ``KVConnectorRole``,
``KVConnectorMetadata``, ``KVConnectorWorkerMetadata`` and
``KVConnectorStats`` are vLLM's own classes, so a connector written against
this module is a real vLLM connector.  Otherwise local stand-ins with the
same constructor and method signatures as vLLM's take their place, so the
same connector runs inside kvblend's built-in engine.

The remaining classes are what the built-in engine hands to a connector,
shaped like the vLLM objects they stand for and cut to the fields kvblend's
engine and connector use: a VllmConfig with its kv_transfer/model/cache
configs, a Request, KVCacheBlocks, a SchedulerOutput with
NewRequestData/CachedRequestData, a KVConnectorOutput, and a ForwardContext
whose layers carry ``kv_cache`` and whose attention metadata carries
``slot_mapping``.  tests/vllm_cpu/test_compat.py checks every stand-in
against vLLM's class.
"""

from __future__ import annotations

import enum
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

_HAVE_VLLM = importlib.util.find_spec("vllm") is not None

if _HAVE_VLLM:  # pragma: no cover - exercised only where vLLM is installed
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: F401
        KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole)
else:

    class KVConnectorRole(enum.Enum):
        """Which side of vLLM a connector instance serves."""

        SCHEDULER = 0
        WORKER = 1

    class KVConnectorMetadata(ABC):  # noqa: B024 - an empty marker, as in vLLM
        """Scheduler-to-worker metadata of one step; subclass it as a dataclass."""

    class KVConnectorBase_V1(ABC):
        """Stand-in for vLLM's KVConnectorBase_V1: the hooks the built-in
        engine calls, with vLLM's signatures and defaults.

        The scheduler-role instance answers lookups and builds per-step
        metadata; the worker-role instance loads and saves KV around each
        layer of the forward.  The two live in different processes in vLLM,
        so metadata must pickle.
        """

        def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config):
            if vllm_config.kv_transfer_config is None:
                raise ValueError("kv_transfer_config must be set for KVConnectorBase_V1")
            self._connector_metadata: KVConnectorMetadata | None = None
            self._vllm_config = vllm_config
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._role = role

        @property
        def role(self) -> KVConnectorRole:
            return self._role

        # ---- worker side ----
        def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
            """Set the metadata of the step about to run."""
            self._connector_metadata = connector_metadata

        def clear_connector_metadata(self) -> None:
            """Drop the step's metadata once the forward is done."""
            self._connector_metadata = None

        def _get_connector_metadata(self) -> KVConnectorMetadata:
            """Return the bound metadata; it must have been bound."""
            assert self._connector_metadata is not None
            return self._connector_metadata

        def has_connector_metadata(self) -> bool:
            return self._connector_metadata is not None

        def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
            """Receive the per-layer paged KV tensors, keyed by layer name."""
            return

        @abstractmethod
        def start_load_kv(self, forward_context, **kwargs: Any) -> None: ...

        @abstractmethod
        def wait_for_layer_load(self, layer_name: str) -> None: ...

        @abstractmethod
        def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata,
                          **kwargs: Any) -> None: ...

        @abstractmethod
        def wait_for_save(self): ...

        def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
            """Return (finished sending, finished receiving) request ids."""
            return None, None

        def shutdown(self):
            return None

        def build_connector_worker_meta(self):
            """Worker-to-scheduler metadata of the step (None: nothing)."""
            return None

        # ---- scheduler side ----
        @abstractmethod
        def get_num_new_matched_tokens(self, request, num_computed_tokens: int
                                       ) -> tuple[int | None, bool]: ...

        @abstractmethod
        def update_state_after_alloc(self, request, blocks, num_external_tokens: int): ...

        @abstractmethod
        def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata: ...

        def update_connector_output(self, connector_output) -> None:
            return

        def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
            """Return (delay freeing the blocks, KV transfer params)."""
            return False, None

# Worker -> scheduler metadata and connector statistics: vLLM's classes
# where this vLLM has them, else stand-ins with the same interface.
try:  # pragma: no cover - depends on the vLLM release
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:

    class KVConnectorWorkerMetadata(ABC):  # noqa: B024
        """Worker-to-scheduler metadata of one step; ``aggregate`` merges
        the reports of several workers."""

        @abstractmethod
        def aggregate(self, other): ...

try:  # pragma: no cover - depends on the vLLM release
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
except ImportError:

    @dataclass
    class KVConnectorStats:
        """A connector's statistics of one interval (a plain data dict)."""

        data: dict[str, Any] = field(default_factory=dict)


@dataclass
class KVConnectorOutput:
    """What the built-in engine hands the scheduler connector after a step."""

    kv_connector_worker_meta: Any = None


# ---------------------------------------------------------------- configs
@dataclass
class KVTransferConfig:
    """Which connector to build and its settings: the vLLM KVTransferConfig
    fields a caller sets (kv_role and engine_id are accepted, not read)."""

    kv_connector: str | None = None
    kv_role: str | None = "kv_both"
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)
    kv_connector_module_path: str | None = None
    engine_id: str | None = None

    def get_from_extra_config(self, key, default) -> Any:
        return self.kv_connector_extra_config.get(key, default)


@dataclass
class ModelConfig:
    model: str


@dataclass
class CacheConfig:
    block_size: int
    kv_cache_layout: str | None = None  # the built-in engine's paged layout


@dataclass
class VllmConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    kv_transfer_config: KVTransferConfig | None = None


# ---------------------------------------------------------------- scheduler side
@dataclass
class Request:
    """A request as the scheduler connector sees it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any = None
    cache_salt: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class KVCacheBlocks:
    """The blocks of one request, one list per KV-cache group (read them
    with ``get_block_ids``, as vLLM's hold block objects)."""

    def __init__(self, block_ids: tuple[list[int], ...]):
        self._block_ids = tuple(list(b) for b in block_ids)

    def get_block_ids(self, allow_none: bool = False, *, group_ids=None
                      ) -> tuple[list[int], ...] | None:
        """The block ids of each group (of ``group_ids``, default all);
        None with ``allow_none`` when every such group is empty."""
        groups = self._block_ids if group_ids is None else tuple(self._block_ids[g] for g in group_ids)
        if allow_none and all(len(g) == 0 for g in groups):
            return None
        return tuple(list(b) for b in groups)


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """Requests scheduled again (decode steps); new_block_ids[i] may be None."""

    req_ids: list[str] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)
    new_block_ids: list[tuple[list[int], ...] | None] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    finished_req_ids: set[str] = field(default_factory=set)
    kv_connector_metadata: Any = None


# ---------------------------------------------------------------- worker side
@dataclass
class AttentionLayer:
    """An attention layer as a connector finds it in no_compile_layers."""

    kv_cache: torch.Tensor


@dataclass
class AttentionMetadata:
    """Per-step attention metadata; slot_mapping[i] is the paged slot of scheduled token i."""

    slot_mapping: torch.Tensor


@dataclass
class ForwardContext:
    no_compile_layers: dict[str, AttentionLayer]
    attn_metadata: dict[str, AttentionMetadata] | AttentionMetadata | None
