"""Runs three RAG prompts through stock vLLM (CPU) on SmolLM2 and prints one
JSON line with each request's greedy tokens, TTFT and blend statistics.

    python blend_run.py --ratio R     # with KVBlendConnector, recompute ratio R
    python blend_run.py --baseline    # plain vLLM, no connector

Prompts (token ids, ``sys + sep + chunks + sep + question``):
    first      chunks (0, 1, 2), question 1: stores every chunk
    reordered  chunks (2, 0, 1), question 2: every chunk stored, out of order
    new_mid    chunks (0, NEW, 1), question 3: a new chunk between stored ones

One vLLM engine per process (vLLM keeps the KV-transfer group global), so
the tests start this script once per configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "rag_sample.json"
SYSTEM = "Answer the question using only the passages below, in a few words."
QUESTIONS = ("Which band did the performer play in?",
             "Which record labels did the performer release music on?",
             "When was the lighthouse on the northern cape built?")
NEW_CHUNK = ("The lighthouse on the northern cape was built in 1871 from granite quarried "
             "nearby; its lamp burned whale oil until the keepers switched to kerosene.")
CHUNK_CHARS = 700  # characters of each sample passage per chunk (keeps CPU prefill short)


def prompts(tokenizer, sep: str) -> dict[str, list[int]]:
    """The three prompts as token ids (see the module docstring)."""
    from kvblend.prompt import encode, join

    data = json.loads(DATA.read_text())
    chunks = [encode(tokenizer, data[str(i)][:CHUNK_CHARS]) for i in range(3)]
    new = encode(tokenizer, NEW_CHUNK)
    s = encode(tokenizer, SYSTEM)
    sep_ids = encode(tokenizer, sep)
    q = [encode(tokenizer, "\nQuestion: " + x + "\nAnswer:") for x in QUESTIONS]
    return {"first": join(s, [chunks[0], chunks[1], chunks[2]], q[0], sep_ids),
            "reordered": join(s, [chunks[2], chunks[0], chunks[1]], q[1], sep_ids),
            "new_mid": join(s, [chunks[0], new, chunks[1]], q[2], sep_ids)}


def ttft(out, wall: float) -> float:
    """Time to first token from vLLM's request metrics (wall time if absent)."""
    m = getattr(out, "metrics", None)
    for name in ("first_token_latency", "ttft"):
        v = getattr(m, name, None)
        if v:
            return float(v)
    first, arrival = getattr(m, "first_token_time", None), getattr(m, "arrival_time", None)
    if first and arrival:
        return float(first - arrival)
    return wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=float, help="recompute ratio of the connector")
    g.add_argument("--baseline", action="store_true", help="vLLM without the connector")
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args(argv)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("LMCACHE_BLEND_SPECIAL_STR", " # # ")
    os.environ["LMCACHE_ENABLE_BLENDING"] = "False" if args.baseline else "True"
    log = logging.getLogger("kvblend")  # the connector names the layout it found at INFO
    log.setLevel(logging.INFO)
    log.addHandler(logging.StreamHandler(sys.stderr))
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from kvblend import models, runtime

    extra = {}
    if not args.baseline:
        extra["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
            kv_role="kv_both", kv_connector_extra_config={"kvblend.recompute_ratios": [args.ratio]})
    llm = LLM(model=str(models.smollm2_path()), dtype="float32", enforce_eager=True,
              max_model_len=2048, max_num_batched_tokens=2048, enable_prefix_caching=False,
              **extra)
    ps = prompts(llm.get_tokenizer(), os.environ["LMCACHE_BLEND_SPECIAL_STR"])
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.generate({"prompt_token_ids": ps["first"][:16]}, SamplingParams(max_tokens=1))  # warm-up
    rows = {}
    for name, ids in ps.items():
        t0 = time.perf_counter()
        out = llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)[0]
        st = (runtime.request_stats(str(out.request_id)) or {}) if not args.baseline else {}
        rows[name] = {"prompt_tokens": len(ids), "ttft_s": ttft(out, time.perf_counter() - t0),
                      "token_ids": list(out.outputs[0].token_ids), "text": out.outputs[0].text,
                      **{k: st.get(k, 0) for k in ("segments_total", "segments_hit",
                                                   "tokens_recomputed", "blend_rows")}}
    print("KVBLEND_RESULT " + json.dumps(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
