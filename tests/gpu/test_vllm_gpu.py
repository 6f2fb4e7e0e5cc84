"""kvblend through vLLM's own CUDA backends, with vLLM's defaults (compile,
CUDA graphs, prefix caching, chunked prefill): a Llama-3-8B-shaped model
with dummy weights, token-id prompts.  For each backend, one engine without
the connector and one with it (each in its own process, through
``benchmarks/bench_vllm_gpu.py`` at 4K tokens): the layout found from the
real cache is logged, reordered prompts are external hits counted in
``num_cached_tokens``, and ratio 1.0 gives vLLM's own greedy tokens.

Runs only where vLLM imports and a GPU is present; skips otherwise.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="vLLM is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
# FLASHINFER where its package is installed (an optional piece of the GPU
# bundle; its kernels are compiled on first use)
_DEFAULT_BACKENDS = "FLASH_ATTN,TRITON_ATTN" + (
    ",FLASHINFER" if importlib.util.find_spec("flashinfer") is not None else "")
BACKENDS = os.environ.get("KVB_VLLM_BACKENDS", _DEFAULT_BACKENDS).split(",")


def _bench(tmp_path, *args) -> tuple[dict, str]:
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_vllm_gpu.py"), *args,
                        "--lengths", "4096", "--reps", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    text = p.stdout + p.stderr
    if p.returncode != 0 or not out.exists():
        pytest.fail(f"bench_vllm_gpu.py {' '.join(args)} failed (rc={p.returncode}):\n{text[-4000:]}")
    return json.loads(out.read_text()), text


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """vLLM without the connector, one run per backend for the module."""
    runs = {}

    def get(backend):
        if backend not in runs:
            runs[backend] = _bench(tmp_path_factory.mktemp("base"), "--run", "baseline",
                                   "--backend", backend)[0]
        return runs[backend]
    return get


@pytest.mark.parametrize("backend", BACKENDS)
def test_blend_through_vllm_backend(tmp_path, baseline, backend):
    base = baseline(backend)
    blend, text = _bench(tmp_path, "--run", "blend", "--backend", backend, "--tier", "gpu")
    assert f"kvblend: attention backend {backend}" in text and "layout '" in text, text[-3000:]
    # under vLLM's defaults the blend replays its layer pieces from CUDA
    # graphs; they are not compiled unless asked (kvblend.compile)
    assert "layer pieces eager, CUDA graphs" in text, text[-3000:]
    b, r = base["rows"][0], blend["rows"][0]
    kb = r["kvblend"]
    assert (kb["segments_total"], kb["segments_hit"]) == (10, 9)
    assert 0 < kb["tokens_recomputed"] < kb["blend_rows"]
    assert all(c == kb["prefix_rows"] + kb["blend_rows"] for c in r["num_cached_tokens"])
    assert r["check_cached"] > 0.9 * r["tokens"]
    assert r["check_tokens"] == b["check_tokens"]


def test_fa3_subset_attention_through_vllm(tmp_path, baseline):
    """{"kvblend.subset_attention": "fa3"} (vLLM's FlashAttention 3 over key
    blocks) through vLLM's FLASH_ATTN backend: the r=0.15 blends run its
    kernels from CUDA graphs (no fallback logged; their numbers are checked
    against the CPU reference in test_gpu.py) and ratio 1.0 still gives
    vLLM's own greedy tokens."""
    from kvblend.model.attention import flash_attn_v3

    if flash_attn_v3()[0] is None:
        pytest.skip(flash_attn_v3()[1])
    base = baseline("FLASH_ATTN")
    blend, text = _bench(tmp_path, "--run", "blend", "--backend", "FLASH_ATTN", "--tier", "gpu",
                         "--subset-attention", "fa3")
    assert "FlashAttention 3 subset attention failed" not in text, text[-3000:]
    assert "CUDA graph capture failed" not in text, text[-3000:]
    r = blend["rows"][0]
    assert (r["kvblend"]["segments_total"], r["kvblend"]["segments_hit"]) == (10, 9)
    assert r["check_tokens"] == base["rows"][0]["check_tokens"]
