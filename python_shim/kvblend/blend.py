"""The blend: CacheBlend's selective recompute over one prefill.

For the rows [0, blend_end) of a prompt whose stored segments are reused,
``blend_prefill`` runs the model layer by layer:

* layer l starts with the stored K/V of every reused segment, keys re-rotated
  to their new positions (one fused C/CUDA op, ``Request.load_layer``);
* the *active* rows go through the model's own modules (norms, projections,
  RoPE, o_proj, MLP); before the first check layer every row is active;
* at each check layer the active set shrinks to the rows whose fresh K (or V)
  deviates most from the stored one (top ``ratio * reusable rows``), united
  with the rows that have no stored KV (separators, new segments);
* fresh K/V of active rows replace the stored rows, the active queries attend
  over all rows with the exact causal mask by position, and the layer is
  written into the engine's paged cache through the slot mapping.

Every tensor operation that is specific to blending (load + re-rotation,
deviation, selection, scatter) is a kvblend op, the subset attention a
strategy chosen once per engine (``kvblend.model.attention``); the model
math is the model's own.

On CUDA the loop never waits for the device: every count it needs (rows,
forced rows, rows kept at a check layer) is known on the host, all work is
queued on the current stream, and layers where every row is still active
take SDPA's fused causal kernel.  With ``timing=True`` CUDA events around
each phase (load, qkv, select, attention, out, scatter) give a per-phase
breakdown in ``BlendStats.phase_ms`` (one synchronize at the end).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from . import ops
from .model import LayerModel
from .model.attention import KernelAttention, attend_by_position, hidden, subset_attention

logger = logging.getLogger("kvblend")
# side streams of pipelined loads, one per (device, compute stream)
_LOAD_STREAMS: dict = {}


@dataclass
class BlendStats:
    """What one blend did."""

    blend_rows: int = 0
    segments_total: int = 0
    segments_hit: int = 0
    forced_rows: int = 0
    tokens_recomputed: int = 0
    active_per_layer: list[int] = field(default_factory=list)
    seconds: float = 0.0
    phase_ms: dict[str, float] = field(default_factory=dict)
    # per check layer (with ``digest``): (rows kept, sum of their positions)
    selected: list[tuple[int, int]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "blend_rows": self.blend_rows,
            "segments_total": self.segments_total,
            "segments_hit": self.segments_hit,
            "forced_rows": self.forced_rows,
            "tokens_recomputed": self.tokens_recomputed,
            "active_per_layer": list(self.active_per_layer),
            "seconds": self.seconds,
            "phase_ms": dict(self.phase_ms),
            "selected": list(self.selected),
        }


def num_selected(ratio: float, reusable: int) -> int:
    """Rows chosen by deviation at a check layer: round(ratio * reusable),
    clamped to [0, reusable]."""
    k = int(round(ratio * reusable))
    return max(0, min(k, reusable))


@torch.inference_mode()
def blend_prefill(adapter: LayerModel, request, token_ids: torch.Tensor, layouts: list,
                  slots: torch.Tensor, check_layers: list[int],
                  ratios: list[float], deviation: str = "kv",
                  kv_dtype: torch.dtype | None = None, timing: bool = False,
                  prefix: int = 0, forced: torch.Tensor | None = None,
                  reduce_scores=None, digest: bool = False,
                  selection: str = "query_deviation", boundary_tokens: int = 4,
                  attention: KernelAttention | None = None, pipeline: bool = True) -> BlendStats:
    """Blend rows [prefix, request.blend_end) of one prompt into the paged cache.

    ``request`` is a ``kvblend._kvblend.Request`` (reused segments pinned);
    ``token_ids`` the prompt [n] (int64); ``layouts[l]`` the paged layout of
    layer l (``ops.paged_layout``); ``slots`` the prompt's slot mapping [n].
    ``ratios[i]`` applies at ``check_layers[i]`` (0 is allowed: pure reuse).
    With ``timing`` (CUDA only) the statistics carry per-phase device times.

    ``prefix``: rows [0, prefix) are already in the paged cache, exact (the
    engine's own prefix cache): each layer reads them from there, they are
    never recomputed nor written.  ``forced`` (uint8 [blend_end], host)
    replaces the request's mask of rows without stored KV (tensor-parallel
    ranks pass the union of every rank's mask, so all recompute the same
    rows).  ``reduce_scores(score)`` returns the deviation scores every rank
    agrees on (the sum over ranks) before the top-k; None: local scores.
    ``digest``: record which rows each check layer kept (``stats.selected``,
    one host sync per check layer), so ranks can be compared.

    How a check layer ranks the reusable rows (``ratio * reusable`` of them
    are recomputed from there on; forced rows always are):
      * ``selection="deviation"``: by the fresh-vs-stored distance of K, V or
        both (``deviation`` "k", "v", "kv"), CacheBlend's rule;
      * ``"query"``: by the attention the rows after the blend (the question,
        up to ``QUERY_ROWS`` of them) pay each row at that layer.  Those rows
        run through the layers up to the last check layer alongside the blend
        (their queries see every blended row, exact causal by position) and
        are then dropped: the engine computes them itself afterwards;
      * ``"query_deviation"``: the product of the two (how much a row moved
        times how much the question looks at it).
    ``boundary_tokens``: the first rows of each reused segment rank above
    every other row (inside the same budget, in score order among
    themselves).  Under tensor parallelism ``reduce_scores`` sums every part
    of the score over the ranks before the rows are ranked.

    ``attention``: the subset-attention strategy (``kvblend.model.attention``;
    None: the default for the adapter's device).  ``pipeline`` (CUDA): load
    layer l+1 on a second stream into a second staging buffer while layer l
    computes (events order the two streams; no host waits).
    Returns the statistics; raises ValueError on inconsistent arguments.
    """
    t0 = time.perf_counter()
    n_rows = int(request.blend_end)
    n_seg, n_hit, _ = request.counts()
    if not 0 <= prefix <= n_rows:
        raise ValueError(f"prefix={prefix}: expected 0 <= prefix <= blend_end={n_rows}")
    if forced is None:
        forced = torch.frombuffer(bytearray(request.forced()), dtype=torch.uint8)[:n_rows]
    elif tuple(forced.shape) != (n_rows,) or forced.dtype != torch.uint8:
        raise ValueError(f"forced: expected uint8 [{n_rows}], got {forced.dtype} "
                         f"{list(forced.shape)}")
    forced = forced.clone()
    forced[:prefix] = 0  # the engine's own rows: exact, never recomputed
    n_forced = int(forced.sum())
    stats = BlendStats(blend_rows=n_rows, segments_total=n_seg,
                       segments_hit=n_hit, forced_rows=n_forced)
    if n_rows - prefix <= 0:
        return stats
    if len(check_layers) != len(ratios):
        raise ValueError(f"{len(check_layers)} check layers but {len(ratios)} recompute ratios")
    if len(layouts) != adapter.num_layers:
        raise ValueError(f"{len(layouts)} cache layouts for a model of {adapter.num_layers} layers")
    if deviation not in ("k", "v", "kv"):
        raise ValueError(f"deviation={deviation!r}: expected 'k', 'v' or 'kv'")
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}: expected one of {', '.join(SELECTIONS)}")
    if boundary_tokens < 0:
        raise ValueError(f"boundary_tokens={boundary_tokens}: expected >= 0")
    device = adapter.device
    cuda = device.type == "cuda"
    cur = torch.cuda.current_stream(device) if cuda else None
    kv_dtype = kv_dtype or adapter.dtype
    forced = forced.to(device, non_blocking=True)
    # Every forced row stays active at every layer (selection keeps them
    # all), so the forced count among the active rows is always n_forced.
    reusable = n_rows - prefix - n_forced
    rows = torch.arange(n_rows, device=device)
    ids = token_ids[prefix:n_rows].to(device)
    # written back: the blended rows only (the prefix rows' slots are -1)
    row_slots = slots[:n_rows].clone()
    prefix_slots = row_slots[:prefix].clone().to(device)  # a copy: the next line masks
    row_slots[:prefix] = -1
    row_slots = row_slots.to(device)
    shape = (n_rows, adapter.num_kv_heads, adapter.head_size)
    check = dict(zip(check_layers, ratios))
    marks = _Marks(timing and cuda)
    if attention is None:
        attention = subset_attention(device=device)
    attend = attention.begin(adapter.scale, adapter.num_q_heads // adapter.num_kv_heads)
    loader = _Loader(request, adapter.num_layers, shape, kv_dtype, device, cur,
                     pipeline and cuda, attention.tile)
    windows = adapter.sliding_windows

    boundary = None  # rows that rank first at a check layer
    if boundary_tokens > 0 and check:
        boundary = torch.zeros(n_rows, dtype=torch.bool)
        for start, length in request.reused():
            boundary[max(start, prefix):start + min(length, boundary_tokens)] = True
        boundary = boundary.to(device, non_blocking=True)
    tail = None  # the rows after the blend, for query-aware selection
    if selection != "deviation" and check:
        tail = _Tail.of(adapter, token_ids, n_rows, device)
        if tail is None:
            _warn_once("kvblend: %s selection needs the prompt's rows after the blend and this "
                       "call has none: ranking by deviation alone" % selection)
    last_check = max(check) if check else -1

    h = adapter.embed(ids)
    active = rows[prefix:]  # rows whose hidden state h holds, ascending
    for layer in range(adapter.num_layers):
        marks.mark("load")
        stage_k, stage_v = loader.take(layer)
        if prefix > 0:
            ops.gather(layouts[layer], prefix_slots, stage_k[:prefix], stage_v[:prefix])
        if active.numel() == 0:  # nothing left to recompute: pure reuse
            stats.active_per_layer.append(0)
            marks.mark("scatter")
            ops.scatter(layouts[layer], row_slots, stage_k, stage_v)
            loader.done(layer)
            continue
        marks.mark("qkv")
        if tail is not None and layer <= last_check:
            # first, and copied: under CUDA graphs a piece's output is the
            # graph's static buffer, which the active rows' call of the same
            # layer and size bucket would overwrite
            tail.qkv(layer, kv_dtype)
        q, k, v = adapter.qkv(layer, h, active)
        k = k.to(kv_dtype)
        v = v.to(kv_dtype)
        if layer in check:
            marks.mark("select")
            dev = None
            if tail is None or selection == "query_deviation":
                dev = _deviation(k, v, stage_k, stage_v, active, deviation)
            # every active row was computed fresh at this layer: keep it all
            stage_k[active] = k
            stage_v[active] = v
            mass = None
            if tail is not None:
                mass = tail.step(layer, stage_k, stage_v, kv_dtype, windows[layer], active,
                                 advance=layer < last_check)
            score = _score(dev, mass, reduce_scores)
            if boundary is not None:
                score = _boundary_first(score, boundary[active])
            keep = ops.select(score, forced[active], num_selected(check[layer], reusable),
                              n_forced=n_forced)
            active = active[keep]
            if digest:
                stats.selected.append((int(active.numel()), int(active.sum())))
            q = q[keep]
            h = h[keep]
            attend.new_active()
        elif active.numel() == n_rows:
            stage_k.copy_(k)
            stage_v.copy_(v)
        else:
            stage_k[active] = k
            stage_v[active] = v
        if tail is not None and layer < last_check and layer not in check:
            tail.step(layer, stage_k, stage_v, kv_dtype, windows[layer])
        stats.active_per_layer.append(int(active.numel()))
        if active.numel() > 0:
            marks.mark("attention")
            attn = attend(q, active, stage_k, stage_v, windows[layer], loader.padded(layer))
            marks.mark("out")
            h = adapter.out(layer, attn.to(h.dtype), h)
        marks.mark("scatter")
        ops.scatter(layouts[layer], row_slots, stage_k, stage_v)
        loader.done(layer)
    marks.mark(None)
    stats.phase_ms = marks.totals()
    stats.tokens_recomputed = int(active.numel())
    stats.seconds = time.perf_counter() - t0
    return stats


class _Loader:
    """Staging buffers of the blend, filled by ``Request.load_layer``.

    Serial (CPU, or ``pipelined`` off): one buffer pair, each layer loaded on
    the compute stream when taken.  Pipelined (CUDA): two buffer pairs; taking
    layer l makes the compute stream wait for l's load (an event) and queues
    the load of l+1 into the other pair on a side stream, after the compute
    stream's event marking that pair free (``done(l-1)``).  Nothing waits on
    the host.
    """

    def __init__(self, request, num_layers: int, shape, dtype, device, compute, pipelined: bool,
                 tile: int = 1):
        self.request, self.compute, self.pipelined = request, compute, pipelined
        self.num_layers = num_layers
        n = 2 if pipelined else 1
        # The rows are padded to whole tiles of the subset attention, zeros
        # (finite: masked keys must not turn the softmax into NaN); ``take``
        # returns the first shape[0] rows, ``padded`` the whole buffers.
        rows = -(-shape[0] // tile) * tile
        self.full = []
        for _ in range(n):
            pair = tuple(torch.empty((rows,) + tuple(shape[1:]), dtype=dtype, device=device)
                         for _ in range(2))
            for x in pair:
                x[shape[0]:].zero_()
            self.full.append(pair)
        self.bufs = [(k[:shape[0]], v[:shape[0]]) for k, v in self.full]
        if pipelined:
            key = (device.index, compute.cuda_stream)
            side = _LOAD_STREAMS.get(key)
            if side is None:
                side = _LOAD_STREAMS[key] = torch.cuda.Stream(device)
            self.side = side
            self.loaded = [torch.cuda.Event(), torch.cuda.Event()]
            self.free = [torch.cuda.Event(), torch.cuda.Event()]
            self.free_recorded = [False, False]
            self.issued = -1

    def _issue(self, layer: int) -> None:
        """Queue the load of ``layer`` on the side stream."""
        b = layer % 2
        if self.free_recorded[b]:
            self.side.wait_event(self.free[b])
        k, v = self.bufs[b]
        self.request.load_layer(layer, k.data_ptr(), v.data_ptr(), self.side.cuda_stream)
        self.loaded[b].record(self.side)
        self.issued = layer

    def take(self, layer: int):
        """The staging pair holding ``layer``, ready on the compute stream."""
        if not self.pipelined:
            k, v = self.bufs[0]
            stream = self.compute.cuda_stream if self.compute is not None else 0
            self.request.load_layer(layer, k.data_ptr(), v.data_ptr(), stream)
            return k, v
        if self.issued < layer:
            self.side.wait_stream(self.compute)  # inputs queued before the blend
            self._issue(layer)
        self.compute.wait_event(self.loaded[layer % 2])
        if layer + 1 < self.num_layers:
            self._issue(layer + 1)
        return self.bufs[layer % 2]

    def padded(self, layer: int):
        """The staging pair of ``layer`` with its zero padding rows."""
        return self.full[layer % 2 if self.pipelined else 0]

    def done(self, layer: int) -> None:
        """The compute stream has queued its last use of ``layer``'s pair."""
        if self.pipelined:
            self.free[layer % 2].record(self.compute)
            self.free_recorded[layer % 2] = True


class _Marks:
    """Per-phase CUDA event timing: ``mark(name)`` ends the running phase
    and starts ``name`` (None ends the last).  Inactive: every call is a
    no-op.  ``totals`` synchronizes once and sums milliseconds per phase."""

    def __init__(self, active: bool):
        self.active = active
        self.events: list[tuple[str | None, torch.cuda.Event]] = []

    def mark(self, name: str | None) -> None:
        if self.active:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append((name, ev))

    def totals(self) -> dict[str, float]:
        if not self.events:
            return {}
        self.events[-1][1].synchronize()
        out: dict[str, float] = {}
        for (name, a), (_, b) in zip(self.events, self.events[1:]):
            if name is not None:
                out[name] = out.get(name, 0.0) + a.elapsed_time(b)
        return out


SELECTIONS = ("deviation", "query", "query_deviation")
# Query-aware selection scores with at most this many rows after the blend
# (the first ones: they need no row the blend does not compute).
QUERY_ROWS = 256
_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        logger.warning(msg)


class _Tail:
    """The prompt rows right after the blend ([blend_end, blend_end + T)),
    run through the layers up to the last check layer so their attention
    to the blended rows can rank those rows."""

    def __init__(self, adapter, ids: torch.Tensor, start: int, device):
        self.adapter = adapter
        self.pos = torch.arange(start, start + ids.numel(), device=device)
        self.h = adapter.embed(ids.to(device))
        self._qkv: tuple[int, tuple] | None = None

    @classmethod
    def of(cls, adapter, token_ids: torch.Tensor, n_rows: int, device) -> "_Tail | None":
        end = min(int(token_ids.numel()), n_rows + QUERY_ROWS)
        return cls(adapter, token_ids[n_rows:end], n_rows, device) if end > n_rows else None

    def qkv(self, layer: int, kv_dtype):
        if self._qkv is None or self._qkv[0] != layer:
            q, k, v = self.adapter.qkv(layer, self.h, self.pos)
            self._qkv = (layer, (q.clone(), k.to(kv_dtype, copy=True), v.to(kv_dtype, copy=True)))
        return self._qkv[1]

    def step(self, layer: int, stage_k, stage_v, kv_dtype, window, active=None,
             advance: bool = True) -> torch.Tensor | None:
        """At ``layer`` (the blended rows' K/V in ``stage_k``/``stage_v``):
        with ``active``, the attention mass (summed over these rows and every
        query head) on each active row, float32 [active.numel()]; with
        ``advance``, runs the layer's attention and MLP for these rows."""
        q, k, v = self.qkv(layer, kv_dtype)
        keys = torch.cat([stage_k, k])
        mass = None
        if active is not None:
            key_pos = torch.arange(keys.shape[0], device=keys.device)
            mass = query_mass(q, self.pos, keys, key_pos, self.adapter.scale, window)[active]
        if advance:
            attn = attend_by_position(q, self.pos, keys, torch.cat([stage_v, v]),
                                      self.adapter.scale, window)
            # a copy: a CUDA graph's static output (see the blend loop)
            self.h = self.adapter.out(layer, attn.to(self.h.dtype), self.h).clone()
            self._qkv = None
        return mass


def query_mass(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, k_pos: torch.Tensor,
               scale: float, window: int | None = None, block: int = 64) -> torch.Tensor:
    """For each key row j, the attention probability all queries give it,
    summed over queries and query heads: q [T, Hq, D] at positions q_pos,
    k [N, Hkv, D] at k_pos (GQA: Hq a multiple of Hkv), exact causal mask by
    position (and a sliding window).  float32 [N]; fp32 softmax."""
    T, hq, d = q.shape
    n, hkv, _ = k.shape
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query_mass: {hkv} KV heads do not divide {hq} query heads")
    kf = k.float()
    out = torch.zeros(n, dtype=torch.float32, device=k.device)
    for s in range(0, T, block):
        qs = q[s:s + block].float()
        t = qs.shape[0]
        logits = torch.einsum("tkgd,nkd->kgtn", qs.view(t, hkv, hq // hkv, d), kf) * scale
        logits.masked_fill_(hidden(q_pos[s:s + t], k_pos, window), float("-inf"))
        out += torch.softmax(logits, -1).sum((0, 1, 2))
    return out


def _score(dev, mass, reduce_scores):
    """The score a check layer ranks by: deviation, query mass, or their
    product, each summed over tensor-parallel ranks first."""
    parts = [x.float() for x in (dev, mass) if x is not None]
    both = torch.stack(parts) if len(parts) > 1 else parts[0]
    if reduce_scores is not None:
        both = reduce_scores(both.contiguous())
    return both[0] * both[1] if len(parts) > 1 else both


def _boundary_first(score: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Raises the rows marked in ``first`` above every other row, keeping
    their order among themselves (scores are >= 0)."""
    if score.numel() == 0:
        return score
    return torch.where(first, score + (score.max().abs() + 1.0), score)


def _deviation(k, v, stage_k, stage_v, active, kind: str) -> torch.Tensor:
    """Per active row, the squared L2 distance between fresh and stored K
    (or V, or both) over heads and dims."""
    if kind == "v":
        return ops.deviation(v, stage_v[active])
    score = ops.deviation(k, stage_k[active])
    if kind == "kv":
        score = score + ops.deviation(v, stage_v[active])
    return score
