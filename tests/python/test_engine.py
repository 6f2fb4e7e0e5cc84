"""The built-in engine: exact against transformers, vLLM's connector order, no leaks."""

import dataclasses
import pickle

import pytest
import torch

from conftest import make_tiny_model
from kvblend import _vllm_compat as vc
from kvblend import layouts
from kvblend.engine import LLM, KVTransferConfig, SamplingParams, kv_read, layer_name

MODULE = __name__


@torch.no_grad()
def _hf_greedy(model, ids, max_tokens):
    """Reference greedy decode: full recomputation every step, no cache."""
    seq = list(ids)
    first = None
    for _ in range(max_tokens):
        logits = model(torch.tensor([seq])).logits[0, -1]
        if first is None:
            first = logits.float()
        seq.append(int(logits.argmax()))
    return seq[len(ids):], first


def _prompt(n, seed=3, vocab=256):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ------------------------------------------------------------------ exactness
@torch.no_grad()
def test_engine_matches_hf_smollm2(smollm2):
    model, tok = smollm2
    llm = LLM(model, tokenizer=tok, max_model_len=256)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=12),
                       return_first_logits=True)[0]
    want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    assert out.outputs[0].token_ids == want.tolist()
    assert "Paris" in out.outputs[0].text
    ref = model(torch.tensor([ids])).logits[0, -1]
    assert out.first_logits.dtype == torch.float32 and out.first_logits.shape == (49152,)
    assert (out.first_logits - ref).abs().max().item() <= 1e-4
    assert out.num_cached_tokens == 0
    assert 0 < out.metrics.prefill_s <= out.metrics.ttft
    assert llm.num_free_blocks() == llm.allocator.num_blocks


def test_engine_str_prompt_equals_token_ids(smollm2):
    model, tok = smollm2
    llm = LLM(model, tokenizer=tok, max_model_len=128)
    sp = SamplingParams(max_tokens=5, ignore_eos=True)
    a = llm.generate("The capital of France is", sp)[0]
    b = llm.generate([{"prompt_token_ids": tok("The capital of France is").input_ids}], sp)[0]
    assert a.prompt_token_ids == b.prompt_token_ids
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.outputs[0].text == tok.decode(a.outputs[0].token_ids, skip_special_tokens=True)
    assert a.prompt == "The capital of France is" and a.request_id != b.request_id


@pytest.mark.parametrize("layout", ["cpu", "flash", "flashinfer"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen3"])
def test_engine_matches_hf_tiny(kind, layout):
    # block_size 4 and 21 prompt tokens: decode crosses block boundaries, and
    # Mistral's window of 8 cuts into the paged keys.
    model = make_tiny_model(kind)
    llm = LLM(model, block_size=4, max_model_len=64, kv_cache_layout=layout)
    ids = _prompt(21)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=8, ignore_eos=True),
                       return_first_logits=True)[0]
    want, first = _hf_greedy(model, ids, 8)
    assert out.outputs[0].token_ids == want
    assert out.outputs[0].finish_reason == "length"
    assert (out.first_logits - first).abs().max().item() <= 1e-4
    assert llm.num_free_blocks() == llm.allocator.num_blocks


def test_engine_layouts_identical():
    model = make_tiny_model("qwen2")
    ids = _prompt(30, seed=5)
    res = []
    for layout in layouts.NAMES:
        llm = LLM(model, block_size=8, max_model_len=64, kv_cache_layout=layout)
        o = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=6, ignore_eos=True),
                         return_first_logits=True)[0]
        res.append((o.outputs[0].token_ids, o.first_logits))
        shape = next(iter(llm.kv_caches.values())).shape
        assert shape == {"cpu": (2, 8, 2, 8, 16), "flash": (2, 8, 8, 2, 16),
                         "flashinfer": (8, 2, 8, 2, 16), "joint": (8, 8, 2, 32),
                         "bhnc": (8, 2, 8, 32), "cpu_attn": (8, 2, 8, 32)}[layout]
    for toks, logits in res[1:]:
        assert toks == res[0][0]
        assert torch.equal(logits, res[0][1])


# ------------------------------------------------------------------ input checks
def test_engine_rejects_sampling_and_bad_input():
    with pytest.raises(ValueError, match="greedy only"):
        SamplingParams(temperature=0.7)
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="kv_cache_layout 'nhd' is not supported"):
        LLM(model, kv_cache_layout="nhd", max_model_len=32)
    llm = LLM(model, max_model_len=32, block_size=4)
    with pytest.raises(ValueError, match="exceeds max_model_len=32"):
        llm.generate({"prompt_token_ids": _prompt(40)})
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(ValueError, match="needs kv_connector_module_path"):
        LLM(model, max_model_len=32, kv_transfer_config=vc.KVTransferConfig(kv_connector="Nope"))
    # Generation stops at max_model_len.
    o = llm.generate({"prompt_token_ids": _prompt(30)}, SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert len(o.outputs[0].token_ids) == 2 and o.outputs[0].finish_reason == "length"
    assert llm.num_free_blocks() == llm.allocator.num_blocks


# ------------------------------------------------------------------ connectors
CALLS = []


@dataclasses.dataclass
class RecMeta(vc.KVConnectorMetadata):
    new_req_ids: list
    finished: list
    serial: int


class RecordingConnector(vc.KVConnectorBase_V1):
    """Records every hook with the role of the instance that received it."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self.serial = 0
        self.built = []
        CALLS.append((role.name, "init"))

    def _rec(self, *what):
        CALLS.append((self.role.name,) + what)

    def register_kv_caches(self, kv_caches):
        self._rec("register_kv_caches", tuple(kv_caches))

    def start_load_kv(self, forward_context, **kw):
        self._rec("start_load_kv")

    def wait_for_layer_load(self, layer_name):
        self._rec("wait_for_layer_load", layer_name)

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kw):
        self._rec("save_kv_layer", layer_name, tuple(attn_metadata.slot_mapping.tolist()))

    def wait_for_save(self):
        self._rec("wait_for_save")

    def bind_connector_metadata(self, md):
        self._rec("bind", md.serial, id(md) in map(id, self.built))
        super().bind_connector_metadata(md)

    def clear_connector_metadata(self):
        self._rec("clear")
        super().clear_connector_metadata()

    def get_finished(self, finished_req_ids):
        self._rec("get_finished", tuple(sorted(finished_req_ids)))
        return None, None

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        self._rec("get_num_new_matched_tokens", num_computed_tokens)
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self._rec("update_state_after_alloc", tuple(blocks.get_block_ids()[0]), num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        self.serial += 1
        self._rec("build_connector_meta", scheduler_output.total_num_scheduled_tokens)
        md = RecMeta([r.req_id for r in scheduler_output.scheduled_new_reqs],
                     sorted(scheduler_output.finished_req_ids), self.serial)
        self.built.append(md)
        return md

    def request_finished(self, request, block_ids):
        self._rec("request_finished", tuple(block_ids))
        return False, None


def _ktc(cls_name, **extra):
    return KVTransferConfig(kv_connector=cls_name, kv_connector_module_path=MODULE,
                            kv_role="kv_both", kv_connector_extra_config=extra)


def test_engine_connector_hook_order():
    CALLS.clear()
    model = make_tiny_model("llama")
    llm = LLM(model, block_size=4, max_model_len=32, kv_transfer_config=_ktc("RecordingConnector"))
    names = tuple(layer_name(i) for i in range(2))
    assert CALLS == [("WORKER", "init"), ("WORKER", "register_kv_caches", names), ("SCHEDULER", "init")]
    assert llm.worker_connector.role is vc.KVConnectorRole.WORKER
    assert llm.scheduler_connector.role is vc.KVConnectorRole.SCHEDULER
    CALLS.clear()
    ids = _prompt(6)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=3, ignore_eos=True))[0]
    rid = out.request_id

    def step(serial, ntok, slots, finished=()):
        layers = []
        for n in names:
            layers += [("WORKER", "wait_for_layer_load", n)]
            if ntok:
                layers += [("WORKER", "save_kv_layer", n, slots)]
        if not ntok:
            layers = []
        return ([("SCHEDULER", "build_connector_meta", ntok), ("WORKER", "bind", serial, False),
                 ("WORKER", "start_load_kv")] + layers +
                [("WORKER", "wait_for_save"), ("WORKER", "get_finished", tuple(finished)),
                 ("WORKER", "clear")])

    # Blocks 0,1 hold the 6 prompt tokens (slots 0..5); decode adds slots 6, 7.
    want = ([("SCHEDULER", "get_num_new_matched_tokens", 0)] * 2 +
            [("SCHEDULER", "update_state_after_alloc", (0, 1), 0)] +
            step(1, 6, tuple(range(6))) + step(2, 1, (6,)) + step(3, 1, (7,)) +
            [("SCHEDULER", "request_finished", (0, 1))] + step(4, 0, (), finished=(rid,)))
    assert CALLS == want
    # Metadata crossed a pickle boundary: the worker never saw the built object.
    assert all(not c[3] for c in CALLS if c[1] == "bind")
    assert llm.num_free_blocks() == llm.allocator.num_blocks


class SideEffectConnector(RecordingConnector):
    """A lookup that changes its answer each time it is asked (a bug)."""

    asked = 0

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        SideEffectConnector.asked += 1
        return SideEffectConnector.asked % 2, False


def test_engine_rejects_lookup_side_effects():
    model = make_tiny_model("llama")
    llm = LLM(model, block_size=4, max_model_len=32, kv_transfer_config=_ktc("SideEffectConnector"))
    with pytest.raises(RuntimeError, match="must be free of side effects"):
        llm.generate({"prompt_token_ids": _prompt(6)})
    assert llm.num_free_blocks() == llm.allocator.num_blocks


class DelayFreeConnector(RecordingConnector):
    """Holds the blocks after finish until the worker reports the send done."""

    def request_finished(self, request, block_ids):
        return True, {"held": list(block_ids)}

    def get_finished(self, finished_req_ids):
        return (set(finished_req_ids) or None), None


def test_engine_delayed_free_released_by_get_finished():
    model = make_tiny_model("llama")
    llm = LLM(model, block_size=4, max_model_len=32, kv_transfer_config=_ktc("DelayFreeConnector"))
    llm.generate({"prompt_token_ids": _prompt(9)}, SamplingParams(max_tokens=2))
    assert llm.num_free_blocks() == llm.allocator.num_blocks


# A prefix store living "on disk" (shared by the two roles, as a file would be).
STORE = {}


@dataclasses.dataclass
class PrefixMeta(vc.KVConnectorMetadata):
    load: list  # [(req_id, slots of positions [0, n_ext), store key)]
    save: list  # [(req_id, token ids, slots)]


class PrefixStoreConnector(vc.KVConnectorBase_V1):
    """Stores every prefill's KV per layer; serves the longest stored prefix.

    Written only against the hooks and the paged layout, like a real
    connector, to prove the engine computes [n_ext, n) correctly over KV that
    someone else put into the paged cache.
    """

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self.layout = self._kv_transfer_config.get_from_extra_config("layout", "cpu")
        self.pending = {}
        self.kv_caches = None

    def _match(self, ids):
        best = 0
        for key in STORE:
            n = 0
            for a, b in zip(key, ids):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return min(best, len(ids) - 1)

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return self._match(request.prompt_token_ids), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self.pending[request.request_id] = (num_external_tokens, blocks.get_block_ids()[0])

    def build_connector_meta(self, so):
        load, save = [], []
        bs = self._vllm_config.cache_config.block_size
        for r in so.scheduled_new_reqs:
            n_ext, blocks = self.pending.pop(r.req_id)
            slots = [blocks[p // bs] * bs + p % bs for p in range(len(r.prompt_token_ids))]
            if n_ext:
                key = max(STORE, key=lambda k: sum(1 for _ in zip(k, r.prompt_token_ids))
                          if list(k[:n_ext]) == r.prompt_token_ids[:n_ext] else -1)
                load.append((r.req_id, slots[:n_ext], key))
            save.append((r.req_id, r.prompt_token_ids, slots))
        return PrefixMeta(load, save)

    def register_kv_caches(self, kv_caches):
        self.kv_caches = kv_caches

    def start_load_kv(self, forward_context, **kw):
        from kvblend.engine import kv_write

        for _rid, slots, key in self._get_connector_metadata().load:
            for name, layer in forward_context.no_compile_layers.items():
                k, v = STORE[key][name]
                n = len(slots)
                kv_write(layer.kv_cache, self.layout, torch.tensor(slots), k[:n], v[:n])

    def wait_for_layer_load(self, layer_name):
        pass

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kw):
        for _rid, ids, slots in self._get_connector_metadata().save:
            k, v = kv_read(kv_layer, self.layout, torch.tensor(slots))
            STORE.setdefault(tuple(ids), {})[layer_name] = (k.clone(), v.clone())

    def wait_for_save(self):
        pass


@pytest.mark.parametrize("layout", ["cpu", "flashinfer"])
def test_engine_external_tokens_exact(layout):
    """KV provided by a connector + partial prefill == full prefill."""
    STORE.clear()
    model = make_tiny_model("qwen3")
    ids = _prompt(22, seed=9)
    ref = LLM(model, block_size=4, max_model_len=64, kv_cache_layout=layout)
    base = ref.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=5, ignore_eos=True),
                        return_first_logits=True)[0]
    llm = LLM(model, block_size=4, max_model_len=64, kv_cache_layout=layout,
              kv_transfer_config=_ktc("PrefixStoreConnector", layout=layout))
    sp = SamplingParams(max_tokens=5, ignore_eos=True)
    cold = llm.generate({"prompt_token_ids": ids}, sp, return_first_logits=True)[0]
    assert cold.num_cached_tokens == 0
    # A second run of the same prompt and one sharing a 13-token prefix.
    warm = llm.generate({"prompt_token_ids": ids}, sp, return_first_logits=True)[0]
    other = ids[:13] + _prompt(7, seed=11)
    part = llm.generate({"prompt_token_ids": other}, sp, return_first_logits=True)[0]
    want_other, first_other = _hf_greedy(model, other, 5)
    assert warm.num_cached_tokens == 21 and part.num_cached_tokens == 13
    for o in (cold, warm):
        assert o.outputs[0].token_ids == base.outputs[0].token_ids
        assert (o.first_logits - base.first_logits).abs().max().item() <= 1e-5
    assert part.outputs[0].token_ids == want_other
    assert (part.first_logits - first_other).abs().max().item() <= 1e-4
    assert llm.num_free_blocks() == llm.allocator.num_blocks


def test_compat_shapes():
    assert vc.KVConnectorRole.SCHEDULER.value == 0 and vc.KVConnectorRole.WORKER.value == 1
    with pytest.raises(ValueError, match="kv_transfer_config must be set"):
        RecordingConnector(vc.VllmConfig(vc.ModelConfig("m"), vc.CacheConfig(16)),
                           vc.KVConnectorRole.WORKER)
    assert vc.Request("r", [1, 2, 3]).num_prompt_tokens == 3
    blocks = vc.KVCacheBlocks(([3, 4], []))
    assert blocks.get_block_ids() == ([3, 4], [])
    assert blocks.get_block_ids(group_ids=[1]) == ([],)
    assert blocks.get_block_ids(True, group_ids=[1]) is None
    md = pickle.loads(pickle.dumps(RecMeta(["a"], [], 1)))
    assert md == RecMeta(["a"], [], 1)
    base = vc.KVConnectorBase_V1
    assert base.__abstractmethods__ == {
        "start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_save",
        "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta"}
