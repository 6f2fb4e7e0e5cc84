"""Reliability and isolation on the built-in engine with the real SmolLM2.

Tenants never share chunks (cache_salt, kvblend.namespace); a token id
outside the vocabulary is refused naming its position; a second engine in
the same process leaves the first engine's model alone; options and
settings fail where they enter, naming themselves; and a long run of mixed,
failing and aborted requests over a tiny store never serves a freed slot:
at ratio 1.0 every answer equals the engine without the connector, and at
0.15 every logit stays finite over caches poisoned with NaN between
requests.
"""

import copy
import random

import pytest
import torch

pytest.importorskip("kvblend._kvblend")

from kvblend import Config, InvalidError, runtime  # noqa: E402
from kvblend.engine import LLM, KVTransferConfig, SamplingParams  # noqa: E402
from kvblend.prompt import encode, join  # noqa: E402
from test_blend import ENV, SEP  # noqa: E402  (the settings every SmolLM2 test blends with)

FACTS = [
    "The Amazon river flows through Brazil, Peru and Colombia and carries more water than any "
    "other river on Earth.",
    "Mount Kilimanjaro in Tanzania is the highest mountain in Africa, a dormant volcano with "
    "three cones.",
    "The Great Barrier Reef lies off the coast of Queensland in Australia and can be seen from "
    "outer space.",
    "Johann Sebastian Bach was a German composer of the Baroque period who worked in Leipzig.",
    "The Sahara is the largest hot desert in the world and covers most of North Africa.",
    "Marie Curie was the first person to win Nobel Prizes in two different sciences.",
    "The Pacific is the largest and deepest of the Earth's five oceans.",
    "Honey bees communicate the direction of flowers to each other with a waggle dance.",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=3)


def _ktc(**extra):
    return KVTransferConfig(kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
                            kv_role="kv_both", kv_connector_extra_config=extra)


@pytest.fixture
def blend_env(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def parts(smollm2):
    model, tok = smollm2
    sys_ids = encode(tok, "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")
    chunks = [encode(tok, t) for t in FACTS]
    q = encode(tok, "\nQuestion: Which mountain is the highest in Africa?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    return model, tok, sys_ids, chunks, q, encode(tok, SEP)


def _gen(llm, ids, salt=None, sp=GREEDY):
    prompt = {"prompt_token_ids": ids}
    if salt is not None:
        prompt["cache_salt"] = salt
    out = llm.generate(prompt, sp, return_first_logits=True)[0]
    return out, runtime.request_stats(str(out.request_id)) or {}


def test_cache_salt_and_namespace_keep_tenants_apart(parts, blend_env):
    model, tok, sys_ids, chunks, q, sep = parts
    llm = LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc())
    try:
        _gen(llm, join(sys_ids, chunks[:3], q, sep), salt="alice")
        p2 = join(sys_ids, [chunks[2], chunks[0], chunks[1]], q, sep)
        for salt in ("bob", None):  # another tenant, and the shared namespace
            out, st = _gen(llm, p2, salt=salt)
            assert out.num_cached_tokens == 0 and st["segments_hit"] == 0, salt
        out, st = _gen(llm, p2, salt="")  # "" is no salt: what None just stored
        assert out.num_cached_tokens > 0 and st["segments_hit"] == 5
        out, st = _gen(llm, join(sys_ids, [chunks[1], chunks[2], chunks[0]], q, sep), salt="alice")
        assert out.num_cached_tokens > 0 and st["segments_hit"] == 5  # the question too
    finally:
        llm.shutdown()
    # kvblend.namespace separates engines (deployments) the same way, and a
    # salt refines it
    llm = LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc(**{"kvblend.namespace": "team-a"}))
    try:
        _gen(llm, join(sys_ids, chunks[3:6], q, sep))
        p3 = join(sys_ids, [chunks[5], chunks[3], chunks[4]], q, sep)
        out, _ = _gen(llm, p3, salt="x")
        assert out.num_cached_tokens == 0
        out, st = _gen(llm, p3)
        assert out.num_cached_tokens > 0 and st["segments_hit"] == 5
    finally:
        llm.shutdown()
    with pytest.raises(ValueError, match="'kvblend.namespace'=5: expected a str"):
        LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc(**{"kvblend.namespace": 5}))


def test_token_outside_vocabulary_named_and_nothing_stored(parts, blend_env):
    model, tok, sys_ids, chunks, q, sep = parts
    llm = LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc())
    try:
        vocab = llm.adapter.vocab_size
        bad = join(sys_ids, chunks[:2], q, sep)
        pos = len(bad) - 3
        bad[pos] = vocab + 7
        with pytest.raises(ValueError, match=rf"token id {vocab + 7} at position {pos} is outside "
                                             rf"the model's vocabulary \[0, {vocab}\)"):
            llm.generate({"prompt_token_ids": bad}, GREEDY)
        with pytest.raises(ValueError, match="token id -1 at position 0"):
            llm.generate({"prompt_token_ids": [-1] + bad[1:]}, GREEDY)
        assert llm.worker_connector.blend_stats()["store"]["num_entries"] == 0
        assert llm.num_free_blocks() == llm.allocator.num_blocks
    finally:
        llm.shutdown()


def test_second_engine_leaves_the_first_engines_model_alone(parts, blend_env):
    """A connector binds the model of its engine: an engine built later in
    the process (another model, even without a connector) changes nothing
    in the first one's answers or its stored chunks."""
    model, tok, sys_ids, chunks, q, sep = parts
    full = LLM(model=model, tokenizer=tok)
    first = LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc(**{"kvblend.recompute_ratios": [1.0]}))
    other_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in other_model.parameters():
            p.mul_(1.5)
    second = LLM(model=other_model, tokenizer=tok, kv_transfer_config=_ktc())
    plain = LLM(model=other_model, tokenizer=tok)
    try:
        assert first.worker_connector._conn.fingerprint == second.worker_connector._conn.fingerprint
        _gen(first, join(sys_ids, chunks[:3], q, sep))
        _gen(second, join(sys_ids, chunks[:3], q, sep))  # the other model stores its own KV
        p2 = join(sys_ids, [chunks[2], chunks[0], chunks[1]], q, sep)
        out, st = _gen(first, p2)
        ref, _ = _gen(full, p2)
        assert st["segments_hit"] == 5
        assert (out.first_logits - ref.first_logits).abs().max().item() <= 1e-4
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        oth, _ = _gen(plain, p2)
        assert (oth.first_logits - ref.first_logits).abs().max().item() > 1.0  # really another model
    finally:
        for e in (first, second, full, plain):
            e.shutdown()


def test_failed_step_the_engine_never_reports_stores_nothing(parts, blend_env, monkeypatch, caplog):
    """The worker's own guard: a request whose step failed in the forward
    and that the engine never ends (no finished id reaches the workers) is
    ended at the next step with nothing stored, so its partial saves are
    never completed from slots that now belong to another request."""
    model, tok, sys_ids, chunks, q, sep = parts
    llm = LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc(**{"kvblend.recompute_ratios": [1.0]}))
    full = LLM(model=model, tokenizer=tok)
    real_finish, real_out = llm._finish, llm.adapter.out

    def silent_finish(req, aborted=False):
        if aborted:  # free the blocks, tell no connector
            llm.allocator.free(req.request_id)
        else:
            real_finish(req, aborted)

    def failing(i, attn, h):
        if i == 20:
            raise _Injected("injected failure at layer 20")
        return real_out(i, attn, h)

    try:
        monkeypatch.setattr(llm, "_finish", silent_finish)
        monkeypatch.setattr(llm.adapter, "out", failing)
        with pytest.raises(_Injected):
            llm.generate({"prompt_token_ids": join(sys_ids, chunks[:3], q, sep)}, GREEDY)
        monkeypatch.setattr(llm.adapter, "out", real_out)
        p2 = join(sys_ids, [chunks[4], chunks[5]], q, sep)
        with caplog.at_level("WARNING", logger="kvblend"):
            _gen(llm, p2)
        assert "the step of its prefill did not complete; none of its segments is stored" in caplog.text
        stats = llm.worker_connector.blend_stats()["store"]
        assert stats["num_entries"] == 4  # p2's sys, two chunks, question; nothing of the failed one
        p3 = join(sys_ids, [chunks[2], chunks[0], chunks[1]], q, sep)
        out, st = _gen(llm, p3)
        ref, _ = _gen(full, p3)
        assert st["segments_hit"] == 2  # sys and q, stored by p2
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    finally:
        llm.shutdown()
        full.shutdown()


@pytest.mark.parametrize("value, message", [
    ([2.0], r"entry 0 \(2.0\) is not a ratio in \[0, 1\]"),
    ([-1], r"entry 0 \(-1\) is not a ratio in \[0, 1\]"),
    ([float("nan")], r"entry 0 \(nan\) is not a ratio"),
    (0.5, r"=0.5: expected a non-empty list"),
    ([], r"=\[\]: expected a non-empty list"),
    (["0.2"], r"entry 0 \('0.2'\) is not a ratio"),
    ([True], r"entry 0 \(True\) is not a ratio"),
    ([0.1, 0.2], r"2 ratios for 1 check layers"),
])
def test_recompute_ratio_override_checked_naming_the_option(parts, blend_env, value, message):
    model, tok = parts[:2]
    with pytest.raises(ValueError, match=r"'kvblend.recompute_ratios'.*" + message):
        LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc(**{"kvblend.recompute_ratios": value}))


def test_check_layer_beyond_the_model_fails_at_start(parts, blend_env, monkeypatch):
    model, tok = parts[:2]
    monkeypatch.setenv("LMCACHE_BLEND_CHECK_LAYERS", "1,100")
    monkeypatch.setenv("LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.15")
    with pytest.raises(ValueError, match=r"LMCACHE_BLEND_CHECK_LAYERS=1,100: layer 100 does not "
                                         r"exist; LlamaForCausalLM has 30 layers \(0..29\)"):
        LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc())


def test_settings_with_nul_or_bad_utf8_named():
    with pytest.raises(InvalidError, match=r"LMCACHE_ENABLE_BLENDING='1\\x00junk': the value "
                                           r"contains a NUL character"):
        Config.from_items({"LMCACHE_ENABLE_BLENDING": "1\x00junk"})
    bad = b"\xff1".decode("utf-8", "surrogateescape")  # as os.environ hands it over
    with pytest.raises(InvalidError, match="LMCACHE_CHUNK_SIZE: the value is not valid UTF-8"):
        Config.from_env({"LMCACHE_CHUNK_SIZE": bad})
    with pytest.raises(InvalidError, match="not a name"):
        Config.from_items({"LMCACHE_\x00X": "1"})
    with pytest.raises(InvalidError, match="LMCACHE_EXTRA_CONFIG: the value is not valid UTF-8"):
        Config.from_items({"LMCACHE_EXTRA_CONFIG": '{"a": "\xff"}'.encode("latin-1")
                           .decode("utf-8", "surrogateescape")})
    # an escaped NUL would cut a key short (cJSON): refused, never misread
    with pytest.raises(InvalidError, match="escaped NUL"):
        Config.from_items({"LMCACHE_EXTRA_CONFIG": '{"enable_sparse\\u0000x": true}'})
    assert Config.from_items({"KVBLEND_VERIFY_CHECKSUMS": "1"}).verify_checksums == "true"
    assert Config.default().verify_checksums == "auto"
    with pytest.raises(InvalidError, match="KVBLEND_NUM_THREADS.*expected 0 \\(all cores\\) to 256"):
        Config.from_items({"KVBLEND_NUM_THREADS": "100000"})


class _Injected(RuntimeError):
    pass


def test_stress_mixed_failing_requests_never_serve_freed_slots(parts, monkeypatch):
    """Many requests with random chunk mixes over a store that holds a few
    chunks; some fail inside the forward (at a random layer) or while
    decoding, some are refused before they start.  Between requests every
    paged cache is filled with NaN, so KV saved from a freed slot would
    carry NaN into a later blend."""
    model, tok, sys_ids, chunks, q, sep = parts
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "0.004")  # ~4 MB: a few chunks
    questions = [encode(tok, f"\nQuestion: {t}<|im_end|>\n<|im_start|>assistant\n") for t in
                 ("Where is the reef?", "Who was Bach?", "What is the Sahara?", "Which ocean?")]
    rng = random.Random(1234)
    full = LLM(model=model, tokenizer=tok)
    engines = {1.0: LLM(model=model, tokenizer=tok,
                        kv_transfer_config=_ktc(**{"kvblend.recompute_ratios": [1.0]})),
               0.15: LLM(model=model, tokenizer=tok, kv_transfer_config=_ktc())}
    counts = {"ok": 0, "failed": 0, "refused": 0, "hits": 0}
    try:
        for ratio, llm in engines.items():
            adapter = llm.adapter
            real_out = adapter.out
            for i in range(16 if ratio == 1.0 else 12):
                picked = rng.sample(range(len(chunks)), rng.randint(1, 4))
                ids = join(sys_ids, [chunks[c] for c in picked], rng.choice(questions), sep)
                fate = rng.random()
                if fate < 0.2:  # fails inside the forward at a random layer
                    layer = rng.randrange(adapter.num_layers)

                    def failing(i_layer, attn, h, _layer=layer):
                        if i_layer == _layer:
                            raise _Injected(f"injected failure at layer {_layer}")
                        return real_out(i_layer, attn, h)
                    monkeypatch.setattr(adapter, "out", failing)
                    with pytest.raises(_Injected):
                        llm.generate({"prompt_token_ids": ids}, GREEDY)
                    monkeypatch.setattr(adapter, "out", real_out)
                    counts["failed"] += 1
                elif fate < 0.3:  # refused before it starts
                    with pytest.raises(ValueError, match="outside the model's vocabulary"):
                        llm.generate({"prompt_token_ids": ids + [adapter.vocab_size]}, GREEDY)
                    counts["refused"] += 1
                else:
                    out, st = _gen(llm, ids)
                    counts["hits"] += st.get("segments_hit", 0)
                    assert torch.isfinite(out.first_logits).all(), (ratio, i, picked)
                    if ratio == 1.0:
                        ref, _ = _gen(full, ids)
                        diff = (out.first_logits - ref.first_logits).abs().max().item()
                        assert diff <= 1e-4, (i, picked, diff)
                        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
                    counts["ok"] += 1
                assert llm.num_free_blocks() == llm.allocator.num_blocks
                # a request ends in the workers with the next step: only the last is held
                assert len(llm.worker_connector._active) <= 1
                for cache in llm.kv_caches.values():
                    cache.fill_(float("nan"))
            store = llm.worker_connector.blend_stats()["store"]
            assert store["evictions"] > 0 or store["rejected"] > 0  # the budget was tight
            assert store["host_bytes"] <= 0.004 * 2**30
            assert store["corrupt"] == 0
    finally:
        for e in (full, *engines.values()):
            e.shutdown()
    assert counts["failed"] > 0 and counts["refused"] > 0 and counts["hits"] > 0, counts
