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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _prompts  # noqa: E402


def main(argv=None) -> int:
    p = _prompts.parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    _prompts.set_env(args.ratio)

    from kvblend.engine import LLM, KVTransferConfig, SamplingParams

    # One engine with kvblend's connector, one without it (same weights).
    blend = LLM(model=args.model, kv_transfer_config=_prompts.connector_config(KVTransferConfig))
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
    _prompts.report("builtin", args, rows, rows[1], rows[2], (
        "TTFT ratio (full prefill / blended), same prompt",
        "TTFT ratio (full prefill / the connector's engine, NOT a blend)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
