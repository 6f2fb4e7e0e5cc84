"""One engine process of the tier tests: python tiers_worker.py SPEC.json.

SPEC: {"env": {LMCACHE_*: ...}, "dtype": "float32", "ratio": 1.0,
       "perturb": false (shift one weight: another model of the same shape),
       "prompts": [[token ids], ...]}.  Runs each prompt through the built-in
engine with the connector and, in the same process, without it (full
prefill), then prints one JSON line: per prompt the segment counts, cached
tokens, whether the greedy tokens equal full prefill's and the largest
first-logit difference; and the lower tiers' counters after the writes
were flushed.
"""

import json
import os
import sys

import torch


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    os.environ.update(spec["env"])
    from kvblend import runtime
    from kvblend.engine import LLM, KVTransferConfig, SamplingParams
    from kvblend.models import load_model

    model, tok = load_model("smollm2", dtype=getattr(torch, spec.get("dtype", "float32")))
    if spec.get("perturb"):  # other weights, same architecture (a fine-tune)
        with torch.no_grad():
            model.model.norm.weight.add_(1e-3)
    ktc = KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
                           kv_role="kv_both",
                           kv_connector_extra_config={"kvblend.recompute_ratios": [spec["ratio"]]})
    llm = LLM(model=model, tokenizer=tok, kv_transfer_config=ktc)
    full = LLM(model=model, tokenizer=tok)
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    results = []
    for ids in spec["prompts"]:
        out = llm.generate({"prompt_token_ids": ids}, greedy, return_first_logits=True)[0]
        st = runtime.request_stats(str(out.request_id)) or {}
        ref = full.generate({"prompt_token_ids": ids}, greedy, return_first_logits=True)[0]
        results.append({
            "segments_hit": st.get("segments_hit", 0), "segments_total": st.get("segments_total", 0),
            "num_cached_tokens": out.num_cached_tokens,
            "tokens_equal": out.outputs[0].token_ids == ref.outputs[0].token_ids,
            "max_diff": (out.first_logits - ref.first_logits).abs().max().item()})
    conn = llm.worker_connector._conn
    conn.flush_tiers()
    print(json.dumps({"results": results, "tiers": conn.tier_stats(),
                      "tier_key": conn.tier_key}), flush=True)
    llm.shutdown()


if __name__ == "__main__":
    main()
