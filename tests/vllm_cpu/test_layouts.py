"""Paged-KV layouts of vLLM's attention backends, on synthetic tensors.

Each case builds a cache tensor shaped as the backend allocates it, writes
known K/V rows through kvblend's layout, and reads them back the way the
backend's own forward splits the tensor.  Needs the kvblend extension only.
"""

import pytest
import torch

from kvblend import ops
from kvblend.vllm import layouts

NB, BS, H, D = 3, 16, 2, 8


def _rows(n, sign=1.0):
    return sign * (torch.arange(n * H * D, dtype=torch.float32).view(n, H, D) + 1)


def _backend_split(kv, layout):
    """K, V as (NB, BS, H, D) the way each backend's forward splits its cache."""
    if layout == "cpu":  # (2, NB, H, BS, D)
        return kv[0].transpose(1, 2), kv[1].transpose(1, 2)
    if layout == "flash":  # key_cache, value_cache = kv_cache.unbind(0)
        return kv.unbind(0)
    if layout == "flashinfer":  # blocks first, unbind(1)
        return kv.unbind(1)
    if layout == "bhnc":  # vLLM >= 0.28: kv_cache.transpose(1, 2).split(head_size, -1)
        return kv.transpose(1, 2).split(D, dim=-1)
    if layout == "cpu_attn":  # CPU_ATTN: view (NB, H, 2*BS, D), chunk(2, dim=2); K^T per block/head
        kc, vc = kv.view(NB, H, 2 * BS, D).chunk(2, dim=2)
        return kc.reshape(NB, H, D, BS).permute(0, 3, 1, 2), vc.transpose(1, 2)
    raise AssertionError(layout)


def _alloc(layout, hnd=False):
    if layout == "cpu":
        return torch.zeros(2, NB, H, BS, D)
    if layout == "flash":
        return torch.zeros(2, NB, BS, H, D)
    if layout == "flashinfer":
        return torch.zeros(NB, 2, BS, H, D)
    # (NB, H, BS, 2D) logical; NHD memory order is (NB, BS, H, 2D) permuted
    if hnd or layout == "cpu_attn":
        return torch.zeros(NB, H, BS, 2 * D)
    return torch.zeros(NB, BS, H, 2 * D).permute(0, 2, 1, 3)


CASES = [("cpu", False), ("flash", False), ("flashinfer", False), ("bhnc", False), ("bhnc", True),
         ("cpu_attn", False)]


@pytest.mark.parametrize("layout,hnd", CASES)
def test_layout_scatter_lands_where_backend_reads(layout, hnd):
    kv = _alloc(layout, hnd)
    slots = torch.tensor([0, 5, BS + 1, 2 * BS + BS - 1], dtype=torch.int64)
    k, v = _rows(4), _rows(4, -1.0)
    ops.scatter(ops.paged_layout(kv, layout), slots, k, v)
    kc, vc = _backend_split(kv, layout)
    for i, s in enumerate(slots.tolist()):
        b, t = divmod(s, BS)
        assert torch.equal(kc[b, t], k[i]), (layout, s)
        assert torch.equal(vc[b, t], v[i]), (layout, s)
    assert int((kv != 0).sum()) == 2 * 4 * H * D  # nothing else written


@pytest.mark.parametrize("layout,hnd", CASES)
def test_layout_gather_reads_backend_rows(layout, hnd):
    kv = _alloc(layout, hnd)
    kc, vc = _backend_split(kv, layout)
    kc.copy_(torch.randn(kc.shape))
    vc.copy_(torch.randn(vc.shape))
    slots = torch.tensor([1, BS, 2 * BS + 3], dtype=torch.int64)
    k_out, v_out = torch.empty(3, H, D), torch.empty(3, H, D)
    ops.gather(ops.paged_layout(kv, layout), slots, k_out, v_out)
    for i, s in enumerate(slots.tolist()):
        b, t = divmod(s, BS)
        assert torch.equal(k_out[i], kc[b, t]) and torch.equal(v_out[i], vc[b, t])


@pytest.mark.parametrize("backend,shape,want", [
    ("CPU_ATTN", (2, NB, H, BS, D), "cpu"),
    ("TORCH_SDPA", (2, NB, H, BS, D), "cpu"),
    ("FLASH_ATTN", (2, NB, BS, H, D), "flash"),
    ("FLASH_ATTN_VLLM_V1", (2, NB, BS, H, D), "flash"),
    ("FLASH_ATTN", (NB, 2, BS, H, D), "flashinfer"),
    ("FLASHINFER", (NB, 2, BS, H, D), "flashinfer"),
    ("TRITON_ATTN", (NB, 2, BS, H, D), "flashinfer"),
    ("FLASH_ATTN", (NB, H, BS, 2 * D), "bhnc"),
    ("FLASHINFER", (NB, H, BS, 2 * D), "bhnc"),
])
def test_detect_names_layout_from_backend_and_shape(backend, shape, want):
    assert layouts.detect(torch.empty(shape), backend) == want


@pytest.mark.parametrize("isa", ["vec", "vec16"])
def test_detect_cpu_attn_transposed_k_kernels(isa):
    assert layouts.detect(torch.empty(NB, H, BS, 2 * D), "CPU_ATTN", isa) == "cpu_attn"


def test_detect_refuses_amx_packed_cpu_attn_cache():
    with pytest.raises(ValueError, match="CPU_ATTN cache of shape .* 'amx' .*AMX-packed bf16 K"):
        layouts.detect(torch.empty(NB, H, BS, 2 * D, dtype=torch.bfloat16), "CPU_ATTN", "amx")
    with pytest.raises(ValueError, match="'neon' kernels.*not supported"):
        layouts.detect(torch.empty(NB, H, BS, 2 * D), "CPU_ATTN", "neon")


def test_cpu_attn_layout_matches_vllm_reshape_and_cache():
    """Rows written by vLLM's own CPU_ATTN cache op (the kernels vLLM picks
    for this cache) read back through the 'cpu_attn' layout, and rows
    kvblend scatters sit where that op puts them."""
    vops = pytest.importorskip("vllm._custom_ops")
    nb, bs = 2, 32
    kv = torch.zeros(nb, H, bs, 2 * D * 8)  # head_size 64: a size CPU_ATTN supports
    d = 8 * D
    isa = layouts.cpu_attn_isa(kv)
    if isa not in ("vec", "vec16"):
        pytest.skip(f"vLLM picks the {isa!r} kernels here")
    assert layouts.detect(kv, "CPU_ATTN") == "cpu_attn"
    kc, vc = kv.view(nb, H, 2 * bs, d).chunk(2, dim=2)
    slots = torch.tensor([0, 5, bs + 1, 2 * bs - 1])
    k = torch.randn(4, H, d)
    v = torch.randn(4, H, d)
    vops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)
    lay = ops.paged_layout(kv, "cpu_attn")
    k_out, v_out = torch.empty(4, H, d), torch.empty(4, H, d)
    ops.gather(lay, slots, k_out, v_out)
    assert torch.equal(k_out, k) and torch.equal(v_out, v)
    mine = torch.zeros_like(kv)
    ops.scatter(ops.paged_layout(mine, "cpu_attn"), slots, k, v)
    assert torch.equal(mine, kv)


def test_detect_refuses_unknown_backend_naming_it():
    with pytest.raises(ValueError, match="'MY_ATTN' with a cache of shape"):
        layouts.detect(torch.empty(2, NB, BS, H, D), "MY_ATTN")
    with pytest.raises(ValueError, match="FLASHINFER"):
        layouts.detect(torch.empty(2, NB, BS, H, D), "FLASHINFER")


def test_paged_layout_rejects_wrong_shape():
    with pytest.raises(ValueError, match="layout 'bhnc' expects"):
        ops.paged_layout(torch.zeros(2, NB, BS, H, D), "bhnc")
    with pytest.raises(ValueError, match="expected one of"):
        ops.paged_layout(torch.zeros(2, NB, BS, H, D), "nope")
