"""TTFT through vLLM on a GPU: kvblend's connector against the same vLLM
without it, with vLLM's defaults (torch.compile, CUDA graphs, chunked
prefill, prefix caching, multiprocessing).

A Llama-3-8B-shaped model with dummy weights (no weights to carry; token
ids as prompts, no tokenizer).  Each configuration runs in its own process
(one vLLM engine with a KV connector per process):

    python benchmarks/bench_vllm_gpu.py --run baseline --backend FLASH_ATTN --json b.json
    python benchmarks/bench_vllm_gpu.py --run blend --tier gpu --backend FLASH_ATTN --json g.json
    python benchmarks/bench_vllm_gpu.py --table b.json g.json ...   # the ratio table

Per prompt length: a first prompt (sys + 8 chunks + question) stores the
chunks; then ``--reps`` prompts with the same chunks rotated (new to vLLM's
prefix cache past the system prompt) and a new question are timed (wall
time of one generate with max_tokens=1, the median); then a last reordered
prompt generates 8 greedy tokens, at recompute ratio 1.0 for the blend
(per-request ``extra_args``), for the correctness check against the
baseline's tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

SEP = [128000 - 7, 128000 - 6, 128000 - 5]
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_hidden_layers": 32, "vocab_size": 128256, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": 128001,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}
N_CHUNKS = 8


# --compile: kvblend.compile (None: the product default)
COMPILE = {"default": None, "on": True, "off": False}


def model_dir() -> str:
    d = Path(tempfile.gettempdir()) / "kvblend-llama3-8b-shape"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(LLAMA3_8B))
    return str(d)


def prompts(length: int, reps: int, seed: int = 0):
    """(first, [timed...], check) token-id prompts of about ``length`` tokens."""
    rnd = random.Random(seed + length)

    def piece(n):
        return [rnd.randrange(1000, 120000) for _ in range(n)]

    sys_ids = piece(64)
    chunk_len = (length - 64 - 40 - 3 * (N_CHUNKS + 1)) // N_CHUNKS
    chunks = [piece(chunk_len) for _ in range(N_CHUNKS)]

    def join(order, q):
        out = list(sys_ids)
        for i in order:
            out += SEP + chunks[i]
        return out + SEP + q

    first = join(range(N_CHUNKS), piece(40))
    timed = [join([(i + r + 1) % N_CHUNKS for i in range(N_CHUNKS)], piece(40))
             for r in range(reps)]
    check = join([N_CHUNKS - 1 - i for i in range(N_CHUNKS)], piece(40))
    return first, timed, check


def run(args) -> dict:
    os.environ["LMCACHE_ENABLE_BLENDING"] = "True" if args.run == "blend" else "False"
    os.environ.setdefault("LMCACHE_BLEND_CHECK_LAYERS", "1")
    os.environ.setdefault("LMCACHE_BLEND_RECOMPUTE_RATIOS", str(args.ratio))
    if args.tier == "gpu":
        os.environ["KVBLEND_MAX_DEVICE_SIZE"] = "24"
        os.environ["LMCACHE_MAX_LOCAL_CPU_SIZE"] = "0"
    else:
        os.environ["KVBLEND_MAX_DEVICE_SIZE"] = "0"
        os.environ["LMCACHE_MAX_LOCAL_CPU_SIZE"] = "24"
    from vllm import LLM, SamplingParams

    kw = {}
    if args.backend:
        kw["attention_config"] = {"backend": args.backend}
    if args.run == "blend":
        from vllm.config import KVTransferConfig

        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"kvblend.separator_ids": SEP, "kvblend.timing": args.timing,
                                       "kvblend.profile": args.profile,
                                       "kvblend.compile": COMPILE[args.compile],
                                       "kvblend.subset_attention": args.subset_attention})
    lengths = [int(x) for x in args.lengths.split(",")]
    llm = LLM(model=model_dir(), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=max(lengths) + 256, gpu_memory_utilization=args.gpu_mem, seed=0,
              **kw)
    one = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    rows = []
    for n in lengths:
        first, timed, check = prompts(n, args.reps)
        warm = [random.Random(n).randrange(1000, 120000) for _ in range(n)]
        llm.generate({"prompt_token_ids": warm}, one, use_tqdm=False)  # compile and graphs
        llm.generate({"prompt_token_ids": first}, one, use_tqdm=False)  # stores the chunks
        times, cached, kb = [], [], {}
        for p in timed:
            t0 = time.perf_counter()
            out = llm.generate({"prompt_token_ids": p}, one, use_tqdm=False)[0]
            times.append(time.perf_counter() - t0)
            cached.append(int(out.num_cached_tokens or 0))
            kb = (getattr(out, "kv_transfer_params", None) or {}).get("kvblend") or {}
        extra = {"kvblend_recompute_ratio": 1.0} if args.run == "blend" else None
        sp = SamplingParams(max_tokens=8, temperature=0.0, detokenize=False, ignore_eos=True,
                            extra_args=extra)
        out = llm.generate({"prompt_token_ids": check}, sp, use_tqdm=False)[0]
        rows.append({"tokens": len(timed[0]), "ttft_s": statistics.median(times),
                     "ttft_all_s": times, "num_cached_tokens": cached, "kvblend": kb,
                     "check_tokens": list(out.outputs[0].token_ids),
                     "check_cached": int(out.num_cached_tokens or 0)})
        print(json.dumps(rows[-1]), flush=True)
    return {"run": args.run, "tier": args.tier, "backend": args.backend or "default",
            "ratio": args.ratio, "timing": args.timing, "compile": COMPILE[args.compile],
            "subset_attention": args.subset_attention, "rows": rows}


def table(paths: list[str]) -> str:
    """Markdown table of every blend run's TTFT against the baseline of the
    same backend (same machine, same call)."""
    res = [json.loads(Path(p).read_text()) for p in paths if Path(p).exists()]
    base = {r["backend"]: r for r in res if r["run"] == "baseline"}
    lines = ["| backend | run | tier | tokens | TTFT s | vLLM full prefill s | speed-up | "
             "cached tokens | segments hit | rows recomputed | r=1.0 tokens == vLLM |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res:
        b = base.get(r["backend"])
        for i, row in enumerate(r["rows"]):
            ref = b["rows"][i] if b else None
            sp = f"{ref['ttft_s'] / row['ttft_s']:.2f}x" if ref else "-"
            same = "-" if not ref or r["run"] == "baseline" else \
                str(row["check_tokens"] == ref["check_tokens"])
            kb = row.get("kvblend") or {}
            run = r["run"] + (" (phase timing)" if r.get("timing") else "") + \
                (f" ({'compiled' if r['compile'] else 'eager'} pieces)"
                 if r["run"] == "blend" and r.get("compile") is not None else "") + \
                (f" ({r['subset_attention']})" if r["run"] == "blend" and
                 r.get("subset_attention", "flex") != "flex" else "")
            lines.append(f"| {r['backend']} | {run} | {r['tier'] if r['run'] == 'blend' else '-'} "
                         f"| {row['tokens']} | {row['ttft_s']:.4f} | "
                         f"{ref['ttft_s']:.4f} | {sp} | {row['num_cached_tokens'][-1]} | "
                         f"{kb.get('segments_hit', '-')}/{kb.get('segments_total', '-')} | "
                         f"{kb.get('tokens_recomputed', '-')} | {same} |"
                         if ref else f"| {r['backend']} | {r['run']} | - | {row['tokens']} | "
                         f"{row['ttft_s']:.4f} | - | - | - | - | - | - |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", choices=("baseline", "blend"))
    p.add_argument("--tier", choices=("gpu", "host"), default="gpu")
    p.add_argument("--backend", default=None, help="FLASH_ATTN, TRITON_ATTN, FLASHINFER")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--profile", default=None,
                   help="blend runs: append a torch.profiler table of every blend to this file")
    p.add_argument("--timing", action="store_true",
                   help="blend runs: log each blend's device time per phase (CUDA events, one "
                        "synchronize at the end of the blend, so the TTFT of such a run is not "
                        "the figure to quote)")
    p.add_argument("--compile", default="default", choices=tuple(COMPILE),
                   help="blend runs: kvblend.compile (default: the product's, eager under vLLM)")
    p.add_argument("--subset-attention", default="flex", choices=("flex", "sdpa", "fa3"),
                   help="blend runs: kvblend.subset_attention")
    p.add_argument("--lengths", default="4096,8192,16384")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--gpu-mem", type=float, default=0.55)
    p.add_argument("--json", default=None)
    p.add_argument("--table", nargs="*", default=None, help="print the table of these results")
    args = p.parse_args(argv)
    if args.table is not None:
        print(table(args.table))
        return 0
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
