"""Attention by position, and the blend's subset-attention strategies.

Every attention kvblend computes is causal *by position*: query i sees key j
iff k_pos[j] <= q_pos[i], and a sliding window also hides keys at or before
q_pos[i] - window (``hidden``, the one mask; ``sdpa`` runs it through torch
SDPA).  A blend attends from its *active* rows (ascending positions) over
every row of a layer (positions 0..N-1), through a strategy chosen once per
engine (``subset_attention``) and handed to ``kvblend.blend.blend_prefill``:

* ``KernelAttention``: kvblend's C attention op, what the CPU always uses
  (and the reference the GPU strategies are tested against);
* ``SdpaAttention`` ("sdpa"): SDPA with an explicit mask by position;
* ``FlexAttention`` ("flex", the CUDA default): torch FlexAttention,
  compiled once, with a block mask built once per active set from the rows'
  positions (key tiles past a query tile's last position are skipped), its
  calls replayed from CUDA graphs; SDPA (logged once) where it cannot run.

On CUDA a layer where every row is active takes SDPA's fused causal kernel,
whatever the strategy; sliding-window layers take SDPA on CUDA and plain
torch on the CPU (kvblend's op has no window).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .. import ops
from .graphs import capture_cuda_graph

logger = logging.getLogger("kvblend")


def hidden(q_pos: torch.Tensor, k_pos: torch.Tensor, window) -> torch.Tensor:
    """[len(q_pos), len(k_pos)]: True where a key is not visible to a query
    (after it, or ``window`` or more positions before it)."""
    hide = k_pos[None, :] > q_pos[:, None]
    if window is not None:
        hide |= k_pos[None, :] <= q_pos[:, None] - window
    return hide


def sdpa(q, k, v, scale: float, *, window=None, q_pos=None, k_pos=None,
         q_start: int | None = None) -> torch.Tensor:
    """SDPA of q [Tq,Hq,D] over k/v [Tk,Hkv,D] (GQA), causal by position.

    No positions: q and k are the same rows in order.  ``q_start``: queries
    at [q_start, Tk), keys at [0, Tk) (a prefill after a cached prefix, or a
    decode step).  Otherwise key j is seen by query i iff k_pos[j] <= q_pos[i]
    (keys default to 0..Tk-1).  A sliding ``window`` applies in every case.
    The causal cases take the fused kernels without a materialized mask (on
    the CPU a short-prefix prefill pads the queries to get there); on CUDA
    the KV heads stay unexpanded (enable_gqa is the slow kernel on the CPU).
    """
    rep = q.shape[1] // k.shape[1]
    cuda = q.device.type == "cuda"
    if rep > 1 and not cuda:  # expand KV heads as transformers' repeat_kv does
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    gqa = {"enable_gqa": True} if cuda and rep > 1 else {}
    qh, kh, vh = (x[None].transpose(1, 2) for x in (q, k, v))
    Tq, Tk = q.shape[0], k.shape[0]
    if q_start is not None and q_start + Tq != Tk:
        raise ValueError(f"q_start={q_start}: {Tq} queries end at {q_start + Tq}, "
                         f"but there are {Tk} keys")
    if q_start == 0:
        q_start = None
    if q_pos is None and q_start is None and window is None and Tq == Tk:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, **gqa)
    elif q_start is not None and window is None and cuda:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(Tq, Tk),
                                           scale=scale, **gqa)
    elif q_start is not None and window is None and Tq >= q_start:
        pad = qh.new_zeros(qh.shape[:2] + (q_start, qh.shape[3]))
        o = F.scaled_dot_product_attention(torch.cat((pad, qh), dim=2), kh, vh,
                                           is_causal=True, scale=scale)[:, :, q_start:]
    else:
        if q_pos is None:
            q_pos = torch.arange(Tk - Tq, Tk, device=q.device)
        if k_pos is None:
            k_pos = torch.arange(Tk, device=q.device)
        mask = ~hidden(q_pos.to(q.device), k_pos.to(q.device), window)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, **gqa)
    return o[0].transpose(0, 1)


def windowed_attention(q, q_pos, k, v, k_pos, scale: float, window: int) -> torch.Tensor:
    """Causal attention by position with a sliding window in plain torch,
    fp32: the CPU path of sliding-window layers (kvblend's C attention has
    no window).  q [T, Hq, D], k/v [N, Hkv, D]; returns q's dtype."""
    return _dense(q, k, v, scale, ~hidden(q_pos, k_pos, window))[0].to(q.dtype)


def _dense(q, k, v, scale, seen):
    """Attention of q [T,Hq,D] over k/v [N,Hkv,D] (GQA) where ``seen``
    [T, N], in plain torch, fp32: (out [T,Hq,D], log-sum-exp [Hq,T]); rows
    that see nothing: out 0, lse -inf."""
    group = q.shape[1] // k.shape[1]
    ke = k.float().repeat_interleave(group, dim=1)
    ve = v.float().repeat_interleave(group, dim=1)
    logits = torch.einsum("thd,nhd->htn", q.float(), ke) * scale
    logits = logits.masked_fill(~seen[None], float("-inf"))
    lse = torch.logsumexp(logits, -1)
    p = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("htn,nhd->thd", p, ve), lse


class KernelAttention:
    """The CPU strategy: kvblend's C attention op, and the base of the
    others.  ``begin(scale, group)`` gives one blend its ``BlendAttention``;
    ``tile``: the blend pads its staging rows to a multiple of it (zeros)."""

    name = "kvblend"
    tile = 1

    def begin(self, scale: float, group: int) -> "BlendAttention":
        """This strategy for one blend of a model with ``group`` query heads
        per KV head."""
        return BlendAttention(self, scale)

    def subset(self, q, q_pos, k, v, scale: float, window) -> torch.Tensor:
        """Attention of q [A,Hq,D] at positions ``q_pos`` over k/v [N,Hkv,D]
        at positions 0..N-1, exact causal by position; q's dtype."""
        if window is not None and q.is_cuda:
            return sdpa(q, k.to(q.dtype), v.to(q.dtype), scale, window=window, q_pos=q_pos)
        rows = torch.arange(k.shape[0], device=k.device)
        if window is not None:
            return windowed_attention(q, q_pos, k, v, rows, scale, window)
        return ops.attention(q, q_pos, k.to(q.dtype), v.to(q.dtype), rows, scale)


class SdpaAttention(KernelAttention):
    """The "sdpa" strategy: SDPA with the mask by position."""

    name = "sdpa"

    def subset(self, q, q_pos, k, v, scale: float, window) -> torch.Tensor:
        return sdpa(q, k.to(q.dtype), v.to(q.dtype), scale, window=window, q_pos=q_pos)


_KERNEL, _SDPA = KernelAttention(), SdpaAttention()


def attend_by_position(q, q_pos, k, v, scale: float, window=None) -> torch.Tensor:
    """Attention of q [T, Hq, D] at positions q_pos over k/v [N, Hkv, D] at
    positions 0..N-1, exact causal by position (and a sliding window): SDPA
    on CUDA, kvblend's C attention (or plain torch for a window) on the
    CPU.  Returns q's dtype."""
    return (_SDPA if q.is_cuda else _KERNEL).subset(q, q_pos, k, v, scale, window)


class BlendAttention:
    """A strategy's state for one blend: called per layer with the active
    rows' queries q [A,Hq,D] at positions ``active`` over the layer's staged
    k/v [N,Hkv,D] (``padded``: the same buffers with their padding rows);
    ``new_active()`` when a check layer changed the active set."""

    def __init__(self, strategy: KernelAttention, scale: float):
        self.strategy, self.scale = strategy, scale

    def new_active(self) -> None:
        """The active rows changed (nothing kept for them here)."""

    def _kernel_runs(self, q, active, k, window, dtypes) -> bool:
        """Whether a GPU kernel strategy (not yet ``broken``) takes this call:
        CUDA, a subset of the rows, no window, one of its ``dtypes``."""
        return (q.is_cuda and active.numel() != k.shape[0] and window is None
                and q.dtype in dtypes and not self.strategy.broken)

    def __call__(self, q, active, k, v, window, padded=None) -> torch.Tensor:
        if q.is_cuda and active.numel() == k.shape[0]:
            # every row active (layers before the first check): plain causal
            return sdpa(q, k.to(q.dtype), v.to(q.dtype), self.scale, window=window)
        return self.strategy.subset(q, active, k, v, self.scale, window)


# Inductor found no FlexAttention kernel for float32 nor float16 on H200
# (NoValidChoicesError; torch 2.11): those take SDPA.
_FLEX_DTYPES = (torch.bfloat16,)
_FLEX_BLOCK = 128


class FlexAttention(SdpaAttention):
    """The "flex" strategy (see the module doc).

    ``pack_gqa``: the query heads of each GQA group become rows of one KV
    head (a tile of 128 rows then holds 128/G positions and reads each key
    tile once for the whole group).  ``heavy_first``: rows in descending
    position order (the programs with the most key tiles first; measured the
    same on an H200 and costs two copies per layer, so off).
    ``kernel_options``: handed to FlexAttention (tile sizes, warps, stages;
    must divide the 128-row/128-key tiles of the block mask); None: its
    defaults.  ``cuda_graphs``: replay a blend's later calls from CUDA graphs
    (an eager call costs ~0.3 ms of host time, as long as its kernel at 8K).

    Float32 and float16 queries and sliding-window layers take SDPA.  Where
    FlexAttention fails (``broken``, logged once) this strategy is SDPA's
    from then on."""

    name = "flex"
    tile = _FLEX_BLOCK

    def __init__(self, pack_gqa: bool = True, heavy_first: bool = False,
                 kernel_options: dict | None = None, cuda_graphs: bool = True):
        self.pack_gqa, self.heavy_first = pack_gqa, heavy_first
        self.kernel_options, self.cuda_graphs = kernel_options, cuda_graphs
        self.broken = False
        self._fn = None  # flex_attention, compiled on first use
        self._graph_warned = False

    def begin(self, scale: float, group: int) -> BlendAttention:
        return _FlexBlend(self, scale, group if self.pack_gqa else 1)

    def block_mask(self, q_pos: torch.Tensor, n_keys: int, group: int = 1):
        """FlexAttention block mask for queries at positions ``q_pos`` (int64,
        ascending) over keys 0..n_keys-1: key j is seen by query i iff
        j <= q_pos[i].  Built directly from the positions on the device (no
        dense mask, no host wait): for a tile of 128 query rows whose positions
        span [p_min, p_max], key tiles wholly <= p_min are full (no mask_mod),
        tiles up to p_max's are partial, later ones skipped.

        ``group`` > 1: the rows are the queries' ``group`` heads of one KV head,
        row r = i * group + g at position q_pos[i] (see ``attend``).

        Rows and keys are padded to whole tiles (at least one): padded rows
        repeat the last row's position and are dropped afterwards, padded keys
        lie past every query and are masked out.  Inductor finds no kernel for
        some partial-tile shapes, whole tiles always compile.  Returns
        (mask, rows, padded rows, padded keys, group, heavy_first), or None where
        FlexAttention is unavailable."""
        if self.broken:
            return None
        try:
            from torch.nn.attention.flex_attention import BlockMask

            B = _FLEX_BLOCK
            pos = q_pos.flip(0) if self.heavy_first else q_pos
            if group > 1:
                pos = pos.repeat_interleave(group)
            nq = pos.numel()
            nqb, nkb = max(1, -(-nq // B)), max(1, -(-n_keys // B))
            q_pad = torch.cat((pos, pos[-1:].expand(nqb * B - nq)))
            tiles = q_pad.view(nqb, B)
            first = tiles.amin(1)
            last = tiles.amax(1)
            n_full = torch.div(first + 1, B, rounding_mode="floor").clamp(max=nkb)
            n_part = (torch.div(last, B, rounding_mode="floor") + 1).clamp(max=nkb) - n_full
            cols = torch.arange(nkb, device=q_pos.device)
            part_idx = torch.clamp(n_full[:, None] + cols[None, :], max=nkb - 1)
            full_idx = cols[None, :].expand(nqb, nkb)

            def causal_by_position(b, h, q_idx, kv_idx):
                return kv_idx <= q_pad[q_idx]

            i32 = torch.int32
            mask = BlockMask.from_kv_blocks(
                n_part.to(i32)[None, None], part_idx.to(i32)[None, None].contiguous(),
                n_full.to(i32)[None, None], full_idx.to(i32)[None, None].contiguous(),
                BLOCK_SIZE=B, mask_mod=causal_by_position, seq_lengths=(nqb * B, nkb * B))
            return mask, nq, nqb * B, nkb * B, group, self.heavy_first
        except Exception as e:  # noqa: BLE001 - any failure means: use SDPA
            self._broke(e)
            return None

    def attend(self, q, k, v, block_mask, scale: float):
        """FlexAttention of q [nq,Hq,D] over k/v [N,Hkv,D] under ``block_mask``
        (``block_mask``), compiled once (dynamic shapes).  With the mask's
        ``group`` > 1 the query heads of each KV head's group become rows of
        that head (Hq = group * Hkv).  Returns None for float32 and (after
        logging once) where FlexAttention cannot run."""
        if block_mask is None or self.broken or q.dtype not in _FLEX_DTYPES:
            return None
        try:
            return self.attend_raw(q, k, v, block_mask, scale)
        except Exception as e:  # noqa: BLE001 - any failure means: use SDPA
            self._broke(e)
            return None

    def attend_raw(self, q, k, v, block_mask, scale: float):
        """``attend`` without the fallback: errors propagate."""
        mask, rows, rows_pad, nk_pad, group, heavy_first = block_mask
        if self._fn is None:
            from torch.nn.attention.flex_attention import flex_attention

            self._fn = torch.compile(flex_attention, dynamic=True)
        nq, hq, d = q.shape
        hkv = k.shape[1]
        if group > 1 and hq != group * hkv:
            raise ValueError(f"block mask packs {group} query heads per KV head, "
                             f"but q has {hq} heads over {hkv} KV heads")
        if heavy_first:
            q = q.flip(0)
        if group > 1:  # [nq, Hkv*G, D] -> [Hkv, nq*G, D]
            qh = q.reshape(nq, hkv, group, d).permute(1, 0, 2, 3).reshape(hkv, nq * group, d)
        else:
            qh = q.transpose(0, 1)
        if rows_pad > rows:
            qh = torch.cat((qh, qh[:, -1:].expand(-1, rows_pad - rows, -1)), dim=1)
        if nk_pad > k.shape[0]:
            pad = nk_pad - k.shape[0]
            k = torch.cat((k, k.new_zeros((pad,) + tuple(k.shape[1:]))))
            v = torch.cat((v, v.new_zeros((pad,) + tuple(v.shape[1:]))))
        kh, vh = (x[None].transpose(1, 2) for x in (k, v))
        extra = {"kernel_options": dict(self.kernel_options)} if self.kernel_options else {}
        o = self._fn(qh[None], kh, vh, block_mask=mask, scale=scale,
                     enable_gqa=group == 1 and hq != hkv, **extra)[0, :, :rows]
        if group > 1:  # [Hkv, nq*G, D] -> [nq, Hkv*G, D]
            o = o.reshape(hkv, nq, group, d).permute(1, 0, 2, 3).reshape(nq, hq, d)
        else:
            o = o.transpose(0, 1)
        return o.flip(0) if heavy_first else o

    def _broke(self, e: Exception) -> None:
        """Remember that FlexAttention failed; log the reason once."""
        if not self.broken:
            logger.warning("kvblend: FlexAttention unavailable (%s: %s); subset attention uses "
                           "SDPA with a mask", type(e).__name__, e)
        self.broken = True


class _FlexBlend(BlendAttention):
    """FlexAttention for one blend: the block mask of the current active set
    (built at its first layer) and its calls' CUDA graphs."""

    def __init__(self, strategy: FlexAttention, scale: float, group: int):
        super().__init__(strategy, scale)
        self.group = group
        self.new_active()

    def new_active(self) -> None:
        self.mask = None
        self.graphs = None

    def __call__(self, q, active, k, v, window, padded=None) -> torch.Tensor:
        flex = self.strategy
        if not self._kernel_runs(q, active, k, window, _FLEX_DTYPES):
            return super().__call__(q, active, k, v, window, padded)
        if self.mask is None:
            self.mask = flex.block_mask(active, k.shape[0], self.group)
        pk, pv = (x.to(q.dtype) for x in (padded if padded is not None else (k, v)))
        if self.graphs is not None:
            return self.graphs(q, pk, pv)
        # the first call of an active set runs eagerly (it may compile);
        # later ones replay CUDA graphs
        attn = flex.attend(q, pk, pv, self.mask, self.scale)
        if attn is None:  # FlexAttention unavailable: SDPA from now on
            return super().__call__(q, active, k, v, window, padded)
        if flex.cuda_graphs:
            self.graphs = FlexGraphs(flex, self.mask, self.scale)
        return attn


class SubsetGraphs:
    """A subset attention's calls for one active set as CUDA graphs: one per
    staging pair (the K/V buffers alternate by layer), captured from
    ``fn(q, k, v)`` at its first use with a static query buffer, replayed
    after copying the queries in.  The output is the graph's static tensor,
    overwritten when the same pair is used again (two layers later).  A
    capture that fails is logged and that call, and every later one of this
    set, runs ``eager`` (default ``fn``)."""

    def __init__(self, fn, eager=None):
        self.fn, self.eager = fn, eager or fn
        self.graphs: dict = {}
        self.q = None
        self.failed = False

    def _capture_failed(self, e: Exception) -> None:
        logger.warning("kvblend: subset attention CUDA graph capture failed (%s: %s); "
                       "it runs eagerly", type(e).__name__, e)

    def __call__(self, q, k, v):
        if self.failed:
            return self.eager(q, k, v)
        key = (k.data_ptr(), v.data_ptr(), tuple(q.shape), q.dtype)
        entry = self.graphs.get(key)
        if self.q is None or self.q.shape != q.shape or self.q.dtype != q.dtype:
            self.q = torch.empty_like(q)
            self.graphs = {}
            entry = None
        self.q.copy_(q)
        if entry is None:
            try:
                entry = self.graphs[key] = capture_cuda_graph(lambda: self.fn(self.q, k, v))
            except Exception as e:  # noqa: BLE001 - eager from now on
                self.failed = True
                self._capture_failed(e)
                return self.eager(q, k, v)
        graph, out = entry
        graph.replay()
        return out


class FlexGraphs(SubsetGraphs):
    """``SubsetGraphs`` of FlexAttention calls under one block mask; after a
    failed capture they run ``FlexAttention.attend`` (its own fallback), and
    the failure is logged once per strategy."""

    def __init__(self, flex: FlexAttention, mask, scale: float):
        self.flex, self.mask, self.scale = flex, mask, scale
        super().__init__(lambda q, k, v: flex.attend_raw(q, k, v, mask, scale),
                         lambda q, k, v: flex.attend(q, k, v, mask, scale))

    def _capture_failed(self, e: Exception) -> None:
        if not self.flex._graph_warned:
            self.flex._graph_warned = True
            logger.warning("kvblend: FlexAttention CUDA graph capture failed (%s: %s); "
                           "subset attention runs eagerly", type(e).__name__, e)

def block_split_attention(q, q_pos, k, v, scale: float, block: int, prior, diagonal):
    """Subset attention split at key-block boundaries, the form dense
    attention kernels without per-query key limits can run exactly.

    q [A,Hq,D] at ascending positions ``q_pos`` (int64, distinct) over k/v
    [Np,Hkv,D] at positions 0..Np-1, Np a multiple of ``block``; query i sees
    key j iff j <= q_pos[i].  A query in key block g = q_pos // block sees
    * every key of the blocks before g: ``prior(q, cu_q)``, attention of
      the queries rows [cu_q[g], cu_q[g+1]) over keys [0, g*block) without a
      mask (``cu_q`` int32 [nkb+1], the start of each block's queries);
    * the keys of block g up to its own position: ``diagonal(qf)``,
      causal attention inside each block over every row of it (``qf``
      [Np,Hq,D]: the queries at their positions, zeros elsewhere);
    each returning (out [rows,Hq,D], logsumexp fp32 [Hq,rows]).  The two
    parts are merged by their log-sum-exps in fp32; queries of block 0 have
    no prior keys and take the diagonal part alone.  Everything stays on the
    device (no host reads).  Returns q's dtype."""
    n_pad = k.shape[0]
    if n_pad % block:
        raise ValueError(f"block_split_attention: {n_pad} key rows are not a multiple of "
                         f"the block ({block})")
    nkb = n_pad // block
    bounds = torch.arange(nkb + 1, device=q.device, dtype=q_pos.dtype) * block
    cu_q = torch.searchsorted(q_pos, bounds).to(torch.int32)
    o1, lse1 = prior(q, cu_q)
    qf = q.new_zeros((n_pad,) + tuple(q.shape[1:]))
    qf.index_copy_(0, q_pos, q)
    o2, lse2 = diagonal(qf)
    o2, lse2 = o2.index_select(0, q_pos).float(), lse2.index_select(1, q_pos).float()
    first = (q_pos < block)[None, :]
    lse1 = torch.where(first, float("-inf"), lse1.float())
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)  # [Hq, A]
    w1, w2, total = w1.t()[..., None], w2.t()[..., None], (w1 + w2).t()[..., None]
    o = (torch.where(first.t()[..., None], 0.0, o1.float()) * w1 + o2 * w2) / total
    return o.to(q.dtype)


def dense_prior(q, cu_q, k, v, scale: float, block: int):
    """``prior`` of ``block_split_attention`` in plain torch, fp32 (the
    reference the kernels are tested against): returns (out, lse) with
    out 0 and lse -inf for queries of block 0."""
    A = q.shape[0]
    rows = torch.arange(A, device=q.device, dtype=cu_q.dtype)
    g = torch.searchsorted(cu_q[1:].contiguous(), rows, right=True)
    limit = (g * block)[:, None]  # keys [0, limit) seen
    keys = torch.arange(k.shape[0], device=q.device)[None, :]
    return _dense(q, k, v, scale, keys < limit)


def dense_diagonal(qf, k, v, scale: float, block: int):
    """``diagonal`` of ``block_split_attention`` in plain torch, fp32."""
    n = k.shape[0]
    pos = torch.arange(n, device=qf.device)
    seen = (pos[None, :] <= pos[:, None]) & (pos[None, :] // block == pos[:, None] // block)
    return _dense(qf, k, v, scale, seen)


def flash_attn_v3():
    """vLLM's FlashAttention 3 varlen function, or None with the reason
    (vLLM not installed, not a Hopper GPU, ...)."""
    try:
        from vllm.vllm_flash_attn import flash_attn_interface as fa
    except Exception as e:  # noqa: BLE001 - any import failure: unavailable
        return None, f"vllm.vllm_flash_attn does not import ({type(e).__name__}: {e})"
    if not fa.is_fa_version_supported(3):
        return None, f"FlashAttention 3 unsupported here: {fa.fa_version_unsupported_reason(3)}"
    return fa.flash_attn_varlen_func, None


class FA3Attention(SdpaAttention):
    """The "fa3" strategy: ``block_split_attention`` on vLLM's FlashAttention
    3 kernels (Hopper).  The prior part is one varlen call whose sequences
    are the queries of each ``block``-key block, over a block table that views
    the staging buffer as pages of ``page`` rows (every block's table is the
    whole buffer, ``seqused_k`` = the block's start), no mask; the diagonal
    part a second varlen call, causal, with every block its own sequence.
    The block trades the two: a larger one fills FA3's 128-row query tiles
    in the prior call (15% of 128 positions are ~19 queries per sequence)
    but runs the diagonal call over more rows (it computes every row of the
    staging buffer, queries or not).
    Both are exact, use tensor cores with FA3's own scheduling and splits,
    and depend on the active set only through ``cu_q`` (computed on the
    device).  A blend's later calls replay CUDA graphs per staging pair.
    bfloat16 and float16 only (float32 and sliding windows: SDPA); where
    the kernels fail (logged once) this strategy is SDPA's from then on.
    Needs vLLM's FA3 build (Hopper): asking for it elsewhere is refused
    with the reason."""

    name = "fa3"

    def __init__(self, fn=None, cuda_graphs: bool = True, page: int = 128, block: int = 128):
        if block <= 0 or block % 128:
            raise ValueError(f"block={block}: expected a multiple of 128")
        if page <= 0 or block % page:
            raise ValueError(f"page={page}: expected a divisor of the block ({block})")
        self._fn, self.cuda_graphs, self.page = fn, cuda_graphs, page
        self.tile = block  # the staging buffers are padded to whole blocks
        self.broken = False
        self._tables: dict = {}
        if self._fn is None:
            self._fn, why = flash_attn_v3()
            if self._fn is None:
                raise ValueError(f"subset attention 'fa3': {why}")

    def begin(self, scale: float, group: int) -> BlendAttention:
        return _FA3Blend(self, scale)

    def _table(self, nkb: int, device):
        """(block table [nkb, pages]: every row the whole buffer, seqused_k
        [nkb]: each block's start, cu_seqlens [nkb+1] of whole blocks)."""
        key = (nkb, str(device))
        t = self._tables.get(key)
        if t is None:
            pages = nkb * (self.tile // self.page)
            every = torch.arange(pages, dtype=torch.int32, device=device)
            t = self._tables[key] = (
                every.expand(nkb, pages).contiguous(),
                torch.arange(nkb, dtype=torch.int32, device=device) * self.tile,
                torch.arange(nkb + 1, dtype=torch.int32, device=device) * self.tile)
        return t

    def attend(self, q, q_pos, k, v, scale: float):
        """Subset attention of q [A,Hq,D] at ascending positions ``q_pos``
        over k/v [Np,Hkv,D] (Np a multiple of the block, rows past the last
        position never seen)."""
        B, fn = self.tile, self._fn
        n_pad, hkv, d = k.shape
        table, seqused, cu_all = self._table(n_pad // B, k.device)
        P = self.page
        pages = (k.view(n_pad // P, P, hkv, d), v.view(n_pad // P, P, hkv, d))

        def prior(q_, cu_q):
            return fn(q_, pages[0], pages[1], max_seqlen_q=B, cu_seqlens_q=cu_q,
                      max_seqlen_k=n_pad, seqused_k=seqused, softmax_scale=scale,
                      causal=False, block_table=table, return_softmax_lse=True, fa_version=3)

        def diagonal(qf):
            return fn(qf, k, v, max_seqlen_q=B, cu_seqlens_q=cu_all, max_seqlen_k=B,
                      cu_seqlens_k=cu_all, softmax_scale=scale, causal=True,
                      return_softmax_lse=True, fa_version=3)

        return block_split_attention(q, q_pos, k, v, scale, B, prior, diagonal)


class _FA3Blend(BlendAttention):
    """FA3 subset attention for one blend: eager first call per active set
    and staging pair, CUDA graphs after."""

    def __init__(self, strategy: FA3Attention, scale: float):
        super().__init__(strategy, scale)
        self.new_active()

    def new_active(self) -> None:
        self.graphs = None

    def __call__(self, q, active, k, v, window, padded=None) -> torch.Tensor:
        fa = self.strategy
        if not self._kernel_runs(q, active, k, window, (torch.bfloat16, torch.float16)):
            return super().__call__(q, active, k, v, window, padded)
        pk, pv = (x.to(q.dtype) for x in (padded if padded is not None else (k, v)))
        if self.graphs is None:
            try:
                out = fa.attend(q, active, pk, pv, self.scale)
            except Exception as e:  # noqa: BLE001 - SDPA from now on, said once
                fa.broken = True
                logger.warning("kvblend: FlashAttention 3 subset attention failed (%s: %s); "
                               "subset attention uses SDPA with a mask", type(e).__name__, e)
                return super().__call__(q, active, k, v, window, padded)
            if fa.cuda_graphs:
                self.graphs = SubsetGraphs(lambda q_, k_, v_: fa.attend(q_, active, k_, v_,
                                                                       self.scale))
            return out
        return self.graphs(q, pk, pv)




SUBSET_ATTENTIONS = {"flex": FlexAttention, "sdpa": SdpaAttention, "fa3": FA3Attention}


def subset_attention(name: str = "flex", device: torch.device | str = "cpu") -> KernelAttention:
    """The strategy ``name`` (a key of ``SUBSET_ATTENTIONS``, the choices on
    CUDA) for a model on ``device``: on the CPU always kvblend's C attention
    op.  ValueError for an unknown name."""
    if name not in SUBSET_ATTENTIONS:
        raise ValueError(f"subset attention {name!r}: expected one of "
                         f"{', '.join(SUBSET_ATTENTIONS)}")
    if torch.device(device).type != "cuda":
        return KernelAttention()
    return SUBSET_ATTENTIONS[name]()  # "fa3" raises ValueError naming why it cannot run
