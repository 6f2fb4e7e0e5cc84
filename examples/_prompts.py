"""The seed example's settings, prompts and result rows, shared by
examples/blend_builtin.py, examples/blend_vllm.py and the benchmarks.

Prompts are built as LMCache's blend example builds them, from token ids:
    system prompt + sep + chunk1 + sep + chunk2 + sep + chunk3 + sep + question
with each piece tokenized on its own (no BOS) and ``sep`` the token ids of
LMCACHE_BLEND_SPECIAL_STR.  The first prompt stores every chunk; the
reordered one puts the same chunks in another order with another question,
so every chunk can be reused.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "rag_sample.json"
SYSTEM = ("You are a helpful assistant. Answer the question using only the passages "
          "below, in a few words.")
QUESTION_2 = ("Which record labels did the performer release music on? "
              "Answer within 10 words.")

# LMCache's blend settings, applied unless the user already set them.
BLEND_ENV = {
    "LMCACHE_ENABLE_BLENDING": "True", "LMCACHE_BLEND_SPECIAL_STR": " # # ",
    "LMCACHE_USE_LAYERWISE": "True", "LMCACHE_BLEND_CHECK_LAYERS": "1",
    "LMCACHE_BLEND_RECOMPUTE_RATIOS": "0.15", "LMCACHE_LOCAL_CPU": "True",
    "LMCACHE_MAX_LOCAL_CPU_SIZE": "5", "LMCACHE_CHUNK_SIZE": "256",
}


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every seed-example script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or an HF model folder")
    p.add_argument("--ratio", type=float, default=None,
                   help="recompute ratio (default: LMCACHE_BLEND_RECOMPUTE_RATIOS or 0.15)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--passages-per-chunk", type=int, default=2,
                   help="passages of the sample per chunk (2 gives a ~4K-token prompt)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    return p


def vllm_engine(model: str, **kwargs):
    """A vLLM engine on ``model`` with the examples' settings (fp32, 8K
    context) and otherwise vLLM's defaults."""
    from vllm import LLM

    from kvblend.models import resolve_model_path

    return LLM(model=resolve_model_path(model), max_model_len=8192, dtype="float32", **kwargs)


def connector_config(kv_transfer_config_cls):
    """kvblend's connector as ``kv_transfer_config_cls`` (vLLM's
    KVTransferConfig or the built-in engine's) names it."""
    return kv_transfer_config_cls(kv_connector="KVBlendConnector",
                                  kv_connector_module_path="kvblend.vllm", kv_role="kv_both")


def report(engine: str, args, rows: list[dict], blended: dict, full: dict | None = None,
           ratio_lines: tuple[str, str] = ("", ""), with_ttft: bool = True) -> str | None:
    """Print the settings, the rows, and the TTFT ratio of ``full`` (the
    same prompt without the connector) to ``blended`` (after ratio_lines[0],
    or ratio_lines[1] when not a blend) or, without ``full``, the blended
    request's figures, with a warning when ``blended`` (the request run with
    the connector) was not a blend; write --json.  Returns the warning or
    None."""
    ratio = None
    if full is not None:
        ratio = full["ttft_s"] / blended["ttft_s"] if blended["ttft_s"] > 0 else float("nan")
    print(f"engine: {engine}   model: {args.model}   recompute ratio: "
          f"{os.environ['LMCACHE_BLEND_RECOMPUTE_RATIOS']}   check layers: "
          f"{os.environ['LMCACHE_BLEND_CHECK_LAYERS']}")
    print_rows(rows, with_ttft=with_ttft)
    warning = not_blended(blended)
    print()
    if warning:
        print(warning)
    if ratio is not None:
        print(f"{ratio_lines[1] if warning else ratio_lines[0]}: {ratio:.2f}x")
    elif not warning:
        r = blended
        print(f"reordered prompt: {r['segments_hit']}/{r['segments_total']} segments reused, "
              f"{r['tokens_recomputed']} of {r['blend_rows']} blended tokens recomputed, "
              f"num_cached_tokens {r['num_cached_tokens']} of {r['prompt_tokens']}")
    if args.json_path:
        result = {"engine": engine, "model": args.model,
                  "ratio": float(os.environ["LMCACHE_BLEND_RECOMPUTE_RATIOS"].split(",")[0]),
                  "blended": warning is None, "requests": rows}
        if ratio is not None:
            result["ttft_ratio"] = ratio
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return warning


def set_env(ratio: float | None = None) -> None:
    """Set the variables of BLEND_ENV that are unset; ``ratio``, when given,
    overrides LMCACHE_BLEND_RECOMPUTE_RATIOS."""
    for k, v in BLEND_ENV.items():
        os.environ.setdefault(k, v)
    if ratio is not None:
        os.environ["LMCACHE_BLEND_RECOMPUTE_RATIOS"] = repr(float(ratio))


def build_prompts(tokenizer, data_path=DATA, per_chunk: int = 2) -> tuple[list[int], list[int]]:
    """Token ids of the two prompts: chunks (0, 1, 2) with the sample's
    question, then chunks (2, 0, 1) with QUESTION_2.  Each chunk joins
    ``per_chunk`` passages of the sample (2 gives a ~4K-token prompt)."""
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


def run_prompt(llm, ids: list[int], sampling_params, label: str, connector: bool = True) -> dict:
    """Generate for one prompt on ``llm`` (vLLM's or the built-in engine)
    and return its result row: TTFT, kvblend's figures (zero when the
    engine has no ``connector``), ``num_cached_tokens`` and the answer."""
    from kvblend import runtime

    t0 = time.perf_counter()
    out = llm.generate({"prompt_token_ids": ids}, sampling_params)[0]
    wall = time.perf_counter() - t0
    # vLLM returns kvblend's figures in kv_transfer_params; the built-in
    # engine records them in this process
    st = {}
    if connector:
        st = (getattr(out, "kv_transfer_params", None) or {}).get("kvblend") \
            or runtime.request_stats(str(out.request_id)) or {}
    return {
        "label": label,
        "prompt_tokens": len(ids),
        "ttft_s": ttft(out, wall),
        "segments_total": int(st.get("segments_total", 0)),
        "segments_hit": int(st.get("segments_hit", 0)),
        "tokens_recomputed": int(st.get("tokens_recomputed", 0)),
        "blend_rows": int(st.get("blend_rows", 0)),
        "num_cached_tokens": int(getattr(out, "num_cached_tokens", 0) or 0),
        "text": out.outputs[0].text,
    }


def ttft(out, wall: float) -> float:
    """Time to first token from the output's metrics (the built-in engine's
    ``ttft``, vLLM's ``first_token_latency`` or first token - arrival);
    ``wall`` (the whole generate call) when the engine reports none."""
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


def not_blended(row: dict) -> str | None:
    """Why ``row`` (a request run with the connector) is not a blend: a
    warning naming the cause, or None when it reused stored chunks."""
    from kvblend import Config

    if not Config.from_env().enable_blending:
        return ("WARNING: blending is OFF (LMCACHE_ENABLE_BLENDING="
                f"{os.environ.get('LMCACHE_ENABLE_BLENDING')!r}): the connector stored and "
                "reused nothing; no prompt was blended")
    if row["segments_hit"] == 0:
        return (f"WARNING: nothing was reused: the {row['label']!r} prompt hit 0 of "
                f"its {row['segments_total']} segments and was not blended")
    return None


def print_rows(rows: list[dict], with_ttft: bool = True) -> None:
    """The rows as a table, then each answer."""
    head = f"{'request':<34}{'tokens':>7}"
    head += f"{'TTFT s':>9}" if with_ttft else ""
    print(head + f"{'hit/total':>11}{'recomputed':>12}{'cached':>8}")
    for r in rows:
        line = f"{r['label']:<34}{r['prompt_tokens']:>7}"
        line += f"{r['ttft_s']:>9.3f}" if with_ttft else ""
        hits = f"{r['segments_hit']}/{r['segments_total']}"
        print(line + f"{hits:>11}{r['tokens_recomputed']:>12}{r['num_cached_tokens']:>8}")
    for r in rows:
        print(f"\n[{r['label']}] {r['text'].strip()!r}")
