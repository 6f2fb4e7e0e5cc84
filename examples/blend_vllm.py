"""kvblend's seed example through vLLM, with kvblend's connector and
vLLM's defaults (multiprocessing, chunked prefill, prefix caching,
compilation).

A first prompt (system + 3 chunks + question) stores every chunk; a second
prompt puts the same chunks in another order with another question and
reuses their KV.  For the reordered prompt it prints the segments hit, the
tokens recomputed, vLLM's ``num_cached_tokens`` and the answer.  See
examples/_prompts.py for how the prompts are built.

    python examples/blend_vllm.py [--model smollm2] [--ratio 0.15]
        [--max-tokens 24] [--passages-per-chunk 2] [--json out.json]

LMCache's blend variables are set to the defaults of examples/_prompts.py
unless already set; --ratio overrides LMCACHE_BLEND_RECOMPUTE_RATIOS.
The TTFT against vLLM without the connector is benchmarks/bench_vllm_ttft.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _prompts  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or an HF model folder")
    p.add_argument("--ratio", type=float, default=None,
                   help="recompute ratio (default: LMCACHE_BLEND_RECOMPUTE_RATIOS or 0.15)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--passages-per-chunk", type=int, default=2,
                   help="passages of the sample per chunk (2 gives a ~4K-token prompt)")
    p.add_argument("--data", default=str(_prompts.DATA))
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    args = p.parse_args(argv)
    _prompts.set_env(args.ratio)

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from kvblend.models import resolve_model_path

    ktc = KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
                           kv_role="kv_both")
    llm = LLM(model=resolve_model_path(args.model), max_model_len=8192, dtype="float32",
              kv_transfer_config=ktc)
    first, reordered = _prompts.build_prompts(llm.get_tokenizer(), args.data,
                                              args.passages_per_chunk)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    rows = [_prompts.run_prompt(llm, first, sp, "first (stores chunks)"),
            _prompts.run_prompt(llm, reordered, sp, "reordered (reuses chunks)")]

    print(f"engine: vllm   model: {args.model}   recompute ratio: "
          f"{os.environ['LMCACHE_BLEND_RECOMPUTE_RATIOS']}   check layers: "
          f"{os.environ['LMCACHE_BLEND_CHECK_LAYERS']}")
    _prompts.print_rows(rows, with_ttft=False)
    r = rows[1]
    warning = _prompts.not_blended(r)
    print()
    if warning:
        print(warning)
    else:
        print(f"reordered prompt: {r['segments_hit']}/{r['segments_total']} segments reused, "
              f"{r['tokens_recomputed']} of {r['blend_rows']} blended tokens recomputed, "
              f"num_cached_tokens {r['num_cached_tokens']} of {r['prompt_tokens']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(
            {"engine": "vllm", "model": args.model,
             "ratio": float(os.environ["LMCACHE_BLEND_RECOMPUTE_RATIOS"].split(",")[0]),
             "blended": warning is None, "requests": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
