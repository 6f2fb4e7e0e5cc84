"""The layer-by-layer adapter reproduces the transformers forward exactly."""

import pytest
import torch

from conftest import make_tiny_model
from kvblend.model import SUPPORTED_ARCHITECTURES, get_adapter


def _adapter_forward(adapter, ids):
    """embed -> (qkv -> causal attention -> out) x L -> logits, no cache."""
    positions = torch.arange(ids.numel())
    h = adapter.embed(ids)
    for layer in range(adapter.num_layers):
        q, k, v = adapter.qkv(layer, h, positions)
        h = adapter.out(layer, adapter.attend(layer, q, k, v), h)
    return adapter.logits(h)


@torch.no_grad()
def _check_forward(model, ids, tol=1e-4):
    adapter = get_adapter(model)
    want = model(ids[None]).logits[0]
    got = _adapter_forward(adapter, ids)
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= tol, f"max abs logit diff {diff}"


def test_adapter_forward_matches_hf_smollm2(smollm2):
    model, tok = smollm2
    ids = torch.tensor(tok.encode("The capital of France is Paris. The capital of Italy is"))
    _check_forward(model, ids)


def test_adapter_attributes_smollm2(smollm2):
    model, _ = smollm2
    a = get_adapter(model)
    assert (a.num_layers, a.num_q_heads, a.num_kv_heads, a.head_size, a.hidden_size) == (30, 9, 3, 64, 576)
    assert a.vocab_size == 49152 and a.dtype == torch.float32
    assert a.scale == pytest.approx(64 ** -0.5)
    assert a.rope.rotary_dim == 64 and a.rope.style == "neox" and a.rope.attention_scaling == 1.0
    want = 1.0 / (100000.0 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
    assert torch.equal(a.rope.inv_freq, want)


@pytest.mark.parametrize("kind", ["llama", "llama3", "yarn", "mistral", "qwen2", "qwen3"])
def test_adapter_forward_matches_hf_tiny(kind):
    # 40 tokens: longer than Mistral's window of 8, so the window matters.
    model = make_tiny_model(kind)
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    _check_forward(model, ids)


def test_adapter_rope_includes_scaling():
    # llama3 scaling divides the low frequencies by `factor`; the adapter must
    # expose the scaled table, not the default one.
    a = get_adapter(make_tiny_model("llama3"))
    default = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    assert not torch.equal(a.rope.inv_freq, default)
    assert torch.allclose(a.rope.inv_freq[-1], default[-1] / 8.0)
    y = get_adapter(make_tiny_model("yarn"))
    assert y.rope.attention_scaling > 1.0


def test_adapter_qk_norm_and_bias_used():
    # Dropping Qwen3's k_norm must change k: proves the adapter applies it.
    model = make_tiny_model("qwen3")
    a = get_adapter(model)
    assert a.has_qk_norm
    h = torch.randn(5, 64)
    _, k, _ = a.qkv(0, h, torch.arange(5))
    with torch.no_grad():
        model.model.layers[0].self_attn.k_norm.weight.mul_(2.0)
    _, k2, _ = a.qkv(0, h, torch.arange(5))
    assert torch.allclose(k2, 2 * k, atol=1e-5)


def test_adapter_qkv_positions_shift_equals_rerotation():
    # RoPE is relative: q.k at positions (p+d, s+d) equals q.k at (p, s).
    a = get_adapter(make_tiny_model("llama"))
    h = torch.randn(2, 64)
    q0, k0, _ = a.qkv(0, h, torch.tensor([3, 7]))
    q1, k1, _ = a.qkv(0, h, torch.tensor([103, 107]))
    dot0 = (q0[1, :2] * k0[0]).sum(-1)
    dot1 = (q1[1, :2] * k1[0]).sum(-1)
    assert torch.allclose(dot0, dot1, atol=1e-4)


def test_adapter_attend_positions_mask():
    # Shuffled rows with explicit positions equal ordered causal attention.
    a = get_adapter(make_tiny_model("llama"))
    q, k, v = torch.randn(6, 4, 16), torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    want = a.attend(0, q, k, v)
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    got = a.attend(0, q[perm], k[perm], v[perm], q_positions=perm, k_positions=perm)
    assert torch.allclose(got, want[perm], atol=1e-6)


def test_adapter_unsupported_architecture():
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(ValueError, match="unsupported model architecture 'GPT2LMHeadModel'"):
        get_adapter(tf.GPT2LMHeadModel(cfg))
    assert "Qwen3ForCausalLM" in SUPPORTED_ARCHITECTURES


def test_adapter_dynamic_rope_rejected():
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2,
                         rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        get_adapter(tf.LlamaForCausalLM(cfg))
