"""TTFT of a blended prefill against full prefill, over prompt lengths.

For each target length, chunks are cut from the example's RAG passages
(``--chunk-tokens`` tokens each) until the prompt reaches the length.  The
chunks are stored by a first request; the same chunks in reverse order with
a new question are then blended, and the same prompt runs through the engine
without the connector.  One run, one table of ratios (full / blend).

    python benchmarks/bench_ttft.py [--lengths 1024,2048,4096] [--ratio 0.15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--chunk-tokens", type=int, default=512)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=str(ROOT / "examples" / "data" / "rag_sample.json"))
    ap.add_argument("--json", dest="json_path", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("LMCACHE_ENABLE_BLENDING", "True")
    os.environ.setdefault("LMCACHE_BLEND_SPECIAL_STR", " # # ")
    os.environ.setdefault("LMCACHE_BLEND_CHECK_LAYERS", "1")
    os.environ["LMCACHE_BLEND_RECOMPUTE_RATIOS"] = repr(args.ratio)
    from kvblend import runtime
    from kvblend.engine import LLM, KVTransferConfig, SamplingParams
    from kvblend.prompt import encode, join

    ktc = KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
                           kv_role="kv_both")
    lengths = [int(x) for x in args.lengths.split(",")]
    blend = LLM(model=args.model, kv_transfer_config=ktc, max_model_len=max(lengths) + 1024)
    full = LLM(model=blend.model, tokenizer=blend.tokenizer, max_model_len=max(lengths) + 1024)
    tok = blend.get_tokenizer()
    data = json.loads(Path(args.data).read_text())
    text = " ".join(data[str(i)] for i in range(int(data["chunk_num"])))
    words = encode(tok, text)
    sep = encode(tok, os.environ["LMCACHE_BLEND_SPECIAL_STR"])
    sys_ids = encode(tok, "<|im_start|>system\nAnswer from the passages.<|im_end|>\n<|im_start|>user\n")
    one = SamplingParams(temperature=0.0, max_tokens=1)
    blend.generate({"prompt_token_ids": words[:64]}, one)  # warm-up
    full.generate({"prompt_token_ids": words[:64]}, one)
    rows = []
    for li, length in enumerate(lengths):
        n_chunks = max(2, (length - len(sys_ids)) // (args.chunk_tokens + len(sep)))
        chunks = []
        for c in range(n_chunks):  # distinct chunks per length: tokens rotated through the text
            off = ((li * 97 + c) * args.chunk_tokens) % max(1, len(words) - args.chunk_tokens)
            chunks.append(words[off:off + args.chunk_tokens])
        q1 = encode(tok, f"\nQuestion {li}a: who is mentioned first?<|im_end|>\n<|im_start|>assistant\n")
        q2 = encode(tok, f"\nQuestion {li}b: what happened last?<|im_end|>\n<|im_start|>assistant\n")
        blend.generate({"prompt_token_ids": join(sys_ids, chunks, q1, sep)}, one)  # stores chunks
        prompt = join(sys_ids, chunks[::-1], q2, sep)
        t = time.perf_counter()
        out = blend.generate({"prompt_token_ids": prompt}, one)[0]
        t_blend = out.metrics.ttft or (time.perf_counter() - t)
        st = runtime.request_stats(str(out.request_id)) or {}
        ref = full.generate({"prompt_token_ids": prompt}, one)[0]
        rows.append({"prompt_tokens": len(prompt), "chunks": n_chunks, "ratio": args.ratio,
                     "ttft_full_s": ref.metrics.ttft, "ttft_blend_s": t_blend,
                     "blend_s": st.get("seconds", 0.0),
                     "segments_hit": st.get("segments_hit", 0),
                     "segments_total": st.get("segments_total", 0),
                     "tokens_recomputed": st.get("tokens_recomputed", 0),
                     "speedup": ref.metrics.ttft / t_blend})
    print(f"TTFT, full prefill vs kvblend r={args.ratio} ({args.model}, CPU, "
          f"{os.cpu_count()} cores, one run)")
    print(f"{'tokens':>7} {'chunks':>6} {'hit/total':>9} {'recomp':>7} {'full s':>8} {'blend s':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['prompt_tokens']:>7} {r['chunks']:>6} {str(r['segments_hit']) + '/' + str(r['segments_total']):>9} "
              f"{r['tokens_recomputed']:>7} {r['ttft_full_s']:>8.3f} {r['ttft_blend_s']:>8.3f} {r['speedup']:>5.2f}x")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
