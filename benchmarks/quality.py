"""Answer quality of blending against full prefill on MuSiQue.

For each item, every passage is stored the way a RAG system precomputes it:
prefilled on its own after the system prompt (``sys + sep + passage``), so
its KV has never seen the other passages.  The question prompt
``sys + sep + p1 + ... + p10 + sep + query`` then runs:
  * through an engine without the connector (full prefill), and
  * blended, once per recompute ratio (0 = pure reuse of the stored KV).
Per ratio: token F1 against the gold answers (SQuAD-style), the mean
KL(full || blend) of the first answer token's distribution, the share of
items whose greedy answer equals full prefill's (``agree``) and whose first
answer token does (``agree1``).

``--bf16-reference`` also runs full prefill with the model in bfloat16, the
precision it is served in: its KL and agreement against the fp32 full
prefill are the noise floor of these metrics for the model (how far a
prefill that changes nothing but rounding moves them).

    python benchmarks/quality.py --data musique_dev.json --n 20 \
        --ratios 0,0.05,0.1,0.15,0.3 --selections k,kv,query,query*kv+b4 \
        [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import string
import sys
import time
from pathlib import Path

PREFIX = ("You will be asked a question after reading several passages. Please directly answer the "
          "question based on the given passages. Do NOT repeat the question. The answer should be "
          "within 5 words..\nPassages:\n")
QUERY = ("\n\nAnswer the question directly based on the given passages. Do NOT repeat the question. "
         "The answer should be within 5 words. \nQuestion:{q}\nAnswer:")


def normalize(s: str) -> str:
    """SQuAD answer normalisation: lower case, no punctuation, no articles,
    single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1(pred: str, golds: list[str]) -> float:
    """Token F1 of ``pred`` against the best of ``golds``."""
    best = 0.0
    p = normalize(pred).split()
    for g in golds:
        t = normalize(g).split()
        common = collections.Counter(p) & collections.Counter(t)
        same = sum(common.values())
        if same == 0:
            continue
        prec, rec = same / len(p), same / len(t)
        best = max(best, 2 * prec * rec / (prec + rec))
    return best


def kl(p_logits, q_logits) -> float:
    """KL(p || q) of the softmax distributions of two logit vectors."""
    import torch

    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


SELECTION_HELP = """selection strategies, comma-separated: k, v, kv (CacheBlend's deviation of
K, V or both), query (attention the question pays each row at the check layer), query*k,
query*kv (the product); a suffix +bN also recomputes the first N rows of each reused chunk
first, inside the same budget (e.g. query*kv+b4); a suffix @L takes check layer L instead of
LMCACHE_BLEND_CHECK_LAYERS (e.g. query*kv+b4@3)"""


def selection_settings(spec: str) -> dict[str, str]:
    """KVBLEND_* settings of one strategy name (see SELECTION_HELP)."""
    spec, _, layers = spec.partition("@")
    base, _, boundary = spec.partition("+b")
    out = {"KVBLEND_BOUNDARY_TOKENS": boundary or "0"}
    if layers:
        out["LMCACHE_BLEND_CHECK_LAYERS"] = layers.replace("/", ",")
    if base in ("k", "v", "kv"):
        out.update(KVBLEND_SELECTION="deviation", KVBLEND_DEVIATION=base)
    elif base == "query":
        out.update(KVBLEND_SELECTION="query")
    elif base in ("query*k", "query*v", "query*kv"):
        out.update(KVBLEND_SELECTION="query_deviation", KVBLEND_DEVIATION=base[6:])
    else:
        raise SystemExit(f"--selections: unknown strategy {spec!r}; {SELECTION_HELP}")
    if not out["KVBLEND_BOUNDARY_TOKENS"].isdigit():
        raise SystemExit(f"--selections: {spec!r}: +b takes a row count, e.g. +b4")
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="MuSiQue-format JSON (question, answers, ctxs)")
    ap.add_argument("--n", type=int, default=10, help="first N items")
    ap.add_argument("--skip", type=int, default=0, help="start at item SKIP")
    ap.add_argument("--ratios", default="0,0.05,0.15,0.3,1.0")
    ap.add_argument("--selections", default="k", help=SELECTION_HELP)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the model runs in fp32)")
    ap.add_argument("--store-gb", type=float, default=1.0, help="host store of each engine, GB")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--check-layers", default=None, help="overrides LMCACHE_BLEND_CHECK_LAYERS")
    ap.add_argument("--lead-ratios", default=None,
                    help="gradual filtering: ratios of the check layers before the last, e.g. "
                         "'0.5,0.3' with --check-layers 1,4,8; the last check layer takes each "
                         "--ratios value (0 stays pure reuse at every check layer)")
    ap.add_argument("--lead-factor", type=float, default=None,
                    help="gradual filtering with the earlier check layers keeping this many "
                         "times each final ratio (e.g. 2: 0.1 at layer 1, 0.05 at the last)")
    ap.add_argument("--bf16-reference", action="store_true",
                    help="also score full prefill with the model in bfloat16 (the metrics' "
                         "noise floor: rounding alone)")
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument("--plot", default=None, help="PNG of agreement and KL against the ratio")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    sels = [x.strip() for x in args.selections.split(",") if x.strip()]
    settings = {sel: selection_settings(sel) for sel in sels}
    os.environ.setdefault("LMCACHE_ENABLE_BLENDING", "True")
    os.environ.setdefault("LMCACHE_BLEND_SPECIAL_STR", " # # ")
    os.environ.setdefault("LMCACHE_BLEND_CHECK_LAYERS", "1")
    if args.check_layers:
        os.environ["LMCACHE_BLEND_CHECK_LAYERS"] = args.check_layers
    import torch  # noqa: F401

    from kvblend import runtime
    from kvblend.engine import LLM, KVTransferConfig, SamplingParams
    from kvblend.prompt import chat_pieces, encode, join
    from kvblend.vllm.connector import RATIO_ARG, SAVE_ARG

    from kvblend.models import load_model

    items = json.loads(Path(args.data).read_text())[args.skip: args.skip + args.n]
    model, tok = load_model(args.model, dtype=torch.float32)
    model = model.to(args.device)
    eager = args.device != "cpu"  # no per-engine compilation on the GPU: quality, not speed
    full = LLM(model=model, tokenizer=tok, enforce_eager=eager)
    half = None
    if args.bf16_reference:
        import copy

        half = LLM(model=copy.deepcopy(model).to(torch.bfloat16), tokenizer=tok,
                   enforce_eager=eager)
    n_checks = len(os.environ["LMCACHE_BLEND_CHECK_LAYERS"].split(","))
    lead = [float(x) for x in args.lead_ratios.split(",")] if args.lead_ratios else []
    if lead and len(lead) != n_checks - 1:
        raise SystemExit(f"--lead-ratios has {len(lead)} values for {n_checks} check layers "
                         "(expected one fewer)")
    if args.lead_factor is not None:
        if lead or n_checks < 2 or args.lead_factor < 1:
            raise SystemExit("--lead-factor needs several check layers, a factor >= 1 and no "
                             "--lead-ratios")
        lead = [args.lead_factor] * (n_checks - 1)  # multiplied by each final ratio below

    def schedule(r):
        """Ratios per check layer for final ratio r."""
        if r == 0:
            return [0.0] * n_checks
        if args.lead_factor is not None:
            return [min(1.0, x * r) for x in lead] + [r]
        return [max(x, r) for x in lead] + [r]

    def engine(extra):
        ktc = KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
                               kv_role="kv_both", kv_connector_extra_config=extra)
        return LLM(model=full.model, tokenizer=tok, kv_transfer_config=ktc, enforce_eager=eager)

    # Each evaluated engine stores the passages itself; its question prompts
    # store nothing (kvblend_save: False), so no run leaves the question's KV
    # behind for the next.  One engine per strategy, the ratio per request;
    # with a gradual schedule, one engine per (strategy, ratio).
    engines = {}
    for sel in sels:
        # a bounded store per engine: old items' passages are evicted
        base = {"kvblend.settings": {"LMCACHE_MAX_LOCAL_CPU_SIZE": str(args.store_gb),
                                     **settings[sel]}}
        if lead:
            for r in ratios:
                engines[sel, r] = engine({**base, "kvblend.recompute_ratios": schedule(r)})
        else:
            shared = engine(base)
            for r in ratios:
                engines[sel, r] = shared
    sp = {key: SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                              extra_args={SAVE_ARG: False, **({} if lead else {RATIO_ARG: key[1]})})
          for key in engines}
    plain = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    before, after = chat_pieces(tok, "You are a helpful assistant.")
    sys_ids = encode(tok, before + PREFIX)
    sep = encode(tok, os.environ["LMCACHE_BLEND_SPECIAL_STR"])

    acc = {key: {"f1": [], "kl": [], "agree": [], "agree1": [], "hit": [], "recomputed": [],
                 "ttft": []} for key in engines}
    if half is not None:
        acc["full bf16", "full"] = {name: [] for name in acc[next(iter(engines))]}
    acc_full = {"f1": [], "ttft": []}
    t_start = time.perf_counter()
    for i, item in enumerate(items):
        chunks = [encode(tok, f"{c['title']}\n\n{c['text']}\n\n") for c in item["ctxs"]]
        q_ids = encode(tok, QUERY.format(q=item["question"]) + after)
        prompt = join(sys_ids, chunks, q_ids, sep)
        for eng in {id(e): e for e in engines.values()}.values():
            for c in chunks:  # each passage prefilled alone after the system prompt
                eng.generate({"prompt_token_ids": join(sys_ids, [c], [], sep)}, one)
        ref = full.generate({"prompt_token_ids": prompt}, plain, return_first_logits=True)[0]
        ref_text = ref.outputs[0].text.strip()
        acc_full["f1"].append(f1(ref_text, item["answers"]))
        acc_full["ttft"].append(ref.metrics.ttft)

        def score(key, out):
            text = out.outputs[0].text.strip()
            a = acc[key]
            a["f1"].append(f1(text, item["answers"]))
            a["kl"].append(kl(ref.first_logits, out.first_logits))
            a["agree"].append(float(normalize(text) == normalize(ref_text)))
            a["agree1"].append(float(int(out.first_logits.argmax()) ==
                                     int(ref.first_logits.argmax())))
            a["ttft"].append(out.metrics.ttft)
            return text

        if half is not None:
            out = half.generate({"prompt_token_ids": prompt}, plain, return_first_logits=True)[0]
            for name in ("hit", "recomputed"):
                acc["full bf16", "full"][name].append(1.0)
            text = score(("full bf16", "full"), out)
            print(f"item {args.skip + i} full bf16 kl={acc['full bf16', 'full']['kl'][-1]:.4f} "
                  f"agree={int(acc['full bf16', 'full']['agree'][-1])} {text!r} | full "
                  f"{ref_text!r}", flush=True)
        for key, eng in engines.items():
            if key[1] == 0 and key[0] != sels[0] and not lead:
                # ratio 0 recomputes the forced rows only, whatever the
                # strategy: the first strategy's run stands for all
                for name, xs in acc[sels[0], 0.0].items():
                    acc[key][name].append(xs[-1])
                continue
            out = eng.generate({"prompt_token_ids": prompt}, sp[key], return_first_logits=True)[0]
            text = score(key, out)
            st = runtime.request_stats(str(out.request_id)) or {}
            a = acc[key]
            a["hit"].append(st.get("segments_hit", 0) / max(1, st.get("segments_total", 1)))
            a["recomputed"].append(st.get("tokens_recomputed", 0) / max(1, st.get("blend_rows", 1)))
            print(f"item {args.skip + i} {key[0]:<12} r={key[1]:<5} f1={a['f1'][-1]:.2f} "
                  f"kl={a['kl'][-1]:.4f} agree={int(a['agree'][-1])} {text!r} | full {ref_text!r} "
                  f"| gold {item['answers']}", flush=True)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    rows = [{"selection": "full", "ratio": "full", "f1": mean(acc_full["f1"]), "kl_vs_full": 0.0,
             "agree_vs_full": 1.0, "agree1_vs_full": 1.0, "ttft_s": mean(acc_full["ttft"]), "n": len(items)}]
    for (sel, r), a in acc.items():
        rows.append({"selection": sel, "ratio": r, "f1": mean(a["f1"]), "kl_vs_full": mean(a["kl"]),
                     "agree_vs_full": mean(a["agree"]), "agree1_vs_full": mean(a["agree1"]),
                     "segments_hit_share": mean(a["hit"]),
                     "recomputed_share": mean(a["recomputed"]), "ttft_s": mean(a["ttft"]),
                     "n": len(items), "kl_each": a["kl"], "agree_each": a["agree"]})
    reuse = {row["selection"]: row["kl_vs_full"] for row in rows if row["ratio"] == 0}
    print(f"\nquality on {len(items)} items of {args.data} from item {args.skip} ({args.model} "
          f"fp32 on {args.device}, {args.max_tokens} tokens, "
          f"check layers {os.environ['LMCACHE_BLEND_CHECK_LAYERS']}"
          f"{', lead ratios ' + args.lead_ratios if args.lead_ratios else ''}"
          f"{f', lead factor {args.lead_factor:g}' if args.lead_factor else ''}, "
          f"{time.perf_counter() - t_start:.0f} s)")
    print(f"{'selection':>14} {'ratio':>6} {'F1':>6} {'KL(full||blend)':>16} {'KL/reuse':>9} "
          f"{'agree':>6} {'agree1':>6} {'hit':>5} {'recomp':>7} {'TTFT s':>7}")
    for row in rows:
        rr = row["ratio"] if isinstance(row["ratio"], str) else f"{row['ratio']:.2f}"
        # the bf16 reference is measured against the first strategy's pure reuse
        base = reuse.get(row["selection"], reuse.get(sels[0]) if row["selection"] != "full"
                         else None)
        rel = f"{row['kl_vs_full'] / base:>9.3f}" if base else f"{'':>9}"
        print(f"{row['selection']:>14} {rr:>6} {row['f1']:>6.3f} {row['kl_vs_full']:>16.5f} {rel} "
              f"{row['agree_vs_full']:>6.2f} {row['agree1_vs_full']:>6.2f} "
              f"{row.get('segments_hit_share', 1.0):>5.2f} "
              f"{row.get('recomputed_share', 1.0):>7.3f} {row['ttft_s']:>7.2f}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2))
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _plot(rows, path):
    """Agreement with full prefill and KL against the recompute ratio, one
    line per selection strategy."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in rows:  # the bf16 full prefill: the noise floor, a horizontal line
        if r["selection"] == "full bf16":
            ax[0].axhline(r["agree_vs_full"], color="grey", ls="--", label="full prefill, bf16")
            ax[1].axhline(max(r["kl_vs_full"], 1e-9), color="grey", ls="--",
                          label="full prefill, bf16")
    for sel in dict.fromkeys(r["selection"] for r in rows if not isinstance(r["ratio"], str)):
        pts = [r for r in rows if r["selection"] == sel]
        ax[0].plot([r["ratio"] for r in pts], [r["agree_vs_full"] for r in pts], "o-", label=sel)
        ax[1].plot([r["ratio"] for r in pts], [max(r["kl_vs_full"], 1e-9) for r in pts], "o-",
                   label=sel)
    ax[0].set_xlabel("recompute ratio"); ax[0].set_ylabel("greedy answer = full prefill")
    ax[0].legend(fontsize=7)
    ax[1].set_yscale("log"); ax[1].set_xlabel("recompute ratio"); ax[1].set_ylabel("KL(full || blend)")
    fig.tight_layout(); fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
