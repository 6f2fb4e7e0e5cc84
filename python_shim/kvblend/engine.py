"""A small vLLM-shaped inference engine for the CPU.

It exists so kvblend's connector can run where vLLM cannot: it serves one
request at a time, greedy only, over a paged KV cache in vLLM's layouts, and
drives a KV connector through the same hooks, in the same order, with the same
separation between a scheduler-role and a worker-role instance as vLLM:

    init:     worker.register_kv_caches({layer_name: kv_cache})
              sched.set_xfer_handshake_metadata({0: worker.get_handshake_metadata()})
    request:  sched.get_num_new_matched_tokens(req, 0)        (asked twice)
              allocate blocks; sched.update_state_after_alloc(req, blocks, n_ext)
    each step (prefill, every decode token, and the step after the finish):
              meta = sched.build_connector_meta(scheduler_output)  (pickled)
              worker.bind_connector_metadata(meta); worker.start_load_kv(ctx)
              per layer: worker.wait_for_layer_load(name) ... attention ...
                         worker.save_kv_layer(name, kv_cache, attn_metadata)
              worker.wait_for_save(); worker.get_finished(finished_ids)
              worker.clear_connector_metadata()
    finish:   sched.request_finished(req, block_ids); blocks freed (or later,
              when the worker reports the request in finished-sending)

The engine never assumes what a connector does: tokens [0, n_ext) are taken
to be in the paged cache after start_load_kv/wait_for_layer_load, and the
forward computes tokens [n_ext, n) over all keys [0, n) read back from the
paged cache.  Without a connector it is a plain full prefill.

Public entry: ``from kvblend.engine import LLM, SamplingParams, KVTransferConfig``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import pickle
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _vllm_compat as vc
from . import layouts
from ._vllm_compat import KVTransferConfig  # noqa: F401 - the engine's public config type
from .model import get_adapter

logger = logging.getLogger("kvblend")

# Connector names resolvable without kv_connector_module_path (the role of
# vLLM's KVConnectorFactory registry).
_KNOWN_CONNECTORS = {"KVBlendConnector": "kvblend.vllm"}


def layer_name(i: int) -> str:
    """vLLM's name for the attention layer of decoder layer ``i``."""
    return f"model.layers.{i}.self_attn.attn"


def kv_cache_shape(layout: str, num_blocks: int, block_size: int, num_kv_heads: int,
                   head_size: int) -> tuple[int, ...]:
    """Shape of one layer's paged KV tensor in ``layout`` (a name of
    ``kvblend.layouts``)."""
    return layouts.get(layout, f"kv_cache_layout {layout!r} is not supported").shape(
        num_blocks, block_size, num_kv_heads, head_size)


def kv_write(kv_cache: torch.Tensor, layout: str, slots: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, index=None) -> None:
    """Write k, v [T, H, D] into the paged ``kv_cache`` at ``slots`` [T].
    ``index``: ``slot_index(kv_cache, layout, slots)`` computed once for many layers."""
    blk, off = index if index is not None else slot_index(kv_cache, layout, slots)
    for plane, x in zip(layouts.kv_views(kv_cache, layout), (k, v)):
        plane[blk, off] = x


def slot_index(kv_cache: torch.Tensor, layout: str, slots: torch.Tensor):
    """(block index, offset in block) of ``slots`` on the cache's device."""
    block_size = layouts.kv_views(kv_cache, layout)[0].shape[1]
    slots = slots.to(kv_cache.device)
    return torch.div(slots, block_size, rounding_mode="floor"), slots % block_size


def kv_read(kv_cache: torch.Tensor, layout: str, slots: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather (k, v), each [T, H, D], from the paged ``kv_cache`` at ``slots`` [T]."""
    blk, off = slot_index(kv_cache, layout, slots)
    k, v = (plane[blk, off] for plane in layouts.kv_views(kv_cache, layout))
    return k, v


def kv_read_blocks(kv_cache: torch.Tensor, layout: str, block_table: torch.Tensor,
                   num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (k, v), each [num_tokens, H, D], of the positions [0, num_tokens)
    of a request whose blocks are ``block_table`` [>= ceil(num_tokens/bs)]
    (int64, on the cache's device), the way a paged-attention kernel reads
    them: whole blocks, not slot by slot.

    When the blocks are consecutive ids (``block_table`` may then be given as
    a ``range``) the result views the cache without a copy where a block's
    rows are contiguous ("flash", "flashinfer"); otherwise it is one block
    gather per plane.
    """
    out = []
    for plane in layouts.kv_views(kv_cache, layout):
        nb = -(-num_tokens // plane.shape[1])
        if isinstance(block_table, range):
            blocks = plane[block_table.start:block_table.start + nb]
        else:
            blocks = plane.index_select(0, block_table[:nb])
        out.append(blocks.reshape((-1,) + tuple(blocks.shape[2:]))[:num_tokens])
    return out[0], out[1]


@dataclass
class SamplingParams:
    """Greedy decoding settings (the only kind the built-in engine implements)."""

    temperature: float = 0.0
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    extra_args: dict | None = None  # as vLLM's: read by connectors

    def __post_init__(self):
        if self.temperature != 0.0:
            raise ValueError(f"temperature={self.temperature}: the built-in engine is greedy "
                             "only; use temperature=0.0")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: expected >= 1")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RequestMetrics:
    """Times in seconds (time.perf_counter clock): ttft = first_token_time - arrival_time,
    prefill_s = the prefill step alone (connector load + forward + save)."""

    arrival_time: float
    first_token_time: float = 0.0
    finished_time: float = 0.0
    ttft: float = 0.0
    prefill_s: float = 0.0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    finished: bool = True
    first_logits: torch.Tensor | None = None


class BlockAllocator:
    """Free list of paged-KV block ids; tracks which request holds which block."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = deque(range(num_blocks))
        self._owned: dict[str, list[int]] = {}

    def allocate(self, req_id: str, n: int) -> list[int]:
        """Append ``n`` blocks to ``req_id``'s list; RuntimeError when too few are free."""
        if n > len(self._free):
            raise RuntimeError(f"out of KV blocks: request {req_id} needs {n}, "
                               f"{len(self._free)} of {self.num_blocks} free")
        got = [self._free.popleft() for _ in range(n)]
        self._owned.setdefault(req_id, []).extend(got)
        return got

    def blocks(self, req_id: str) -> list[int]:
        return self._owned.get(req_id, [])

    def free(self, req_id: str) -> None:
        self._free.extend(self._owned.pop(req_id, []))

    def num_free(self) -> int:
        return len(self._free)


class LLM:
    """A vLLM-shaped single-request engine (see the module doc).

    ``model`` is "smollm2", an HF folder/hub id, or an already loaded
    transformers model (then pass ``tokenizer`` too).  ``num_blocks``
    defaults to enough blocks for one sequence of max_model_len tokens.
    """

    def __init__(self, model: Any = "smollm2", kv_transfer_config=None, block_size: int = 16,
                 max_model_len: int = 8192, dtype: torch.dtype = torch.float32,
                 kv_cache_layout: str = "cpu", num_blocks: int | None = None, tokenizer=None,
                 enforce_eager: bool = False, cuda_graph_max_tokens: int = 2048):
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: expected >= 1")
        if isinstance(model, str):
            from .models import load_model

            self.model, self.tokenizer = load_model(model, dtype=dtype)
            model_name = model
        else:
            self.model, self.tokenizer = model.eval(), tokenizer
            model_name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.adapter = get_adapter(self.model)
        # As in vLLM: on CUDA each layer's dense pieces are compiled
        # (torch.compile) and steps of up to cuda_graph_max_tokens tokens
        # (decode, short suffix prefills) replay them as CUDA graphs,
        # attention eager between them; enforce_eager turns both off.
        if not enforce_eager:
            self.adapter.enable_compile()
            self.adapter.enable_cuda_graphs(cuda_graph_max_tokens)
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.kv_cache_layout = kv_cache_layout
        if num_blocks is None:
            num_blocks = math.ceil(max_model_len / block_size)
        a = self.adapter
        shape = kv_cache_shape(kv_cache_layout, num_blocks, block_size, a.num_kv_heads, a.head_size)
        self.layer_names = [layer_name(i) for i in range(a.num_layers)]
        self.kv_caches = {n: torch.zeros(shape, dtype=a.dtype, device=a.device) for n in self.layer_names}
        self.allocator = BlockAllocator(num_blocks)
        self.vllm_config = vc.VllmConfig(
            model_config=vc.ModelConfig(model=model_name),
            cache_config=vc.CacheConfig(block_size=block_size, kv_cache_layout=kv_cache_layout),
            kv_transfer_config=kv_transfer_config)
        self._eos = self._eos_ids()
        self._next_id = 0
        self._finished_ids: set[str] = set()  # finished since the last step
        self._delayed_free: set[str] = set()  # blocks held until the worker reports sent

        # vLLM hands the loaded model to kvblend through its plugin; same here.
        if importlib.util.find_spec("kvblend.runtime") is not None:
            importlib.import_module("kvblend.runtime").set_model(self.model, self.tokenizer)
        self.worker_connector = self.scheduler_connector = None
        if kv_transfer_config is not None and kv_transfer_config.kv_connector:
            cls = _connector_class(kv_transfer_config)
            # no KVCacheConfig: one group spans every layer, which the
            # connectors learn from register_kv_caches and the block ids
            self.worker_connector = cls(self.vllm_config, vc.KVConnectorRole.WORKER, None)
            self.worker_connector.register_kv_caches(dict(self.kv_caches))
            self.scheduler_connector = cls(self.vllm_config, vc.KVConnectorRole.SCHEDULER, None)
            # vLLM's start-up handshake: workers' metadata to the scheduler
            hs = getattr(self.worker_connector, "get_handshake_metadata", lambda: None)()
            if hs is not None and hasattr(self.scheduler_connector, "set_xfer_handshake_metadata"):
                self.scheduler_connector.set_xfer_handshake_metadata({0: hs})

    # ------------------------------------------------------------ public API
    def get_tokenizer(self):
        return self.tokenizer

    def num_free_blocks(self) -> int:
        """Free KV blocks; equals the total once every request has finished."""
        return self.allocator.num_free()

    def shutdown(self) -> None:
        for c in (self.worker_connector, self.scheduler_connector):
            if c is not None:
                c.shutdown()

    @torch.inference_mode()
    def generate(self, prompts, sampling_params: SamplingParams | None = None,
                 return_first_logits: bool = False) -> list[RequestOutput]:
        """Run each prompt to completion, one after another; return their outputs.

        ``prompts``: a str, {"prompt_token_ids": [...]}, or a list of either.
        A str is tokenized as vLLM does (``tokenizer(prompt).input_ids``).
        A dict may carry ``"cache_salt"`` (as vLLM's prompts do): chunks
        stored under one salt are never reused under another.
        With ``return_first_logits`` each output carries ``first_logits``, the
        float32 logits [vocab] that chose the first generated token.
        """
        sp = sampling_params or SamplingParams()
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        outs = []
        for p in prompts:
            salt = None
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("a str prompt needs a tokenizer; pass prompt_token_ids")
                text, ids = p, list(self.tokenizer(p).input_ids)
            elif isinstance(p, dict) and "prompt_token_ids" in p:
                text, ids = p.get("prompt"), [int(t) for t in p["prompt_token_ids"]]
                salt = p.get("cache_salt")
                if salt is not None and not isinstance(salt, str):
                    raise ValueError(f"cache_salt={salt!r}: expected a str")
            else:
                raise ValueError(f"prompt of type {type(p).__name__}: expected str or "
                                 "{'prompt_token_ids': [...]}")
            outs.append(self._run_request(text, ids, sp, return_first_logits, salt))
        return outs

    # ------------------------------------------------------------ request
    def _run_request(self, text, ids, sp, want_logits, salt=None) -> RequestOutput:
        """Schedule, prefill, decode and finish one request (see the module doc)."""
        n = len(ids)
        if n == 0:
            raise ValueError("empty prompt: expected at least one token")
        if n > self.max_model_len:
            raise ValueError(f"prompt of {n} tokens exceeds max_model_len={self.max_model_len}")
        vocab = self.adapter.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t} at position {i} is outside the "
                                 f"model's vocabulary [0, {vocab})")
        rid = str(self._next_id)
        self._next_id += 1
        metrics = RequestMetrics(arrival_time=time.perf_counter())
        req = vc.Request(request_id=rid, prompt_token_ids=list(ids), sampling_params=sp,
                         cache_salt=salt)

        num_external = self._lookup(req)
        bs = self.block_size
        self.allocator.allocate(rid, math.ceil(n / bs))
        try:
            if self.scheduler_connector is not None:
                self.scheduler_connector.update_state_after_alloc(
                    req, vc.KVCacheBlocks((list(self.allocator.blocks(rid)),)), num_external)
            so = vc.SchedulerOutput(
                scheduled_new_reqs=[vc.NewRequestData(rid, list(ids), (list(self.allocator.blocks(rid)),),
                                                      num_external)],
                num_scheduled_tokens={rid: n - num_external},
                total_num_scheduled_tokens=n - num_external)
            t0 = time.perf_counter()
            h = self._step(so, rid, ids[num_external:], num_external)
            logits = self.adapter.logits(h[-1:])[0].float()
            metrics.prefill_s = time.perf_counter() - t0
            token = int(torch.argmax(logits))
            metrics.first_token_time = time.perf_counter()
            metrics.ttft = metrics.first_token_time - metrics.arrival_time
            first_logits = logits.clone() if want_logits else None

            out_ids, finish = [token], None
            while True:
                finish = self._stop_reason(req, out_ids, sp)
                if finish is not None:
                    break
                pos = n + len(out_ids) - 1  # position of the token to feed
                new_blocks = None
                if pos // bs >= len(self.allocator.blocks(rid)):
                    new_blocks = (self.allocator.allocate(rid, 1),)
                so = vc.SchedulerOutput(
                    scheduled_cached_reqs=vc.CachedRequestData(
                        req_ids=[rid], new_block_ids=[new_blocks], num_computed_tokens=[pos]),
                    num_scheduled_tokens={rid: 1}, total_num_scheduled_tokens=1)
                h = self._step(so, rid, [out_ids[-1]], pos)
                out_ids.append(int(torch.argmax(self.adapter.logits(h[-1:])[0])))
        except BaseException:
            self._finish(req, aborted=True)
            raise
        self._finish(req)
        metrics.finished_time = time.perf_counter()
        text_out = self.tokenizer.decode(out_ids, skip_special_tokens=True) if self.tokenizer else ""
        return RequestOutput(request_id=rid, prompt=text, prompt_token_ids=list(ids),
                             outputs=[vc_completion(text_out, out_ids, finish)], metrics=metrics,
                             num_cached_tokens=num_external, first_logits=first_logits)

    def _lookup(self, req) -> int:
        """Ask the scheduler connector how many prompt tokens it can provide.

        The question is asked twice and must get the same answer (vLLM may ask
        repeatedly, so the call must be free of side effects).  None ("ask
        later") and asynchronous loads are not supported here.  At least the
        last prompt token is always computed, to produce the first logits.
        """
        if self.scheduler_connector is None:
            return 0
        first = self.scheduler_connector.get_num_new_matched_tokens(req, 0)
        second = self.scheduler_connector.get_num_new_matched_tokens(req, 0)
        if first != second:
            raise RuntimeError(f"get_num_new_matched_tokens answered {first} then {second} for the "
                               "same request: it must be free of side effects")
        num_external, load_async = first
        if num_external is None:
            raise NotImplementedError("the built-in engine does not retry lookups "
                                      "(get_num_new_matched_tokens returned None)")
        if load_async:
            raise NotImplementedError("the built-in engine does not support asynchronous KV loads")
        if not 0 <= num_external < req.num_prompt_tokens:
            raise RuntimeError(f"connector reported {num_external} external tokens for a prompt of "
                               f"{req.num_prompt_tokens}; expected 0 <= n < prompt length")
        return int(num_external)

    def _stop_reason(self, req, out_ids, sp) -> str | None:
        """Return "stop"/"length" when generation must end after ``out_ids``, else None."""
        last = out_ids[-1]
        if not sp.ignore_eos and last in self._eos:
            return "stop"
        if sp.stop_token_ids and last in sp.stop_token_ids:
            return "stop"
        if len(out_ids) >= sp.max_tokens or req.num_prompt_tokens + len(out_ids) >= self.max_model_len:
            return "length"
        return None

    def _finish(self, req, aborted: bool = False) -> None:
        """Tell the scheduler connector, run the finishing step, free the blocks."""
        rid = req.request_id
        delay = False
        if self.scheduler_connector is not None:
            delay, _params = self.scheduler_connector.request_finished(
                req, list(self.allocator.blocks(rid)))
        self._finished_ids.add(rid)
        if delay:
            self._delayed_free.add(rid)
        else:
            self.allocator.free(rid)
        if self.worker_connector is not None and not aborted:
            # vLLM's step with nothing scheduled (kv_connector_no_forward):
            # it delivers finished_req_ids to the worker.
            self._step(vc.SchedulerOutput(), None, [], 0)

    # ------------------------------------------------------------ one step
    def _step(self, so, rid, tokens, start) -> torch.Tensor | None:
        """Run one engine step: the connector's per-step hooks around a forward of
        ``tokens`` at positions [start, start+len).  Returns the hidden states."""
        so.finished_req_ids, self._finished_ids = self._finished_ids, set()
        sched, worker = self.scheduler_connector, self.worker_connector
        ctx = self._forward_context(rid, len(tokens), start)
        if sched is not None:
            meta = sched.build_connector_meta(so)
            so.kv_connector_metadata = pickle.loads(pickle.dumps(meta))
            worker.bind_connector_metadata(so.kv_connector_metadata)
            worker.start_load_kv(ctx)
        h = self._forward(rid, tokens, start, ctx) if tokens else None
        if worker is not None:
            worker.wait_for_save()
            # what the worker stored reaches the scheduler's index, as in vLLM
            sched.update_connector_output(vc.KVConnectorOutput(
                kv_connector_worker_meta=worker.build_connector_worker_meta()))
            sending, _recving = worker.get_finished(set(so.finished_req_ids))
            for done in sending or ():
                if done in self._delayed_free:
                    self._delayed_free.discard(done)
                    self.allocator.free(done)
            worker.clear_connector_metadata()
        return h

    def _forward_context(self, rid, num_tokens, start) -> vc.ForwardContext:
        """Build the ForwardContext (layers with kv_cache, per-layer metadata)."""
        slots = self._slots(rid, start, start + num_tokens)
        md = vc.AttentionMetadata(slot_mapping=slots)
        return vc.ForwardContext(
            no_compile_layers={n: vc.AttentionLayer(self.kv_caches[n]) for n in self.layer_names},
            attn_metadata={n: md for n in self.layer_names})

    def _slots(self, rid, begin, end) -> torch.Tensor:
        """Paged slots (block_id * block_size + offset) of positions [begin, end)."""
        if rid is None or end <= begin:
            return torch.empty(0, dtype=torch.long)
        table = torch.tensor(self.allocator.blocks(rid), dtype=torch.long)
        pos = torch.arange(begin, end)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _block_table(self, rid, end: int, device: torch.device):
        """The request's blocks covering positions [0, end): a ``range`` when
        they are consecutive ids (the cache is then read in place), else an
        int64 tensor on ``device``."""
        blocks = self.allocator.blocks(rid)[: math.ceil(end / self.block_size)]
        if blocks == list(range(blocks[0], blocks[0] + len(blocks))):
            return range(blocks[0], blocks[0] + len(blocks))
        return torch.tensor(blocks, dtype=torch.long).to(device)

    def _forward(self, rid, tokens, start, ctx) -> torch.Tensor:
        """Compute ``tokens`` at positions [start, start+T) over the paged cache.

        Per layer: wait for the connector's load, project, write K/V through the
        slot mapping, attend from the new queries to all keys [0, start+T) read
        back from the paged cache by whole blocks (causal by position), finish
        the layer, and hand the layer's cache to the connector.  Index tensors
        go to the device once per step, so the layers queue without waiting.
        A prefill from position 0 attends over its own fresh K/V (the values
        just written to the cache, read back only when the cache dtype differs).
        """
        a, worker, layout = self.adapter, self.worker_connector, self.kv_cache_layout
        T = len(tokens)
        end = start + T
        dev = a.device
        slots = ctx.attn_metadata[self.layer_names[0]].slot_mapping.to(dev)
        table = self._block_table(rid, end, dev) if start > 0 else None
        positions = torch.arange(start, end, device=dev)
        index = slot_index(self.kv_caches[self.layer_names[0]], layout, slots)
        h = a.embed(torch.tensor(tokens, dtype=torch.long))
        for i, name in enumerate(self.layer_names):
            if worker is not None:
                worker.wait_for_layer_load(name)
            q, k, v = a.qkv(i, h, positions)
            cache = self.kv_caches[name]
            kv_write(cache, layout, slots, k, v, index)
            if start == 0 and cache.dtype == k.dtype:
                attn = a.attend(i, q, k, v)
            elif start == 0:
                keys, values = kv_read(cache, layout, slots)
                attn = a.attend(i, q, keys, values)
            else:
                keys, values = kv_read_blocks(cache, layout, table, end)
                attn = a.attend(i, q, keys, values, q_start=start)
            h = a.out(i, attn, h)
            if worker is not None:
                worker.save_kv_layer(name, cache, ctx.attn_metadata[name])
        return h

    def _eos_ids(self) -> set[int]:
        """EOS ids from the generation config and the tokenizer."""
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for src in (getattr(gen, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(x) for x in src)
        return ids


def vc_completion(text, token_ids, finish) -> CompletionOutput:
    return CompletionOutput(index=0, text=text, token_ids=list(token_ids), finish_reason=finish)


def _connector_class(cfg):
    """Resolve the connector class named by a KVTransferConfig.

    Like vLLM's factory with a module path: import kv_connector_module_path and
    take the attribute named kv_connector.  Without a module path only the
    names in _KNOWN_CONNECTORS resolve.
    """
    path = cfg.kv_connector_module_path or _KNOWN_CONNECTORS.get(cfg.kv_connector)
    if not path:
        raise ValueError(f"kv_connector {cfg.kv_connector!r} needs kv_connector_module_path "
                         f"(known without one: {', '.join(_KNOWN_CONNECTORS)})")
    module = importlib.import_module(path)
    try:
        return getattr(module, cfg.kv_connector)
    except AttributeError:
        raise AttributeError(f"Class {cfg.kv_connector} not found in {path}") from None
