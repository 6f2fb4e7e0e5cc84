"""Runs RAG prompts through stock vLLM (CPU) on SmolLM2, with vLLM's defaults
(multiprocessing, chunked prefill, prefix caching), and prints one JSON line
with each request's greedy tokens, TTFT, ``num_cached_tokens`` and the
figures kvblend returns in ``kv_transfer_params``.

    python blend_run.py --ratio R     # with KVBlendConnector, recompute ratio R
    python blend_run.py --baseline    # plain vLLM, no connector
    options: --long (chunks of two passages: ~4K-token prompts),
             --max-num-batched-tokens N (the chunked-prefill budget),
             --tp N (tensor_parallel_size), --tiny DIR (a small random-weight
             Llama whose heads split over ranks), --max-tokens N

Prompts (token ids, ``sys + sep + chunks + sep + question``):
    first      chunks (0, 1, 2), question 1: stores every chunk
    reordered  chunks (2, 0, 1), question 2: every chunk stored, out of order
    new_mid    chunks (0, NEW, 1), question 3: a new chunk between stored ones;
               its start (sys + chunk 0) is also a prefix-cache hit of `first`

One vLLM engine per process, so the tests start this script once per
configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
from _prompts import ttft  # noqa: E402  (the examples' TTFT from vLLM's request metrics)

DATA = EXAMPLES / "data" / "rag_sample.json"
SYSTEM = "Answer the question using only the passages below, in a few words."
QUESTIONS = ("Which band did the performer play in?",
             "Which record labels did the performer release music on?",
             "When was the lighthouse on the northern cape built?")
NEW_CHUNK = ("The lighthouse on the northern cape was built in 1871 from granite quarried "
             "nearby; its lamp burned whale oil until the keepers switched to kerosene.")
CHUNK_CHARS = 700  # characters of each sample passage per chunk (keeps CPU prefill short)


def prompts(tokenizer, sep: str, long: bool = False) -> dict[str, list[int]]:
    """The three prompts as token ids (see the module docstring)."""
    from kvblend.prompt import encode, join

    data = json.loads(DATA.read_text())
    if long:  # ~1K tokens a chunk: two whole passages
        texts = [data[str(2 * i)] + "\n" + data[str(2 * i + 1)] for i in range(3)]
    else:
        texts = [data[str(i)][:CHUNK_CHARS] for i in range(3)]
    chunks = [encode(tokenizer, t) for t in texts]
    new = encode(tokenizer, NEW_CHUNK * (8 if long else 1))
    s = encode(tokenizer, SYSTEM)
    sep_ids = encode(tokenizer, sep)
    q = [encode(tokenizer, "\nQuestion: " + x + "\nAnswer:") for x in QUESTIONS]
    return {"first": join(s, [chunks[0], chunks[1], chunks[2]], q[0], sep_ids),
            "reordered": join(s, [chunks[2], chunks[0], chunks[1]], q[1], sep_ids),
            "new_mid": join(s, [chunks[0], new, chunks[1]], q[2], sep_ids)}


TINY_SEP = [7, 8, 9]  # separator token ids of the tiny model's prompts


def tiny_model(path: Path) -> Path:
    """A small Llama with random weights (seeded) saved at ``path`` (made
    once): 4 layers, 8 query and 4 KV heads, so tensor-parallel ranks split
    the heads.  No tokenizer: prompts are token ids."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_attention_heads=8,
                      num_key_value_heads=4, num_hidden_layers=4, vocab_size=4096,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    return path


def tiny_prompts() -> dict[str, list[int]]:
    """The three prompts of the module doc over random token ids."""
    import random

    rnd = random.Random(1)

    def piece(n):
        return [rnd.randrange(100, 4000) for _ in range(n)]

    s, chunks, new = piece(20), [piece(90) for _ in range(3)], piece(70)
    q = [piece(12) for _ in range(3)]

    def join(parts, question):
        out = list(s)
        for p in [*parts, question]:
            out += TINY_SEP + p
        return out

    return {"first": join([chunks[0], chunks[1], chunks[2]], q[0]),
            "reordered": join([chunks[2], chunks[0], chunks[1]], q[1]),
            "new_mid": join([chunks[0], new, chunks[1]], q[2])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=float, help="recompute ratio of the connector")
    g.add_argument("--baseline", action="store_true", help="vLLM without the connector")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--only", default=None,
                   help="comma-separated prompt names to run (default: all three)")
    p.add_argument("--long", action="store_true", help="~4K-token prompts")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--tiny", default=None,
                   help="folder of a small random-weight Llama (made there once) instead of "
                        "SmolLM2; token-id prompts, separator given as token ids")
    args = p.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("LMCACHE_BLEND_SPECIAL_STR", " # # ")
    os.environ["LMCACHE_ENABLE_BLENDING"] = "False" if args.baseline else "True"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from kvblend import models

    extra = {}
    kb_extra = {} if args.ratio is None else {"kvblend.recompute_ratios": [args.ratio]}
    if args.tiny:
        model = str(tiny_model(Path(args.tiny)))
        extra["skip_tokenizer_init"] = True
        kb_extra["kvblend.separator_ids"] = TINY_SEP
    else:
        model = str(models.smollm2_path())
    if not args.baseline:
        extra["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
            kv_role="kv_both", kv_connector_extra_config=kb_extra)
    if args.max_num_batched_tokens:
        extra["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.tp > 1:
        extra["tensor_parallel_size"] = args.tp
        # vLLM's CPU workers bind their threads per NUMA node and refuse
        # several ranks on one node unless given cores: split them
        per = max(1, (os.cpu_count() or args.tp) // args.tp)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(
            f"{r * per}-{r * per + per - 1}" if per > 1 else str(r) for r in range(args.tp)))
    llm = LLM(model=model, dtype="float32", max_model_len=8192 if args.long else 2048, **extra)
    ps = tiny_prompts() if args.tiny else \
        prompts(llm.get_tokenizer(), os.environ["LMCACHE_BLEND_SPECIAL_STR"], args.long)
    # ignore_eos: every run compares max_tokens tokens, even where one
    # answer would end at once
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                        detokenize=not args.tiny)
    llm.generate({"prompt_token_ids": list(range(1000, 1040))}, SamplingParams(max_tokens=1),
                 use_tqdm=False)  # warm-up, unrelated tokens
    if args.only:
        ps = {k: ps[k] for k in args.only.split(",")}
    rows = {}
    for name, ids in ps.items():
        t0 = time.perf_counter()
        out = llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)[0]
        kb = (getattr(out, "kv_transfer_params", None) or {}).get("kvblend") or {}
        rows[name] = {"prompt_tokens": len(ids), "ttft_s": ttft(out, time.perf_counter() - t0),
                      "num_cached_tokens": int(out.num_cached_tokens or 0),
                      "token_ids": list(out.outputs[0].token_ids), "text": out.outputs[0].text,
                      **{k: kb.get(k, 0) for k in ("segments_total", "segments_hit",
                                                   "tokens_recomputed", "blend_rows",
                                                   "prefix_rows")}}
    print("KVBLEND_RESULT " + json.dumps(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
