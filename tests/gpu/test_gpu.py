"""The CUDA path from Python: each kvblend op on CUDA tensors equals the CPU
op on the same inputs, and the whole blend on the GPU (device tier and
pinned host tier) gives the CPU blend's greedy tokens and logits on a
random-weight model of SmolLM2's shape.  Skips without CUDA or without a
CUDA build of the extension."""

import copy

import pytest
import torch

pytest.importorskip("kvblend._kvblend")
from kvblend import _clib  # noqa: E402

if not torch.cuda.is_available() or not _clib.has_cuda():
    pytest.skip("needs a CUDA device and a CUDA build of kvblend", allow_module_level=True)

from kvblend import ops, runtime  # noqa: E402
from kvblend.engine import LLM, KVTransferConfig, SamplingParams  # noqa: E402
from kvblend.prompt import join  # noqa: E402

DEV = torch.device("cuda", 0)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
SEP_IDS = [5, 6]


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------ ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["cpu", "flash", "flashinfer", "joint"])
def test_gather_scatter_match_cpu(dtype, layout):
    g = torch.Generator().manual_seed(1)
    blocks, bs, h, d = 12, 16, 3, 64
    shape = {"cpu": (2, blocks, h, bs, d), "flash": (2, blocks, bs, h, d),
             "flashinfer": (blocks, 2, bs, h, d), "joint": (blocks, bs, h, 2 * d)}[layout]
    cache = torch.randn(shape, generator=g).to(dtype)
    slots = torch.randperm(blocks * bs, generator=g)[:70].to(torch.int64)
    slots[3] = -1
    k_in = torch.randn(70, h, d, generator=g).to(dtype)
    v_in = torch.randn(70, h, d, generator=g).to(dtype)
    gcache = cache.to(DEV)
    ops.scatter(ops.paged_layout(cache, layout), slots, k_in, v_in)
    ops.scatter(ops.paged_layout(gcache, layout), slots.to(DEV), k_in.to(DEV), v_in.to(DEV))
    assert torch.equal(gcache.cpu(), cache)
    ko, vo = torch.full_like(k_in, 7), torch.full_like(v_in, 7)
    gko, gvo = ko.to(DEV), vo.to(DEV)
    ops.gather(ops.paged_layout(cache, layout), slots, ko, vo)
    ops.gather(ops.paged_layout(gcache, layout), slots.to(DEV), gko, gvo)
    assert torch.equal(gko.cpu(), ko) and torch.equal(gvo.cpu(), vo)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rerotate_deviation_match_cpu(dtype):
    g = torch.Generator().manual_seed(2)
    n, h, d = 300, 4, 128
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2).float() / d))
    k = torch.randn(n, h, d, generator=g).to(dtype)
    old = torch.randint(0, 4000, (n,), generator=g)
    new = torch.randint(0, 4000, (n,), generator=g)
    gk = k.to(DEV)
    ops.rerotate(k, inv, d, "neox", old, new)
    ops.rerotate(gk, inv, d, "neox", old.to(DEV), new.to(DEV))
    assert _rel(gk, k) <= TOL[dtype]
    b = torch.randn(n, h, d, generator=g).to(dtype)
    dev_cpu = ops.deviation(k, b)
    dev_gpu = ops.deviation(gk, b.to(DEV))
    assert _rel(dev_gpu, ops.deviation(gk.cpu(), b)) <= 1e-5
    assert dev_cpu.shape == dev_gpu.shape


def test_select_matches_cpu():
    g = torch.Generator().manual_seed(3)
    n = 5000
    score = torch.randn(n, generator=g)
    score[10:20] = 0.5  # ties: lower index first
    forced = (torch.rand(n, generator=g) < 0.05).to(torch.uint8)
    nf = int(forced.sum())
    for k in (0, 1, 750, n):
        cpu = ops.select(score, forced, k)
        gpu = ops.select(score.to(DEV), forced.to(DEV), k, n_forced=nf)
        assert torch.equal(gpu.cpu(), cpu)


def test_attention_op_refuses_cuda_tensors():
    """kvblend's attention op is the CPU reference: CUDA tensors are refused
    by name (the blend's GPU strategies are FlexAttention and SDPA)."""
    q = torch.zeros(2, 4, 64, device=DEV)
    k = torch.zeros(3, 2, 64, device=DEV)
    with pytest.raises(ValueError, match="q: expected device cpu"):
        ops.attention(q, torch.arange(2, device=DEV), k, k, torch.arange(3, device=DEV))


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("nk,nq", [(700, 105), (2000, 300), (1029, 1000)])
@pytest.mark.parametrize("group,heavy_first", [(1, False), (4, True), (4, False), (1, True)])
def test_flex_subset_attention_matches_cpu(dtype, nk, nq, group, heavy_first):
    """The blend's FlexAttention path (block mask by position, GQA; query
    heads packed per KV head or not, rows ascending or heavy-first) equals
    kvblend's CPU attention on the same subset; fresh inputs per size."""
    from kvblend.model.attention import FlexAttention

    g = torch.Generator().manual_seed(nk + nq)
    hq, hkv, hs = 8, 8 // group if group > 1 else 2, 128
    q_all = torch.randn(nk, hq, hs, generator=g).to(dtype)
    k = torch.randn(nk, hkv, hs, generator=g).to(dtype)
    v = torch.randn(nk, hkv, hs, generator=g).to(dtype)
    q_pos = torch.sort(torch.randperm(nk, generator=g)[:nq]).values
    q = q_all[q_pos].contiguous()
    cpu = ops.attention(q, q_pos, k, v, torch.arange(nk), 0.1)
    qd = q_pos.to(DEV)
    flex = FlexAttention(heavy_first=heavy_first)
    bm = flex.block_mask(qd, nk, group)
    gpu = flex.attend(q.to(DEV), k.to(DEV), v.to(DEV), bm, 0.1)
    assert not flex.broken, "FlexAttention fell back to SDPA"
    assert gpu is not None and torch.isfinite(gpu).all()
    assert _rel(gpu, cpu) <= 2e-2


def test_flex_graphs_replay_equals_eager():
    """The blend's CUDA-graph replay of FlexAttention equals the eager call,
    for the two staging pairs and for new queries copied into a replay."""
    from kvblend.model.attention import FlexAttention, FlexGraphs

    g = torch.Generator().manual_seed(9)
    nk, nq = 1100, 170
    k = [torch.randn(1152, 2, 128, generator=g).to(DEV, torch.bfloat16) for _ in range(2)]
    v = [torch.randn(1152, 2, 128, generator=g).to(DEV, torch.bfloat16) for _ in range(2)]
    q_pos = torch.sort(torch.randperm(nk, generator=g)[:nq]).values.to(DEV)
    flex = FlexAttention(heavy_first=True)
    bm = flex.block_mask(q_pos, nk, 4)
    fg = FlexGraphs(flex, bm, 0.1)
    for step in range(5):
        q = torch.randn(nq, 8, 128, generator=g).to(DEV, torch.bfloat16)
        want = flex.attend(q, k[step % 2], v[step % 2], bm, 0.1)
        got = fg(q, k[step % 2], v[step % 2]).clone()
        assert not fg.failed
        assert torch.equal(got, want), step
    assert len(fg.graphs) == 2


def _fa3():
    from kvblend.model.attention import flash_attn_v3

    fn, why = flash_attn_v3()
    if fn is None:
        pytest.skip(why)
    return fn


@pytest.mark.parametrize("nk,nq", [(700, 105), (2000, 300), (1029, 1000), (8192, 1229)])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (8, 8)])
@pytest.mark.parametrize("block", [128, 512])
def test_fa3_subset_attention_matches_cpu(nk, nq, hq, hkv, block):
    """The "fa3" strategy (FlashAttention 3 over key blocks, merged by
    log-sum-exp) equals kvblend's CPU attention on the same subset, bf16,
    for the default key block and a larger one."""
    from kvblend.model.attention import FA3Attention

    fa3 = FA3Attention(_fa3(), block=block)
    g = torch.Generator().manual_seed(nk + nq + hkv)
    q_all = torch.randn(nk, hq, 128, generator=g).to(torch.bfloat16)
    k = torch.randn(nk, hkv, 128, generator=g).to(torch.bfloat16)
    v = torch.randn(nk, hkv, 128, generator=g).to(torch.bfloat16)
    q_pos = torch.unique(torch.cat((torch.randperm(nk, generator=g)[:nq], torch.tensor([0, 5]))))
    q = q_all[q_pos].contiguous()
    cpu = ops.attention(q, q_pos, k, v, torch.arange(nk), 0.1)
    n_pad = -(-nk // block) * block
    kp = torch.cat((k, k.new_zeros(n_pad - nk, hkv, 128))).to(DEV)
    vp = torch.cat((v, v.new_zeros(n_pad - nk, hkv, 128))).to(DEV)
    gpu = fa3.attend(q.to(DEV), q_pos.to(DEV), kp, vp, 0.1)
    assert gpu.dtype == torch.bfloat16 and torch.isfinite(gpu).all()
    assert _rel(gpu, cpu) <= 2e-2


def test_fa3_blend_graph_replays_equal_eager():
    """The blend's FA3 calls replayed from CUDA graphs (one per staging
    pair, new queries copied in) equal eager calls."""
    from kvblend.model.attention import FA3Attention

    fa3 = FA3Attention(_fa3())
    g = torch.Generator().manual_seed(11)
    nk, nq = 1100, 170
    k = [torch.randn(1152, 2, 128, generator=g).to(DEV, torch.bfloat16) for _ in range(2)]
    v = [torch.randn(1152, 2, 128, generator=g).to(DEV, torch.bfloat16) for _ in range(2)]
    active = torch.sort(torch.randperm(nk, generator=g)[:nq]).values.to(DEV)
    attend = fa3.begin(0.1, 4)
    for step in range(5):
        q = torch.randn(nq, 8, 128, generator=g).to(DEV, torch.bfloat16)
        want = fa3.attend(q, active, k[step % 2], v[step % 2], 0.1)
        got = attend(q, active, k[step % 2][:nk], v[step % 2][:nk], None,
                     (k[step % 2], v[step % 2])).clone()
        assert torch.equal(got, want), step
    assert attend.graphs is not None and not attend.graphs.failed
    assert len(attend.graphs.graphs) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tq,tk", [(1, 300), (35, 1000), (400, 700)])
def test_attend_bottom_right_causal_matches_mask(dtype, tq, tk):
    """The engine's partial prefill on CUDA (bottom-right causal, unexpanded
    KV heads) equals the explicit mask by position computed on the CPU."""
    from kvblend.model.hf import HFAdapter

    a = HFAdapter.__new__(HFAdapter)
    a.sliding_windows, a.num_q_heads, a.num_kv_heads, a.scale = [None], 8, 2, 0.09
    g = torch.Generator().manual_seed(tq * tk)
    q = torch.randn(tq, 8, 64, generator=g).to(dtype)
    k = torch.randn(tk, 2, 64, generator=g).to(dtype)
    v = torch.randn(tk, 2, 64, generator=g).to(dtype)
    ref = a.attend(0, q.double(), k.double(), v.double(),
                   q_positions=torch.arange(tk - tq, tk), k_positions=torch.arange(tk))
    got = a.attend(0, q.to(DEV), k.to(DEV), v.to(DEV), q_start=tk - tq)
    assert _rel(got, ref) <= (1e-5 if dtype == torch.float32 else 2e-2)


def _partial_prefill_check(device):
    """Logits of prefilling tokens [start, n) over a cache holding [0, n),
    with the request's blocks consecutive (read in place) and reversed
    (gathered), against a full prefill."""
    import transformers as tf

    torch.manual_seed(3)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                         max_position_embeddings=4096)
    model = tf.LlamaForCausalLM(cfg).eval().to(device)
    n = 600
    ids = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    llm = LLM(model=model, tokenizer=None, max_model_len=1024)
    want = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, ignore_eos=True),
                        return_first_logits=True)[0].first_logits.cpu()
    for order in ("consecutive", "reversed"):
        blocks = llm.allocator.allocate(order, -(-n // llm.block_size))
        if order == "reversed":
            llm.allocator._owned[order] = blocks[::-1]
        with torch.inference_mode():
            llm._forward(order, ids, 0, llm._forward_context(order, n, 0))  # fill the cache
            for start in (1, 200, n - 10, n - 1):
                ctx = llm._forward_context(order, n - start, start)
                h = llm._forward(order, ids[start:], start, ctx)
                got = llm.adapter.logits(h[-1:])[0].float().cpu()
                rel = float((got - want).norm() / want.norm())
                assert rel < 1e-4, (order, start, rel)
        llm.allocator.free(order)


def test_engine_partial_prefill_equals_full_gpu():
    """A prefill after a cached prefix on CUDA (blocks read in place or
    gathered, bottom-right causal, unexpanded KV heads) gives the full
    prefill's logits."""
    _partial_prefill_check(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_cuda_graphs_equal_eager(dtype):
    """Compiled pieces, with small steps through per-layer CUDA graphs
    (decode, short prefills), give the eager engine's tokens (fp32) and
    logits; a second request replays the captured graphs (stale padded
    rows from the first) with the same result."""
    import transformers as tf

    torch.manual_seed(4)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                         max_position_embeddings=4096)
    model = tf.LlamaForCausalLM(cfg).eval().to(DEV, dtype)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (37, 200, 5)]
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    eager = LLM(model=model, tokenizer=None, max_model_len=1024, enforce_eager=True)
    graphed = LLM(model=model, tokenizer=None, max_model_len=1024, cuda_graph_max_tokens=64)
    assert eager.adapter.graphs is None and graphed.adapter.graphs is not None
    for ids in prompts + prompts[:1]:
        a = eager.generate({"prompt_token_ids": ids}, sp, return_first_logits=True)[0]
        b = graphed.generate({"prompt_token_ids": ids}, sp, return_first_logits=True)[0]
        if dtype == torch.float32:  # bf16 roundings may differ with the padded GEMM shapes
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, len(ids)
        rel = _rel(b.first_logits, a.first_logits)
        assert rel <= (1e-4 if dtype == torch.float32 else 2e-2), (len(ids), rel)
    # decode steps (1 token) and the 37- and 5-token prefills ran as graphs;
    # the 200-token prefill is past 64 rows and stayed eager
    assert graphed.adapter.graphs.captures >= 2 * 3 * 3
    assert not any(key[2] > 64 for key in graphed.adapter.graphs.graphs)


# ---------------------------------------------------------------- blend
class _Tok:
    """The one thing the connector asks a tokenizer: the separator's ids."""

    def encode(self, text, add_special_tokens=False):
        return list(SEP_IDS)


def _smollm2_shaped(seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    return tf.LlamaForCausalLM(cfg).eval()


def _prompts():
    g = torch.Generator().manual_seed(5)
    chunks = [torch.randint(100, 49000, (n,), generator=g).tolist() for n in (90, 120, 75, 110)]
    sys_ids = torch.randint(100, 49000, (12,), generator=g).tolist()
    q1 = torch.randint(100, 49000, (14,), generator=g).tolist()
    q2 = torch.randint(100, 49000, (17,), generator=g).tolist()
    warm = join(sys_ids, chunks, q1, SEP_IDS)
    blended = join(sys_ids, [chunks[2], chunks[0], chunks[3], chunks[1]], q2, SEP_IDS)
    return warm, blended


def _run_blend(model, monkeypatch, engine_id, device_gb, host_gb, restart=False, options=None,
               **env):
    """Store the chunks with one prompt, then blend a reordered prompt (in a
    fresh engine when `restart`: its chunks then come from the lower tiers
    `env` names; `options`: the connector's kv_connector_extra_config);
    returns (tokens, first logits, store stats, blend stats with the
    engine's subset-attention strategy as "attention")."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LMCACHE_ENABLE_BLENDING", "True")
    monkeypatch.setenv("LMCACHE_BLEND_CHECK_LAYERS", "1")
    monkeypatch.setenv("LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.15")
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", str(host_gb))
    monkeypatch.setenv("KVBLEND_MAX_DEVICE_SIZE", str(device_gb))
    runtime.set_model(model, _Tok())
    ktc = KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
                           kv_role="kv_both", engine_id=engine_id,
                           kv_connector_extra_config=dict(options or {}))
    llm = LLM(model=model, tokenizer=None, kv_transfer_config=ktc, max_model_len=2048)
    warm, blended = _prompts()
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    llm.generate({"prompt_token_ids": warm}, sp)
    if restart:
        llm.shutdown()  # flushes the lower tiers' writes
        llm = LLM(model=model, tokenizer=None, kv_transfer_config=ktc, max_model_len=2048)
    out = llm.generate({"prompt_token_ids": blended}, sp, return_first_logits=True)[0]
    stats = llm.worker_connector.blend_stats()
    info = dict(runtime.request_stats(out.request_id))
    info["self_test"] = llm.worker_connector.self_test_report
    info["attention"] = llm.worker_connector.attention
    llm.shutdown()
    return out.outputs[0].token_ids, out.first_logits.float().cpu(), stats, info


@pytest.fixture(scope="module")
def cpu_model():
    return _smollm2_shaped()


@pytest.fixture(scope="module")
def cpu_result(cpu_model):
    mp = pytest.MonkeyPatch()
    try:
        return _run_blend(cpu_model, mp, "cpu", 0, 0.25)
    finally:
        mp.undo()


@pytest.mark.parametrize("tier", ["device", "host"])
def test_blend_fp32_gpu_equals_cpu(cpu_model, cpu_result, monkeypatch, tier):
    gmodel = copy.deepcopy(cpu_model).to(DEV)
    dev_gb, host_gb = (0.25, 0) if tier == "device" else (0, 0.25)
    toks, logits, stats, info = _run_blend(gmodel, monkeypatch, f"gpu32-{tier}", dev_gb, host_gb)
    ctoks, clogits, cstats, cinfo = cpu_result
    assert info["segments_hit"] == 5 and info["blend_rows"] > 0
    assert info["tokens_recomputed"] == cinfo["tokens_recomputed"]
    key = "device_bytes" if tier == "device" else "host_bytes"
    assert stats["store"][key] > 0
    assert toks == ctoks
    rel = float((logits - clogits).norm() / clogits.norm())
    assert rel < 1e-3, rel


@pytest.mark.parametrize("tier", ["device", "host"])
def test_disk_tier_restart_gpu_equals_cpu(cpu_model, cpu_result, monkeypatch, tmp_path, tier):
    """A device connector writes its chunks (device-tier rows copied out
    through CUDA, or pinned host rows) to the disk tier; a fresh engine loads
    them from disk into its memory tier and blends exactly as the CPU does."""
    gmodel = copy.deepcopy(cpu_model).to(DEV)
    dev_gb, host_gb = (0.25, 0) if tier == "device" else (0, 0.25)
    toks, logits, stats, info = _run_blend(
        gmodel, monkeypatch, f"gpu-disk-{tier}", dev_gb, host_gb, restart=True,
        LMCACHE_LOCAL_DISK=str(tmp_path / "kv"), LMCACHE_MAX_LOCAL_DISK_SIZE="1")
    ctoks, clogits, _, cinfo = cpu_result
    assert info["segments_hit"] == 5
    assert stats["tiers"]["disk"]["hits"] == 5 and stats["tiers"]["disk"]["corrupt"] == 0
    assert info["tokens_recomputed"] == cinfo["tokens_recomputed"]
    assert toks == ctoks
    rel = float((logits - clogits).norm() / clogits.norm())
    assert rel < 1e-3, rel


def test_blend_bf16_gpu_near_fp32_cpu(cpu_model, cpu_result, monkeypatch):
    gmodel = copy.deepcopy(cpu_model).to(DEV, torch.bfloat16)
    toks, logits, stats, info = _run_blend(gmodel, monkeypatch, "gpu16", 0.25, 0.25)
    _, clogits, _, _ = cpu_result
    assert info["segments_hit"] == 5
    rel = float((logits - clogits).norm() / clogits.norm())
    cos = float(torch.nn.functional.cosine_similarity(logits, clogits, dim=0))
    assert rel < 0.1 and cos > 0.99, (rel, cos)
    assert info["attention"].name == "flex"
    assert not info["attention"].broken, "bf16 subset attention fell back from FlexAttention"


def test_blend_refuses_a_cpu_only_subset_attention(cpu_model, monkeypatch):
    """"kvblend" (the C attention op) is no subset attention on CUDA: the
    engine refuses to start, naming the choices."""
    with pytest.raises(ValueError, match="expected one of 'flex', 'sdpa'"):
        _run_blend(copy.deepcopy(cpu_model).to(DEV), monkeypatch, "gpu32-kvb", 0.25, 0,
                   options={"kvblend.subset_attention": "kvblend"})


# ------------------------------------------------- selection and the gate
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_mass_matches_cpu(dtype):
    from kvblend.blend import query_mass

    g = torch.Generator().manual_seed(3)
    q = torch.randn(70, 8, 64, generator=g).to(dtype)
    k = torch.randn(400, 2, 64, generator=g).to(dtype)
    q_pos, k_pos = torch.arange(330, 400), torch.arange(400)
    for window in (None, 100):
        ref = query_mass(q, q_pos, k, k_pos, 0.125, window)
        got = query_mass(q.to(DEV), q_pos.to(DEV), k.to(DEV), k_pos.to(DEV), 0.125, window)
        assert torch.allclose(got.cpu(), ref, rtol=1e-4, atol=1e-5), window


_QUERY_ENV = {"KVBLEND_SELECTION": "query_deviation", "KVBLEND_BOUNDARY_TOKENS": "4"}


@pytest.fixture(scope="module")
def cpu_query_result(cpu_model):
    mp = pytest.MonkeyPatch()
    try:
        return _run_blend(cpu_model, mp, "cpu-q", 0, 0.25, **_QUERY_ENV)
    finally:
        mp.undo()


@pytest.mark.parametrize("tier", ["device", "host"])
def test_query_selection_gpu_equals_cpu(cpu_model, cpu_query_result, monkeypatch, tier):
    """Query-aware selection with boundary rows: the same rows kept and the
    same tokens on the GPU as on the CPU (fp32)."""
    gmodel = copy.deepcopy(cpu_model).to(DEV)
    dev_gb, host_gb = (0.25, 0) if tier == "device" else (0, 0.25)
    toks, logits, _, info = _run_blend(gmodel, monkeypatch, f"gpu-q-{tier}", dev_gb, host_gb,
                                       **_QUERY_ENV)
    ctoks, clogits, _, cinfo = cpu_query_result
    assert info["segments_hit"] == 5
    assert info["tokens_recomputed"] == cinfo["tokens_recomputed"]
    assert toks == ctoks
    rel = float((logits - clogits).norm() / clogits.norm())
    assert rel < 1e-3, rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_test_passes_on_gpu(cpu_model, monkeypatch, dtype):
    """The start-up gate on the GPU connector (device tier, the engine's KV
    dtype): passes with errors at the dtype's rounding."""
    gmodel = copy.deepcopy(cpu_model).to(DEV, dtype)
    _, _, _, info = _run_blend(gmodel, monkeypatch, f"gate-{dtype}", 0.25, 0.25)
    rep = info["self_test"]
    assert rep is not None and rep["reference"] == "model forward"
    limit = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 1e-1)
    assert rep["key_error"] < limit[0] and rep["logits_error"] < limit[1], rep


def test_query_selection_under_cuda_graphs_equals_eager(monkeypatch):
    """Query-aware selection on a short prompt whose blended rows and
    question rows fall in the same CUDA-graph size bucket: the question's
    pieces must not overwrite the blended rows' graph outputs (same tokens
    and logits as the eager engine)."""
    import transformers as tf

    torch.manual_seed(6)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                         max_position_embeddings=4096)
    model = tf.LlamaForCausalLM(cfg).eval().to(DEV)
    for k, v in {"LMCACHE_ENABLE_BLENDING": "True", "LMCACHE_BLEND_CHECK_LAYERS": "1",
                 "KVBLEND_SELECTION": "query_deviation", "KVBLEND_BOUNDARY_TOKENS": "4"}.items():
        monkeypatch.setenv(k, v)
    runtime.set_model(model, _Tok())
    g = torch.Generator().manual_seed(8)
    chunks = [torch.randint(100, 990, (45,), generator=g).tolist() for _ in range(4)]
    sys_ids = torch.randint(100, 990, (12,), generator=g).tolist()
    question = torch.randint(100, 990, (150,), generator=g).tolist()  # bucket 256, as the blend
    warm = join(sys_ids, chunks, question[:5], SEP_IDS)
    blended = join(sys_ids, chunks[::-1], question, SEP_IDS)
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    out = {}
    for name, eager in (("eager", True), ("graphs", False)):
        ktc = KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
                               kv_role="kv_both", engine_id=f"graphs-{name}")
        llm = LLM(model=model, tokenizer=None, kv_transfer_config=ktc, max_model_len=1024,
                  enforce_eager=eager, cuda_graph_max_tokens=512)
        llm.generate({"prompt_token_ids": warm}, sp)
        o = llm.generate({"prompt_token_ids": blended}, sp, return_first_logits=True)[0]
        out[name] = (o.outputs[0].token_ids, o.first_logits.float().cpu(),
                     runtime.request_stats(o.request_id))
        llm.shutdown()
    assert out["graphs"][2]["segments_hit"] == out["eager"][2]["segments_hit"] == 5
    assert 100 < out["graphs"][2]["blend_rows"] <= 256
    assert out["graphs"][0] == out["eager"][0]
    assert _rel(out["graphs"][1], out["eager"][1]) < 1e-4
