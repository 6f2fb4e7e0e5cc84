"""KVBlendConnector: kvblend's KVConnectorBase_V1.

Scheduler role: splits each new prompt into segments, asks the shared store
which are stored, and tells the engine that the prompt up to the end of the
last stored segment is an external hit (never the whole prompt).  The
lookup has no side effects.  ``update_state_after_alloc`` records the blocks,
``build_connector_meta`` hands a picklable description of each new request
to the workers.

Worker role: ``start_load_kv`` blends the external rows of each request into
the paged cache (selective recompute through the model's own layers);
``save_kv_layer`` copies every segment seen for the first time out of the
paged cache into the store, layer by layer; ``wait_for_save`` commits them.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import runtime
from .._vllm_compat import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole
from ..config import Config

logger = logging.getLogger("kvblend")

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


@dataclass
class ReqMeta:
    """What a worker needs to know about one new request."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    num_external: int
    save: bool = True


@dataclass
class KVBlendMetadata(KVConnectorMetadata):
    """Scheduler → worker metadata of one step (plain data: it pickles)."""

    requests: list[ReqMeta] = field(default_factory=list)


class _BlendState:
    """The C connector (store + separator + model shape) shared by the
    scheduler and worker connectors of one engine in one process."""

    def __init__(self, cconn, config: Config, sep_ids: list[int]):
        self.conn = cconn
        self.config = config
        self.sep_ids = sep_ids


def _extra(vllm_config) -> dict:
    """kv_connector_extra_config as a dict (may be None in configs)."""
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    return dict(getattr(ktc, "kv_connector_extra_config", None) or {})


def _state_key(vllm_config) -> str:
    """Key of the shared state: the engine id, the model name and the loaded
    model object (two engines over one loaded model share one store)."""
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    engine_id = getattr(ktc, "engine_id", None)
    model = getattr(getattr(vllm_config, "model_config", None), "model", None)
    return f"{engine_id or ''}|{model or ''}|{id(runtime.get_model()):x}"


def _layer_index(name: str) -> int:
    """Layer number in a vLLM layer name like 'model.layers.7.self_attn.attn'."""
    m = _LAYER_RE.search(name)
    if m is None:
        raise ValueError(f"cannot find a layer index in KV cache name {name!r}")
    return int(m.group(1))


class KVBlendConnector(KVConnectorBase_V1):
    """CacheBlend for vLLM: reuse stored chunk KV anywhere in the prompt."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        try:
            super().__init__(vllm_config, role, kv_cache_config)
        except TypeError:  # vLLM releases whose base takes (vllm_config, role)
            super().__init__(vllm_config, role)
        self.vllm_config = vllm_config
        self.role_ = role
        self.config = Config.from_env()  # bad LMCACHE_* values fail here
        extra = _extra(vllm_config)
        ratios = extra.get("kvblend.recompute_ratios")
        self.timing = bool(extra.get("kvblend.timing", False))
        # "kvblend.save": False makes a read-only consumer: it reuses stored
        # chunks but never adds its own (evaluation, or a replica that must
        # not fill a shared store).
        self.save_chunks = bool(extra.get("kvblend.save", True))
        self.ratios_override = None if ratios is None else [float(r) for r in ratios]
        # An explicit layout wins; kvblend's built-in engine names its own;
        # under vLLM it is detected from the attention backend in
        # register_kv_caches.
        self.kv_layout = extra.get("kvblend.kv_layout")
        # On CUDA the blend runs the dense pieces of layers with at most this
        # many active rows as per-layer CUDA graphs (0: eager).  At 8K tokens
        # and r=0.15 a layer's ~1.2K rows cost the device about as long as
        # launching their ~60 eager ops costs the host.
        self.cuda_graph_max_tokens = int(extra.get("kvblend.cuda_graph_max_tokens", 2048))
        # ... and compiles them (torch.compile): the norms, RoPE, activation
        # and residual adds fuse into a few kernels per layer.
        self.compile_pieces = bool(extra.get("kvblend.compile", True))
        self._in_vllm = not type(vllm_config).__module__.startswith("kvblend.")
        if self.kv_layout is None and not self._in_vllm:
            self.kv_layout = getattr(getattr(vllm_config, "cache_config", None),
                                     "kv_cache_layout", None)
        # scheduler state
        self._pending: dict[str, ReqMeta] = {}
        self._warned_chunked = False
        # worker state
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._layouts: list | None = None
        self._active: dict[str, tuple[Any, torch.Tensor, dict]] = {}
        self._done: set[str] = set()  # begun and finished in this step
        self.block_size = int(getattr(getattr(vllm_config, "cache_config", None), "block_size", 16))
        self.stats = {"requests": 0, "blended": 0, "segments_total": 0, "segments_hit": 0,
                      "tokens_recomputed": 0, "tokens_saved": 0}

    # ------------------------------------------------------------------ state
    def _state(self, create: bool) -> _BlendState | None:
        """The shared blend state, created from the runtime's model when
        ``create`` is set (worker side) and absent."""
        self.key = _state_key(self.vllm_config)
        st = runtime.get_state(self.key)
        if st is not None or not create:
            return st
        from .. import _ext
        from .adapters import get_adapter

        model = runtime.get_model()
        if model is None:
            raise RuntimeError("kvblend: no model was handed over (the engine must call "
                               "kvblend.runtime.set_model, which kvblend's vLLM plugin does)")
        adapter = get_adapter(model)
        ext = _ext.load()
        cache_dtype = next(iter(self._kv_caches.values())).dtype if self._kv_caches else adapter.dtype
        rope = adapter.rope
        cconn = ext.Connector(self.config.items, adapter.num_layers, adapter.num_q_heads,
                              adapter.num_kv_heads, adapter.head_size, _dtype_code(ext, cache_dtype),
                              rope.rotary_dim, ext.ROPE_NEOX if rope.style == "neox" else ext.ROPE_GPTJ,
                              [float(x) for x in rope.inv_freq.tolist()], float(rope.attention_scaling),
                              -1 if adapter.device.type == "cpu" else (adapter.device.index or 0))
        sep_ids = self._separator_ids()
        cconn.set_separator(sep_ids)
        st = _BlendState(cconn, self.config, sep_ids)
        if hasattr(adapter, "enable_cuda_graphs"):
            adapter.enable_compile(self.compile_pieces)
            adapter.enable_cuda_graphs(self.cuda_graph_max_tokens)
        st.adapter = adapter
        return runtime.put_state(self.key, st)

    def _separator_ids(self) -> list[int]:
        """The separator string tokenized alone, without special tokens."""
        tok = runtime.get_tokenizer()
        if tok is None:
            from transformers import AutoTokenizer

            from ..models import resolve_model_path

            mc = getattr(self.vllm_config, "model_config", None)
            path = getattr(mc, "tokenizer", None) or getattr(mc, "model", None)
            tok = AutoTokenizer.from_pretrained(resolve_model_path(str(path)))
        ids = tok.encode(self.config.blend_special_str, add_special_tokens=False)
        if not ids:
            raise ValueError(f"LMCACHE_BLEND_SPECIAL_STR={self.config.blend_special_str!r} "
                             "tokenizes to no tokens")
        return list(ids)

    # -------------------------------------------------------------- scheduler
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        """Tokens up to the end of the last stored segment, as an external
        hit (synchronous).  No side effects."""
        if not self.config.enable_blending or num_computed_tokens > 0:
            return 0, False
        st = self._state(create=False)
        if st is None:
            return 0, False
        _, reuse_end = st.conn.lookup(list(request.prompt_token_ids))
        return max(0, int(reuse_end) - num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        """Remember the request's blocks and external count for the workers."""
        block_ids = list(blocks.get_block_ids()[0]) if blocks is not None else []
        self._pending[request.request_id] = ReqMeta(
            req_id=request.request_id, token_ids=list(request.prompt_token_ids),
            block_ids=block_ids, num_external=int(num_external_tokens))

    def build_connector_meta(self, scheduler_output) -> KVBlendMetadata:
        """Describe this step's new requests; resets the pending state."""
        meta = KVBlendMetadata()
        for new in getattr(scheduler_output, "scheduled_new_reqs", []) or []:
            rm = self._pending.pop(new.req_id, None)
            if rm is None:
                continue
            ids = new.block_ids[0] if new.block_ids and isinstance(new.block_ids[0], (list, tuple)) \
                else new.block_ids
            rm.block_ids = list(ids)
            # A prompt prefilled over several steps (chunked prefill) is not
            # saved: its KV is complete only after the last step.
            scheduled = (getattr(scheduler_output, "num_scheduled_tokens", None) or {}).get(new.req_id)
            if scheduled is not None and rm.save:
                done = int(getattr(new, "num_computed_tokens", 0) or 0) + int(scheduled)
                if done < len(rm.token_ids):
                    rm.save = False
                    if not self._warned_chunked:
                        self._warned_chunked = True
                        logger.warning("kvblend: a %d-token prompt is prefilled in chunks, so its "
                                       "segments are not stored; raise max_num_batched_tokens to "
                                       "at least max_model_len to store every prompt",
                                       len(rm.token_ids))
            meta.requests.append(rm)
        self._pending.clear()
        return meta

    def request_finished(self, request, block_ids):
        """Blocks may be freed at once: nothing is sent asynchronously."""
        return False, None

    # ----------------------------------------------------------------- worker
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        """Keep the engine's per-layer paged caches and describe them to C."""
        from .. import ops
        from . import layouts

        self._kv_caches = dict(kv_caches)
        order = sorted(self._kv_caches, key=_layer_index)
        self._layer_of = {name: _layer_index(name) for name in order}
        if self.kv_layout is None and self._in_vllm:
            first = order[0]
            backend = layouts.backend_name(self.vllm_config, first)
            self.kv_layout = layouts.detect(self._kv_caches[first], backend,
                                            layouts.layer_isa(self.vllm_config, first))
            logger.info("kvblend: attention backend %s, KV cache %s, layout %r", backend,
                        tuple(self._kv_caches[first].shape), self.kv_layout)
        name = self.kv_layout or "cpu"
        if name in layouts.VLLM_LAYOUTS:
            self._layouts = [layouts.layout_of(self._kv_caches[n], name) for n in order]
        else:
            self._layouts = [ops.paged_layout(self._kv_caches[n], name) for n in order]
        self._state(create=True)

    def _slots(self, rm: ReqMeta) -> torch.Tensor:
        """Slot of each prompt token from the request's block ids."""
        n = len(rm.token_ids)
        blocks = torch.tensor(rm.block_ids, dtype=torch.int64)
        pos = torch.arange(n, dtype=torch.int64)
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def start_load_kv(self, forward_context, **kwargs):
        """Start each new request; blend those with external rows."""
        self._start_requests()

    def _start_requests(self):
        """Begin this step's new requests not begun yet (blending those with
        external rows).

        vLLM calls start_load_kv before the forward only when some request
        of the step loads KV synchronously (a blend); otherwise it calls it
        after the forward, so ``save_kv_layer`` begins the requests itself.
        """
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        if not isinstance(meta, KVBlendMetadata) or not meta.requests:
            return
        todo = [rm for rm in meta.requests if rm.req_id not in self._active
                and rm.req_id not in self._done]
        if not todo:
            return
        st = self._state(create=True)
        from ..blend import blend_prefill

        cfg = self.config
        ratios = self.ratios_override or list(cfg.recompute_ratios)
        checks = list(cfg.check_layers)
        if len(ratios) == 1 and len(checks) > 1:
            ratios = ratios * len(checks)
        for rm in todo:
            slots = self._slots(rm)
            t0 = time.perf_counter()
            req = st.conn.begin(rm.token_ids, blend_end=rm.num_external,
                                save=rm.save and self.save_chunks)
            info = {"segments_total": 0, "segments_hit": 0, "tokens_recomputed": 0,
                    "blend_rows": 0, "blend_s": 0.0}
            if rm.num_external > 0:
                ids = torch.tensor(rm.token_ids, dtype=torch.int64)
                bs = blend_prefill(st.adapter, req, ids, self._layouts, slots, checks, ratios,
                                   deviation=cfg.deviation,
                                   kv_dtype=next(iter(self._kv_caches.values())).dtype,
                                   timing=self.timing)
                info.update(bs.as_dict())
                info["blend_s"] = time.perf_counter() - t0
                self.stats["blended"] += 1
            else:
                n_seg, n_hit, _ = req.counts()
                info["segments_total"], info["segments_hit"] = n_seg, n_hit
            self._active[rm.req_id] = (req, slots, info)

    def wait_for_layer_load(self, layer_name: str):
        """The blend ran to completion in start_load_kv: nothing to wait for."""
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs):
        """Copy this layer of each request's first-seen segments into the store."""
        self._start_requests()
        if not self._active:
            return
        layer = self._layer_of.get(layer_name)
        if layer is None:
            layer = _layer_index(layer_name)
        layout = self._layouts[layer]
        stream = torch.cuda.current_stream(kv_layer.device).cuda_stream \
            if kv_layer.device.type == "cuda" else 0
        for req, slots, _ in self._active.values():
            req.save_layer(layer, layout, slots.data_ptr(), slots.numel(), stream)

    def wait_for_save(self):
        """Commit the segments saved at every layer; end the requests."""
        for req_id, (req, slots, info) in self._active.items():
            req.finish(True)
            self.stats["requests"] += 1
            self.stats["segments_total"] += info["segments_total"]
            self.stats["segments_hit"] += info["segments_hit"]
            self.stats["tokens_recomputed"] += info["tokens_recomputed"]
            runtime.record_request_stats(req_id, info)
            self._done.add(req_id)
            external = _external_id(req_id)
            if external != req_id:
                runtime.record_request_stats(external, info)
        self._active.clear()

    def clear_connector_metadata(self):
        """Drop this step's metadata and the record of requests it began."""
        super().clear_connector_metadata()
        self._done.clear()

    def get_finished(self, finished_req_ids):
        return None, None

    def blend_stats(self) -> dict:
        """Cumulative counters of this worker (plain dict) with the store's."""
        st = runtime.get_state(_state_key(self.vllm_config))
        out = dict(self.stats)
        if st is not None:
            out["store"] = st.conn.store_stats()
        return out

    def get_kv_connector_stats(self):
        """``blend_stats()`` for kvblend's built-in engine; None under vLLM,
        whose scheduler expects a KVConnectorStats (per-request statistics
        are in ``kvblend.runtime.request_stats``)."""
        return None if self._in_vllm else self.blend_stats()

    def shutdown(self):
        for req, _, _ in self._active.values():
            req.finish(False)
        self._active.clear()


def _external_id(req_id: str) -> str:
    """The id the caller gave a request: vLLM's engine appends '-' and 8
    random characters to make its internal id unique; strip them."""
    head, sep, tail = req_id.rpartition("-")
    return head if sep and head and len(tail) == 8 and tail.isalnum() else req_id


def _dtype_code(ext, dtype: torch.dtype) -> int:
    """kvblend dtype code of a torch dtype (ValueError for others)."""
    codes = {torch.float32: ext.DTYPE_F32, torch.float16: ext.DTYPE_F16,
             torch.bfloat16: ext.DTYPE_BF16}
    if dtype not in codes:
        raise ValueError(f"KV cache dtype {dtype} is not supported (float32, float16, bfloat16)")
    return codes[dtype]
