"""kvblend's seed example: reuse stored chunk KV in a reordered prompt.

Prompts are built as LMCache's blend example builds them, from token ids:
    system prompt + sep + chunk1 + sep + chunk2 + sep + chunk3 + sep + question
with each piece tokenized on its own (no BOS) and `sep` the token ids of
LMCACHE_BLEND_SPECIAL_STR.  The first request stores every chunk; the second
puts the same chunks in another order with another question and reuses all
of them.  The same second prompt then runs through an engine without the
connector (full prefill) for the TTFT ratio; with vLLM that engine runs in a
child process, since one process holds one vLLM engine with a connector.

    python examples/blend.py [--engine auto|builtin|vllm] [--model smollm2]
                             [--ratio 0.15] [--max-tokens 24] [--json out.json]

Set the LMCACHE_* variables first (scripts/example.sh does); --ratio
overrides LMCACHE_BLEND_RECOMPUTE_RATIOS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = ("You are a helpful assistant. Answer the question using only the passages "
          "below, in a few words.")
QUESTION_2 = ("Which record labels did the performer release music on? "
              "Answer within 10 words.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=("auto", "builtin", "vllm"), default="auto")
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or an HF model folder")
    p.add_argument("--ratio", type=float, default=None,
                   help="recompute ratio (default: LMCACHE_BLEND_RECOMPUTE_RATIOS or 0.15)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--passages-per-chunk", type=int, default=2,
                   help="passages of the sample per chunk (2 gives a ~4K-token prompt)")
    p.add_argument("--data", default=str(HERE / "data" / "rag_sample.json"))
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    p.add_argument("--full-prefill-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def set_env(ratio):
    """Apply LMCache's blend settings unless the user already set them."""
    defaults = {
        "LMCACHE_ENABLE_BLENDING": "True", "LMCACHE_BLEND_SPECIAL_STR": " # # ",
        "LMCACHE_USE_LAYERWISE": "True", "LMCACHE_BLEND_CHECK_LAYERS": "1",
        "LMCACHE_BLEND_RECOMPUTE_RATIOS": "0.15", "LMCACHE_LOCAL_CPU": "True",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "5", "LMCACHE_CHUNK_SIZE": "256",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    if ratio is not None:
        os.environ["LMCACHE_BLEND_RECOMPUTE_RATIOS"] = repr(float(ratio))


def build_prompts(tokenizer, data_path, per_chunk):
    """Token ids of the two prompts: chunks (0,1,2) with the sample's question,
    then chunks (2,0,1) with another question."""
    from kvblend.prompt import chat_pieces, encode, join

    data = json.loads(Path(data_path).read_text())
    passages = [data[str(i)] for i in range(int(data["chunk_num"]))]
    chunks = ["".join(passages[i:i + per_chunk]) for i in range(0, per_chunk * 3, per_chunk)]
    if len(chunks) != 3 or any(not c for c in chunks):
        raise SystemExit(f"{data_path}: needs {3 * per_chunk} passages for 3 chunks")
    before, after = chat_pieces(tokenizer, SYSTEM)
    sep = encode(tokenizer, os.environ["LMCACHE_BLEND_SPECIAL_STR"])
    sys_ids = encode(tokenizer, before)
    chunk_ids = [encode(tokenizer, c) for c in chunks]
    q1 = encode(tokenizer, data["query"].strip() + after)
    q2 = encode(tokenizer, "\n\nQuestion: " + QUESTION_2 + "\nAnswer:" + after)
    return (join(sys_ids, [chunk_ids[i] for i in (0, 1, 2)], q1, sep),
            join(sys_ids, [chunk_ids[i] for i in (2, 0, 1)], q2, sep))


def make_engines(kind, model):
    """(blend engine, full-prefill engine, SamplingParams class, name)."""
    if kind == "auto":
        try:
            import vllm  # noqa: F401
            kind = "vllm"
        except ImportError:
            kind = "builtin"
    if kind in ("vllm", "vllm-full"):
        from vllm import LLM, SamplingParams
        from vllm.config import KVTransferConfig

        from kvblend.models import resolve_model_path

        path = resolve_model_path(model)
        # vLLM's defaults otherwise: multiprocessing, chunked prefill,
        # prefix caching, compilation
        common = dict(model=path, max_model_len=8192, dtype="float32")
        if kind == "vllm-full":
            return None, LLM(**common), SamplingParams, "vllm"
        ktc = KVTransferConfig(kv_connector="KVBlendConnector",
                               kv_connector_module_path="kvblend.vllm", kv_role="kv_both")
        # vLLM keeps the KV-transfer group per process: the engine without
        # the connector runs in a child process (see full_prefill_in_child)
        return LLM(kv_transfer_config=ktc, **common), None, SamplingParams, "vllm"
    from kvblend._vllm_compat import KVTransferConfig as KTC
    from kvblend.engine import LLM, SamplingParams

    ktc = KTC(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
              kv_role="kv_both")
    blend = LLM(model=model, kv_transfer_config=ktc)
    full = LLM(model=blend.model, tokenizer=blend.tokenizer)
    return blend, full, SamplingParams, "builtin"


def run_one(llm, ids, sp, label, blended=True):
    """Generate for one prompt; return a result row (blend statistics only
    for the engine with the connector)."""
    from kvblend import runtime

    t0 = time.perf_counter()
    out = llm.generate({"prompt_token_ids": ids}, sp)[0]
    wall = time.perf_counter() - t0
    ttft = _ttft(out, wall)
    # vLLM (any process layout): the figures come back in kv_transfer_params;
    # the built-in engine also records them in the process
    st = (getattr(out, "kv_transfer_params", None) or {}).get("kvblend") if blended else {}
    if blended and not st:
        st = runtime.request_stats(str(out.request_id)) or {}
    return {
        "label": label,
        "prompt_tokens": len(ids),
        "ttft_s": ttft,
        "segments_total": int(st.get("segments_total", 0)),
        "segments_hit": int(st.get("segments_hit", 0)),
        "tokens_recomputed": int(st.get("tokens_recomputed", 0)),
        "blend_rows": int(st.get("blend_rows", 0)),
        "num_cached_tokens": int(getattr(out, "num_cached_tokens", 0) or 0),
        "text": out.outputs[0].text,
    }


def _ttft(out, wall):
    """Time to first token from the output's metrics (engine-specific)."""
    m = getattr(out, "metrics", None)
    if m is not None:
        for name in ("ttft", "first_token_latency"):
            v = getattr(m, name, None)
            if v:
                return float(v)
        first, arrival = getattr(m, "first_token_time", None), getattr(m, "arrival_time", None)
        if first and arrival:
            return float(first - arrival)
    return wall


def full_prefill_in_child(argv):
    """Run this script with --full-prefill-child (a vLLM engine without the
    connector) and return its result row for the reordered prompt."""
    import subprocess

    argv = list(sys.argv[1:] if argv is None else argv)
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv,
                        "--full-prefill-child"], capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("FULL_PREFILL_ROW "):
            return json.loads(line.split(" ", 1)[1])
    raise SystemExit(f"full-prefill child failed (rc={p.returncode}):\n{p.stderr[-3000:]}")


def main(argv=None):
    args = parse_args(argv)
    set_env(args.ratio)
    if args.full_prefill_child:
        _, full, SamplingParams, _ = make_engines("vllm-full", args.model)
        _, p2 = build_prompts(full.get_tokenizer(), args.data, args.passages_per_chunk)
        full.generate({"prompt_token_ids": p2[:64]}, SamplingParams(temperature=0.0, max_tokens=1))
        row = run_one(full, p2, SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
                      "reordered, full prefill", blended=False)
        print("FULL_PREFILL_ROW " + json.dumps(row), flush=True)
        return 0
    kind = args.engine
    if kind == "auto":
        try:
            import vllm  # noqa: F401
            kind = "vllm"
        except ImportError:
            kind = "builtin"
    # with vLLM the full prefill runs first, in a child process, so the two
    # engines never hold memory or cores at the same time
    full_row = full_prefill_in_child(argv) if kind == "vllm" else None
    blend, full, SamplingParams, engine = make_engines(kind, args.model)
    tok = blend.get_tokenizer()
    p1, p2 = build_prompts(tok, args.data, args.passages_per_chunk)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    warm = SamplingParams(temperature=0.0, max_tokens=1)
    # warm-up both engines on a short prompt (one-time kernel and allocator costs)
    blend.generate({"prompt_token_ids": p1[:64]}, warm)
    if full is not None:
        full.generate({"prompt_token_ids": p1[:64]}, warm)

    rows = [run_one(blend, p1, sp, "first (stores chunks)"),
            run_one(blend, p2, sp, "reordered (reuses chunks)"),
            full_row or run_one(full, p2, sp, "reordered, full prefill", blended=False)]
    ratio = rows[2]["ttft_s"] / rows[1]["ttft_s"] if rows[1]["ttft_s"] > 0 else float("nan")
    print(f"engine: {engine}   model: {args.model}   recompute ratio: "
          f"{os.environ['LMCACHE_BLEND_RECOMPUTE_RATIOS']}   check layers: "
          f"{os.environ['LMCACHE_BLEND_CHECK_LAYERS']}")
    print(f"{'request':<28}{'tokens':>7}{'TTFT s':>9}{'hit/total':>11}{'recomputed':>12}"
          f"{'cached':>8}")
    for r in rows:
        print(f"{r['label']:<28}{r['prompt_tokens']:>7}{r['ttft_s']:>9.3f}"
              f"{str(r['segments_hit']) + '/' + str(r['segments_total']):>11}{r['tokens_recomputed']:>12}"
              f"{r['num_cached_tokens']:>8}")
    for r in rows:
        print(f"\n[{r['label']}] {r['text'].strip()!r}")
    print(f"\nTTFT ratio (full prefill / blended), same prompt: {ratio:.2f}x")
    if rows[1]["segments_hit"] == 0:
        print("\nNOTE: the reordered prompt reused nothing: blending is off or not working "
              f"(LMCACHE_ENABLE_BLENDING={os.environ.get('LMCACHE_ENABLE_BLENDING')!r}); "
              "the ratio above is not a blend")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(
            {"engine": engine, "model": args.model,
             "ratio": float(os.environ["LMCACHE_BLEND_RECOMPUTE_RATIOS"].split(",")[0]),
             "ttft_ratio": ratio, "requests": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
