"""GPU benchmark of the blend on a Llama-3-8B-shaped model (random bf16
weights): TTFT of full prefill against kvblend at r=0.15 with the chunks in
the device tier and in the pinned host tier, the load+re-rotate kernel's
bandwidth against the device copy rate, and subset attention (15% of the
queries) against SDPA's full causal attention at the same N.

    python3 benchmarks/bench_gpu.py [--sizes 4096,8192,16384] [--reps 3]
                                    [--out DIR] [--results FILE] [--profile]

Prints a table, appends it with card, date and command to --results
(default benchmarks/RESULTS.md), and writes results.md and results.json to
--out (default: the current folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SEP_IDS = [11, 12, 11]
HEADS, KV_HEADS, HEAD = 32, 8, 128


class _Tok:
    """The connector only asks a tokenizer for the separator's ids."""

    def encode(self, text, add_special_tokens=False):
        return list(SEP_IDS)


def build_model():
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         vocab_size=128256, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                         tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = tf.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def make_prompt(rng, n_total, n_chunks, chunks=None, question_seed=0):
    """sys + sep + chunk_1 + ... + sep + question, ~n_total tokens; reuses
    `chunks` (shuffled) when given."""
    from kvblend.prompt import join

    sys_len, q_len = 32, 32
    if chunks is None:
        clen = (n_total - sys_len - q_len) // n_chunks - len(SEP_IDS)
        chunks = [[rng.randrange(1000, 120000) for _ in range(clen)] for _ in range(n_chunks)]
    qr = random.Random(question_seed)
    question = [qr.randrange(1000, 120000) for _ in range(q_len)]
    sys_ids = [7] * sys_len
    order = list(chunks)
    qr.shuffle(order)
    return join(sys_ids, order, question, SEP_IDS), chunks


def engine(model, kind, max_len, options=None):
    """An engine without connector ("full"), or with kvblend keeping chunks
    in the device tier ("device", and "device_eager": engine and blend
    without torch.compile and CUDA graphs) or the pinned host tier ("host");
    ``options``: more of the connector's kv_connector_extra_config."""
    from kvblend import runtime
    from kvblend.engine import LLM, KVTransferConfig

    runtime.set_model(model, _Tok())
    if kind in ("full", "full_eager"):
        return LLM(model=model, tokenizer=None, max_model_len=max_len,
                   enforce_eager=kind == "full_eager")
    eager = kind.endswith("_eager")
    kind = kind.removesuffix("_eager")
    os.environ.update({"LMCACHE_ENABLE_BLENDING": "True", "LMCACHE_BLEND_CHECK_LAYERS": "1",
                       "LMCACHE_BLEND_RECOMPUTE_RATIOS": "0.15"})
    if kind == "device":
        os.environ.update({"KVBLEND_MAX_DEVICE_SIZE": "8", "LMCACHE_LOCAL_CPU": "False"})
    else:
        os.environ.update({"KVBLEND_MAX_DEVICE_SIZE": "0", "LMCACHE_LOCAL_CPU": "True",
                           "LMCACHE_MAX_LOCAL_CPU_SIZE": "8"})
    extra = {"kvblend.compile": False, "kvblend.cuda_graph_max_tokens": 0} if eager else {}
    extra.update(options or {})
    ktc = KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
                           kv_role="kv_both", engine_id=f"bench-{kind}{'-eager' if eager else ''}",
                           kv_connector_extra_config=extra)
    return LLM(model=model, tokenizer=None, max_model_len=max_len, kv_transfer_config=ktc,
               enforce_eager=eager)


def ttft(llm, ids):
    from kvblend.engine import SamplingParams

    torch.cuda.synchronize()
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, ignore_eos=True))[0]
    return out.metrics.ttft, out


def cuda_time(fn, iters=20, warm=3):
    """Median milliseconds of fn() over iters (CUDA events)."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth():
    x = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = cuda_time(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / (ms * 1e-3)


def load_bandwidth(llm, ids):
    """Bytes/s of Request.load_layer (read + write of every loaded row):
    one call between two events (its host launch time included, as before),
    and the 32 layers queued back to back as the blend queues them (device
    time per layer), with a device copy of the same bytes timed the same way.
    Returns (single-call B/s, its ms, back-to-back B/s, same-size copy B/s)."""
    spans, _, reuse_end = llm.scheduler_connector._lookup(list(ids))
    req = llm.worker_connector._conn.begin(ids, spans=spans, blend_end=int(reuse_end), save=False)
    n_rows = int(req.blend_end)
    _, _, n_forced = req.counts()
    k = torch.empty(n_rows, KV_HEADS, HEAD, dtype=torch.bfloat16, device="cuda")
    v = torch.empty_like(k)
    stream = torch.cuda.current_stream().cuda_stream
    layer = [0]

    def one():
        req.load_layer(layer[0] % 32, k.data_ptr(), v.data_ptr(), stream)
        layer[0] += 1

    def all_layers():
        for i in range(32):
            req.load_layer(i, k.data_ptr(), v.data_ptr(), stream)
    ms = cuda_time(one, iters=64)
    ms32 = cuda_time(all_layers, iters=10) / 32
    req.finish(False)
    loaded = n_rows - n_forced
    nbytes = 2 * 2 * loaded * KV_HEADS * HEAD * 2
    src = torch.empty(2 * loaded * KV_HEADS * HEAD, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)

    def copies():
        for _ in range(32):
            dst.copy_(src)
    copy_ms = cuda_time(copies, iters=10) / 32
    return nbytes / (ms * 1e-3), ms, nbytes / (ms32 * 1e-3), nbytes / (copy_ms * 1e-3)


def attention_times(n, ratio=0.15):
    """Milliseconds of full causal SDPA, and of the subset attention (15% of
    the queries, sorted positions) through SDPA with a mask and FlexAttention
    (block mask build timed apart), with the relative error of each against
    SDPA's full causal rows."""
    from kvblend.model.attention import FlexAttention, FlexGraphs

    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(n, HEADS, HEAD, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(n, KV_HEADS, HEAD, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    qh, kh, vh = (x[None].transpose(1, 2) for x in (q, k, v))
    full = cuda_time(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True,
                                                            enable_gqa=True))
    idx = torch.sort(torch.randperm(n, device="cuda", generator=g)[: int(ratio * n)]).values
    qs = q[idx].contiguous()
    pos = torch.arange(n, device="cuda")
    qsh = qs[None].transpose(1, 2)
    mask = pos[None, :] <= idx[:, None]
    sub_sdpa = cuda_time(lambda: F.scaled_dot_product_attention(qsh, kh, vh, attn_mask=mask,
                                                                enable_gqa=True))
    out = F.scaled_dot_product_attention(qsh, kh, vh, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
    flex = FlexAttention()
    group = HEADS // KV_HEADS if flex.pack_gqa else 1
    # K/V padded to whole tiles once, as the blend's staging buffers are
    n_pad = -(-n // 128) * 128
    kp = torch.cat((k, k.new_zeros(n_pad - n, KV_HEADS, HEAD)))
    vp = torch.cat((v, v.new_zeros(n_pad - n, KV_HEADS, HEAD)))
    t0 = time.perf_counter()
    bm = flex.block_mask(idx, n, group)
    fo = flex.attend(qs, kp, vp, bm, HEAD ** -0.5)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    variants = {}
    if fo is None:
        flex_ms = flex_eager_ms = mask_ms = float("nan")
        flex_err = float("nan")
    else:
        # the blend replays the call from a CUDA graph (device time only);
        # the eager call adds ~0.3 ms of host time per call
        fg = FlexGraphs(flex, bm, HEAD ** -0.5)
        flex_ms = cuda_time(lambda: fg(qs, kp, vp))
        flex_eager_ms = cuda_time(lambda: flex.attend(qs, kp, vp, bm, HEAD ** -0.5))
        mask_ms = cuda_time(lambda: flex.block_mask(idx, n, group), iters=5)
        # the layouts and tile sizes the default was chosen from (graph replays)
        for g_, hf in ((1, False), (1, True), (HEADS // KV_HEADS, False), (HEADS // KV_HEADS, True)):
            opt_list = (("", None), (" M64", {"BLOCK_M": 64, "BLOCK_N": 64}))
            if (g_, hf) == (HEADS // KV_HEADS, False):
                opt_list += ((" M128N128w8s2", {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8,
                                                "num_stages": 2}),
                             (" M128N64w8s3", {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8,
                                               "num_stages": 3}),
                             (" TMA", {"USE_TMA": True}))
            for name, opts in opt_list:
                label = f"group{g_}{' heavy-first' if hf else ''}{name}"
                variant = FlexAttention(heavy_first=hf, kernel_options=opts)
                try:
                    m_ = variant.block_mask(idx, n, g_)
                    if variant.attend(qs, kp, vp, m_, HEAD ** -0.5) is None:
                        variants[label] = "unavailable"
                        continue
                    fg_ = FlexGraphs(variant, m_, HEAD ** -0.5)
                    variants[label] = round(cuda_time(lambda: fg_(qs, kp, vp)), 4)
                except Exception as e:  # noqa: BLE001 - a variant that fails is reported
                    variants[label] = repr(e)[:80]
    # reference check of the subset against SDPA's rows
    ref = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True,
                                         enable_gqa=True)[0].transpose(0, 1)[idx].float()
    # the "fa3" strategy (FlashAttention 3 over key blocks), where vLLM's FA3 imports
    try:
        from kvblend.model.attention import FA3Attention, SubsetGraphs

        # the key block trades the prior call's query-tile fill against the
        # diagonal call's rows (FA3Attention); pages made no difference
        # (128/64/16 rows: 0.597/0.598/0.605 ms at 8K on an H200)
        for block in (128, 256, 512, 1024):
            label = "fa3" if block == 128 else f"fa3 block {block}"
            fa3 = FA3Attention(block=block)
            n_blk = -(-n // block) * block
            kb = torch.cat((k, k.new_zeros(n_blk - n, KV_HEADS, HEAD)))
            vb = torch.cat((v, v.new_zeros(n_blk - n, KV_HEADS, HEAD)))
            sg = SubsetGraphs(lambda q_, k_, v_, fa3=fa3: fa3.attend(q_, idx, k_, v_, HEAD ** -0.5))
            fo3 = sg(qs, kb, vb).clone()
            variants[label] = round(cuda_time(lambda: sg(qs, kb, vb)), 4)
            variants[label + " err"] = round(float((fo3.float() - ref).norm() / ref.norm()), 5)
        variants["fa3 eager"] = round(cuda_time(lambda: FA3Attention().attend(
            qs, idx, kp, vp, HEAD ** -0.5)), 4)
        # full causal attention as vLLM's FLASH_ATTN prefill runs it: the
        # reference of the subset ratios (SDPA's kernel choice varies with
        # the process's settings: 0.93 or 1.76 ms at 8K on the same card)
        from kvblend.model.attention import flash_attn_v3

        fn, _ = flash_attn_v3()
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        variants["fa3 full causal"] = round(cuda_time(lambda: fn(
            q, k, v, max_seqlen_q=n, cu_seqlens_q=cu, max_seqlen_k=n, cu_seqlens_k=cu,
            softmax_scale=HEAD ** -0.5, causal=True, fa_version=3)), 4)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        variants["fa3"] = repr(e)[:120]
    try:
        variants.update(layer0_times(q, k, v, kp, vp, flex, group))
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        variants["layer0"] = repr(e)[:120]
    err = float((out.float() - ref).norm() / ref.norm())
    if fo is not None:
        flex_err = float((fo.float() - ref).norm() / ref.norm())
    return dict(sdpa_full_ms=full, subset_sdpa_ms=sub_sdpa, subset_err=err,
                subset_flex_ms=flex_ms, subset_flex_eager_ms=flex_eager_ms,
                flex_mask_ms=mask_ms, flex_err=flex_err,
                flex_first_call_s=first_s, flex_variants_ms=variants)


def layer0_times(q, k, v, kp, vp, flex, group, prefix=64):
    """The blend's first layer after a cached prefix (a system prompt in
    vLLM's prefix cache): every row past ``prefix`` over all keys, causal,
    i.e. lower-right aligned.  The blend runs it through its subset strategy
    (FlexAttention under the suffix's block mask); timed against SDPA with
    ``causal_lower_right`` and FA3's causal varlen call (vLLM's own kernel),
    each with its relative error to an fp32 SDPA of the same rows."""
    from kvblend.model.attention import FlexGraphs, flash_attn_v3, sdpa

    n = k.shape[0]
    scale = HEAD ** -0.5
    rows = torch.arange(prefix, n, device="cuda")
    qs = q[prefix:].contiguous()
    ref = sdpa(qs.float(), k.float(), v.float(), scale, q_start=prefix)
    res = {}

    def rel(x):
        return round(float((x.float() - ref).norm() / ref.norm()), 5)
    try:
        bm = flex.block_mask(rows, n, group)
        fg = FlexGraphs(flex, bm, scale)
        res["layer0 flex err"] = rel(fg(qs, kp, vp))
        res["layer0 flex"] = round(cuda_time(lambda: fg(qs, kp, vp)), 4)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        res["layer0 flex"] = repr(e)[:120]
    res["layer0 sdpa err"] = rel(sdpa(qs, k, v, scale, q_start=prefix))
    res["layer0 sdpa"] = round(cuda_time(lambda: sdpa(qs, k, v, scale, q_start=prefix)), 4)
    fn, why = flash_attn_v3()
    if fn is None:
        res["layer0 fa3"] = why[:120]
        return res
    cu_q = torch.tensor([0, n - prefix], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, n], dtype=torch.int32, device="cuda")

    def fa3():
        return fn(qs, k, v, max_seqlen_q=n - prefix, cu_seqlens_q=cu_q, max_seqlen_k=n,
                  cu_seqlens_k=cu_k, softmax_scale=scale, causal=True, fa_version=3)
    res["layer0 fa3 err"] = rel(fa3())
    res["layer0 fa3"] = round(cuda_time(fa3), 4)
    return res


def profile_ttft(llm, ids, path, title):
    """One TTFT under torch.profiler: the 30 heaviest ops by device time and
    by host time, appended to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t, _ = ttft(llm, ids)
    ka = prof.key_averages()
    # device busy time: the union of every kernel's interval, against the
    # span from the first to the last kernel
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type.name == "CUDA")
    busy, cur_s, cur_e = 0.0, None, None
    for a, b in spans:
        if cur_e is None or a > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    if cur_e is not None:
        busy += cur_e - cur_s
    span = (spans[-1][1] - spans[0][0]) if spans else 0.0
    with open(path, "a") as f:
        f.write(f"==== {title}: TTFT {t * 1e3:.1f} ms (under the profiler); device busy "
                f"{busy / 1e3:.1f} ms of a {span / 1e3:.1f} ms kernel span, {len(spans)} kernels\n")
        f.write(ka.table(sort_by="cuda_time_total", row_limit=40) + "\n")
        f.write(ka.table(sort_by="cpu_time_total", row_limit=25) + "\n")
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,8192,16384")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=".")
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "RESULTS.md"),
                    help="append the table to this file (default benchmarks/RESULTS.md; '' = don't)")
    ap.add_argument("--subset-attention", default="flex", choices=("flex", "sdpa", "fa3"),
                    help="subset attention of the blend on CUDA")
    ap.add_argument("--no-pipeline", action="store_true",
                    help="load each layer on the compute stream (no layer-ahead loads)")
    ap.add_argument("--profile", action="store_true",
                    help="write torch.profiler tables of one 8K TTFT per engine to profile.txt")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    blend_options = {"kvblend.subset_attention": args.subset_attention,
                     "kvblend.pipeline_loads": not args.no_pipeline}
    chunks_of = {4096: 4, 8192: 6, 16384: 8}
    t0 = time.time()
    model = build_model()
    print(f"model built in {time.time() - t0:.1f}s", flush=True)
    max_len = max(sizes) + 512
    tiers = ("device", "host", "device_eager")
    engines = {k: engine(model, k, max_len, blend_options) for k in ("full", "full_eager") + tiers}
    details = {}
    rng = random.Random(1)
    for n in sizes:
        nch = chunks_of.get(n, 6)
        warm_ids, chunks = make_prompt(rng, n, nch, question_seed=0)
        res = {"n": len(warm_ids), "chunks": nch}
        for full in ("full", "full_eager"):
            ttft(engines[full], warm_ids)  # warm-up
            res[f"{full}_s"] = statistics.median(
                ttft(engines[full], make_prompt(rng, n, nch, chunks, 100 + i)[0])[0]
                for i in range(args.reps))
        for tier in tiers:
            llm = engines[tier]
            ttft(llm, warm_ids)  # stores the chunks
            ttft(llm, make_prompt(rng, n, nch, chunks, 50)[0])  # warm-up blend
            ts, infos = [], []
            for i in range(args.reps):
                t, out = ttft(llm, make_prompt(rng, n, nch, chunks, 200 + i)[0])
                from kvblend import runtime
                ts.append(t)
                infos.append(runtime.request_stats(out.request_id))
            res[f"{tier}_s"] = statistics.median(ts)
            info = infos[-1]
            res[f"{tier}_hit"] = f"{info['segments_hit']}/{info['segments_total']}"
            res[f"{tier}_recomputed"] = info["tokens_recomputed"]
            res[f"{tier}_blend_s"] = statistics.median(i["blend_s"] for i in infos)
            # one more run with per-phase events
            llm.worker_connector.timing = True
            t, out = ttft(llm, make_prompt(rng, n, nch, chunks, 300)[0])
            llm.worker_connector.timing = False
            pinfo = runtime.request_stats(out.request_id)
            res[f"{tier}_phase_ms"] = {k: round(v, 2) for k, v in pinfo["phase_ms"].items()}
            res[f"{tier}_timed_ttft_s"] = t
            res[f"{tier}_timed_blend_s"] = pinfo["blend_s"]
            bw, ms, bw32, copy32 = load_bandwidth(llm, make_prompt(rng, n, nch, chunks, 400)[0])
            res[f"{tier}_load_GBps"] = bw / 1e9
            res[f"{tier}_load_ms_per_layer"] = ms
            res[f"{tier}_load_queued_GBps"] = bw32 / 1e9
            res[f"{tier}_copy_same_GBps"] = copy32 / 1e9
        if args.profile and n == 8192:
            path = os.path.join(args.out, "profile.txt")
            profile_ttft(engines["full"], make_prompt(rng, n, nch, chunks, 500)[0], path, "full 8K")
            for tier in tiers:
                profile_ttft(engines[tier], make_prompt(rng, n, nch, chunks, 501)[0], path,
                             f"kvblend {tier} 8K")
        res.update(attention_times(len(warm_ids)))
        details[n] = res
        print(json.dumps(res), flush=True)
    copy_bw = copy_bandwidth()
    card = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python3 " + " ".join(sys.argv)
    lines = [f"## GPU: {card}, {date}", "", f"Command: `{cmd}` (Llama-3-8B shape, random bf16 weights, "
             f"transformers {__import__('transformers').__version__}, torch {torch.__version__}; "
             f"r=0.15, check layer 1, subset attention {args.subset_attention}, "
             f"layer-ahead loads {'off' if args.no_pipeline else 'on'}; engine and blend with torch.compile'd "
             f"dense pieces and CUDA graphs up to 2048 rows, the eager columns without either; "
             f"TTFT = engine arrival to first token, median of {args.reps})", "",
             f"Device copy rate (torch copy_ of 512 MiB, read+write): {copy_bw / 1e9:.0f} GB/s", "",
             "| N | chunks | full TTFT s | kvblend GPU tier s | ratio (vs eager full) "
             "| kvblend pinned host s | ratio (vs eager full) "
             "| eager engine: full TTFT s | GPU tier s | ratio "
             "| load+rerotate GPU tier GB/s (% of copy) | host tier GB/s | SDPA full causal ms "
             "| subset 15% SDPA+mask ms (/full) "
             "| subset 15% FlexAttention ms (/full) | same, eager call ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in details.items():
        lines.append(
            f"| {r['n']} | {r['chunks']} | {r['full_s']:.3f} | {r['device_s']:.3f} | "
            f"{r['full_s'] / r['device_s']:.2f}x ({r['full_eager_s'] / r['device_s']:.2f}x) | "
            f"{r['host_s']:.3f} | {r['full_s'] / r['host_s']:.2f}x ({r['full_eager_s'] / r['host_s']:.2f}x) | "
            f"{r['full_eager_s']:.3f} | {r['device_eager_s']:.3f} | "
            f"{r['full_eager_s'] / r['device_eager_s']:.2f}x | "
            f"{r['device_load_GBps']:.0f} ({100 * r['device_load_GBps'] * 1e9 / copy_bw:.0f}%) | "
            f"{r['host_load_GBps']:.1f} | {r['sdpa_full_ms']:.2f} | "
            f"{r['subset_sdpa_ms']:.2f} ({r['subset_sdpa_ms'] / r['sdpa_full_ms']:.2f}) | "
            f"{r['subset_flex_ms']:.2f} ({r['subset_flex_ms'] / r['sdpa_full_ms']:.2f}) | "
            f"{r['subset_flex_eager_ms']:.2f} |")
    lines += ["", "Load + re-rotate, the 32 layers queued back to back as the blend queues them "
              "(device GB/s, read+write; % of the 512 MiB copy rate; % of a device copy of the same "
              "bytes queued the same way):", ""]
    for n, r in details.items():
        for tier in tiers:
            q, c = r[f"{tier}_load_queued_GBps"], r[f"{tier}_copy_same_GBps"]
            lines.append(f"- N={r['n']} {tier} tier: {q:.0f} GB/s ({100 * q * 1e9 / copy_bw:.0f}% of "
                         f"{copy_bw / 1e9:.0f}; {100 * q / c:.0f}% of {c:.0f}); one call alone "
                         f"{r[f'{tier}_load_ms_per_layer'] * 1e3:.1f} us")
    lines += ["", "Per-phase device time of one blend (ms over all 32 layers; CUDA events), "
              "and blend / TTFT seconds:", "",
              "| N | tier | TTFT s | blend s | " + " | ".join(("load", "qkv", "select", "attention", "out", "scatter")) + " |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in details.items():
        for tier in tiers:
            p = r[f"{tier}_phase_ms"]
            lines.append(f"| {r['n']} | {tier} | {r[f'{tier}_timed_ttft_s']:.3f} | {r[f'{tier}_timed_blend_s']:.3f} | "
                         + " | ".join(f"{p.get(k, 0.0):.1f}" for k in ("load", "qkv", "select", "attention", "out", "scatter"))
                         + " |")
    lines += ["", "Subset attention (15% of the queries) through FlexAttention, ms by query layout "
              "(group4: the 4 query heads of a KV head packed as rows; heavy-first: rows by "
              "descending position) and kernel tile options:", ""]
    for n, r in details.items():
        lines.append(f"- N={r['n']}: " + ", ".join(f"{k} {v}" for k, v in r["flex_variants_ms"].items()))
    md = "\n".join(lines) + "\n"
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"card": card, "date": date, "command": cmd, "copy_GBps": copy_bw / 1e9,
                   "sizes": details}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
