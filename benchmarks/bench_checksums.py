"""What KVBLEND_VERIFY_CHECKSUMS costs a blended request on the CPU.

Two built-in engines over the real SmolLM2, one with checksums off and one
with them on, each first storing four ~690-token chunks; then reordered
prompts of the same chunks (every chunk a hit, so every stored layer is
hashed once per request) alternate between the two engines.  Prints the
median TTFT of each and their ratio (one run: compare the ratio, not the
times across runs).

    python3 benchmarks/bench_checksums.py [--reps 4]
"""

import argparse
import os
import statistics

ENV = {"LMCACHE_ENABLE_BLENDING": "True", "LMCACHE_BLEND_SPECIAL_STR": " # # ",
       "LMCACHE_BLEND_CHECK_LAYERS": "1", "LMCACHE_BLEND_RECOMPUTE_RATIOS": "0.15"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    os.environ.update(ENV)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvblend import models
    from kvblend.engine import LLM, KVTransferConfig, SamplingParams
    from kvblend.prompt import encode, join

    path = str(models.smollm2_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    text = "The quick brown fox jumps over the lazy dog near the river bank while birds sing. " * 40
    chunks = [encode(tok, f"Passage {i}: {text}") for i in range(4)]
    sys_ids = encode(tok, "<|im_start|>system\nAnswer.<|im_end|>\n<|im_start|>user\n")
    sep = encode(tok, " # # ")
    sp = SamplingParams(temperature=0.0, max_tokens=1)
    ktc = KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
                           kv_role="kv_both")
    engines = {}
    for mode in ("off", "on"):
        os.environ["KVBLEND_VERIFY_CHECKSUMS"] = "1" if mode == "on" else "0"
        engines[mode] = LLM(model=model, tokenizer=tok, kv_transfer_config=ktc)
        q = encode(tok, "\nQuestion: what?<|im_end|>\n<|im_start|>assistant\n")
        engines[mode].generate({"prompt_token_ids": join(sys_ids, chunks, q, sep)}, sp)
    ttft = {"off": [], "on": []}
    n = 0
    for rep in range(args.reps):
        order = chunks[rep % 4:] + chunks[:rep % 4][::-1]
        q = encode(tok, f"\nQuestion: what {rep}?<|im_end|>\n<|im_start|>assistant\n")
        p = join(sys_ids, order, q, sep)
        n = len(p)
        for mode in ("off", "on"):
            ttft[mode].append(engines[mode].generate({"prompt_token_ids": p}, sp)[0].metrics.ttft)
    store = engines["on"].worker_connector.blend_stats()["store"]
    off, on = statistics.median(ttft["off"]), statistics.median(ttft["on"])
    print(f"prompt {n} tokens, {store['host_bytes'] / 2**20:.0f} MiB stored, {args.reps} reps")
    print("| checksums | blended TTFT median s | ratio to off |")
    print("|---|---|---|")
    print(f"| off | {off:.3f} | 1.000 |")
    print(f"| on | {on:.3f} | {on / off:.3f} |")
    print(f"corrupt entries: {store['corrupt']}")
    for e in engines.values():
        e.shutdown()


if __name__ == "__main__":
    main()
