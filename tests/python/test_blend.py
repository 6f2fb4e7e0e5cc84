"""The blend end to end on the built-in engine with the real SmolLM2.

Each property is the one DESIGN.md names: ratio 1.0 reproduces full prefill;
ratio 0 is pure reuse of the stored rows re-rotated; a prompt of only new
chunks is exactly the engine without the connector; reordered, new-in-the-
middle and repeated chunks are reused; odd prompts fall back to a full
prefill; bad LMCACHE_* values fail at construction, naming the variable.
"""

import pytest
import torch

pytest.importorskip("kvblend._kvblend")

from kvblend import runtime  # noqa: E402
from kvblend.engine import LLM, KVTransferConfig, SamplingParams, kv_read  # noqa: E402
from kvblend.prompt import encode, join  # noqa: E402

SEP = " # # "
ENV = {"LMCACHE_ENABLE_BLENDING": "True", "LMCACHE_BLEND_SPECIAL_STR": SEP,
       "LMCACHE_BLEND_CHECK_LAYERS": "1", "LMCACHE_BLEND_RECOMPUTE_RATIOS": "0.15"}
TEXTS = [
    "The Amazon river flows through Brazil, Peru and Colombia and carries more water than any "
    "other river. Its basin is home to the largest tropical rainforest on Earth, with millions of "
    "species of insects, plants, birds and other forms of life.",
    "Mount Kilimanjaro in Tanzania is the highest mountain in Africa. It is a dormant volcano "
    "with three cones, Kibo, Mawenzi and Shira, and climbers reach its summit, Uhuru Peak, "
    "after several days of walking through five climate zones.",
    "The Great Barrier Reef lies off the coast of Queensland in Australia. It is the world's "
    "largest coral reef system, made of nearly three thousand individual reefs and hundreds of "
    "islands, and it can be seen from outer space.",
    "Johann Sebastian Bach was a German composer of the Baroque period. He wrote the "
    "Brandenburg Concertos, the Mass in B minor and hundreds of cantatas, and he worked in "
    "Leipzig as a cantor for the last twenty-seven years of his life.",
]


@pytest.fixture
def blend_env(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


def _ktc(ratio=None):
    extra = {} if ratio is None else {"kvblend.recompute_ratios": [ratio]}
    return KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
                            kv_role="kv_both", kv_connector_extra_config=extra)


@pytest.fixture
def engines(smollm2, blend_env):
    """A factory of engines over the one loaded model, plus a full-prefill one.
    Each engine made here has its own, empty store."""
    model, tok = smollm2
    made = []

    def make(ratio=None):
        e = LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc(ratio))
        made.append(e)
        return e

    full = LLM(model=model, tokenizer=tok)
    yield make, full, tok
    for e in made:
        assert e.num_free_blocks() == e.allocator.num_blocks  # no leaked blocks
        e.shutdown()


def _pieces(tok):
    sys_ids = encode(tok, "<|im_start|>system\nAnswer briefly from the passages.<|im_end|>\n"
                          "<|im_start|>user\n")
    chunks = [encode(tok, t) for t in TEXTS]
    q = encode(tok, "\nQuestion: Which mountain is the highest in Africa?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    return sys_ids, chunks, q, encode(tok, SEP)


def _question(tok, text):
    return encode(tok, f"\nQuestion: {text}<|im_end|>\n<|im_start|>assistant\n")


GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def _run(llm, ids):
    out = llm.generate({"prompt_token_ids": ids}, GREEDY, return_first_logits=True)[0]
    return out, runtime.request_stats(str(out.request_id)) or {}


def test_ratio_one_reproduces_full_prefill(engines):
    make, full, tok = engines
    sys_ids, chunks, q, sep = _pieces(tok)
    llm = make(ratio=1.0)
    _run(llm, join(sys_ids, chunks[:3], q, sep))  # stores sys and the chunks
    p2 = join(sys_ids, [chunks[2], chunks[0], chunks[1]], _question(tok, "Where is the reef?"), sep)
    out, st = _run(llm, p2)
    ref, _ = _run(full, p2)
    assert st["segments_hit"] == 4 and st["segments_total"] == 5
    assert out.num_cached_tokens > 0
    diff = (out.first_logits - ref.first_logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids


@pytest.mark.parametrize("layout", ["flash", "flashinfer"])
def test_engine_layout_reaches_the_connector(smollm2, blend_env, layout):
    """The built-in engine names its paged layout in cache_config.kv_cache_layout
    (as vLLM's CacheConfig does); read as the default "cpu" layout, a "flash"
    cache would be blended through the wrong strides."""
    model, tok = smollm2
    sys_ids, chunks, q, sep = _pieces(tok)
    llm = LLM(model=model, tokenizer=tok, kv_cache_layout=layout, kv_transfer_config=_ktc(1.0))
    full = LLM(model=model, tokenizer=tok, kv_cache_layout=layout)
    assert llm.worker_connector.kv_layout == layout
    _run(llm, join(sys_ids, chunks[:3], q, sep))
    p2 = join(sys_ids, [chunks[2], chunks[0], chunks[1]], _question(tok, "Where is the reef?"), sep)
    out, st = _run(llm, p2)
    ref, _ = _run(full, p2)
    assert st["segments_hit"] == 4
    assert (out.first_logits - ref.first_logits).abs().max().item() <= 1e-4
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    llm.shutdown()


def test_ratio_zero_is_pure_reuse_of_rerotated_rows(engines):
    make, full, tok = engines
    sys_ids, chunks, q, sep = _pieces(tok)
    llm = make(ratio=0.0)
    worker = llm.worker_connector
    snaps = []
    orig = worker.wait_for_save

    def snapshot():  # the request's rows of every layer, before the blocks go back
        for a in worker._active.values():
            slots = a.slot_mapping(worker.block_size)
            layers = [kv_read(llm.kv_caches[n], llm.kv_cache_layout, slots) for n in llm.layer_names]
            snaps.append([(k.clone(), v.clone()) for k, v in layers])
        orig()

    worker.wait_for_save = snapshot
    p1 = join(sys_ids, chunks[:3], q, sep)
    p2 = join(sys_ids, [chunks[1], chunks[2], chunks[0]], _question(tok, "Who was Bach?"), sep)
    _run(llm, p1)
    _, st = _run(llm, p2)
    assert st["segments_hit"] == 4
    rope = llm.adapter.rope
    L = llm.adapter.num_layers
    s1, s2 = snaps[-2], snaps[-1]
    # where each chunk starts in p1 and p2
    start1 = len(sys_ids) + len(sep)
    starts1, pos = [], start1
    for c in chunks[:3]:
        starts1.append(pos)
        pos += len(c) + len(sep)
    starts2, pos = {}, start1
    for i in (1, 2, 0):
        starts2[i] = pos
        pos += len(chunks[i]) + len(sep)
    checked = 0
    for layer in range(2, L):  # every layer after the last check layer (1)
        for i in range(3):
            n = len(chunks[i])
            a, b = starts1[i], starts2[i]
            k1, v1 = s1[layer][0][a:a + n], s1[layer][1][a:a + n]
            k2, v2 = s2[layer][0][b:b + n], s2[layer][1][b:b + n]
            delta = torch.full((n,), b - a, dtype=torch.long)
            cos, sin = rope.cos_sin(delta, torch.float32, k1.device)
            want = rope.apply(k1, cos, sin)
            assert torch.equal(v2, v1)
            assert (k2 - want).abs().max().item() < 1e-5
            checked += 1
    assert checked == (L - 2) * 3


def test_only_new_chunks_equal_engine_without_connector(engines):
    make, full, tok = engines
    sys_ids, chunks, q, sep = _pieces(tok)
    llm = make()
    p = join(sys_ids, chunks[:2], q, sep)
    out, st = _run(llm, p)
    ref, _ = _run(full, p)
    assert out.num_cached_tokens == 0
    assert st["segments_hit"] == 0
    assert torch.equal(out.first_logits, ref.first_logits)
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_new_chunk_in_the_middle_reuses_the_others(engines):
    make, full, tok = engines
    sys_ids, chunks, q, sep = _pieces(tok)
    llm = make(ratio=1.0)
    _run(llm, join(sys_ids, [chunks[0], chunks[1]], q, sep))
    p = join(sys_ids, [chunks[0], chunks[3], chunks[1]], _question(tok, "Who wrote cantatas?"),
             sep)  # chunk 3 is new, in the middle
    out, st = _run(llm, p)
    assert st["segments_total"] == 5 and st["segments_hit"] == 3
    # the new chunk and the separators are forced into the recompute set
    assert st["forced_rows"] >= len(chunks[3]) + 3 * len(sep)
    ref, _ = _run(full, p)
    assert (out.first_logits - ref.first_logits).abs().max().item() <= 1e-4


def test_reordered_chunks_at_default_ratio(engines):
    make, full, tok = engines
    sys_ids, chunks, q, sep = _pieces(tok)
    llm = make()
    _run(llm, join(sys_ids, chunks[:3], q, sep))
    p2 = join(sys_ids, [chunks[2], chunks[1], chunks[0]], _question(tok, "What is the Amazon?"), sep)
    out, st = _run(llm, p2)
    ref, _ = _run(full, p2)
    assert st["segments_hit"] == 4
    n_reused = sum(len(c) for c in chunks[:3]) + len(sys_ids)
    # layers after the check layer recompute the forced rows + 15% of the reused
    assert st["active_per_layer"][-1] == st["forced_rows"] + round(0.15 * n_reused)
    assert st["tokens_recomputed"] < 0.3 * st["blend_rows"]
    # a faithful blend: the first token's distribution stays close to full prefill's
    p = torch.log_softmax(ref.first_logits.double(), -1)
    qd = torch.log_softmax(out.first_logits.double(), -1)
    assert float((p.exp() * (p - qd)).sum()) < 0.5


def test_same_chunk_twice_in_one_prompt(engines):
    make, full, tok = engines
    sys_ids, chunks, q, sep = _pieces(tok)
    llm = make(ratio=1.0)
    _run(llm, join(sys_ids, [chunks[0]], q, sep))
    p = join(sys_ids, [chunks[0], chunks[2], chunks[0]], _question(tok, "Name a river."), sep)
    out, st = _run(llm, p)
    assert st["segments_hit"] == 3  # sys and both copies of chunk 0
    ref, _ = _run(full, p)
    assert (out.first_logits - ref.first_logits).abs().max().item() <= 1e-4


def test_prompt_without_separator(engines):
    make, full, tok = engines
    ids = encode(tok, TEXTS[0] + " What flows through Brazil?")
    llm = make(ratio=1.0)
    first, st1 = _run(llm, ids)
    ref, _ = _run(full, ids)
    assert st1["segments_total"] == 1 and st1["segments_hit"] == 0
    assert torch.equal(first.first_logits, ref.first_logits)
    again, st2 = _run(llm, ids)  # the whole prompt is one stored segment now
    assert st2["segments_hit"] == 1
    assert again.num_cached_tokens == len(ids) - 1  # the engine computes the last token
    assert (again.first_logits - ref.first_logits).abs().max().item() <= 1e-4


def test_prompt_shorter_than_separator(engines):
    make, full, tok = engines
    ids = encode(tok, "Hi")[:2]
    assert len(ids) < len(encode(tok, SEP))
    llm = make()
    out, st = _run(llm, ids)
    ref, _ = _run(full, ids)
    assert st["segments_total"] == 0
    assert torch.equal(out.first_logits, ref.first_logits)


@pytest.mark.parametrize("name,value", [
    ("LMCACHE_BLEND_RECOMPUTE_RATIOS", "1.5"),
    ("LMCACHE_BLEND_CHECK_LAYERS", "3,2"),
    ("LMCACHE_ENABLE_BLENDING", "maybe"),
    ("LMCACHE_MAX_LOCAL_CPU_SIZE", "-2"),
    ("LMCACHE_EXTRA_CONFIG", "{\"enable_sparse\": tru}"),
])
def test_bad_env_fails_at_construction(smollm2, blend_env, monkeypatch, name, value):
    model, tok = smollm2
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as ei:
        LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc())
    assert name in str(ei.value) and value in str(ei.value)


def test_ratio_zero_without_forced_rows(engines):
    """Every blended row reused and none forced: after the check layer no row
    is recomputed, and the layers are pure loads."""
    make, full, tok = engines
    sys_ids, chunks, q, sep = _pieces(tok)
    llm = make(ratio=0.0)
    _run(llm, join(sys_ids, [], q, sep))  # stores the system prompt
    out, st = _run(llm, join(sys_ids, [chunks[0]], [], sep))  # blends only sys rows
    assert st["segments_hit"] == 1 and st["forced_rows"] == 0
    assert st["active_per_layer"][2:] == [0] * (llm.adapter.num_layers - 2)
    assert len(out.outputs[0].token_ids) > 0


def test_read_only_consumer_reuses_but_never_stores(engines, smollm2):
    """kv_connector_extra_config {"kvblend.save": False}: the engine blends
    from its store but adds none of its own segments, so a prompt seen
    twice never hits."""
    make, full, tok = engines
    sys_ids, chunks, q, sep = _pieces(tok)
    model, _ = smollm2
    ro = LLM(model=model, tokenizer=tok, kv_transfer_config=KVTransferConfig(
        kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
        kv_role="kv_both", kv_connector_extra_config={"kvblend.save": False}))
    p = join(sys_ids, [chunks[1], chunks[3], chunks[0]], _question(tok, "Name a composer."), sep)
    out, st = _run(ro, p)
    assert (st["segments_total"], st["segments_hit"]) == (5, 0)
    out2, st2 = _run(ro, p)
    assert st2["segments_hit"] == 0 and out2.num_cached_tokens == 0
    assert ro.worker_connector.blend_stats()["store"]["num_entries"] == 0
    assert ro.worker_connector.blend_stats()["segments_stored"] == 0
    # the same prompts through a saving engine: stored once, hit the second time
    writer = make()
    _run(writer, p)
    _, st3 = _run(writer, p)
    assert st3["segments_hit"] == 5 and writer.worker_connector.blend_stats()["segments_stored"] == 5
    ro.shutdown()


def test_profile_option_writes_each_blends_operator_table(engines, smollm2, tmp_path):
    """kv_connector_extra_config {"kvblend.profile": path}: every blend
    appends a torch.profiler table naming the operators it ran."""
    _, _, tok = engines
    sys_ids, chunks, q, sep = _pieces(tok)
    model, _ = smollm2
    path = tmp_path / "blend_profile.txt"
    llm = LLM(model=model, tokenizer=tok, kv_transfer_config=KVTransferConfig(
        kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
        kv_role="kv_both", kv_connector_extra_config={"kvblend.profile": str(path)}))
    _run(llm, join(sys_ids, chunks[:3], q, sep))  # stores: nothing blended yet
    assert path.read_text() == ""  # created (checked writable) at start-up, still empty
    out, st = _run(llm, join(sys_ids, [chunks[2], chunks[0]], q, sep))
    assert st["segments_hit"] >= 3
    text = path.read_text()
    assert text.count("==== kvblend blend, request") == 1
    assert "aten::mm" in text or "aten::addmm" in text or "aten::linear" in text
    assert out.outputs[0].token_ids  # the profiled request still answers
    llm.shutdown()
    with pytest.raises(ValueError, match="'kvblend.profile'=.*cannot write there"):
        LLM(model=model, tokenizer=tok, kv_transfer_config=KVTransferConfig(
            kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"kvblend.profile": str(tmp_path / "no" / "such.txt")}))


def test_stale_lookup_recomputes_what_was_evicted(engines):
    """Every stored segment is evicted between the scheduler's lookup and
    the worker's load: the promised rows are recomputed (at ratio 0.15
    too), so the answer is full prefill's, never stale or zero KV."""
    make, full, tok = engines
    sys_ids, chunks, q, sep = _pieces(tok)
    llm = make(ratio=0.15)
    _run(llm, join(sys_ids, chunks[:3], q, sep))
    worker = llm.worker_connector
    begin = worker._begin

    def evict_then_begin(rm):
        worker._conn.store_clear()
        begin(rm)

    worker._begin = evict_then_begin
    p2 = join(sys_ids, [chunks[2], chunks[0], chunks[1]], _question(tok, "Where is the reef?"), sep)
    out, st = _run(llm, p2)
    ref, _ = _run(full, p2)
    assert out.num_cached_tokens > 0  # the scheduler promised rows ...
    assert st["segments_hit"] == 0    # ... none were there to load
    assert st["tokens_recomputed"] == st["blend_rows"] == out.num_cached_tokens
    diff = (out.first_logits - ref.first_logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_request_sets_its_own_recompute_ratio(engines, caplog):
    """SamplingParams(extra_args={"kvblend_recompute_ratio": r}) overrides the
    configured ratio for that request alone (1.0 gives full prefill's
    logits on an engine configured at 0.15); a bad value is logged with the
    request id and the configured ratio is used."""
    make, full, tok = engines
    sys_ids, chunks, q, sep = _pieces(tok)
    llm = make(ratio=0.15)
    _run(llm, join(sys_ids, chunks[:3], q, sep))
    p2 = join(sys_ids, [chunks[1], chunks[0], chunks[2]], _question(tok, "Who was Bach?"), sep)
    sp = SamplingParams(temperature=0.0, max_tokens=4, extra_args={"kvblend_recompute_ratio": 1.0})
    out = llm.generate({"prompt_token_ids": p2}, sp, return_first_logits=True)[0]
    st = runtime.request_stats(str(out.request_id))
    ref, _ = _run(full, p2)
    assert st["segments_hit"] == 4 and st["tokens_recomputed"] == st["blend_rows"]
    assert (out.first_logits - ref.first_logits).abs().max().item() <= 1e-4
    _, st15 = _run(llm, join(sys_ids, [chunks[2], chunks[1], chunks[0]], q, sep))
    assert 0 < st15["tokens_recomputed"] < st15["blend_rows"]
    bad = SamplingParams(temperature=0.0, max_tokens=1, extra_args={"kvblend_recompute_ratio": 2})
    with caplog.at_level("ERROR", logger="kvblend"):
        out = llm.generate({"prompt_token_ids": p2[:-1] + [p2[-1] + 1]}, bad)[0]
    assert "kvblend_recompute_ratio=2 is not a number in [0, 1]" in caplog.text
    st_bad = runtime.request_stats(str(out.request_id))
    assert 0 < st_bad["tokens_recomputed"] < st_bad["blend_rows"]


def test_failed_prefill_stores_nothing(engines, monkeypatch):
    """A prompt that fails in the forward (an error in the last layer,
    after every layer's KV was written) ends in the connector with the
    request: none of its segments is stored from the freed blocks, and
    later requests blend as before."""
    make, full, tok = engines
    sys_ids, chunks, q, sep = _pieces(tok)
    llm = make(ratio=1.0)
    bad = join(sys_ids, chunks[:3], q, sep)
    real_out, last = llm.adapter.out, llm.adapter.num_layers - 1

    def failing(i, attn, h):
        if i == last:
            raise RuntimeError("injected failure in the last layer")
        return real_out(i, attn, h)

    monkeypatch.setattr(llm.adapter, "out", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        llm.generate({"prompt_token_ids": bad}, GREEDY)
    monkeypatch.setattr(llm.adapter, "out", real_out)
    p2 = join(sys_ids, [chunks[2], chunks[0], chunks[1]], _question(tok, "Where is the reef?"), sep)
    out, st = _run(llm, p2)
    assert st["segments_hit"] == 0 and out.num_cached_tokens == 0  # nothing of `bad` stored
    assert llm.worker_connector.blend_stats()["store"]["num_entries"] == 5  # p2's own
    _run(llm, join(sys_ids, chunks[:3], q, sep))
    p3 = join(sys_ids, [chunks[1], chunks[2], chunks[0]], _question(tok, "Who was Bach?"), sep)
    out3, st3 = _run(llm, p3)
    ref3, _ = _run(full, p3)
    assert st3["segments_hit"] == 4
    assert out3.outputs[0].token_ids == ref3.outputs[0].token_ids
