"""kvblend through vLLM's own CUDA backends, with vLLM's defaults (compile,
CUDA graphs, prefix caching, chunked prefill): a Llama-3-8B-shaped model
with dummy weights, token-id prompts.  For each backend, one engine without
the connector and one with it (each in its own process, through
``benchmarks/bench_vllm_gpu.py`` at 4K tokens): the layout found from the
real cache is logged, reordered prompts are external hits counted in
``num_cached_tokens``, and ratio 1.0 gives vLLM's own greedy tokens.

Runs only where vLLM imports and a GPU is present; skips otherwise.
"""

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
BACKENDS = os.environ.get("KVB_VLLM_BACKENDS", "FLASH_ATTN,TRITON_ATTN").split(",")


def _bench(tmp_path, *args) -> tuple[dict, str]:
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_vllm_gpu.py"), *args,
                        "--lengths", "4096", "--reps", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    text = p.stdout + p.stderr
    if p.returncode != 0 or not out.exists():
        pytest.fail(f"bench_vllm_gpu.py {' '.join(args)} failed (rc={p.returncode}):\n{text[-4000:]}")
    return json.loads(out.read_text()), text


@pytest.mark.parametrize("backend", BACKENDS)
def test_blend_through_vllm_backend(tmp_path, backend):
    base, _ = _bench(tmp_path, "--run", "baseline", "--backend", backend)
    blend, text = _bench(tmp_path, "--run", "blend", "--backend", backend, "--tier", "gpu")
    assert f"kvblend: attention backend {backend}" in text and "layout '" in text, text[-3000:]
    b, r = base["rows"][0], blend["rows"][0]
    kb = r["kvblend"]
    assert (kb["segments_total"], kb["segments_hit"]) == (10, 9)
    assert 0 < kb["tokens_recomputed"] < kb["blend_rows"]
    assert all(c == kb["prefix_rows"] + kb["blend_rows"] for c in r["num_cached_tokens"])
    assert r["check_cached"] > 0.9 * r["tokens"]
    assert r["check_tokens"] == b["check_tokens"]
