"""Subset attention split at key-block boundaries (``block_split_attention``,
the form the "fa3" strategy runs on FlashAttention 3): with its two parts
computed in plain torch it equals kvblend's C attention op, the CPU
reference, on the same subset; the GPU suite checks the FA3 parts."""

import pytest
import torch

pytest.importorskip("kvblend._kvblend")

from kvblend import ops  # noqa: E402
from kvblend.model.attention import (  # noqa: E402
    block_split_attention, dense_diagonal, dense_prior, subset_attention)


def _split(q, q_pos, k, v, scale, block):
    n = k.shape[0]
    n_pad = -(-n // block) * block
    kp = torch.cat((k, k.new_zeros((n_pad - n,) + tuple(k.shape[1:]))))
    vp = torch.cat((v, v.new_zeros((n_pad - n,) + tuple(v.shape[1:]))))
    return block_split_attention(
        q, q_pos, kp, vp, scale, block,
        lambda q_, cu: dense_prior(q_, cu, kp, vp, scale, block),
        lambda qf: dense_diagonal(qf, kp, vp, scale, block))


@pytest.mark.parametrize("n,block", [(300, 64), (256, 64), (77, 128), (520, 16)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_block_split_equals_the_c_attention(n, block, hq, hkv):
    """Random subsets that include row 0, rows of the first block (no prior
    keys), block boundaries and the last row."""
    g = torch.Generator().manual_seed(n * 31 + block + hq)
    q_all = torch.randn(n, hq, 32, generator=g)
    k = torch.randn(n, hkv, 32, generator=g)
    v = torch.randn(n, hkv, 32, generator=g)
    pick = torch.randperm(n, generator=g)[: max(1, n // 6)]
    extra = torch.tensor([0, 1, min(block, n - 1), min(block - 1, n - 1), n - 1])
    q_pos = torch.unique(torch.cat((pick, extra)))  # sorted
    q = q_all[q_pos].contiguous()
    want = ops.attention(q, q_pos, k, v, torch.arange(n), 0.17)
    got = _split(q, q_pos, k, v, 0.17, block)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), float((got - want).abs().max())


def test_block_split_only_first_block_and_every_row():
    """Every query in block 0 (the prior part sees nothing), and the
    subset that is every row (plain causal attention)."""
    g = torch.Generator().manual_seed(5)
    n, block = 200, 64
    q_all = torch.randn(n, 4, 16, generator=g)
    k = torch.randn(n, 2, 16, generator=g)
    v = torch.randn(n, 2, 16, generator=g)
    for q_pos in (torch.arange(0, 40, 3), torch.arange(n)):
        q = q_all[q_pos].contiguous()
        want = ops.attention(q, q_pos, k, v, torch.arange(n), 0.25)
        got = _split(q, q_pos, k, v, 0.25, block)
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-4)


def test_block_split_refuses_unpadded_keys():
    q = torch.zeros(2, 2, 8)
    k = torch.zeros(100, 2, 8)
    with pytest.raises(ValueError, match="100 key rows are not a multiple of the block \\(64\\)"):
        block_split_attention(q, torch.tensor([3, 9]), k, k, 1.0, 64, None, None)


def test_fa3_strategy_is_cpu_kernel_on_cpu_and_named_in_errors():
    """On the CPU every name gives kvblend's C attention; an unknown name is
    refused with the choices, fa3 among them."""
    assert subset_attention("fa3", "cpu").name == "kvblend"
    with pytest.raises(ValueError, match="fa3"):
        subset_attention("fa4", "cpu")


def test_windowed_attention_matches_a_per_query_loop():
    """The CPU path of sliding-window layers against one query and one head
    at a time in float64: key j seen iff q_pos - window < j <= q_pos."""
    from kvblend.model.attention import windowed_attention

    g = torch.Generator().manual_seed(3)
    q = torch.randn(30, 8, 16, generator=g)
    k = torch.randn(50, 2, 16, generator=g)
    v = torch.randn(50, 2, 16, generator=g)
    q_pos = torch.sort(torch.randperm(50, generator=g)[:30]).values
    want = torch.zeros(30, 8, 16, dtype=torch.float64)
    for t in range(30):
        seen = (torch.arange(50) <= q_pos[t]) & (torch.arange(50) > q_pos[t] - 8)
        for h in range(8):
            logits = (k[seen, h // 4].double() @ q[t, h].double()) * 0.3
            want[t, h] = torch.softmax(logits, 0) @ v[seen, h // 4].double()
    got = windowed_attention(q, q_pos, k, v, torch.arange(50), 0.3, 8)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-5), float((got.double() - want).abs().max())


@pytest.mark.parametrize("kw, message", [
    ({"block": 200}, "block=200: expected a multiple of 128"),
    ({"block": 0}, "block=0: expected a multiple of 128"),
    ({"block": 256, "page": 96}, r"page=96: expected a divisor of the block \(256\)"),
])
def test_fa3_strategy_refuses_bad_blocks_and_pages(kw, message):
    """The key block must be whole FA3 query tiles and the page must divide
    it; the staging buffers are padded to the block."""
    from kvblend.model.attention import FA3Attention

    def unused(*a, **k):
        raise AssertionError("not called")
    with pytest.raises(ValueError, match=message):
        FA3Attention(unused, **kw)
    assert FA3Attention(unused, block=512, page=64).tile == 512
