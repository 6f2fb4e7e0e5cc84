"""Where a chunk's KV comes from, and what that costs: TTFT of the seed
example's reordered prompt with its chunks in host memory, on the local disk
and in Redis on loopback, against full prefill, in one run.

For each lower tier, engine A stores the first prompt's chunks and shuts down
(writes flushed); a fresh engine B (empty memory store, the tier reopened, as
after a restart or on another instance) blends the reordered prompt, loading
the chunks from that tier.  The host row blends in the engine that stored
them.  Medians of --repeat fresh engines.

Load bandwidth is the bytes the tier delivered over the time it added to the
host-memory TTFT; the break-even is the load bandwidth at which loading the
chunks would take as long as the prefill it saves (below it, reuse from that
tier no longer pays for a model of this size).  The disk figures come from
the page cache when the files are still cached, as they are right after a
write: they are a best case for a local disk.

    python benchmarks/bench_tiers.py [--repeat 3] [--ratio 0.15] [--json out.json]
        [--device cuda --synthetic]

--synthetic runs a model of SmolLM2's shape with random weights on prompts of
the seed example's shape (3 chunks of --chunk-tokens random ids): the timings
do not depend on the weights, and no model files are needed.  On CUDA the
table adds the GPU-memory tier (KVBLEND_MAX_DEVICE_SIZE) and the host row is
pinned host memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests" / "python"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--passages-per-chunk", type=int, default=2)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--chunk-tokens", type=int, default=1200)
    ap.add_argument("--shape", choices=("smollm2", "llama3-8b"), default="smollm2",
                    help="with --synthetic: the model's shape")
    return ap.parse_args(argv)


SEP_IDS = [2, 3, 2]  # the synthetic prompts' separator (no chunk holds these ids)


def random_model(shape: str):
    """A model of `shape` with random weights: "smollm2" (fp32, on the CPU
    until moved) or "llama3-8b" (bf16, made on the GPU; benchmarks/bench_gpu.py)."""
    import torch
    import transformers as tf

    if shape == "llama3-8b":
        from bench_gpu import build_model

        return build_model()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=16384, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    return tf.LlamaForCausalLM(cfg).eval()


def random_prompts(seed: int, sep: list[int], chunk_tokens: int):
    """The seed example's two prompts over random ids: sys + chunks (0,1,2) +
    question, then sys + chunks (2,0,1) + another question."""
    import torch

    from kvblend.prompt import join

    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(100, 30000, (n,), generator=g).tolist()

    sys_ids, chunks, q1, q2 = ids(40), [ids(chunk_tokens) for _ in range(3)], ids(30), ids(25)
    return (join(sys_ids, chunks, q1, sep),
            join(sys_ids, [chunks[2], chunks[0], chunks[1]], q2, sep))


def main(argv=None) -> int:
    args = parse_args(argv)
    import _prompts as example  # examples/_prompts.py: the seed example's prompts
    from redis_server import RedisServer

    example.set_env(args.ratio)
    from kvblend import runtime
    from kvblend.engine import LLM, KVTransferConfig, SamplingParams
    from kvblend.models import load_model

    extra = {}
    if args.synthetic:
        model = random_model(args.shape)
        tok, sep = None, SEP_IDS
        extra["kvblend.separator_ids"] = SEP_IDS
        p1, p2 = random_prompts(1, sep, args.chunk_tokens)
    else:
        model, tok = load_model(args.model)
        sep = tok.encode(os.environ["LMCACHE_BLEND_SPECIAL_STR"], add_special_tokens=False)
        p1, p2 = example.build_prompts(tok, str(ROOT / "examples" / "data" / "rag_sample.json"),
                                       args.passages_per_chunk)
    # other chunks, blended before each measured request: CUDA graphs,
    # compilation and the tiers' connections are warm when it is timed
    w1, w2 = random_prompts(2, sep, args.chunk_tokens)
    model = model.to(args.device)
    max_len = max(8192, len(p1) + 64)
    gpu = args.device != "cpu"

    def engine(env: dict, save: bool = True):
        """An engine with a fresh store; `env` names its tiers.  A reader
        (save=False) adds nothing to them, so every repeat finds the same."""
        for k in ("LMCACHE_LOCAL_DISK", "LMCACHE_MAX_LOCAL_DISK_SIZE", "LMCACHE_REMOTE_URL",
                  "KVBLEND_MAX_DEVICE_SIZE"):
            os.environ.pop(k, None)
        os.environ.update(env)
        ktc = KVTransferConfig(kv_connector="KVBlendConnector",
                               kv_connector_module_path="kvblend.vllm", kv_role="kv_both",
                               kv_connector_extra_config={**extra, "kvblend.save": save})
        return LLM(model=model, tokenizer=tok, kv_transfer_config=ktc, max_model_len=max_len)

    one = SamplingParams(temperature=0.0, max_tokens=1)

    def sync():
        if gpu:
            import torch

            torch.cuda.synchronize()

    def ttft(llm, ids):
        sync()
        t0 = time.perf_counter()
        out = llm.generate({"prompt_token_ids": ids}, one)[0]
        sync()
        wall = time.perf_counter() - t0
        return wall, runtime.request_stats(str(out.request_id)) or {}

    full = LLM(model=model, tokenizer=tok, max_model_len=max_len)
    full.generate({"prompt_token_ids": w2}, one)  # warm-up
    full_t = statistics.median(ttft(full, p2)[0] for _ in range(args.repeat))

    tmp = Path(tempfile.mkdtemp(prefix="kvb_bench_tiers_"))
    redis = RedisServer().start()
    rows = []
    try:
        # memory: the engine that stored the chunks blends (a warm-up
        # request first, so one-time costs are not in the first row)
        memory = {"host memory" if not gpu else "pinned host memory": {}}
        if gpu:
            memory = {"GPU memory": {"KVBLEND_MAX_DEVICE_SIZE": "4"}, **memory}
        for label, env in memory.items():
            times, st = [], {}
            for _ in range(args.repeat):
                a = engine(env)
                ttft(a, w1)
                ttft(a, w2)  # a warm-up blend
                ttft(a, p1)
                t, st = ttft(a, p2)
                times.append(t)
                a.shutdown()
            rows.append({"tier": label, "ttft_s": statistics.median(times),
                         "segments_hit": st.get("segments_hit", 0),
                         "segments_total": st.get("segments_total", 0), "bytes": 0})
        tiers = {"disk": {"LMCACHE_LOCAL_DISK": str(tmp / "disk"),
                          "LMCACHE_MAX_LOCAL_DISK_SIZE": "20"},
                 "remote": {"LMCACHE_REMOTE_URL": redis.url}}
        for name, env in tiers.items():
            a = engine(env)
            ttft(a, w1)
            ttft(a, p1)
            a.shutdown()
            times, loaded = [], []
            for _ in range(args.repeat):
                b = engine(env, save=False)
                ttft(b, w2)  # a warm-up blend, its chunks from the same tier
                before = b.worker_connector._conn.tier_stats()[name]["bytes_read"]
                t, st = ttft(b, p2)
                stats = b.worker_connector._conn.tier_stats()[name]
                times.append(t)
                loaded.append(stats["bytes_read"] - before)
                b.shutdown()
            rows.append({"tier": "local disk" if name == "disk" else "Redis (loopback)",
                         "ttft_s": statistics.median(times),
                         "segments_hit": st.get("segments_hit", 0),
                         "segments_total": st.get("segments_total", 0),
                         "bytes": int(statistics.median(loaded))})
    finally:
        redis.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    host_t = min(r["ttft_s"] for r in rows if not r["bytes"])
    stored = max(r["bytes"] for r in rows)
    saved = full_t - host_t  # prefill time reuse saves, before any load
    breakeven = stored / saved if saved > 0 else float("nan")
    name = f"{args.shape}-shaped, random weights" if args.synthetic else args.model
    print(f"model: {name}   "
          f"device: {args.device}   prompt: {len(p2)} tokens   recompute ratio: {args.ratio}   "
          f"repeat: {args.repeat} (medians)")
    print(f"full prefill TTFT: {full_t:.3f} s")
    print(f"{'chunks in':<18}{'hit/total':>10}{'MB loaded':>11}{'TTFT s':>9}{'vs full':>9}"
          f"{'load GB/s':>11}")
    for r in rows:
        r["ratio"] = full_t / r["ttft_s"] if r["ttft_s"] > 0 else float("nan")
        extra_t = r["ttft_s"] - host_t
        r["load_gbps"] = (r["bytes"] / extra_t / 1e9) if r["bytes"] and extra_t > 0 else None
        bw = f"{r['load_gbps']:.2f}" if r["load_gbps"] else "-"
        hits = f"{r['segments_hit']}/{r['segments_total']}"
        print(f"{r['tier']:<18}{hits:>10}{r['bytes'] / 1e6:>11.1f}"
              f"{r['ttft_s']:>9.3f}{r['ratio']:>8.2f}x{bw:>11}")
    if saved > 0:
        print(f"\nbreak-even load bandwidth: {breakeven / 1e9:.3f} GB/s "
              f"({stored / 1e6:.0f} MB of chunk KV against {saved:.3f} s of prefill saved); "
              "a tier slower than this makes reuse cost more than recomputing")
    else:
        print(f"\nno break-even: blending from memory ({host_t:.3f} s) is already no faster "
              f"than full prefill ({full_t:.3f} s) for this model here, so no tier pays")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(
            {"model": args.model, "prompt_tokens": len(p2), "ratio": args.ratio,
             "device": args.device, "synthetic": args.synthetic, "shape": args.shape,
             "full_ttft_s": full_t, "rows": rows,
             "breakeven_gbps": breakeven / 1e9 if saved > 0 else None}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
