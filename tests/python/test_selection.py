"""Selection strategies at a check layer (KVBLEND_SELECTION,
KVBLEND_BOUNDARY_TOKENS), each against a reference computed another way.

* ``query_mass`` against a per-query, per-head loop with an explicit softmax;
* query-aware selection in a real blend (SmolLM2, check layer 1) against
  the question's attention computed from transformers' own forward (hidden
  states, projections and rotary embedding of the HF model, not kvblend's
  adapter): the scores ranked are that attention, row for row;
* boundary rows and the tensor-parallel reduction of combined scores.
"""

import pytest
import torch

pytest.importorskip("kvblend._kvblend")

from kvblend import blend, runtime  # noqa: E402
from kvblend.config import Config  # noqa: E402
from kvblend.engine import LLM, SamplingParams  # noqa: E402
from kvblend.prompt import encode, join  # noqa: E402

from test_blend import SEP, TEXTS, _ktc, _question  # noqa: E402


def _mass_reference(q, q_pos, k, k_pos, scale, window=None):
    """The attention mass on each key, one query and one head at a time."""
    T, hq, d = q.shape
    n, hkv, _ = k.shape
    out = torch.zeros(n, dtype=torch.float64)
    for t in range(T):
        for h in range(hq):
            kh = k[:, h // (hq // hkv)].double()
            logits = (kh @ q[t, h].double()) * scale
            seen = k_pos <= q_pos[t]
            if window is not None:
                seen &= k_pos > q_pos[t] - window
            logits[~seen] = float("-inf")
            out += torch.softmax(logits, 0)
    return out


@pytest.mark.parametrize("hq,hkv,window", [(4, 4, None), (6, 2, None), (4, 2, 5)])
def test_query_mass_matches_loop_reference(hq, hkv, window):
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    n, T, d = 40, 9, 8
    k = torch.randn(n + T, hkv, d, generator=g)
    q = torch.randn(T, hq, d, generator=g)
    q_pos = torch.arange(n, n + T)
    k_pos = torch.arange(n + T)
    got = blend.query_mass(q, q_pos, k, k_pos, 0.3, window, block=4)  # several blocks
    ref = _mass_reference(q, q_pos, k, k_pos, 0.3, window)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert abs(float(got.sum()) - T * hq) < 1e-3  # every query's probabilities sum to 1


def test_query_mass_rejects_bad_heads():
    with pytest.raises(ValueError, match="KV heads"):
        blend.query_mass(torch.zeros(2, 3, 4), torch.arange(2), torch.zeros(5, 2, 4),
                         torch.arange(5), 1.0)


def test_boundary_rows_rank_first_in_their_own_order():
    score = torch.tensor([5.0, 0.1, 3.0, 0.2, 9.0, 0.0])
    first = torch.tensor([False, True, False, True, False, True])
    s = blend._boundary_first(score, first)
    order = torch.argsort(s, descending=True).tolist()
    assert order[:3] == [3, 1, 5]  # the boundary rows, by their own score
    assert order[3:] == [4, 0, 2]


def test_combined_score_is_reduced_before_the_product():
    """Tensor parallelism: each rank holds part of the heads; ranks must rank
    by (sum of deviations) x (sum of masses), not by a sum of products."""
    dev_a, dev_b = torch.tensor([1.0, 4.0, 0.0]), torch.tensor([3.0, 0.0, 2.0])
    mass_a, mass_b = torch.tensor([0.5, 0.1, 2.0]), torch.tensor([0.5, 0.1, 0.0])
    other = {"dev": dev_b, "mass": mass_b}

    def reduce(x):  # the all-reduce of rank a: adds rank b's tensor
        return x + torch.stack([other["dev"], other["mass"]])
    got = blend._score(dev_a, mass_a, reduce)
    assert torch.equal(got, (dev_a + dev_b) * (mass_a + mass_b))
    # a single part goes through the reduction alone
    assert torch.equal(blend._score(None, mass_a, lambda x: 2 * x), 2 * mass_a)


@pytest.mark.parametrize("bad", ["queries", "k", ""])
def test_selection_setting_rejects_unknown_values(bad):
    with pytest.raises(ValueError, match="KVBLEND_SELECTION"):
        Config.from_items({"KVBLEND_SELECTION": bad})


@pytest.mark.parametrize("bad", ["-1", "4097", "x"])
def test_boundary_setting_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="KVBLEND_BOUNDARY_TOKENS"):
        Config.from_items({"KVBLEND_BOUNDARY_TOKENS": bad})


def test_settings_extra_config_must_name_variables(smollm2, monkeypatch):
    model, tok = smollm2
    monkeypatch.setenv("LMCACHE_ENABLE_BLENDING", "True")
    ktc = _ktc()
    ktc.kv_connector_extra_config = {"kvblend.settings": {"SELECTION": "query"}}
    with pytest.raises(ValueError, match="kvblend.settings"):
        LLM(model=model, tokenizer=tok, kv_transfer_config=ktc)
    ktc.kv_connector_extra_config = {"kvblend.settings": {"KVBLEND_SELECTION": "nope"}}
    with pytest.raises(ValueError, match="KVBLEND_SELECTION"):
        LLM(model=model, tokenizer=tok, kv_transfer_config=ktc)


def _hf_question_mass(model, ids, start, end, layer):
    """Attention of rows [start, end) to every row at ``layer`` in
    transformers' own full prefill: hidden states from the model's forward,
    then the layer's own norm, projections and rotary embedding."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = torch.tensor([ids])
    with torch.no_grad():
        hs = model(x, output_hidden_states=True).hidden_states[layer]
        lay = model.model.layers[layer]
        att = lay.self_attn
        h = lay.input_layernorm(hs)
        d = att.head_dim
        q = att.q_proj(h).view(1, len(ids), -1, d).transpose(1, 2)
        k = att.k_proj(h).view(1, len(ids), -1, d).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(len(ids))[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q = q[0].transpose(0, 1)[start:end]  # [T, Hq, D]
    k = k[0].transpose(0, 1)             # [N, Hkv, D]
    return _mass_reference(q, torch.arange(start, end), k, torch.arange(len(ids)), att.scaling)


def _blend_with_spy(smollm2, monkeypatch, env, order, question):
    """Store the chunks through an engine configured by ``env``, then blend
    them in ``order`` with ``question``, recording every ops.select call:
    returns (prompt, request stats, [(score, forced, k, keep), ...])."""
    model, tok = smollm2
    for k, v in {"LMCACHE_ENABLE_BLENDING": "True", "LMCACHE_BLEND_SPECIAL_STR": SEP, **env}.items():
        monkeypatch.setenv(k, v)
    llm = LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc())
    sys_ids = encode(tok, "<|im_start|>system\nAnswer from the passages.<|im_end|>\n<|im_start|>user\n")
    chunks = [encode(tok, t) for t in TEXTS]
    sep = encode(tok, SEP)
    sp = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate({"prompt_token_ids": join(sys_ids, chunks, _question(tok, "Hi?"), sep)}, sp)
    prompt = join(sys_ids, [chunks[i] for i in order], _question(tok, question), sep)
    seen = []
    real_select = blend.ops.select

    def spy(score, forced, k, **kw):
        keep = real_select(score, forced, k, **kw)
        seen.append((score.clone(), forced.clone(), k, keep.clone()))
        return keep
    monkeypatch.setattr(blend.ops, "select", spy)
    out = llm.generate({"prompt_token_ids": prompt}, sp)[0]
    st = runtime.request_stats(str(out.request_id))
    llm.shutdown()
    return prompt, st, seen


@pytest.mark.parametrize("boundary", [0, 3])
def test_query_selection_ranks_by_the_questions_attention(smollm2, monkeypatch, boundary):
    """A reordered prompt blended with KVBLEND_SELECTION=query: at check
    layer 1 (every row recomputed before it) the scores ranked are the
    question's attention in the model's own prefill; with boundary rows
    those come first and the budget is unchanged."""
    model, _ = smollm2
    prompt, st, seen = _blend_with_spy(
        smollm2, monkeypatch, {"LMCACHE_BLEND_CHECK_LAYERS": "1", "KVBLEND_SELECTION": "query",
                               "KVBLEND_BOUNDARY_TOKENS": str(boundary)},
        [3, 1, 0, 2], "Who wrote the Brandenburg Concertos?")
    assert st["segments_hit"] == 5 and len(seen) == 1
    score, forced, k, keep = seen[0]
    n = st["blend_rows"]
    off = n - score.numel()  # rows of the engine's own prefix hit are not ranked
    ref = _hf_question_mass(model, prompt, n, len(prompt), 1)[off:n]
    reused = forced == 0
    assert k == blend.num_selected(0.15, int(reused.sum()))
    assert len(keep) == k + int(forced.sum())
    if boundary:
        first = torch.zeros(n - off, dtype=torch.bool)
        starts = [i for i in range(n - off) if reused[i] and (i == 0 or not reused[i - 1])]
        for i in starts:  # a reused row after a forced one starts a chunk
            first[i:i + boundary] = True
        assert len(starts) == 4 + (off == 0)  # the chunks, and sys unless it was a prefix hit
        assert set(torch.nonzero(first & reused).flatten().tolist()) <= set(keep.tolist())
        ref = torch.where(first, ref + ref.max() + 1.0, ref)
    got = score.double()
    assert torch.allclose(got[reused], ref[reused], rtol=2e-3, atol=1e-4), \
        float((got[reused] - ref[reused]).abs().max())
    # the rows kept are the reference's top k (ties aside)
    top = set(torch.nonzero(reused).flatten()[torch.topk(ref[reused], k).indices].tolist())
    kept = set(keep.tolist()) - set(torch.nonzero(forced).flatten().tolist())
    assert len(top ^ kept) <= 2, sorted(top ^ kept)


def test_query_selection_without_rows_after_the_blend_falls_back(caplog):
    """blend_prefill called with only the blended rows: query selection has
    no question to score with; it says so and ranks by deviation."""
    blend._WARNED.clear()
    assert blend._Tail.of(None, torch.arange(10), 10, torch.device("cpu")) is None
    with caplog.at_level("WARNING", logger="kvblend"):
        blend._warn_once("kvblend: query selection needs x")
        blend._warn_once("kvblend: query selection needs x")
    assert sum("query selection" in r.message for r in caplog.records) == 1


def test_query_selection_with_several_check_layers(smollm2, monkeypatch):
    """Check layers 1 and 3 with ratios 0.5 then 0.15: the question's rows
    run up to layer 3, each check layer ranks by its own layer's scores, the
    second keeps the budget of its own ratio out of the first's rows."""
    _, st, seen = _blend_with_spy(
        smollm2, monkeypatch, {"LMCACHE_BLEND_CHECK_LAYERS": "1,3",
                               "LMCACHE_BLEND_RECOMPUTE_RATIOS": "0.5,0.15",
                               "KVBLEND_SELECTION": "query_deviation"},
        [3, 2, 1, 0], "Where is Kilimanjaro?")
    assert len(seen) == 2 and st["segments_hit"] == 5
    (s1, f1, k1, keep1), (s2, f2, k2, keep2) = seen
    reusable = int((f1 == 0).sum())
    assert k1 == blend.num_selected(0.5, reusable) and k2 == blend.num_selected(0.15, reusable)
    assert len(s2) == len(keep1) and len(keep2) == k2 + int(f2.sum())
    assert st["active_per_layer"][1] == len(keep1) and st["active_per_layer"][3] == len(keep2)
    # layer 3's scores are its own: not a reordering of layer 1's
    assert not torch.allclose(s2, s1[keep1])
    assert bool((s2 > 0).all())  # every kept row has question attention and deviation
