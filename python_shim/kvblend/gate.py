"""The correctness gate: a self-test of blending on the loaded model.

A connector runs it once at start-up (``KVBLEND_SELF_TEST``, on by default)
before it serves a blended request.  On a short synthetic prompt it checks
the two things that garble blended answers when a model is not handled
right, through the real code paths (a scratch C connector, its store, a
scratch paged cache in the engine's KV dtype and device):

1. **Re-rotated keys**: three chunks are stored from the model's own prefill,
   then loaded for a prompt that reorders them (``Request.load_layer``,
   keys re-rotated to their new positions by kvblend's RoPE settings).  At
   layer 0 a key depends on its token and position only, so each loaded key
   must equal the key the model itself computes at the new position, and
   each value the stored value.  A wrong RoPE style, rotary_dim, base,
   scaling (llama3, yarn, linear) or partial rotary shows here.
2. **Ratio 1.0 against the model's own prefill**: the reordered prompt is
   blended with every row recomputed (``blend_prefill`` into the paged
   cache), the rows after the blend attend over that cache, and the last
   row's logits must match the model's own forward within a dtype-aware
   tolerance.  For transformers models the reference is the model's own
   ``forward``; vLLM's forward needs its scheduler's attention metadata, so
   there the reference is the adapter's plain causal prefill (the gate then
   checks the blend, load and cache layout paths, not vLLM's attention).

A failure raises :class:`SelfTestError` naming the model and what differed;
the connector then refuses to start instead of serving garbled text.
"""

from __future__ import annotations

import inspect
import logging
import time

import torch

from . import ops
from .blend import _Tail, blend_prefill
from .model import LayerModel
from .model.attention import attend_by_position

logger = logging.getLogger("kvblend")

# Relative error (norm of the difference / norm of the reference) allowed,
# per KV dtype: for the loaded keys and values (one rounding), for the KV the
# blend wrote at each layer (errors grow with depth), and for the logits
# (loose: they amplify rounding in models with large activations; the KV
# check is the sharp one).
TOLERANCE = {torch.float32: (1e-4, 1e-2, 5e-2), torch.float16: (4e-3, 3e-2, 1e-1),
             torch.bfloat16: (2e-2, 8e-2, 2e-1)}
BLOCK = 16
_PREFIX, _CHUNKS, _TAIL = 6, (24, 20, 28), 8


class SelfTestError(RuntimeError):
    """Blending would give wrong results on this model."""


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def adapter_prefill(adapter, ids: torch.Tensor, kv_dtype):
    """A plain causal prefill through the adapter: (K, V per layer, each
    [T, Hkv, D] in ``kv_dtype``; logits of the last row, float32)."""
    pos = torch.arange(ids.numel(), device=adapter.device)
    windows = adapter.sliding_windows
    h = adapter.embed(ids.to(adapter.device))
    kv = []
    for layer in range(adapter.num_layers):
        q, k, v = adapter.qkv(layer, h, pos)
        k, v = k.to(kv_dtype), v.to(kv_dtype)
        kv.append((k.clone(), v.clone()))
        attn = attend_by_position(q, pos, k, v, adapter.scale, windows[layer])
        h = adapter.out(layer, attn.to(h.dtype), h)
    return kv, adapter.logits(h[-1:]).float()[0]


def _hf_own(model, ids: torch.Tensor, kv_dtype):
    """The transformers model's own prefill: (K, V per layer [T, Hkv, D]
    from its cache, logits of the last row)."""
    from transformers import DynamicCache

    # a cache built without the config keeps every row, also for
    # sliding-window layers (whose own cache keeps the window only);
    # transformers 5.x names the argument "cache", earlier "past_key_values"
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = model(ids[None].to(next(model.parameters()).device), use_cache=True,
                    **{arg: DynamicCache()})
    cache = getattr(out, arg)
    kv = []
    for layer in range(len(cache)):
        if hasattr(cache, "layers"):
            k, v = cache.layers[layer].keys, cache.layers[layer].values
        else:
            k, v = cache[layer]
        kv.append((k[0].transpose(0, 1).to(kv_dtype), v[0].transpose(0, 1).to(kv_dtype)))
    return kv, out.logits[0, -1].float()


def _tokens(vocab: int, seed: int = 20250101) -> tuple[list[int], list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = min(100, vocab // 4), max(vocab - 100, vocab // 2)

    def draw(n):
        return torch.randint(lo, hi, (n,), generator=g).tolist()
    return draw(_PREFIX), [draw(n) for n in _CHUNKS], draw(_TAIL)


def _spans(pieces: list[list[int]]) -> list[tuple[int, int]]:
    out, at = [], 0
    for p in pieces:
        out.append((at, at + len(p)))
        at += len(p)
    return out


def self_test(adapter: LayerModel, new_connector, model_name: str, kv_dtype: torch.dtype,
              check_layers: list[int], hf_model=None, attention=None) -> dict:
    """Run the gate; returns its figures, raises SelfTestError on a failure.

    ``new_connector(items)`` builds a scratch ``kvblend.Connector`` with the
    production connector's model shape and RoPE and the settings ``items``
    laid over its own; ``hf_model``: the transformers model whose forward is
    the reference (None under vLLM); ``attention``: the subset-attention
    strategy the engine's blends use (None: the device's default).
    """

    t0 = time.perf_counter()
    device = adapter.device
    tol_k, tol_kv, tol_logits = TOLERANCE.get(kv_dtype, TOLERANCE[torch.bfloat16])
    vocab = int(adapter.model.model.embed_tokens.weight.shape[0])
    prefix, chunks, tail = _tokens(vocab)
    stored = [prefix] + chunks
    reordered = [prefix, chunks[2], chunks[0], chunks[1]]
    a_ids = torch.tensor([t for p in stored for t in p], dtype=torch.int64)
    b_ids = torch.tensor([t for p in reordered for t in p] + tail, dtype=torch.int64)
    own = (lambda ids: _hf_own(hf_model, ids, kv_dtype)) if hf_model is not None else \
        (lambda ids: adapter_prefill(adapter, ids, kv_dtype))
    with torch.inference_mode():
        own_a, _ = own(a_ids)
        own_b, logits_b = own(b_ids)
    n_layers = adapter.num_layers
    if len(own_a) != n_layers:
        raise SelfTestError(f"kvblend self-test: {model_name}: the model's own prefill has "
                            f"{len(own_a)} layers of KV, the adapter {n_layers}")

    # the scratch store keeps its chunks in a small host pool whatever tiers
    # the engine uses (a device-only engine sets LMCACHE_LOCAL_CPU=False),
    # and never touches the disk or remote tiers: its synthetic chunks must
    # not reach a store other engines read
    conn = new_connector({"LMCACHE_LOCAL_CPU": "True", "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.02",
                          "KVBLEND_MAX_DEVICE_SIZE": "0",
                          "KVBLEND_VERIFY_CHECKSUMS": "true", "LMCACHE_LOCAL_DISK": "",
                          "LMCACHE_REMOTE_URL": ""})
    n = int(b_ids.numel())
    blocks = (max(n, a_ids.numel()) + BLOCK - 1) // BLOCK
    shape = (2, blocks, BLOCK, adapter.num_kv_heads, adapter.head_size)
    caches = [torch.zeros(shape, dtype=kv_dtype, device=device) for _ in range(n_layers)]
    layouts = [ops.paged_layout(c, "flash") for c in caches]
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0

    # 1. store the chunks of prompt A from the model's own KV
    slots_a = torch.arange(a_ids.numel(), dtype=torch.int64)
    req = conn.begin(a_ids.tolist(), spans=_spans(stored), blend_end=0, save=True)
    for layer, (k, v) in enumerate(own_a):
        ops.scatter(layouts[layer], slots_a.to(device), k.contiguous(), v.contiguous())
        req.save_layer(layer, layouts[layer], slots_a.data_ptr(), slots_a.numel(), stream)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    stored_n = int(req.commit())
    req.finish(commit=True)
    if stored_n != len(stored):
        raise SelfTestError(f"kvblend self-test: {model_name}: {stored_n} of {len(stored)} "
                            "synthetic chunks were stored")

    # 2. load them for the reordered prompt B: layer 0 against the model's own
    blend_end = n - len(tail)
    spans_b = _spans(reordered) + [(blend_end, n)]
    req = conn.begin(b_ids.tolist(), spans=spans_b, blend_end=blend_end, save=False)
    try:
        n_seg, n_hit, _ = req.counts()
        if n_hit != len(reordered):
            raise SelfTestError(f"kvblend self-test: {model_name}: {n_hit} of {len(reordered)} "
                                "stored synthetic chunks found for the reordered prompt")
        rows = torch.zeros(blend_end, dtype=torch.bool)
        for start, length in req.reused():
            rows[start:start + length] = True
        sk = torch.zeros((blend_end, adapter.num_kv_heads, adapter.head_size), dtype=kv_dtype,
                         device=device)
        sv = torch.zeros_like(sk)
        req.load_layer(0, sk.data_ptr(), sv.data_ptr(), stream)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        k_ref, v_ref = own_b[0][0][:blend_end], own_b[0][1][:blend_end]
        moved = rows.clone()
        moved[:_PREFIX] = False  # the prefix did not move
        err_k = _rel(sk[moved], k_ref[moved])
        err_v = _rel(sv[rows], v_ref[rows])
        if not err_k <= tol_k or not err_v <= tol_k:
            rope = adapter.rope
            inv = rope.inv_freq
            raise SelfTestError(
                f"kvblend self-test failed for {model_name}: keys of stored chunks re-rotated to "
                f"their new positions differ from the model's own keys there (relative error "
                f"{err_k:.2e}, values {err_v:.2e}, allowed {tol_k:.0e} in {kv_dtype}); kvblend's "
                f"RoPE for this model: style {rope.style}, rotary_dim {rope.rotary_dim} of head "
                f"size {adapter.head_size}, rope_type {rope.rope_type}, attention scaling "
                f"{rope.attention_scaling}, inv_freq[1] {float(inv[1]) if len(inv) > 1 else '?'}. "
                "Blending is refused (KVBLEND_SELF_TEST=0 skips this check)")

        # 3. blend B at ratio 1.0 into the paged cache, then its tail
        slots_b = torch.arange(n, dtype=torch.int64)
        forced = torch.frombuffer(bytearray(req.forced()), dtype=torch.uint8)[:blend_end]
        for c in caches:
            c.zero_()
        blend_prefill(adapter, req, b_ids, layouts, slots_b, list(check_layers),
                      [1.0] * len(check_layers), kv_dtype=kv_dtype, forced=forced,
                      attention=attention)
    finally:
        req.finish()
    with torch.inference_mode():
        t = _Tail(adapter, b_ids[blend_end:], blend_end, device)
        gk = torch.empty((blend_end, adapter.num_kv_heads, adapter.head_size), dtype=kv_dtype,
                         device=device)
        gv = torch.empty_like(gk)
        windows = adapter.sliding_windows
        kv_err, kv_layer = 0.0, 0
        for layer in range(n_layers):
            ops.gather(layouts[layer], slots_b[:blend_end].to(device), gk, gv)
            e = max(_rel(gk, own_b[layer][0][:blend_end]), _rel(gv, own_b[layer][1][:blend_end]))
            if not e <= kv_err:
                kv_err, kv_layer = e, layer
            t.step(layer, gk, gv, kv_dtype, windows[layer])
        logits = adapter.logits(t.h[-1:]).float()[0]
    err = _rel(logits, logits_b)
    same_top = int(logits.argmax()) == int(logits_b.argmax())
    if not kv_err <= tol_kv:
        raise SelfTestError(
            f"kvblend self-test failed for {model_name}: a reordered synthetic prompt blended "
            f"at ratio 1.0 writes KV {kv_err:.2e} away from the model's own prefill at layer "
            f"{kv_layer} (relative norm, allowed {tol_kv:.0e} in {kv_dtype}; logits {err:.2e}). "
            "kvblend's layer pieces (norms, projections, attention, RoPE) do not reproduce "
            "this model; blending is refused (KVBLEND_SELF_TEST=0 skips this check)")
    if not err <= tol_logits:
        raise SelfTestError(
            f"kvblend self-test failed for {model_name}: a reordered synthetic prompt blended "
            f"at ratio 1.0 gives logits {err:.2e} away from the model's own prefill (relative "
            f"norm, allowed {tol_logits:.0e} in {kv_dtype}; same top token: {same_top}). "
            "kvblend's layer pieces (norms, projections, attention, RoPE) do not reproduce "
            "this model; blending is refused (KVBLEND_SELF_TEST=0 skips this check)")
    report = {"key_error": err_k, "value_error": err_v, "kv_error": kv_err,
              "kv_error_layer": kv_layer, "logits_error": err,
              "same_top_token": same_top, "seconds": time.perf_counter() - t0,
              "reference": "model forward" if hf_model is not None else "adapter prefill"}
    logger.info("kvblend: self-test passed for %s: re-rotated keys %.1e, KV at ratio 1.0 %.1e, "
                "logits %.1e from the %s (%.2f s)", model_name, err_k, kv_err, err,
                report["reference"], report["seconds"])
    return report

