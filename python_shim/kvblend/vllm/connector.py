"""KVBlendConnector: kvblend's KVConnectorBase_V1.

vLLM runs the scheduler's connector and one worker connector per
tensor-parallel rank, by default each in its own process.  They share
nothing but vLLM's two channels, so kvblend uses exactly those:

* scheduler -> workers (``build_connector_meta``): per step, the requests
  that start (prompt, segment spans, blocks, the local prefix-cache hit, the
  external rows promised), the requests whose prefill goes on (chunked
  prefill: new blocks, rows computed) and the requests that ended;
* workers -> scheduler (``build_connector_worker_meta`` /
  ``update_connector_output``): per step and rank, the segments its store
  added and removed.  The scheduler mirrors them in ``SegmentIndex``; a
  segment counts as stored when every rank has it.

Scheduler role: splits each prompt into segments, looks them up in the
index and reports the prompt up to the end of the last stored segment as an
external hit (never the whole prompt; beyond a local prefix hit, which is
used as it is).  The lookup has no side effects.

Worker role: ``start_load_kv`` blends the promised rows of each new request
into the paged cache (selective recompute through the model's own layers);
a promise that turned stale (a segment evicted since the lookup) is
recomputed, never served wrong.  ``save_kv_layer`` copies each segment seen
for the first time out of the paged cache once its rows are all computed
(a prompt prefilled over several steps stores each segment in the step that
completes it); ``wait_for_save`` commits them.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import runtime
from .._vllm_compat import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorStats,
    KVConnectorWorkerMetadata,
)
from ..config import Config, engine_options

logger = logging.getLogger("kvblend")

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


# --------------------------------------------------------------- metadata
@dataclass
class ReqMeta:
    """A request whose prefill starts in this step (new, or resumed after a
    preemption, which starts it again)."""

    req_id: str
    token_ids: list[int]
    spans: list[tuple[int, int]]  # segments, from the scheduler's split
    block_ids: list[int]
    prefix: int        # rows [0, prefix) are a local prefix-cache hit
    num_external: int  # rows [prefix, prefix + num_external) are blended
    computed: int      # rows in the cache once this step has run
    save: bool = True
    ratio: float | None = None  # the request's own recompute ratio, if it set one
    namespace: int = 0  # the tenant's (cache_salt, kvblend.namespace); 0 is shared


@dataclass
class ReqStep:
    """A request whose prefill goes on in this step (chunked prefill)."""

    req_id: str
    new_block_ids: list[int]
    computed: int


@dataclass
class KVBlendMetadata(KVConnectorMetadata):
    """Scheduler -> worker metadata of one step (plain data: it pickles)."""

    requests: list[ReqMeta] = field(default_factory=list)
    steps: list[ReqStep] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)


@dataclass
class KVBlendWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler metadata of one step: per rank, the store events
    ``[(hash, num_tokens, added), ...]`` and whether that rank's log lost
    events (its mirror must then be dropped)."""

    events: dict[int, list[tuple[int, int, bool]]] = field(default_factory=dict)
    lost: dict[int, bool] = field(default_factory=dict)

    def aggregate(self, other: "KVBlendWorkerMetadata") -> "KVBlendWorkerMetadata":
        """Merge another rank's report into this one (ranks are distinct)."""
        for rank, ev in other.events.items():
            self.events.setdefault(rank, []).extend(ev)
        for rank, lost in other.lost.items():
            self.lost[rank] = self.lost.get(rank, False) or lost
        return self


try:  # vLLM's base of out-of-band handshake metadata (workers -> scheduler at start-up)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorHandshakeMetadata
except ImportError:  # the built-in engine without vLLM
    class KVConnectorHandshakeMetadata:  # type: ignore[no-redef]
        pass


@dataclass
class KVBlendHandshake(KVConnectorHandshakeMetadata):
    """A worker's tier key (model fingerprint and shard), sent once at
    start-up so the scheduler can look its chunks up in the disk and remote
    tiers before the first step."""

    rank: int
    tier_key: int


# ------------------------------------------------------------------ stats
_COUNTERS = ("requests", "blended", "segments_total", "segments_hit", "rows_blended",
             "rows_reused", "rows_recomputed", "segments_stored",
             # lower tiers (rank 0's store), per interval
             "disk_hits", "disk_misses", "disk_errors", "disk_corrupt", "disk_bytes_read",
             "disk_bytes_written", "remote_hits", "remote_misses", "remote_errors",
             "remote_corrupt", "remote_bytes_read", "remote_bytes_written")
_TIER_FIELDS = ("hits", "misses", "errors", "corrupt", "bytes_read", "bytes_written")


@dataclass
class KVBlendStats(KVConnectorStats):
    """kvblend's counters of one interval (vLLM's connector stats): summed
    over steps, reported by tensor-parallel rank 0 only."""

    def __post_init__(self):
        for k in _COUNTERS:
            self.data.setdefault(k, 0)

    def reset(self):
        self.data = {k: 0 for k in _COUNTERS}

    def aggregate(self, other: "KVConnectorStats") -> "KVBlendStats":
        for k, v in (other.data or {}).items():
            if k in _COUNTERS:
                self.data[k] = self.data.get(k, 0) + int(v)
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k: int(self.data.get(k, 0)) for k in _COUNTERS}
        seg = out["segments_total"]
        out["segment_hit_rate"] = round(out["segments_hit"] / seg, 3) if seg else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(k, 0) for k in _COUNTERS)


def _prom_metrics_class():
    """KVConnectorPromMetrics subclass exposing the counters as
    ``vllm:kvblend_<name>_total`` (defined lazily: it needs vLLM)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

    class KVBlendPromMetrics(KVConnectorPromMetrics):
        def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
            super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
            self._counters = {}
            for name in _COUNTERS:
                c = self._counter_cls(name=f"vllm:kvblend_{name}_total",
                                      documentation=f"kvblend: {name.replace('_', ' ')}",
                                      labelnames=labelnames)
                self._counters[name] = {idx: c.labels(*values)
                                        for idx, values in per_engine_labelvalues.items()}

        def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
            for name, per_engine in self._counters.items():
                v = int((transfer_stats_data or {}).get(name, 0))
                if v and engine_idx in per_engine:
                    per_engine[engine_idx].inc(v)

    return KVBlendPromMetrics


# ------------------------------------------------------------------ index
class SegmentIndex:
    """The scheduler's mirror of the workers' stores: for each segment key
    (hash of its tokens, length), the set of ranks that hold it.

    Fed only by the workers' store events, so it never claims more than
    they reported; it can be stale by a step (a segment evicted after it
    was looked up), which the blend absorbs by recomputing those rows.
    A hash collision would also only cost a recompute: the worker's store
    compares tokens.
    """

    def __init__(self, world_size: int):
        self.world_size = max(1, int(world_size))
        self._ranks: dict[tuple[int, int], set[int]] = {}

    def __len__(self) -> int:
        return sum(1 for r in self._ranks.values() if len(r) == self.world_size)

    def apply(self, meta: KVBlendWorkerMetadata) -> None:
        """Apply one step's events of every rank (in order)."""
        for rank, events in meta.events.items():
            for h, n, added in events:
                key = (int(h), int(n))
                if added:
                    self._ranks.setdefault(key, set()).add(rank)
                else:
                    self._drop(key, rank)
        for rank, lost in meta.lost.items():
            if lost:
                self.forget_rank(rank)

    def forget_rank(self, rank: int) -> None:
        """Forget everything ``rank`` reported (its event log overflowed)."""
        logger.warning("kvblend: rank %d lost store events; forgetting its segments "
                       "(they are stored again as prompts reuse them)", rank)
        for key in list(self._ranks):
            self._drop(key, rank)

    def _drop(self, key: tuple[int, int], rank: int) -> None:
        """``rank`` no longer holds ``key``; forget keys no rank holds."""
        ranks = self._ranks.get(key)
        if ranks is not None:
            ranks.discard(rank)
            if not ranks:
                del self._ranks[key]

    def has(self, key: tuple[int, int]) -> bool:
        """True when every rank holds the segment."""
        ranks = self._ranks.get(key)
        return ranks is not None and len(ranks) == self.world_size


# ---------------------------------------------------------------- helpers
def _extra(vllm_config) -> dict:
    """kv_connector_extra_config as a dict (may be None in configs)."""
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    return dict(getattr(ktc, "kv_connector_extra_config", None) or {})


def _layer_index(name: str) -> int:
    """Layer number in a vLLM layer name like 'model.layers.7.self_attn.attn'."""
    m = _LAYER_RE.search(name)
    if m is None:
        raise ValueError(f"cannot find a layer index in KV cache name {name!r}")
    return int(m.group(1))


def _first_group(block_ids) -> list[int]:
    """Block ids of the first (only) KV cache group: vLLM passes a tuple of
    per-group lists, older releases a flat list."""
    if not block_ids:
        return []
    if isinstance(block_ids[0], (list, tuple)):
        return list(block_ids[0])
    return list(block_ids)


def _tp() -> tuple[int, int, Any]:
    """(rank, world size, group) of this worker's tensor-parallel group;
    (0, 1, None) outside vLLM's distributed setup."""
    try:
        from vllm.distributed import parallel_state as ps

        group = ps.get_tp_group()
        return int(group.rank_in_group), int(group.world_size), group
    except Exception:  # noqa: BLE001 - not initialised: one rank
        return 0, 1, None


class _Active:
    """Worker state of one request whose prefill is under way."""

    __slots__ = ("req", "n", "blocks", "computed", "slots", "info")

    def __init__(self, req, n: int, blocks: list[int], computed: int, info: dict):
        self.req, self.n, self.blocks, self.computed, self.info = req, n, blocks, computed, info
        self.slots = None

    def slot_mapping(self, block_size: int) -> torch.Tensor:
        """Slot of each prompt row computed so far (see ``_slot_mapping``)."""
        return _slot_mapping(self.blocks, self.n, self.computed, block_size)


def _slot_mapping(block_ids: list[int], n: int, computed: int, block_size: int) -> torch.Tensor:
    """Slot of each of ``n`` rows in the blocks ``block_ids``; -1 for rows at
    or past ``computed`` or past the allocated blocks."""
    pos = torch.arange(n, dtype=torch.int64)
    blocks = torch.tensor(block_ids or [0], dtype=torch.int64)
    idx = torch.clamp(pos // block_size, max=blocks.numel() - 1)
    slots = blocks[idx] * block_size + pos % block_size
    valid = (pos < computed) & (pos // block_size < len(block_ids))
    return torch.where(valid, slots, torch.full_like(slots, -1))


def _profiled(fn, path: str, title: str):
    """Run ``fn()`` under torch.profiler and append its table (self device
    time per operator and input shapes) to ``path``; returns fn's result."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True) as prof:
        out = fn()
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=40,
                                                               max_name_column_width=60,
                                                               max_shapes_column_width=70)
    with open(path, "a") as f:
        f.write(f"==== kvblend blend, {title}\n{table}\n")
    return out


# -------------------------------------------------------------- connector
class KVBlendConnector(KVConnectorBase_V1):
    """CacheBlend for vLLM: reuse stored chunk KV anywhere in the prompt."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        try:
            super().__init__(vllm_config, role, kv_cache_config)
        except TypeError:  # vLLM releases whose base takes (vllm_config, role)
            super().__init__(vllm_config, role)
        self.vllm_config = vllm_config
        self.role_ = role
        extra = _extra(vllm_config)
        # the "kvblend.*" options, checked (kvblend.config.ENGINE_OPTIONS)
        opts = self.options = engine_options(extra)
        # "kvblend.settings": {"KVBLEND_SELECTION": "query", ...} sets any
        # LMCACHE_*/KVBLEND_* variable for this connector only, over the
        # environment (one process, several engines configured apart); bad
        # values fail here
        self.config = Config.from_env({**os.environ, **{k: str(v) for k, v in opts["settings"].items()}})
        self.timing = opts["timing"]
        # "kvblend.profile": a file each blend appends its torch.profiler
        # table to (device time per kernel and input shapes; diagnostics:
        # the profiler slows the blend down)
        self.profile_path = opts["profile"]
        if self.profile_path is not None:
            try:  # refused at start-up, not in the middle of a request
                open(self.profile_path, "a").close()
            except OSError as e:
                raise ValueError(f"kv_connector_extra_config 'kvblend.profile'="
                                 f"{self.profile_path!r}: cannot write there ({e})") from e
        self.self_test_report: dict | None = None  # the start-up gate's figures (kvblend.gate)
        # "kvblend.save": False makes a read-only consumer: it reuses stored
        # chunks but never adds its own (evaluation, or a replica that must
        # not fill a shared store).
        self.save_chunks = opts["save"]
        self.ratios_override = _ratios_override(opts["recompute_ratios"], len(self.config.check_layers))
        # Tenants: chunks stored under one namespace are never found from
        # another.  "kvblend.namespace" names this deployment's (or, in the
        # built-in engine, this engine's) namespace; a request's cache_salt
        # refines it per request, as vLLM's prefix cache does.
        self.namespace = opts["namespace"]
        # An explicit layout wins; kvblend's built-in engine names its own;
        # under vLLM it is detected from the attention backend in
        # register_kv_caches.
        self.kv_layout = opts["kv_layout"]
        # On CUDA the blend runs the dense pieces of layers with at most this
        # many active rows as per-layer CUDA graphs (0: eager).  At 8K tokens
        # and r=0.15 a layer's ~1.2K rows cost the device about as long as
        # launching their ~60 eager ops costs the host.
        self.cuda_graph_max_tokens = opts["cuda_graph_max_tokens"]
        # ... and compiles them (torch.compile): the norms, RoPE, activation
        # and residual adds fuse into a few kernels per layer.  By default
        # only under the built-in engine: under vLLM (FLASH_ATTN, 8K, H200)
        # the compiled pieces saved ~1 ms of device time per blend, no TTFT
        # within the noise, and the compilation cost 30-45 s of start-up.
        self.compile_pieces = opts["compile"]
        # Subset attention of the blend on CUDA ("flex" or "sdpa";
        # kvblend.model.attention), chosen once the model's device is known,
        # and whether layer l+1 loads on a side stream while l computes.
        self.subset_attention = opts["subset_attention"]
        self.pipeline_loads = opts["pipeline_loads"]
        self.attention = None
        self._in_vllm = not type(vllm_config).__module__.startswith("kvblend.")
        if self.kv_layout is None and not self._in_vllm:
            self.kv_layout = getattr(getattr(vllm_config, "cache_config", None),
                                     "kv_cache_layout", None)
        self.block_size = int(getattr(getattr(vllm_config, "cache_config", None), "block_size", 16))
        pc = getattr(vllm_config, "parallel_config", None)
        self.world_size = int(getattr(pc, "tensor_parallel_size", 1) or 1)
        pp = int(getattr(pc, "pipeline_parallel_size", 1) or 1)
        if pp > 1 and self.config.enable_blending:
            raise ValueError("kvblend: pipeline parallelism (pipeline_parallel_size="
                             f"{pp}) is not supported; blending needs every layer in one worker")
        self._stats = KVBlendStats()
        self._cumulative: dict[str, int] = {}
        if self._is_scheduler():
            self._init_scheduler(extra)
        else:
            self._init_worker()

    def _is_scheduler(self) -> bool:
        return getattr(self.role_, "name", str(self.role_)).endswith("SCHEDULER")

    # ------------------------------------------------------------ scheduler
    def _init_scheduler(self, extra: dict) -> None:
        """Scheduler state; says at start-up whether blending is on."""
        from .. import _clib

        self._clib = _clib
        self.index = SegmentIndex(self.world_size)
        self._pending: dict[str, int] = {}               # req_id -> num_external
        self._prefill: dict[str, int] = {}               # req_id -> prompt length, while prefilling
        self._prompts: dict[str, list[int]] = {}         # req_id -> prompt, until it finishes
        self._ratios: dict[str, float | None] = {}       # req_id -> its own ratio, until it finishes
        self._no_save: set[str] = set()                  # requests that asked not to store chunks
        self._ns: dict[str, int] = {}                    # req_id -> its namespace, until it finishes
        self._finished: list[str] = []
        self._plans: dict[str, dict] = {}                # req_id -> lookup figures
        self.sep_ids: list[int] = []
        if not self.config.enable_blending:
            logger.info("kvblend: blending is off (LMCACHE_ENABLE_BLENDING is not true); "
                        "the connector stores and reuses nothing")
            return
        self.sep_ids = self._separator_ids(extra)
        cfg = self.config
        logger.info("kvblend: blending on: separator %r = token ids %s, check layers %s, "
                    "recompute ratios %s, tensor-parallel ranks %d",
                    cfg.blend_special_str, self.sep_ids, list(cfg.check_layers),
                    self.ratios_override or list(cfg.recompute_ratios), self.world_size)
        # The disk and remote tiers, for lookups only: the workers load and
        # write.  Their tier keys arrive with vLLM's start-up handshake.
        self._tiers = self._clib.TiersView.open(dict(cfg.items))
        self._tier_keys: dict[int, int] = {}
        if self._tiers is not None:
            logger.info("kvblend: lower tiers: disk %s, remote %s",
                        cfg.local_disk or "off", _safe_url(cfg.remote_url) or "off")

    def set_xfer_handshake_metadata(self, metadata) -> None:
        """Take each worker's tier key (vLLM calls this once, at start-up)."""
        for rank, meta in (metadata or {}).items():
            if isinstance(meta, KVBlendHandshake):
                self._tier_keys[int(meta.rank)] = int(meta.tier_key)

    def _in_tiers(self, h: int) -> bool:
        """True when every rank's copy of segment hash ``h`` is in the disk
        or remote tier (a server that is down answers no)."""
        if getattr(self, "_tiers", None) is None or len(self._tier_keys) < self.world_size:
            return False
        return all(self._tiers.contains(k, h) for k in self._tier_keys.values())

    def _separator_ids(self, extra: dict) -> list[int]:
        """The separator's token ids: ``kvblend.separator_ids`` when given,
        else LMCACHE_BLEND_SPECIAL_STR tokenized alone without special
        tokens.  Raises ValueError naming the setting when neither works."""
        given = self.options["separator_ids"]  # checked by engine_options
        if given is not None:
            return [int(t) for t in given]
        mc = getattr(self.vllm_config, "model_config", None)
        if getattr(mc, "skip_tokenizer_init", False):
            raise ValueError("kvblend: blending is on but the engine has no tokenizer "
                             "(skip_tokenizer_init); set kv_connector_extra_config "
                             "'kvblend.separator_ids' to the separator's token ids")
        tok = runtime.get_tokenizer()
        if tok is None:
            from transformers import AutoTokenizer

            from ..models import resolve_model_path

            path = getattr(mc, "tokenizer", None) or getattr(mc, "model", None)
            tok = AutoTokenizer.from_pretrained(resolve_model_path(str(path)))
        ids = tok.encode(self.config.blend_special_str, add_special_tokens=False)
        if not ids:
            raise ValueError(f"LMCACHE_BLEND_SPECIAL_STR={self.config.blend_special_str!r} "
                             "tokenizes to no tokens")
        return list(ids)

    def _segments(self, tokens: list[int]) -> list[tuple[int, int]]:
        """The prompt's segments (spans) split on the separator."""
        if len(tokens) < len(self.sep_ids):
            return []
        return [(int(a), int(b)) for a, b in self._clib.segment_split(tokens, self.sep_ids)]

    def _namespace_of(self, request) -> int:
        """The request's tenant namespace: kvblend.namespace and the
        request's cache_salt (vLLM's per-request cache isolation) together;
        0, shared by all, when neither is set."""
        salt = getattr(request, "cache_salt", None) or ""
        if not self.namespace and not salt:
            return 0
        return int(self._clib.namespace(f"{self.namespace}\x1f{salt}"))

    def _lookup(self, tokens: list[int], ns: int = 0) -> tuple[list[tuple[int, int]], list[bool], int]:
        """(spans, hit per span, reuse_end) in namespace ``ns``: reuse_end
        is the end of the last stored segment, capped at n - 1 (the engine
        computes at least the last token)."""
        spans = self._segments(tokens)
        hits, end = [], 0
        for a, b in spans:
            h = self._clib.hash_tokens(tokens[a:b], ns)
            hit = self.index.has((h, b - a)) or self._in_tiers(h)
            hits.append(hit)
            if hit:
                end = b
        n = len(tokens)
        return spans, hits, min(end, max(n - 1, 0))

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        """Rows past the local prefix hit up to the end of the last stored
        segment, as an external hit (synchronous).  No side effects."""
        if not self.config.enable_blending:
            return 0, False
        tokens = list(request.prompt_token_ids)
        _, _, reuse_end = self._lookup(tokens, self._namespace_of(request))
        return max(0, reuse_end - int(num_computed_tokens)), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        """Remember the external rows of a request that starts; its blocks
        and local prefix hit come with the step's scheduler output."""
        if not self.config.enable_blending:
            return
        self._pending[request.request_id] = int(num_external_tokens)
        self._prompts[request.request_id] = list(request.prompt_token_ids)
        self._ratios[request.request_id] = _request_ratio(request)
        if _request_no_save(request):
            self._no_save.add(request.request_id)
        self._ns[request.request_id] = self._namespace_of(request)

    def build_connector_meta(self, scheduler_output) -> KVBlendMetadata:
        """Describe this step's starting, continuing and ended requests."""
        meta = KVBlendMetadata(finished=self._finished)
        self._finished = []
        if not self.config.enable_blending:
            return meta
        scheduled = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
        for new in getattr(scheduler_output, "scheduled_new_reqs", []) or []:
            tokens = new.prompt_token_ids or self._prompts.get(new.req_id, [])
            self._start(meta, new.req_id, list(tokens), _first_group(new.block_ids),
                        int(new.num_computed_tokens or 0), int(scheduled.get(new.req_id, 0)))
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        if cached is not None:
            resumed = set(getattr(cached, "resumed_req_ids", None) or ())
            flags = getattr(cached, "resumed_from_preemption", None)  # older releases
            for i, req_id in enumerate(cached.req_ids):
                new_ids = _first_group(cached.new_block_ids[i]) if cached.new_block_ids[i] else []
                if req_id in resumed or (flags is not None and flags[i]):
                    # preempted and resumed: its blocks were freed and it is
                    # computed again (new_ids is its whole block list), maybe
                    # with external rows again: the workers start it anew
                    meta.finished.append(req_id)
                    self._start(meta, req_id, self._prompts.get(req_id, []), new_ids,
                                int(cached.num_computed_tokens[i]), int(scheduled.get(req_id, 0)))
                    continue
                if req_id not in self._prefill:
                    continue
                computed = int(cached.num_computed_tokens[i]) + int(scheduled.get(req_id, 0))
                meta.steps.append(ReqStep(req_id, new_ids, computed))
                if computed >= self._prefill[req_id]:
                    del self._prefill[req_id]
        self._pending.clear()
        return meta

    def _start(self, meta: KVBlendMetadata, req_id: str, tokens: list[int], block_ids: list[int],
               num_computed: int, scheduled: int) -> None:
        """Add a request whose prefill starts now to ``meta``."""
        # computed at scheduling = the local prefix-cache hit + the external rows
        ext = self._pending.pop(req_id, 0)
        prefix = max(0, num_computed - ext)
        ns = self._ns.get(req_id, 0)
        spans, hits, _ = self._lookup(tokens, ns)
        computed = num_computed + scheduled
        meta.requests.append(ReqMeta(req_id=req_id, token_ids=tokens, spans=spans,
                                     block_ids=block_ids, prefix=prefix, num_external=ext,
                                     computed=computed,
                                     save=self.save_chunks and req_id not in self._no_save,
                                     ratio=self._ratios.get(req_id), namespace=ns))
        self._plans[req_id] = self._plan(spans, hits, prefix, ext, len(tokens),
                                         self._ratios.get(req_id))
        if len(self._plans) > 4096:
            self._plans.pop(next(iter(self._plans)))
        if computed < len(tokens):
            self._prefill[req_id] = len(tokens)
        else:
            self._prefill.pop(req_id, None)

    def _plan(self, spans, hits, prefix: int, ext: int, n: int, ratio: float | None) -> dict:
        """What the workers will do with a request, from the lookup: the
        figures its ``kv_transfer_params`` report (the workers recompute
        the same rows unless a segment was evicted since the lookup)."""
        from ..blend import num_selected

        end = prefix + ext
        covered = 0
        n_hit = 0
        for (a, b), hit in zip(spans, hits):
            if hit and a < end:
                n_hit += 1
                covered += max(0, min(b, end) - max(a, prefix))
        forced = ext - covered
        ratios = [ratio] if ratio is not None else \
            (self.ratios_override or list(self.config.recompute_ratios))
        recomputed = forced + num_selected(ratios[-1], ext - forced) if ext else 0
        return {"segments_total": len(spans), "segments_hit": n_hit if ext else 0,
                "prompt_tokens": n, "prefix_rows": prefix, "blend_rows": ext,
                "tokens_recomputed": recomputed, "rows_reused": ext - recomputed}

    def update_connector_output(self, connector_output) -> None:
        """Mirror the workers' store events into the index."""
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, KVBlendWorkerMetadata):
            self.index.apply(meta)

    def request_finished(self, request, block_ids):
        """Blocks may be freed at once (nothing is sent asynchronously); the
        workers end the request's state in the next step.  The request's
        lookup figures come back in its ``kv_transfer_params``."""
        if not self._is_scheduler() or not self.config.enable_blending:
            return False, None
        req_id = request.request_id
        self._finished.append(req_id)
        self._prefill.pop(req_id, None)
        self._prompts.pop(req_id, None)
        self._ratios.pop(req_id, None)
        self._no_save.discard(req_id)
        self._ns.pop(req_id, None)
        self._pending.pop(req_id, None)
        plan = self._plans.pop(req_id, None)
        return False, ({"kvblend": plan} if plan is not None else None)

    # --------------------------------------------------------------- worker
    def _init_worker(self) -> None:
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._layouts: list | None = None
        self._active: dict[str, _Active] = {}
        self._scheduled: set[str] = set()  # requests whose prefill runs in this step
        self._conn = None
        self._adapter = None
        self._rank, self._tp_size, self._tp_group = 0, 1, None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        """Keep the engine's per-layer paged caches, describe them to C and
        create this worker's store over the model vLLM loaded."""
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
        self._layouts = [ops.paged_layout(self._kv_caches[n], name) for n in order]
        if self.config.enable_blending:
            self._create_store()

    def _create_store(self) -> None:
        """This worker's C connector (store, model shape), bound to the model
        loaded in this process; fails loudly when blending cannot work."""
        from .. import _ext
        from ..connector import Connector
        from ..model import get_adapter
        from ..model.attention import subset_attention

        model = runtime.get_model()
        if model is None:
            raise RuntimeError("kvblend: blending is on but no model was handed over (vLLM must "
                               "load kvblend's plugin, the 'kvblend' vllm.general_plugins entry "
                               "point; is the package installed in this environment?)")
        adapter = get_adapter(model)  # ValueError naming an unsupported model
        bad = [c for c in self.config.check_layers if c >= adapter.num_layers]
        if bad:
            raise ValueError(f"LMCACHE_BLEND_CHECK_LAYERS={','.join(map(str, self.config.check_layers))}: "
                             f"layer {bad[0]} does not exist; {type(model).__name__} has "
                             f"{adapter.num_layers} layers (0..{adapter.num_layers - 1})")
        ext = _ext.load()
        cache_dtype = next(iter(self._kv_caches.values())).dtype if self._kv_caches else adapter.dtype
        rope = adapter.rope
        self.attention = subset_attention(self.subset_attention, adapter.device)

        def new_connector(over=None):
            items = dict(self.config.items)
            items.update(over or {})
            return Connector(
                items, adapter.num_layers, adapter.num_q_heads, adapter.num_kv_heads,
                adapter.head_size, _dtype_code(ext, cache_dtype), rope.rotary_dim,
                ext.ROPE_NEOX if rope.style == "neox" else ext.ROPE_GPTJ,
                [float(x) for x in rope.inv_freq.tolist()], float(rope.attention_scaling),
                -1 if adapter.device.type == "cpu" else (adapter.device.index or 0),
                type(model).__name__)

        name = _model_name(self.vllm_config, model)
        if self.config.self_test:
            from ..gate import self_test

            # before CUDA graphs and compilation: the gate's shapes are not
            # the engine's; raises SelfTestError naming the model
            self.self_test_report = self_test(
                adapter, new_connector, name, cache_dtype, list(self.config.check_layers),
                hf_model=None if self._in_vllm else model, attention=self.attention)
        else:
            logger.warning("kvblend: KVBLEND_SELF_TEST=0: blending %s without the start-up "
                           "self-test", name)
        self._conn = new_connector()
        self._rank, self._tp_size, self._tp_group = _tp() if self._in_vllm else (0, 1, None)
        # each rank stores its own KV heads: its own key in the lower tiers;
        # entries there outlive this process and are shared, so the key
        # also names the weights (a fine-tune never reads its base's KV)
        self._conn.set_shard(self._rank, max(1, self._tp_size))
        if self._conn.tier_stats() is not None:
            self._conn.set_model_id(weights_digest(model))
        self._conn.watch_store(True)
        self._tier_last: dict[str, int] = {}
        runtime.register_worker(self)  # kvblend.store_stats()
        compiled = adapter.enable_compile(
            self.compile_pieces if self.compile_pieces is not None else not self._in_vllm)
        graphs = adapter.enable_cuda_graphs(self.cuda_graph_max_tokens)
        self._adapter = adapter
        if self._tp_size != self.world_size and self._in_vllm:
            raise RuntimeError(f"kvblend: tensor-parallel group has {self._tp_size} ranks, the "
                               f"config {self.world_size}")
        logger.info("kvblend: worker rank %d/%d stores %d KV heads of %d layers (%s); layer "
                    "pieces %s, %s", self._rank, self._tp_size, adapter.num_kv_heads,
                    adapter.num_layers, type(model).__name__,
                    "compiled" if compiled else "eager",
                    "CUDA graphs" if graphs else "no CUDA graphs")

    def start_load_kv(self, forward_context, **kwargs):
        """Begin this step's requests (blending those with external rows)."""
        self._begin_step()

    def _begin_step(self):
        """Apply this step's metadata once: end finished requests, extend
        continuing ones, begin new ones (blending the promised rows).

        vLLM calls start_load_kv before the forward only when some request
        of the step loads KV synchronously (a blend); otherwise after it, so
        ``save_kv_layer`` runs this itself first.
        """
        if self._conn is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVBlendMetadata) or getattr(meta, "_kvblend_applied", False):
            return
        meta._kvblend_applied = True
        for req_id in meta.finished:
            self._end(req_id, commit=True)
        self._scheduled = {st.req_id for st in meta.steps} | {rm.req_id for rm in meta.requests}
        for req_id in [r for r in self._active if r not in self._scheduled]:
            # Its prefill is not scheduled in this step.  One whose prefill
            # was done ended in wait_for_save, unless that step failed (an
            # error in the forward): it may hold partial saves whose slots
            # are now freed and reused, so it ends here with nothing stored.
            a = self._active[req_id]
            if a.computed >= a.n:
                logger.warning("kvblend: request %s: the step of its prefill did not complete; "
                               "none of its segments is stored", req_id)
                self._end(req_id, commit=False)
        for st in meta.steps:
            a = self._active.get(st.req_id)
            if a is not None:
                a.blocks.extend(st.new_block_ids)
                a.computed = st.computed
                a.slots = None
        for rm in meta.requests:
            self._end(rm.req_id, commit=False)  # a resumed request starts again
            self._begin(rm)

    def _begin(self, rm: ReqMeta) -> None:
        """Begin one request; blend its promised rows into the paged cache."""
        from ..blend import blend_prefill

        t0 = time.perf_counter()
        end = rm.prefix + rm.num_external
        req = self._conn.begin(rm.token_ids, spans=rm.spans, blend_end=end if rm.num_external else 0,
                               save=rm.save and self.save_chunks, namespace=rm.namespace)
        a = _Active(req, len(rm.token_ids), list(rm.block_ids), rm.computed, {})
        self._active[rm.req_id] = a
        n_seg, n_hit, _ = req.counts()
        info = {"segments_total": n_seg, "segments_hit": n_hit, "blend_rows": 0,
                "prefix_rows": rm.prefix, "tokens_recomputed": 0, "rows_reused": 0,
                "blend_s": 0.0}
        a.info = info
        if rm.num_external > 0:
            cfg = self.config
            ratios = [rm.ratio] if rm.ratio is not None else \
                (self.ratios_override or list(cfg.recompute_ratios))
            checks = list(cfg.check_layers)
            if len(ratios) == 1 and len(checks) > 1:
                ratios = ratios * len(checks)
            blend_slots = _slot_mapping(a.blocks, end, end, self.block_size)
            forced = torch.frombuffer(bytearray(req.forced()), dtype=torch.uint8)[:end]
            def blend():
                return blend_prefill(
                    self._adapter, req, torch.tensor(rm.token_ids, dtype=torch.int64),
                    self._layouts, blend_slots, checks, ratios, deviation=cfg.deviation,
                    selection=cfg.selection, boundary_tokens=cfg.boundary_tokens,
                    kv_dtype=next(iter(self._kv_caches.values())).dtype, timing=self.timing,
                    prefix=rm.prefix, forced=self._union_forced(forced),
                    reduce_scores=self._reduce_scores(), digest=self._tp_size > 1,
                    attention=self.attention, pipeline=self.pipeline_loads)

            bs = blend() if self.profile_path is None else \
                _profiled(blend, self.profile_path,
                          f"request {rm.req_id}, rank {self._rank}, {end - rm.prefix} rows")
            info.update(bs.as_dict())
            info["prefix_rows"] = rm.prefix
            info["rows_reused"] = end - rm.prefix - bs.tokens_recomputed
            info["blend_s"] = time.perf_counter() - t0
            self._stats.data["blended"] += 1
            self._stats.data["rows_blended"] += end - rm.prefix
            self._stats.data["rows_reused"] += info["rows_reused"]
            self._stats.data["rows_recomputed"] += bs.tokens_recomputed
            # "kvblend.timing": the device time of each phase, summed over the layers
            phases = "; device ms: " + ", ".join(f"{k} {v:.1f}" for k, v in bs.phase_ms.items()) \
                if bs.phase_ms else ""
            logger.info("kvblend: request %s: %d/%d segments hit, %d rows blended (%d reused, %d "
                        "recomputed) after a %d-row prefix hit, %.1f ms%s%s",
                        rm.req_id, n_hit, n_seg, end - rm.prefix, info["rows_reused"],
                        bs.tokens_recomputed, rm.prefix, 1000 * info["blend_s"], phases,
                        f"; rank {self._rank} kept rows {bs.selected}" if bs.selected else "")
        self._stats.data["requests"] += 1
        self._stats.data["segments_total"] += n_seg
        self._stats.data["segments_hit"] += n_hit

    def _union_forced(self, forced: torch.Tensor) -> torch.Tensor:
        """Rows without stored KV on any rank: every rank recomputes them
        (a segment one rank evicted is recomputed by all)."""
        if self._tp_size == 1 or self._tp_group is None:
            return forced
        # float32: vLLM's all-reduce paths (custom on GPU, shared memory on
        # the CPU) take floating types only; 0/1 sums are exact in float32
        t = forced.to(device=self._adapter.device, dtype=torch.float32)
        t = self._tp_group.all_reduce(t)
        return (t > 0).to(torch.uint8).cpu()

    def _reduce_scores(self):
        """The deviation every rank ranks by: summed over the ranks' heads."""
        if self._tp_size == 1 or self._tp_group is None:
            return None
        group = self._tp_group
        return lambda score: group.all_reduce(score.float().contiguous())

    def wait_for_layer_load(self, layer_name: str):
        """The blend ran to completion in start_load_kv: nothing to wait for."""
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs):
        """Copy this layer of each request's first-seen, complete segments
        into the store."""
        self._begin_step()
        if not self._active:
            return
        layer = self._layer_of.get(layer_name)
        if layer is None:
            layer = _layer_index(layer_name)
        layout = self._layouts[layer]
        stream = torch.cuda.current_stream(kv_layer.device).cuda_stream \
            if kv_layer.device.type == "cuda" else 0
        for req_id, a in self._active.items():
            if req_id not in self._scheduled:
                continue  # its rows are not computed in this step: nothing to save
            if a.slots is None:
                a.slots = a.slot_mapping(self.block_size)
            a.req.save_layer(layer, layout, a.slots.data_ptr(), a.slots.numel(), stream)

    def wait_for_save(self):
        """Commit the segments completed in this step; end the requests
        whose prefill is done."""
        self._begin_step()
        for req_id in list(self._active):
            a = self._active[req_id]
            self._stats.data["segments_stored"] += int(a.req.commit())
            if a.computed >= a.n:
                self._end(req_id, commit=True)

    def _end(self, req_id: str, commit: bool) -> None:
        """End a request's worker state (idempotent)."""
        a = self._active.pop(req_id, None)
        if a is None:
            return
        a.req.finish(commit)
        runtime.record_request_stats(req_id, a.info)
        external = _external_id(req_id)
        if external != req_id:
            runtime.record_request_stats(external, a.info)

    def build_connector_worker_meta(self):
        """This rank's store events since the last step (None when none)."""
        if self._is_scheduler() or self._conn is None:
            return None
        events, lost = self._conn.take_store_events()
        if not events and not lost:
            return None
        return KVBlendWorkerMetadata(events={self._rank: events}, lost={self._rank: bool(lost)})

    def get_finished(self, finished_req_ids):
        return None, None

    def get_handshake_metadata(self):
        """This rank's tier key for the scheduler (None without lower tiers)."""
        if self._is_scheduler() or self._conn is None or self._conn.tier_stats() is None:
            return None
        return KVBlendHandshake(rank=self._rank, tier_key=int(self._conn.tier_key))

    def _tier_deltas(self) -> dict[str, int]:
        """Lower-tier counters since the last call, as ``disk_hits``, ..."""
        ts = self._conn.tier_stats() if self._conn is not None else None
        if not ts:
            return {}
        out = {}
        for tier in ("disk", "remote"):
            for f in _TIER_FIELDS:
                k = f"{tier}_{f}"
                v = int(ts[tier][f])
                out[k] = v - self._tier_last.get(k, 0)
                self._tier_last[k] = v
        return {k: v for k, v in out.items() if v}

    def blend_stats(self) -> dict:
        """Cumulative counters of this worker (those already handed to vLLM
        and those of the current interval) with the store's."""
        out = {k: self._cumulative.get(k, 0) + int(self._stats.data.get(k, 0)) for k in _COUNTERS}
        if not self._is_scheduler() and self._conn is not None:
            out["store"] = self._conn.store_stats()
            out["tiers"] = self._conn.tier_stats()
        return out

    def get_kv_connector_stats(self):
        """This interval's counters as vLLM connector stats (rank 0 of a
        tensor-parallel group only, so the sum over workers counts each
        request once); None when there is nothing new."""
        if self._is_scheduler() or self._rank != 0:
            return None
        for k, v in self._tier_deltas().items():
            self._stats.data[k] = self._stats.data.get(k, 0) + v
        if self._stats.is_empty():
            return None
        out, self._stats = self._stats, KVBlendStats()
        for k, v in out.data.items():
            self._cumulative[k] = self._cumulative.get(k, 0) + int(v)
        return out

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return KVBlendStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return _prom_metrics_class()(vllm_config, metric_types, labelnames,
                                     per_engine_labelvalues)

    def shutdown(self):
        if self._is_scheduler():
            return
        for req_id in list(self._active):
            self._end(req_id, commit=False)
        if self._conn is not None:
            self._conn.flush_tiers()  # chunks queued for disk/remote are written


RATIO_ARG = "kvblend_recompute_ratio"
SAVE_ARG = "kvblend_save"


def _safe_url(url: str | None) -> str | None:
    """``url`` with its password masked, for logs (the userinfo ends at the
    last '@', as the C parser reads it: a password may hold '@' or '/')."""
    if not url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    at = rest.rfind("@")
    if at < 0:
        return url
    user = rest[:at].split(":", 1)[0] if ":" in rest[:at] else rest[:at]
    masked = f"{user}:***" if ":" in rest[:at] else user
    return f"{scheme}://{masked}@{rest[at + 1:]}"


def weights_digest(model) -> bytes:
    """SHA-256 of the model's parameters' names, shapes, dtypes and up to 64
    evenly spaced values of each: two builds of one architecture (a base
    model and its fine-tune, two quantizations) differ here."""
    import hashlib

    h = hashlib.sha256()
    samples = []
    for name, p in model.named_parameters():
        t = p.detach().reshape(-1)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        if t.numel():
            k = min(64, t.numel())  # evenly spaced, in integers (exact)
            idx = torch.arange(k, device=t.device) * (t.numel() - 1) // max(k - 1, 1)
            samples.append(t[idx].float())
    if samples:
        try:
            flat = torch.cat(samples).cpu()  # one copy from the device
        except RuntimeError:  # parameters on several devices
            flat = torch.cat([s.cpu() for s in samples])
        h.update(flat.numpy().tobytes())
    return h.digest()


def _extra_args(request) -> dict:
    """The ``extra_args`` of a request's sampling params ({} when none)."""
    return getattr(getattr(request, "sampling_params", None), "extra_args", None) or {}


def _request_no_save(request) -> bool:
    """True when a request's ``extra_args`` hold ``{"kvblend_save": False}``:
    its chunks are reused but none of its own is stored (a one-off
    document, or an evaluation that must not leave its KV behind)."""
    extra = _extra_args(request)
    value = extra.get(SAVE_ARG, True)
    if not isinstance(value, bool):
        logger.error("kvblend: request %s: extra_args %s=%r is not a bool; storing its chunks",
                     request.request_id, SAVE_ARG, value)
        return False
    return not value


def _ratios_override(value, num_check_layers: int) -> list[float] | None:
    """``kvblend.recompute_ratios`` checked as LMCACHE_BLEND_RECOMPUTE_RATIOS
    is, except that 0 (reuse every stored row, recompute none) is allowed as
    for a request's own ratio: a non-empty list of numbers in [0, 1], one
    per check layer or one for all.  Raises ValueError naming the option."""
    if value is None:
        return None
    name = "kv_connector_extra_config 'kvblend.recompute_ratios'"
    out = [float(r) for r in value]  # each in [0, 1]: checked by engine_options
    if len(out) not in (1, num_check_layers):
        raise ValueError(f"{name}={value!r}: {len(out)} ratios for {num_check_layers} check "
                         "layers (LMCACHE_BLEND_CHECK_LAYERS); give one per check layer or one")
    return out


def _request_ratio(request) -> float | None:
    """The recompute ratio a request asked for in its sampling params'
    ``extra_args`` (``{"kvblend_recompute_ratio": r}``, r in [0, 1]; it
    applies at every check layer), else None.  A bad value is logged with
    the request id and ignored: one request must not stop the engine."""
    extra = _extra_args(request)
    if RATIO_ARG not in extra:
        return None
    value = extra[RATIO_ARG]
    try:
        r = float(value)
    except (TypeError, ValueError):
        r = float("nan")
    if isinstance(value, bool) or not 0.0 <= r <= 1.0:
        logger.error("kvblend: request %s: extra_args %s=%r is not a number in [0, 1]; "
                     "using the configured ratios", request.request_id, RATIO_ARG, value)
        return None
    return r


def _model_name(vllm_config, model) -> str:
    """The served model's name and class, for messages."""
    path = getattr(getattr(vllm_config, "model_config", None), "model", None)
    cls = type(model).__name__
    return f"{path} ({cls})" if path and str(path) != cls else cls


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
