"""kvblend's seed example on its built-in engine (CPU, SmolLM2-135M-Instruct).

A first prompt (system + 3 chunks + question) stores every chunk; a second
prompt puts the same chunks in another order with another question and
reuses their KV, recomputing a few tokens per layer.  The same reordered
prompt then runs on the engine without the connector (full prefill) for
the TTFT ratio.  See examples/_prompts.py for how the prompts are built.

    python examples/blend_builtin.py [--model smollm2] [--ratio 0.15]
        [--max-tokens 24] [--passages-per-chunk 2] [--json out.json]

LMCache's blend variables are set to the defaults of examples/_prompts.py
unless already set; --ratio overrides LMCACHE_BLEND_RECOMPUTE_RATIOS.
vLLM runs the same example with examples/blend_vllm.py.
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

    from kvblend.engine import LLM, KVTransferConfig, SamplingParams

    # One engine with kvblend's connector, one without it (same weights).
    ktc = KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
                           kv_role="kv_both")
    blend = LLM(model=args.model, kv_transfer_config=ktc)
    full = LLM(model=blend.model, tokenizer=blend.tokenizer)
    first, reordered = _prompts.build_prompts(blend.get_tokenizer(), args.data,
                                              args.passages_per_chunk)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    # Warm-up (one-time kernel and allocator costs) on a short prompt.
    for llm in (blend, full):
        llm.generate({"prompt_token_ids": first[:64]}, SamplingParams(temperature=0.0, max_tokens=1))

    rows = [_prompts.run_prompt(blend, first, sp, "first (stores chunks)"),
            _prompts.run_prompt(blend, reordered, sp, "reordered (reuses chunks)"),
            _prompts.run_prompt(full, reordered, sp, "reordered, full prefill", connector=False)]
    ratio = rows[2]["ttft_s"] / rows[1]["ttft_s"] if rows[1]["ttft_s"] > 0 else float("nan")

    print(f"engine: builtin   model: {args.model}   recompute ratio: "
          f"{os.environ['LMCACHE_BLEND_RECOMPUTE_RATIOS']}   check layers: "
          f"{os.environ['LMCACHE_BLEND_CHECK_LAYERS']}")
    _prompts.print_rows(rows)
    warning = _prompts.not_blended(rows[1])
    print()
    if warning:
        print(warning)
        print(f"TTFT ratio (full prefill / the connector's engine, NOT a blend): {ratio:.2f}x")
    else:
        print(f"TTFT ratio (full prefill / blended), same prompt: {ratio:.2f}x")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(
            {"engine": "builtin", "model": args.model,
             "ratio": float(os.environ["LMCACHE_BLEND_RECOMPUTE_RATIOS"].split(",")[0]),
             "blended": warning is None, "ttft_ratio": ratio, "requests": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
