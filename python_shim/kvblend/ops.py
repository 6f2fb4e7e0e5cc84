"""Torch wrappers over kvblend's C/CUDA ops.

The only module that touches both torch and the C library's ops (declared
in kvblend._clib).  Each wrapper checks shapes, dtypes, devices and
contiguity and raises ValueError (or TypeError for non-tensors) naming the
argument with the expected and the actual value *before* any pointer
reaches C.  CPU tensors run the C
reference ops, CUDA tensors the kernels on the tensor's device and the
current torch stream.  No numerics happen here.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import torch

from . import _clib, layouts

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ROPE_STYLES = {"neox": 0, "gptj": 1}


# --- checks -------------------------------------------------------------------

def dtype_code(dtype: torch.dtype, name: str = "tensor") -> int:
    """Return kvblend's code for a float dtype; ValueError for others."""
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"{name}: dtype {dtype} is not supported "
                         "(expected torch.float32, torch.float16 or torch.bfloat16)") from None


def device_index(t: torch.Tensor) -> int:
    """Return -1 for a CPU tensor, else its CUDA device ordinal."""
    if t.device.type == "cpu":
        return -1
    if t.device.type != "cuda":
        raise ValueError(f"tensor on {t.device} is not supported (expected cpu or cuda)")
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _stream(device: int) -> int:
    """Return the current torch stream's handle of `device` (0 on the CPU)."""
    return 0 if device < 0 else torch.cuda.current_stream(device).cuda_stream


def _on(device: int):
    """Context making `device` current for a CUDA op (a no-op when it already
    is, and on the CPU)."""
    if device < 0 or device == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _check(t, name: str, *, shape: Sequence[int | None] | None = None,
           dtype: torch.dtype | Sequence[torch.dtype] | None = None,
           device: torch.device | None = None, contiguous: bool = True) -> torch.Tensor:
    """Validate one tensor argument; `None` entries of `shape` match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, not {type(t).__name__}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(e is None or e == a for e, a in zip(shape, t.shape))
        if not ok:
            want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ("," if len(shape) == 1 else "") + ")"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(f"{name}: expected dtype {want}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (strides {t.stride()} for shape {tuple(t.shape)})")
    return t


def _torch_device(index: int) -> torch.device:
    """Torch device of a kvblend device index."""
    return torch.device("cpu") if index < 0 else torch.device("cuda", index)


# --- paged layout ---------------------------------------------------------------

def layout_from_views(k: torch.Tensor, v: torch.Tensor):
    """Describe K and V views of shape (num_blocks, block_size, num_kv_heads,
    head_size) with arbitrary element strides (V's may differ from K's, as
    in vLLM's CPU backend, which stores K transposed per block and head).

    Returns a ``kvblend._clib.Layout`` (kvb_paged_layout): element (block b,
    token t, head h, dim d) of K is at ``k_ptr + (b*block_stride +
    t*token_stride + h*head_stride + d*dim_stride) * itemsize``; V likewise
    from ``v_ptr`` with the ``v_*`` strides (all four 0: K's).  The pointers
    are borrowed: keep the cache tensor alive while the layout is used."""
    _check(k, "k", dtype=tuple(_DTYPE_CODES), contiguous=False)
    _check(v, "v", shape=tuple(k.shape), dtype=k.dtype, device=k.device, contiguous=False)
    if k.dim() != 4:
        raise ValueError(f"k: expected 4 dims (num_blocks, block_size, num_kv_heads, head_size), got shape {tuple(k.shape)}")
    if min(k.stride() + v.stride()) < 0:
        raise ValueError(f"k, v: expected non-negative strides, got {k.stride()} and {v.stride()}")
    b, n, h, d = k.shape
    vs = (0, 0, 0, 0) if v.stride() == k.stride() else v.stride()
    return _clib.Layout(k_ptr=k.data_ptr(), v_ptr=v.data_ptr(), block_stride=k.stride(0),
                        token_stride=k.stride(1), head_stride=k.stride(2), dim_stride=k.stride(3),
                        num_blocks=b, block_size=n, num_kv_heads=h, head_size=d,
                        dtype=dtype_code(k.dtype, "k"), device=device_index(k), v_block_stride=vs[0],
                        v_token_stride=vs[1], v_head_stride=vs[2], v_dim_stride=vs[3])


def paged_layout(kv_cache: torch.Tensor, layout: str):
    """Describe one layer's KV cache tensor laid out as ``layout`` (a name
    of ``kvblend.layouts``); strides are read from the tensor, so views and
    padded caches work."""
    _check(kv_cache, "kv_cache", dtype=tuple(_DTYPE_CODES), contiguous=False)
    return layout_from_views(*layouts.kv_views(kv_cache, layout))


def _layout_args(layout) -> tuple[Any, torch.device]:
    """Check a layout argument and return it with its torch device."""
    if not isinstance(layout, _clib.Layout):
        raise TypeError(f"layout: expected a Layout (paged_layout()), got {type(layout).__name__}")
    return layout, _torch_device(layout.device)


def _layout_dtype(lay) -> torch.dtype:
    """Torch dtype of a layout's dtype code."""
    for dt, code in _DTYPE_CODES.items():
        if code == lay.dtype:
            return dt
    raise ValueError(f"layout: unknown dtype code {lay.dtype}")


# --- ops ------------------------------------------------------------------------------

def gather(layout, slots: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
    """Copy the rows at `slots` (int64 [n], negative = padding, row untouched)
    of the paged cache into contiguous k_out/v_out [n, num_kv_heads, head_size]."""
    lay, dev = _layout_args(layout)
    dt = _layout_dtype(lay)
    _check(slots, "slots", shape=(None,), dtype=torch.int64, device=dev)
    n = slots.shape[0]
    row = (n, lay.num_kv_heads, lay.head_size)
    _check(k_out, "k_out", shape=row, dtype=dt, device=dev)
    _check(v_out, "v_out", shape=row, dtype=dt, device=dev)
    with _on(lay.device):
        _clib.gather(lay, slots.data_ptr(), n, k_out.data_ptr(), v_out.data_ptr(), _stream(lay.device))


def scatter(layout, slots: torch.Tensor, k_in: torch.Tensor | None,
            v_in: torch.Tensor | None) -> None:
    """Write contiguous k_in/v_in [n, num_kv_heads, head_size] into the paged
    cache at `slots` (int64 [n]; negative = skip).  Either input may be None."""
    lay, dev = _layout_args(layout)
    dt = _layout_dtype(lay)
    _check(slots, "slots", shape=(None,), dtype=torch.int64, device=dev)
    n = slots.shape[0]
    row = (n, lay.num_kv_heads, lay.head_size)
    if k_in is None and v_in is None:
        raise ValueError("scatter: k_in and v_in are both None (expected at least one tensor)")
    ptrs = []
    for name, t in (("k_in", k_in), ("v_in", v_in)):
        if t is None:
            ptrs.append(0)
        else:
            ptrs.append(_check(t, name, shape=row, dtype=dt, device=dev).data_ptr())
    with _on(lay.device):
        _clib.scatter(lay, slots.data_ptr(), n, ptrs[0], ptrs[1], _stream(lay.device))


def _style_code(style) -> int:
    """Code of a RoPE pairing given as "neox"/"gptj" or its int code."""
    if isinstance(style, str):
        if style.lower() not in _ROPE_STYLES:
            raise ValueError(f"style: expected 'neox' or 'gptj', got {style!r}")
        return _ROPE_STYLES[style.lower()]
    if style not in (0, 1):
        raise ValueError(f"style: expected 'neox' (0) or 'gptj' (1), got {style!r}")
    return int(style)


def rerotate(k: torch.Tensor, inv_freq, rotary_dim: int, style, old_pos: torch.Tensor,
             new_pos: torch.Tensor, attention_factor: float = 1.0) -> torch.Tensor:
    """Re-rotate keys k [n, num_heads, head_size] in place from old_pos to
    new_pos (int64 [n] on k's device); returns k.  inv_freq holds the
    rotary_dim/2 angular frequencies (copied to host float32)."""
    _check(k, "k", dtype=tuple(_DTYPE_CODES))
    if k.dim() != 3:
        raise ValueError(f"k: expected shape (n, num_heads, head_size), got {tuple(k.shape)}")
    n, heads, hs = k.shape
    inv = torch.as_tensor(inv_freq, dtype=torch.float32).detach().to("cpu").contiguous()
    if inv.dim() != 1 or inv.shape[0] != rotary_dim // 2:
        raise ValueError(f"inv_freq: expected shape ({rotary_dim // 2},) for rotary_dim {rotary_dim}, got {tuple(inv.shape)}")
    _check(old_pos, "old_pos", shape=(n,), dtype=torch.int64, device=k.device)
    _check(new_pos, "new_pos", shape=(n,), dtype=torch.int64, device=k.device)
    dev = device_index(k)
    with _on(dev):
        rope = _clib.Rope(int(rotary_dim), _style_code(style), inv.data_ptr(), float(attention_factor))
        _clib.rerotate(dev, k.data_ptr(), n, heads, hs, dtype_code(k.dtype, "k"), rope,
                       old_pos.data_ptr(), new_pos.data_ptr(), _stream(dev))
    return k


def deviation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token squared L2 distance sum((a - b)^2) over heads and dims of
    a, b [n, num_heads, head_size]; returns float32 [n]."""
    _check(a, "a", dtype=tuple(_DTYPE_CODES))
    if a.dim() != 3:
        raise ValueError(f"a: expected shape (n, num_heads, head_size), got {tuple(a.shape)}")
    _check(b, "b", shape=tuple(a.shape), dtype=a.dtype, device=a.device)
    n, heads, hs = a.shape
    out = torch.empty(n, dtype=torch.float32, device=a.device)
    dev = device_index(a)
    with _on(dev):
        _clib.deviation(dev, a.data_ptr(), b.data_ptr(), n, heads, hs, dtype_code(a.dtype, "a"),
                        out.data_ptr(), _stream(dev))
    return out


def select(score: torch.Tensor, forced: torch.Tensor | None, k: int,
           n_forced: int | None = None) -> torch.Tensor:
    """Indices (int64, ascending) of every forced token plus the k
    highest-scoring others (ties: lower index first; NaN lowest).

    score is float32 [n]; forced a bool or uint8 [n] tensor or None.  On CUDA
    the result length is n_forced + min(k, n - n_forced); pass n_forced to
    avoid counting it with a device sync.
    """
    _check(score, "score", shape=(None,), dtype=torch.float32)
    n = score.shape[0]
    if int(k) < 0:
        raise ValueError(f"k: expected >= 0, got {k}")
    fptr = 0
    if forced is not None:
        _check(forced, "forced", shape=(n,), dtype=(torch.bool, torch.uint8), device=score.device)
        if forced.dtype == torch.bool:
            forced = forced.view(torch.uint8)
        fptr = forced.data_ptr()
    dev = device_index(score)
    if dev >= 0 and n_forced is None:
        n_forced = 0 if forced is None else int(torch.count_nonzero(forced))
    out = torch.empty(n, dtype=torch.int64, device=score.device)
    with _on(dev):
        count = _clib.select(dev, score.data_ptr(), fptr, n, int(k), out.data_ptr(), _stream(dev),
                             int(n_forced or 0))
    return out[:count]


def attention(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              k_pos: torch.Tensor, scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of queries q [nq, num_q_heads, head_size] over keys/values
    [nk, num_kv_heads, head_size] with the causal mask by position (query i
    sees key j iff k_pos[j] <= q_pos[i]); GQA when num_q_heads is a multiple
    of num_kv_heads.  scale defaults to head_size ** -0.5.  A query that sees
    no key gets zeros.  Returns out [nq, num_q_heads, head_size] in q's dtype.

    CPU tensors only: this is the reference the GPU paths (FlexAttention and
    SDPA in kvblend.model.attention) are tested against."""
    _check(q, "q", dtype=tuple(_DTYPE_CODES), device=torch.device("cpu"))
    if q.dim() != 3:
        raise ValueError(f"q: expected shape (nq, num_q_heads, head_size), got {tuple(q.shape)}")
    nq, hq, hs = q.shape
    _check(k, "k", dtype=q.dtype, device=q.device)
    if k.dim() != 3 or k.shape[2] != hs:
        raise ValueError(f"k: expected shape (nk, num_kv_heads, {hs}), got {tuple(k.shape)}")
    nk, hkv, _ = k.shape
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"k: num_kv_heads {hkv} must divide num_q_heads {hq}")
    _check(v, "v", shape=(nk, hkv, hs), dtype=q.dtype, device=q.device)
    _check(q_pos, "q_pos", shape=(nq,), dtype=torch.int64, device=q.device)
    _check(k_pos, "k_pos", shape=(nk,), dtype=torch.int64, device=q.device)
    if out is None:
        out = torch.empty_like(q)
    else:
        _check(out, "out", shape=(nq, hq, hs), dtype=q.dtype, device=q.device)
    if scale is None:
        scale = 1.0 / math.sqrt(hs)
    _clib.attention(q.data_ptr(), q_pos.data_ptr(), nq, k.data_ptr(), v.data_ptr(), k_pos.data_ptr(),
                    nk, hq, hkv, hs, float(scale), dtype_code(q.dtype, "q"), out.data_ptr())
    return out
