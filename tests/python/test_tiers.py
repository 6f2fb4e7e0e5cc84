"""The disk and Redis tiers end to end, with the real SmolLM2 and a real
redis-server on loopback.

What each test shows is a property the tiers promise: a restart finds the
disk entries again; two engine processes share chunks through Redis; a
corrupt or torn disk file and a corrupt Redis value are detected and
recomputed; Redis killed in the middle of a request costs only the reuse,
and reuse comes back with Redis; entries of another model build never hit.
Every blended answer is compared with the same engine's full prefill.
"""

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("kvblend._kvblend")

from kvblend import _clib as clib, _ext, runtime  # noqa: E402
from kvblend.config import Config  # noqa: E402
from kvblend.engine import LLM, KVTransferConfig, SamplingParams  # noqa: E402
from kvblend.prompt import encode, join  # noqa: E402

from redis_server import RedisServer  # noqa: E402
from test_blend import ENV, TEXTS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


# ------------------------------------------------------------------ helpers
def _prompts(tok):
    """A first prompt that stores sys + 3 chunks, and the same chunks
    reordered under another question (4 of its 5 segments stored)."""
    sep = encode(tok, ENV["LMCACHE_BLEND_SPECIAL_STR"])
    sys_ids = encode(tok, "<|im_start|>system\nAnswer briefly from the passages.<|im_end|>\n"
                          "<|im_start|>user\n")
    chunks = [encode(tok, t) for t in TEXTS]

    def q(text):
        return encode(tok, f"\nQuestion: {text}<|im_end|>\n<|im_start|>assistant\n")

    first = join(sys_ids, chunks[:3], q("Which mountain is the highest in Africa?"), sep)
    second = join(sys_ids, [chunks[2], chunks[0], chunks[1]], q("Where is the reef?"), sep)
    return first, second


def _ktc(ratio):
    return KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
                            kv_role="kv_both",
                            kv_connector_extra_config={"kvblend.recompute_ratios": [ratio]})


def _run(llm, ids):
    out = llm.generate({"prompt_token_ids": ids}, GREEDY, return_first_logits=True)[0]
    return out, runtime.request_stats(str(out.request_id)) or {}


def _same_as_full(out, ref):
    diff = (out.first_logits - ref.first_logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def _tiers(llm):
    return llm.worker_connector._conn.tier_stats()


@pytest.fixture
def tier_env(monkeypatch, tmp_path):
    """Blending on, a small host tier, and a disk folder per test."""
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    disk = tmp_path / "kv"
    return monkeypatch, disk


@pytest.fixture
def redis():
    server = RedisServer().start()
    yield server
    server.kill()


@pytest.fixture
def full(smollm2):
    model, tok = smollm2
    return LLM(model=model, tokenizer=tok)


def _store_then_restart(smollm2, monkeypatch, env, ratio=1.0):
    """Engine A stores the first prompt's chunks in the lower tiers and shuts
    down (writes flushed); returns a fresh engine B (empty memory store, the
    tiers reopened) and the two prompts."""
    model, tok = smollm2
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    first, second = _prompts(tok)
    a = LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc(ratio))
    _run(a, first)
    a.shutdown()
    b = LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc(ratio))
    assert b.worker_connector._conn.store_stats()["num_entries"] == 0
    return b, first, second


# -------------------------------------------------------------------- config
def test_tier_settings_parse_and_refuse_bad_values(tmp_path):
    cfg = Config.from_items({"LMCACHE_LOCAL_DISK": f"file://{tmp_path}/kv/",
                             "LMCACHE_MAX_LOCAL_DISK_SIZE": "2",
                             "LMCACHE_REMOTE_URL": "redis://127.0.0.1:1/2",
                             "LMCACHE_REMOTE_SERDE": "naive"})
    assert cfg.local_disk == f"{tmp_path}/kv/" and cfg.max_local_disk_size_gb == 2.0
    assert cfg.remote_url == "redis://127.0.0.1:1/2" and cfg.remote_timeout_ms == 1000
    assert Config.from_items({"LMCACHE_LOCAL_DISK": "None"}).local_disk is None
    bad = [
        ({"LMCACHE_LOCAL_DISK": "/tmp/x"}, "LMCACHE_MAX_LOCAL_DISK_SIZE is 0"),
        ({"LMCACHE_REMOTE_URL": "lm://host:65432"}, "LMCACHE_REMOTE_URL"),
        ({"LMCACHE_REMOTE_SERDE": "cachegen"}, "LMCACHE_REMOTE_SERDE"),
        ({"KVBLEND_REMOTE_TIMEOUT_MS": "0"}, "KVBLEND_REMOTE_TIMEOUT_MS"),
        ({"KVBLEND_REMOTE_PART_SIZE": "1024"}, "KVBLEND_REMOTE_PART_SIZE"),
        ({"LMCACHE_LOCAL_DISK": "s3://bucket/"}, "LMCACHE_LOCAL_DISK"),
    ]
    for items, word in bad:
        with pytest.raises(ValueError, match=word):
            Config.from_items(items)


def test_unusable_disk_or_url_stops_start_up(smollm2, tier_env, tmp_path):
    monkeypatch, _ = tier_env
    model, tok = smollm2
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    monkeypatch.setenv("LMCACHE_LOCAL_DISK", str(not_a_dir))
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_DISK_SIZE", "1")
    with pytest.raises(ValueError, match=str(not_a_dir)):
        LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc(1.0))
    monkeypatch.delenv("LMCACHE_LOCAL_DISK")
    monkeypatch.setenv("LMCACHE_REMOTE_URL", "redis://127.0.0.1:notaport")
    with pytest.raises(ValueError, match="notaport"):
        LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc(1.0))


# ---------------------------------------------------------------------- disk
def test_disk_entries_found_again_after_a_restart(smollm2, tier_env, full):
    monkeypatch, disk = tier_env
    env = {"LMCACHE_LOCAL_DISK": f"file://{disk}/", "LMCACHE_MAX_LOCAL_DISK_SIZE": "1"}
    b, _, second = _store_then_restart(smollm2, monkeypatch, env)
    assert len(list(disk.glob("*.kvb"))) == 5  # sys, 3 chunks and the question
    out, st = _run(b, second)
    assert (st["segments_hit"], st["segments_total"]) == (4, 5)
    assert out.num_cached_tokens > 0  # the scheduler's lookup saw the disk
    _same_as_full(out, full.generate({"prompt_token_ids": second}, GREEDY,
                                     return_first_logits=True)[0])
    d = _tiers(b)["disk"]
    assert d["hits"] == 4 and d["corrupt"] == 0 and d["entries"] >= 4
    import kvblend

    st = kvblend.store_stats()  # this process's worker store, per tier
    assert st["disk"]["hits"] == 4 and st["remote"] is None
    assert st["memory"]["num_entries"] >= 4
    # a disk hit is loaded into memory: the same prompt again hits memory
    before = _tiers(b)["disk"]["lookups"]
    _, st2 = _run(b, second)
    assert st2["segments_hit"] == 5 and _tiers(b)["disk"]["lookups"] == before
    b.shutdown()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_or_torn_disk_file_is_recomputed(smollm2, tier_env, full, damage):
    monkeypatch, disk = tier_env
    env = {"LMCACHE_LOCAL_DISK": str(disk), "LMCACHE_MAX_LOCAL_DISK_SIZE": "1"}
    b, _, second = _store_then_restart(smollm2, monkeypatch, env)
    victim = max(disk.glob("*.kvb"), key=lambda p: p.stat().st_size)  # a chunk, not sys
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40  # one bit in the rows
    else:
        data = data[: len(data) - 100]  # a torn write
    victim.write_bytes(bytes(data))
    out, st = _run(b, second)
    assert st["segments_hit"] == 3  # the damaged chunk is recomputed
    _same_as_full(out, full.generate({"prompt_token_ids": second}, GREEDY,
                                     return_first_logits=True)[0])
    assert _tiers(b)["disk"]["corrupt"] == 1
    b.worker_connector._conn.flush_tiers()
    # dropped from the disk, then stored again from this request's own KV
    assert victim.exists() and victim.read_bytes() != bytes(data)
    b.shutdown()


# --------------------------------------------------------------------- redis
def _worker(spec: dict) -> dict:
    path = os.path.join(spec.pop("dir"), f"spec{time.monotonic_ns()}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    r = subprocess.run([sys.executable, os.path.join(HERE, "tiers_worker.py"), path],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_two_processes_share_chunks_through_redis(smollm2, redis, tmp_path):
    """Instance A stores; instance B, another process with an empty local
    store and no disk, blends a reordered prompt from A's chunks: ratio 1.0
    equals its own full prefill."""
    _, tok = smollm2
    first, second = _prompts(tok)
    env = {**ENV, "LMCACHE_REMOTE_URL": redis.url}
    a = _worker({"dir": str(tmp_path), "env": env, "ratio": 1.0, "prompts": [first]})
    assert a["tiers"]["remote"]["writes"] == 5 and a["tiers"]["remote"]["write_errors"] == 0
    assert len(redis.command("KEYS", "kvblend:*")) >= 5
    # the scheduler's model-free view finds a chunk under A's tier key only
    view = clib.TiersView.open({"LMCACHE_REMOTE_URL": redis.url})
    h = clib.hash_tokens(encode(tok, TEXTS[0]))
    assert view.contains(a["tier_key"], h) is True
    assert view.contains(clib.tier_key(1, 0, 1), h) is False
    assert view.stats()["remote"]["enabled"] is True
    view.close()
    with pytest.raises(_ext.load().InvalidError, match="closed"):
        view.contains(a["tier_key"], h)
    assert clib.TiersView.open({}) is None
    b = _worker({"dir": str(tmp_path), "env": env, "ratio": 1.0, "prompts": [second]})
    r = b["results"][0]
    assert (r["segments_hit"], r["segments_total"]) == (4, 5)
    assert r["num_cached_tokens"] > 0 and r["tokens_equal"] and r["max_diff"] <= 1e-4
    assert b["tiers"]["remote"]["hits"] == 4 and b["tiers"]["remote"]["corrupt"] == 0
    assert b["tier_key"] == a["tier_key"]


@pytest.mark.parametrize("other", [{"dtype": "bfloat16"}, {"perturb": True}])
def test_wrong_model_fingerprint_never_hits(smollm2, redis, tmp_path, other):
    """The chunks the fp32 SmolLM2 stored are never served to a bf16 build
    of it (another KV dtype) nor to a model of the same architecture and
    shape with other weights (a fine-tune): another tier key."""
    _, tok = smollm2
    first, second = _prompts(tok)
    env = {**ENV, "LMCACHE_REMOTE_URL": redis.url}
    a = _worker({"dir": str(tmp_path), "env": env, "ratio": 1.0, "prompts": [first]})
    b = _worker({"dir": str(tmp_path), "env": env, "ratio": 1.0, "prompts": [second], **other})
    assert b["tier_key"] != a["tier_key"]
    assert b["results"][0]["segments_hit"] == 0 and b["results"][0]["num_cached_tokens"] == 0
    assert b["tiers"]["remote"]["hits"] == 0


def test_corrupt_redis_value_is_recomputed(smollm2, tier_env, redis, full):
    monkeypatch, _ = tier_env
    # 0.5 MB parts: every chunk's entry is written in several parts
    b, _, second = _store_then_restart(smollm2, monkeypatch, {"LMCACHE_REMOTE_URL": redis.url,
                                                              "KVBLEND_REMOTE_PART_SIZE": "0.5"})
    _, tok = smollm2
    h = clib.hash_tokens(encode(tok, TEXTS[0]))  # a chunk the second prompt reuses
    parts = redis.command("KEYS", f"kvblend:*:{h:016x}:*")
    assert len(parts) >= 3, parts
    redis.command("SETRANGE", sorted(parts)[1], "100", b"\xff\x00\xff\x00")
    out, st = _run(b, second)
    assert st["segments_hit"] == 3  # the chunk with the damaged part is recomputed
    _same_as_full(out, full.generate({"prompt_token_ids": second}, GREEDY,
                                     return_first_logits=True)[0])
    assert _tiers(b)["remote"]["corrupt"] == 1
    b.shutdown()


def test_redis_killed_mid_request_then_back(smollm2, tier_env, redis, full):
    """Redis dies between the scheduler's lookup and the worker's load: the
    request completes with full prefill's answer (the promised rows are
    recomputed); once Redis is back, requests store and reuse again."""
    monkeypatch, _ = tier_env
    model, tok = smollm2
    b, first, second = _store_then_restart(smollm2, monkeypatch, {"LMCACHE_REMOTE_URL": redis.url})
    worker = b.worker_connector
    begin = worker._begin

    def kill_then_begin(rm):
        redis.kill()
        begin(rm)

    worker._begin = kill_then_begin
    t0 = time.monotonic()
    out, st = _run(b, second)
    worker._begin = begin
    assert out.num_cached_tokens > 0 and st["segments_hit"] == 0
    _same_as_full(out, full.generate({"prompt_token_ids": second}, GREEDY,
                                     return_first_logits=True)[0])
    assert _tiers(b)["remote"]["errors"] >= 1
    assert time.monotonic() - t0 < 60
    # while it is down, requests still run (lookups answer "not stored")
    out2, _ = _run(b, first)
    _same_as_full(out2, full.generate({"prompt_token_ids": first}, GREEDY,
                                      return_first_logits=True)[0])
    b.shutdown()
    # back (empty, as after a crash): a request stores, another instance reuses
    redis.start()
    time.sleep(1.2)  # past the tier's retry interval
    c = LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc(1.0))
    _run(c, first)
    c.shutdown()
    d = LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc(1.0))
    out3, st3 = _run(d, second)
    assert st3["segments_hit"] == 4 and _tiers(d)["remote"]["hits"] == 4
    _same_as_full(out3, full.generate({"prompt_token_ids": second}, GREEDY,
                                      return_first_logits=True)[0])
    d.shutdown()
