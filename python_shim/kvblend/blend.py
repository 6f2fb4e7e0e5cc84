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
deviation, selection, subset attention, scatter) is a kvblend op; the model
math is the model's own.

On CUDA the loop never waits for the device: every count it needs (rows,
forced rows, rows kept at a check layer) is known on the host, all work is
queued on the current stream, and layers where every row is still active
take SDPA's fused causal kernel.  With ``timing=True`` CUDA events around
each phase (load, qkv, select, attention, out, scatter) give a per-phase
breakdown in ``BlendStats.phase_ms`` (one synchronize at the end).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import ops


# Subset attention on CUDA: "sdpa" (torch SDPA with an explicit mask by
# position) or "kvblend" (kvb_cuda_attention).  The CPU always uses kvblend's.
SUBSET_ATTENTION = "sdpa"


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
        }


def num_selected(ratio: float, reusable: int) -> int:
    """Rows chosen by deviation at a check layer: round(ratio * reusable),
    clamped to [0, reusable]."""
    k = int(round(ratio * reusable))
    return max(0, min(k, reusable))


@torch.inference_mode()
def blend_prefill(adapter, request, token_ids: torch.Tensor, layouts: list,
                  slots: torch.Tensor, check_layers: list[int],
                  ratios: list[float], deviation: str = "k",
                  kv_dtype: torch.dtype | None = None, timing: bool = False) -> BlendStats:
    """Blend rows [0, request.blend_end) of one prompt into the paged cache.

    ``request`` is a ``kvblend._kvblend.Request`` (reused segments pinned);
    ``token_ids`` the prompt [n] (int64); ``layouts[l]`` the paged layout of
    layer l (``ops.paged_layout``); ``slots`` the prompt's slot mapping [n].
    ``ratios[i]`` applies at ``check_layers[i]`` (0 is allowed: pure reuse).
    With ``timing`` (CUDA only) the statistics carry per-phase device times.
    Returns the statistics; raises ValueError on inconsistent arguments.
    """
    t0 = time.perf_counter()
    n_rows = int(request.blend_end)
    n_seg, n_hit, n_forced = request.counts()
    stats = BlendStats(blend_rows=n_rows, segments_total=n_seg,
                       segments_hit=n_hit, forced_rows=n_forced)
    if n_rows == 0:
        return stats
    if len(check_layers) != len(ratios):
        raise ValueError(f"{len(check_layers)} check layers but {len(ratios)} recompute ratios")
    if len(layouts) != adapter.num_layers:
        raise ValueError(f"{len(layouts)} cache layouts for a model of {adapter.num_layers} layers")
    if deviation not in ("k", "v", "kv"):
        raise ValueError(f"deviation={deviation!r}: expected 'k', 'v' or 'kv'")
    device = adapter.device
    cuda = device.type == "cuda"
    stream = torch.cuda.current_stream(device).cuda_stream if cuda else 0
    kv_dtype = kv_dtype or adapter.dtype
    forced = torch.frombuffer(bytearray(request.forced()), dtype=torch.uint8)[:n_rows]
    forced = forced.to(device, non_blocking=True)
    # Every forced row stays active at every layer (selection keeps them
    # all), so the forced count among the active rows is always n_forced.
    reusable = n_rows - n_forced
    rows = torch.arange(n_rows, device=device)
    ids = token_ids[:n_rows].to(device)
    row_slots = slots[:n_rows].to(device)
    shape = (n_rows, adapter.num_kv_heads, adapter.head_size)
    stage_k = torch.empty(shape, dtype=kv_dtype, device=device)
    stage_v = torch.empty(shape, dtype=kv_dtype, device=device)
    check = dict(zip(check_layers, ratios))
    marks = _Marks(timing and cuda)

    h = adapter.embed(ids)
    active = rows  # rows whose hidden state h holds, ascending
    for layer in range(adapter.num_layers):
        marks.mark("load")
        request.load_layer(layer, stage_k.data_ptr(), stage_v.data_ptr(), stream)
        if active.numel() == 0:  # nothing left to recompute: pure reuse
            stats.active_per_layer.append(0)
            marks.mark("scatter")
            ops.scatter(layouts[layer], row_slots, stage_k, stage_v)
            continue
        marks.mark("qkv")
        q, k, v = adapter.qkv(layer, h, active)
        k = k.to(kv_dtype)
        v = v.to(kv_dtype)
        if layer in check:
            marks.mark("select")
            score = _deviation(k, v, stage_k, stage_v, active, deviation)
            keep = ops.select(score, forced[active], num_selected(check[layer], reusable),
                              n_forced=n_forced)
            # every active row was computed fresh at this layer: keep it all
            stage_k[active] = k
            stage_v[active] = v
            active = active[keep]
            q = q[keep]
            h = h[keep]
        elif active.numel() == n_rows:
            stage_k.copy_(k)
            stage_v.copy_(v)
        else:
            stage_k[active] = k
            stage_v[active] = v
        stats.active_per_layer.append(int(active.numel()))
        if active.numel() > 0:
            marks.mark("attention")
            if cuda and active.numel() == n_rows:
                # every row active (layers before the first check): plain
                # causal attention, SDPA's fused kernel
                attn = adapter.attend(layer, q, stage_k.to(q.dtype), stage_v.to(q.dtype))
            elif cuda and SUBSET_ATTENTION == "sdpa":
                # SDPA with the causal-by-position mask of the active rows
                # (measured faster than kvblend's kernel on H200, see
                # benchmarks/RESULTS.md)
                attn = adapter.attend(layer, q, stage_k.to(q.dtype), stage_v.to(q.dtype),
                                      q_positions=active, k_positions=rows)
            else:
                attn = ops.attention(q, active, stage_k, stage_v, rows, adapter.scale)
            marks.mark("out")
            h = adapter.out(layer, attn.to(h.dtype), h)
        marks.mark("scatter")
        ops.scatter(layouts[layer], row_slots, stage_k, stage_v)
    marks.mark(None)
    stats.phase_ms = marks.totals()
    stats.tokens_recomputed = int(active.numel())
    stats.seconds = time.perf_counter() - t0
    return stats


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


def _deviation(k, v, stage_k, stage_v, active, kind: str) -> torch.Tensor:
    """Per active row, the squared L2 distance between fresh and stored K
    (or V, or both) over heads and dims."""
    if kind == "v":
        return ops.deviation(v, stage_v[active])
    score = ops.deviation(k, stage_k[active])
    if kind == "kv":
        score = score + ops.deviation(v, stage_v[active])
    return score
