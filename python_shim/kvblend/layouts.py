"""Paged-KV layouts: the one registry of every layout kvblend reads and writes.

Each layout gives a layer's cache tensor its shape for (num_blocks,
block_size, num_kv_heads, head_size) (the built-in engine allocates from it)
and finds K and V in it as views of that logical shape sharing its memory
(``kv_views``: ``kvblend.ops.paged_layout`` describes them to C, the
built-in engine indexes them).

``"cpu"``         (2, num_blocks, num_kv_heads, block_size, head_size): HND
                  planes, vLLM's CPU backend before 0.28
``"flash"``       (2, num_blocks, block_size, num_kv_heads, head_size):
                  FLASH_ATTN / TRITON_ATTN before the blocks-first change
``"flashinfer"``  (num_blocks, 2, block_size, num_kv_heads, head_size):
                  FLASHINFER, and FLASH_ATTN / TRITON_ATTN after that change
``"joint"``       (num_blocks, block_size, num_kv_heads, 2*head_size): K then
                  V along the last axis of each token
``"bhnc"``        (num_blocks, num_kv_heads, block_size, 2*head_size), K then V
                  along the last axis: every GPU backend from vLLM 0.28 (RFC
                  #42082); the memory order (NHD or HND) is in the strides
``"cpu_attn"``    the "bhnc" shape as vLLM's CPU_ATTN "vec"/"vec16" kernels
                  read it: each (block, head) is a K plane stored transposed
                  ([head_size, block_size]) followed by a V plane stored
                  row-major ([block_size, head_size]); V gets its own strides

Strides always come from the tensor, so views and padded caches work.
Which layout a vLLM cache has is told by ``kvblend.vllm.layouts.detect``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Axis letters of a layout's pattern: "2" splits K from V, "2D" holds K|V.
_AXES = {"2": "2", "B": "num_blocks", "N": "block_size", "H": "num_kv_heads",
         "D": "head_size", "2D": "2*head_size"}


@dataclass(frozen=True)
class PagedLayout:
    """One paged-KV layout: the tensor's axes (``pattern``, letters of
    ``_AXES``) and ``split``, which returns K and V as
    (num_blocks, block_size, num_kv_heads, head_size) views of a tensor of
    that pattern."""

    name: str
    pattern: tuple[str, ...]
    split: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

    def shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
              head_size: int) -> tuple[int, ...]:
        """The tensor's shape for these sizes."""
        size = {"2": 2, "B": num_blocks, "N": block_size, "H": num_kv_heads,
                "D": head_size, "2D": 2 * head_size}
        return tuple(size[a] for a in self.pattern)

    def views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``kv_cache``; ValueError naming the expected axes when
        its shape does not fit."""
        shape = tuple(kv_cache.shape)
        fits = len(shape) == len(self.pattern) and all(
            (a != "2" or s == 2) and (a != "2D" or s % 2 == 0) for a, s in zip(self.pattern, shape))
        if not fits:
            axes = ", ".join(_AXES[a] for a in self.pattern)
            raise ValueError(f"kv_cache: layout {self.name!r} expects shape ({axes}), got {shape}")
        return self.split(kv_cache)


def _halves(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of a tensor whose last axis is K|V."""
    d = kv.shape[-1] // 2
    return kv[..., :d], kv[..., d:]


def _cpu_attn(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of a vLLM CPU_ATTN cache (num_blocks, num_kv_heads,
    block_size, 2*head_size), which the backend reads per (block, head) as
    block_size*head_size elements of K stored transposed (K[t, d] at
    d*block_size + t) followed by as many of V stored row-major.  Needs
    each (block, head) contiguous; ValueError otherwise."""
    b, h, n, d2 = kv_cache.shape
    d = d2 // 2
    sb, sh, st, sd = kv_cache.stride()
    if sd != 1 or (n > 1 and st != d2):
        raise ValueError(f"kv_cache: layout 'cpu_attn' needs each (block, head) contiguous "
                         f"(strides (*, *, {d2}, 1)), got strides {kv_cache.stride()}")
    k = kv_cache.as_strided((b, n, h, d), (sb, 1, sh, n))
    v = kv_cache.as_strided((b, n, h, d), (sb, d, sh, 1), kv_cache.storage_offset() + n * d)
    return k, v


LAYOUTS: dict[str, PagedLayout] = {lay.name: lay for lay in (
    PagedLayout("cpu", ("2", "B", "H", "N", "D"),
                lambda kv: (kv[0].transpose(1, 2), kv[1].transpose(1, 2))),
    PagedLayout("flash", ("2", "B", "N", "H", "D"), lambda kv: (kv[0], kv[1])),
    PagedLayout("flashinfer", ("B", "2", "N", "H", "D"), lambda kv: (kv[:, 0], kv[:, 1])),
    PagedLayout("joint", ("B", "N", "H", "2D"), _halves),
    PagedLayout("bhnc", ("B", "H", "N", "2D"), lambda kv: _halves(kv.transpose(1, 2))),
    PagedLayout("cpu_attn", ("B", "H", "N", "2D"), _cpu_attn),
)}
NAMES = tuple(LAYOUTS)


def get(name: str, what: str = "layout") -> PagedLayout:
    """The layout called ``name``; ValueError naming ``what`` and the
    known names otherwise."""
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"{what}: expected one of {NAMES}, got {name!r}") from None


def kv_views(kv_cache: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``kv_cache`` read as layout ``name``, each a view of shape
    (num_blocks, block_size, num_kv_heads, head_size)."""
    return get(name).views(kv_cache)
