"""examples/blend_builtin.py end to end on SmolLM2 (one passage per chunk,
~1.9K-token prompts): a blend reports its hits and the TTFT ratio; with
blending off the example says so instead of passing the ratio off as a blend."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "blend_builtin.py"


def _run_example(tmp_path, enable: str) -> tuple[str, dict]:
    """(stdout, --json results) of the example with LMCACHE_ENABLE_BLENDING=enable
    and the example's defaults for every other setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMCACHE_", "KVBLEND_"))}
    env["LMCACHE_ENABLE_BLENDING"] = enable
    out = tmp_path / "results.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--passages-per-chunk", "1", "--max-tokens", "2",
                        "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, json.loads(out.read_text())


def test_example_blends_and_reports_the_ratio(smollm2, tmp_path):
    stdout, res = _run_example(tmp_path, "True")
    first, reordered, full = res["requests"]
    assert res["blended"] is True
    # system prompt + the 3 chunks are stored; the question is new
    assert (reordered["segments_hit"], reordered["segments_total"]) == (4, 5)
    assert 0 < reordered["tokens_recomputed"] < reordered["blend_rows"] < reordered["prompt_tokens"]
    assert reordered["num_cached_tokens"] == reordered["blend_rows"]
    assert full["segments_total"] == 0 and full["num_cached_tokens"] == 0
    assert res["ttft_ratio"] == full["ttft_s"] / reordered["ttft_s"]
    assert "TTFT ratio (full prefill / blended), same prompt:" in stdout
    assert "WARNING" not in stdout


def test_example_with_blending_off_says_so(smollm2, tmp_path):
    stdout, res = _run_example(tmp_path, "False")
    assert res["blended"] is False
    assert all(r["segments_hit"] == 0 and r["num_cached_tokens"] == 0 for r in res["requests"])
    assert "WARNING: blending is OFF (LMCACHE_ENABLE_BLENDING='False')" in stdout
    assert "NOT a blend" in stdout and "(full prefill / blended)" not in stdout
