"""The correctness gate (kvblend.gate) at connector start-up.

It passes on every supported family with errors at fp32 rounding, and it
refuses to start, naming the model and what differed, when kvblend's view of
the model is wrong: a RoPE style, base, partial rotary or scaling that is
not the model's, or a layer piece (q/k norm) the adapter leaves out.
KVBLEND_SELF_TEST=0 skips it, with a warning.
"""

import dataclasses

import pytest
import torch

pytest.importorskip("kvblend._kvblend")

from kvblend.model import hf  # noqa: E402
from kvblend.engine import LLM  # noqa: E402
from kvblend.gate import SelfTestError  # noqa: E402

from conftest import make_tiny_model  # noqa: E402
from test_blend import _ktc  # noqa: E402


class _Tok:
    def encode(self, text, add_special_tokens=False):
        return [7, 9]


def _engine(model, monkeypatch, **env):
    monkeypatch.setenv("LMCACHE_ENABLE_BLENDING", "True")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return LLM(model=model, tokenizer=_Tok(), kv_transfer_config=_ktc(), max_model_len=512)


@pytest.mark.parametrize("kind", ["llama", "llama3", "mistral", "qwen2", "qwen3", "yarn"])
def test_gate_passes_on_every_family(kind, monkeypatch):
    llm = _engine(make_tiny_model(kind), monkeypatch)
    rep = llm.worker_connector.self_test_report
    assert rep is not None and rep["reference"] == "model forward"
    assert rep["key_error"] < 1e-5 and rep["value_error"] < 1e-6
    assert rep["logits_error"] < 1e-4 and rep["same_top_token"]
    llm.shutdown()


def test_gate_passes_on_smollm2(smollm2, monkeypatch):
    model, tok = smollm2
    monkeypatch.setenv("LMCACHE_ENABLE_BLENDING", "True")
    llm = LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc())
    rep = llm.worker_connector.self_test_report
    assert rep["key_error"] < 1e-5 and rep["logits_error"] < 1e-4
    llm.shutdown()


def _wrong(spec, how):
    half = spec.inv_freq.numel() // 2
    return {
        "style": lambda: dataclasses.replace(spec, style="gptj"),
        "base": lambda: dataclasses.replace(spec, inv_freq=spec.inv_freq ** 1.05),
        "partial": lambda: dataclasses.replace(spec, inv_freq=spec.inv_freq[:half].clone(),
                                               rotary_dim=2 * half),
        "scaling": lambda: dataclasses.replace(spec, attention_scaling=1.2),
    }[how]()


@pytest.mark.parametrize("how", ["style", "base", "partial", "scaling"])
def test_gate_refuses_a_wrong_rope(how, monkeypatch):
    real = hf._rope_spec
    monkeypatch.setattr(hf, "_rope_spec", lambda m: _wrong(real(m), how))
    with pytest.raises(SelfTestError) as e:
        _engine(make_tiny_model("llama3"), monkeypatch)
    msg = str(e.value)
    assert "LlamaForCausalLM" in msg and "self-test failed" in msg and "KVBLEND_SELF_TEST=0" in msg
    if how == "scaling":
        # re-rotating by the position delta is a pure rotation (the factor
        # was applied once, when the key was computed): the stored keys load
        # right, the fresh rows the adapter computes do not
        assert "ratio 1.0" in msg and "own prefill" in msg
    else:
        assert "re-rotated" in msg and "RoPE for this model" in msg


def test_gate_refuses_a_missing_layer_piece(monkeypatch):
    """Keys stored from the model's own prefill re-rotate right, but the
    adapter's own layer math (here without qwen3's k/q norms) does not
    reproduce the model: the ratio-1.0 comparison catches it."""
    real = hf.HFAdapter.__init__

    def no_qk_norm(self, model):
        real(self, model)
        self.has_qk_norm = False
    monkeypatch.setattr(hf.HFAdapter, "__init__", no_qk_norm)
    with pytest.raises(SelfTestError, match=r"Qwen3ForCausalLM.*ratio 1\.0.*own prefill"):
        _engine(make_tiny_model("qwen3"), monkeypatch)


def test_gate_opt_out_starts_with_a_warning(monkeypatch, caplog):
    real = hf._rope_spec
    monkeypatch.setattr(hf, "_rope_spec", lambda m: _wrong(real(m), "base"))
    with caplog.at_level("WARNING", logger="kvblend"):
        llm = _engine(make_tiny_model("llama"), monkeypatch, KVBLEND_SELF_TEST="0")
    assert llm.worker_connector.self_test_report is None
    assert any("without the start-up self-test" in r.message for r in caplog.records)
    llm.shutdown()


def test_gate_runs_whatever_tiers_the_engine_uses(monkeypatch):
    """A device-only engine (LMCACHE_LOCAL_CPU=False) still passes the gate:
    its scratch store brings its own host pool instead of inheriting none."""
    llm = _engine(make_tiny_model("llama"), monkeypatch, LMCACHE_LOCAL_CPU="False")
    assert llm.worker_connector.self_test_report["same_top_token"]
    llm.shutdown()


def test_gate_leaves_the_store_empty(monkeypatch):
    """The gate's synthetic chunks live in a scratch connector: the engine's
    store starts empty."""
    llm = _engine(make_tiny_model("llama"), monkeypatch)
    assert llm.worker_connector.blend_stats()["store"]["num_entries"] == 0
    assert torch.is_tensor(llm.kv_caches[llm.layer_names[0]])
    llm.shutdown()
