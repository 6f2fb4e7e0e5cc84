"""Which paged-KV layout the installed vLLM uses, found from its attention backend.

vLLM hands a connector one tensor per attention layer; its shape and the
meaning of its axes depend on the vLLM release and the attention backend
(kvblend.layouts describes each layout and how K and V are read from it).
The backends' layouts:

* CPU_ATTN before vLLM 0.28: ``"cpu"``; from 0.28 with its "vec"/"vec16"
  kernels: ``"cpu_attn"``.  Its "amx" kernels (bf16 on CPUs with AMX tiles)
  pack K in bf16 pairs, which no Layout describes: that cache is refused
  with an error naming it, as are the ARM/POWER/s390x/RISC-V kernels, whose
  K order kvblend has not been checked against.
* FLASH_ATTN / TRITON_ATTN before the blocks-first change: ``"flash"``;
  after it, and FLASHINFER: ``"flashinfer"``; every GPU backend from vLLM
  0.28 (RFC #42082): ``"bhnc"``.

The shapes of "cpu" and "flash" are equal (and CPU_ATTN's shape equals
"bhnc"), so the layout cannot be told from the shape alone: ``detect``
takes the backend name too.
"""

from __future__ import annotations

import logging

import torch

from ..layouts import NAMES

logger = logging.getLogger("kvblend")

# CPU_ATTN kernels whose K is stored transposed per block and head (checked
# against vLLM's cpu_attn_reshape_and_cache).
_CPU_ATTN_TRANSPOSED_K = ("vec", "vec16")

_CPU_BACKENDS = ("CPU_ATTN", "TORCH_SDPA")
_GPU_BACKENDS = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION",
                 "ROCM_ATTN", "ROCM_AITER_FA", "ROCM_AITER_UNIFIED_ATTN")


def cpu_attn_isa(kv_cache: torch.Tensor) -> str | None:
    """The kernel family ("vec", "vec16", "amx", "neon", ...) vLLM's CPU_ATTN
    picks for a cache like ``kv_cache`` (num_blocks, num_kv_heads,
    block_size, 2*head_size), asked from vLLM itself; None when the
    installed vLLM has no such function."""
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except Exception:  # noqa: BLE001 - another vLLM layout: unknown
        return None
    _, _, block_size, d2 = kv_cache.shape
    return str(_get_attn_isa(kv_cache.dtype, int(block_size), int(d2) // 2))


def detect(kv_cache: torch.Tensor, backend: str | None, isa: str | None = None) -> str:
    """Name the layout of one layer's cache ``kv_cache`` under the attention
    backend named ``backend`` (vLLM's ``AttentionBackend.get_name()``).
    ``isa`` is CPU_ATTN's kernel family (the attention layer's ``isa``);
    when None it is asked from vLLM (``cpu_attn_isa``).

    Raises ValueError naming the backend and the shape when the pair matches
    no known layout (a new vLLM release or an unsupported backend), and
    naming the kernel family for a CPU_ATTN cache whose K order kvblend
    cannot describe (AMX-packed bf16), rather than guessing.
    """
    shape = tuple(kv_cache.shape)
    name = (backend or "").upper()
    if name.endswith("_VLLM_V1"):
        name = name[: -len("_VLLM_V1")]
    dims = kv_cache.dim()
    if name in _CPU_BACKENDS:
        if dims == 4:
            kind = isa if isa is not None else cpu_attn_isa(kv_cache)
            if kind in _CPU_ATTN_TRANSPOSED_K and shape[3] % 2 == 0:
                return "cpu_attn"
            if kind == "amx":
                raise ValueError(f"kvblend: vLLM's {backend} cache of shape {shape} uses the 'amx' "
                                 "kernels, which store K packed in bf16 pairs (AMX-packed bf16 K) "
                                 "per block and head; kvblend's paged layouts cannot describe that "
                                 "order, so blending is not supported there (use dtype float32 or "
                                 "float16, whose kernels store K transposed)")
            raise ValueError(f"kvblend: vLLM's {backend} cache of shape {shape} uses the {kind!r} "
                             "kernels, whose K order per block and head kvblend has not been "
                             "checked against (known: 'vec', 'vec16'); blending on this vLLM CPU "
                             "backend is not supported")
        if dims == 5 and shape[0] == 2:
            return "cpu"
    elif name in _GPU_BACKENDS:
        if dims == 4 and shape[3] % 2 == 0:
            return "bhnc"
        if dims == 5 and shape[1] == 2:
            return "flashinfer"
        if dims == 5 and shape[0] == 2 and name != "FLASHINFER":
            return "flash"
    raise ValueError(f"kvblend: no known paged-KV layout for attention backend {backend!r} "
                     f"with a cache of shape {shape}; set kv_connector_extra_config "
                     f"{{'kvblend.kv_layout': <one of {', '.join(NAMES)}>}} if you know it")


def layer_isa(vllm_config, layer_name: str) -> str | None:
    """CPU_ATTN's kernel family recorded on the attention layer
    ``layer_name`` (its ``isa`` attribute); None when absent."""
    ctx = getattr(getattr(vllm_config, "compilation_config", None), "static_forward_context", None) or {}
    isa = getattr(ctx.get(layer_name), "isa", None)
    return str(isa) if isa is not None else None


def backend_name(vllm_config, layer_name: str) -> str | None:
    """Name of the attention backend vLLM chose for ``layer_name``, read from
    the static forward context; None when it cannot be found."""
    ctx = getattr(getattr(vllm_config, "compilation_config", None), "static_forward_context", None) or {}
    layer = ctx.get(layer_name)
    if layer is None:
        return None
    backend = getattr(layer, "attn_backend", None)
    if backend is None and hasattr(layer, "get_attn_backend"):
        backend = layer.get_attn_backend()
    if backend is None:
        return None
    try:
        return str(backend.get_name())
    except Exception:  # noqa: BLE001 - any backend without a name is "unknown"
        return None
