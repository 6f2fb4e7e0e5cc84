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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _prompts  # noqa: E402


def main(argv=None) -> int:
    p = _prompts.parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    _prompts.set_env(args.ratio)

    from vllm import SamplingParams
    from vllm.config import KVTransferConfig

    llm = _prompts.vllm_engine(args.model, kv_transfer_config=_prompts.connector_config(KVTransferConfig))
    first, reordered = _prompts.build_prompts(llm.get_tokenizer(), args.data,
                                              args.passages_per_chunk)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    rows = [_prompts.run_prompt(llm, first, sp, "first (stores chunks)"),
            _prompts.run_prompt(llm, reordered, sp, "reordered (reuses chunks)")]

    _prompts.report("vllm", args, rows, rows[1], with_ttft=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
