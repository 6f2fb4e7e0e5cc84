"""Per-layer access to a transformers Llama-family model.

The built-in engine and the blend driver run a decoder one layer at a time so
they can place a paged KV cache (and the blend) between the projections and
the attention.  A ``ModelAdapter`` exposes exactly those pieces, always by
calling the model's own modules (norms, projections, MLP); the only math
written here is RoPE, which reproduces transformers' own rotary embedding
operation for operation, and the attention call.

Supported: LlamaForCausalLM (SmolLM2 included), MistralForCausalLM,
Qwen2ForCausalLM (QKV bias) and Qwen3ForCausalLM (per-head q_norm/k_norm
before RoPE).  Tensors are unbatched: ``[T, ...]`` for T tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM",
                           "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# RoPE types whose frequencies do not depend on the sequence length, so one
# inv_freq serves every position (and cached keys can be re-rotated).
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeSpec:
    """The rotary embedding of a model, as its own rotary module computes it.

    ``inv_freq`` is a 1-D float32 CPU tensor of rotary_dim/2 frequencies with
    any scaling already folded in; ``attention_scaling`` multiplies cos and sin
    (1.0 except for yarn).  ``style`` is "neox" (rotate halves, what the
    Llama family uses) or "gptj" (rotate interleaved pairs).
    """

    inv_freq: torch.Tensor
    rotary_dim: int
    style: str
    attention_scaling: float
    rope_type: str

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin) of shape [T, rotary_dim] for ``positions`` [T].

        Computed in fp32 exactly as transformers does (outer product, duplicated
        halves, cos/sin, times attention_scaling), then cast to ``dtype``.
        For the "gptj" style the frequencies are repeated pairwise instead.
        """
        inv = self.inv_freq.to(device=device, dtype=torch.float32)
        freqs = positions.to(device)[:, None].float() * inv[None, :]
        if self.style == "neox":
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.repeat_interleave(freqs, 2, dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [T, H, D] by (cos, sin) [T, rotary_dim].

        Only the first rotary_dim channels rotate; the rest pass through.
        """
        rd = self.rotary_dim
        cos, sin = cos[:, None, :], sin[:, None, :]
        xr = x[..., :rd]
        if self.style == "neox":
            x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
            rot = torch.cat((-x2, x1), dim=-1)
        else:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            rot = torch.stack((-x2, x1), dim=-1).flatten(-2)
        out = xr * cos + rot * sin
        if rd == x.shape[-1]:
            return out
        return torch.cat((out, x[..., rd:]), dim=-1)


def _rope_spec(model) -> RopeSpec:
    """Read the RoPE of ``model`` from its rotary embedding module.

    Raises ValueError for RoPE whose frequencies change with the sequence
    length (dynamic NTK, longrope): a fixed inv_freq cannot describe them.
    """
    config = model.config
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type not in _STATIC_ROPE_TYPES:
        raise ValueError(f"{type(model).__name__}: rope_type {rope_type!r} is not supported "
                         f"(expected one of {', '.join(_STATIC_ROPE_TYPES)}); its frequencies "
                         "depend on the sequence length")
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().to("cpu", torch.float32).clone()
    return RopeSpec(inv_freq=inv_freq, rotary_dim=2 * inv_freq.numel(), style="neox",
                    attention_scaling=float(rotary.attention_scaling), rope_type=rope_type)


class GraphedPieces:
    """What adapters whose two dense pieces (``_qkv``, ``_out``) may replay
    from per-layer CUDA graphs share: ``graphs``, ``enable_cuda_graphs`` and
    ``out``."""

    graphs: "LayerGraphs | None" = None
    device: torch.device

    def enable_cuda_graphs(self, max_tokens: int = 2048) -> bool:
        """Run ``qkv`` and ``out`` of up to ``max_tokens`` rows through
        per-layer CUDA graphs (see ``LayerGraphs``).  Only on CUDA; returns
        whether graphs are on.  ``max_tokens`` 0 turns them off."""
        if self.device.type != "cuda" or max_tokens <= 0:
            self.graphs = None
            return False
        self.graphs = LayerGraphs(self, max_tokens)
        return True

    def out(self, layer: int, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Finish ``layer``: o_proj of ``attn`` [T,Hq,D] + residual, then the MLP block
        (the adapter's ``_out``).

        Under CUDA graphs the result views the graph's static output, valid
        until the same layer runs again for as many tokens."""
        a2 = attn.reshape(attn.shape[0], -1)
        g = self.graphs
        if g is not None and g.fits(residual) and a2.dtype == residual.dtype:
            return g.run("out", layer, (a2, residual))[0]
        return self._out(layer, a2, residual)


class ModelAdapter(GraphedPieces):
    """Layer-by-layer view of a Llama-family causal LM (see module doc).

    The residual stream is the caller's: ``qkv`` reads ``h`` without changing
    it and ``out`` adds the attention output and the MLP to the residual.
    """

    def __init__(self, model):
        self.model = model
        config = model.config
        inner = model.model
        self.layers = list(inner.layers)
        attn0 = self.layers[0].self_attn
        self.architecture = type(model).__name__
        self.num_layers = len(self.layers)
        self.num_q_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_size = attn0.head_dim
        self.hidden_size = config.hidden_size
        self.scale = float(attn0.scaling)
        self.vocab_size = model.lm_head.out_features
        param = next(model.parameters())
        self.dtype = param.dtype
        self.device = param.device
        self.rope = _rope_spec(model)
        self.has_qk_norm = hasattr(attn0, "q_norm")
        self._rope_memo = None
        # Per-layer CUDA graphs of the dense pieces for small token counts
        # (``enable_cuda_graphs``); None: always eager.
        self.graphs: LayerGraphs | None = None
        # torch.compile'd pieces (``enable_compile``); empty: eager modules.
        self._compiled: dict = {}
        # Sliding window per layer (None = full attention): Mistral applies
        # config.sliding_window to every layer, Qwen2/3 mark layers themselves.
        if self.architecture == "MistralForCausalLM":
            self.sliding_windows = [config.sliding_window] * self.num_layers
        else:
            self.sliding_windows = [getattr(l.self_attn, "sliding_window", None) for l in self.layers]

    def enable_compile(self, on: bool = True) -> bool:
        """Run the two dense pieces of every layer (see ``qkv`` and ``out``)
        through ``torch.compile`` (Inductor, dynamic token count), as vLLM
        compiles its models: the norms, RoPE, the MLP's activation and the
        residual adds become a few fused kernels instead of ~40 small ones
        per layer.  The model's own modules are what gets compiled; their
        parameters are inputs of the compiled code, so one compilation per
        piece serves every layer.  Only on CUDA; returns whether it is on."""
        if not on or self.device.type != "cuda":
            self._compiled = {}
            return False
        self._compiled = {"qkv": torch.compile(_qkv_piece, dynamic=True),
                          "out": torch.compile(_out_piece, dynamic=True)}
        return True

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> hidden states [T, hidden]."""
        return self.model.model.embed_tokens(ids.to(self.device))

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor):
        """Return (q [T,Hq,D], k [T,Hkv,D], v [T,Hkv,D]) of ``layer`` for hidden ``h`` [T,hidden].

        Applies input_layernorm, the projections, q_norm/k_norm where the model
        has them, and RoPE at ``positions`` [T] to q and k.  With CUDA graphs
        on and T within the graph buckets the result views the graph's static
        output, valid until the same layer runs again for as many tokens.
        """
        cos, sin = self._cos_sin(positions, h.dtype)
        g = self.graphs
        if g is not None and g.fits(h):
            return g.run("qkv", layer, (h, cos, sin))
        return self._qkv(layer, h, cos, sin)

    def _qkv(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``qkv`` with the RoPE tables given (the body CUDA graphs capture;
        compiled when ``enable_compile`` was called)."""
        mod = self.layers[layer]
        fn = self._compiled.get("qkv", _qkv_piece)
        return fn(mod.input_layernorm, mod.self_attn, self.rope, self.head_size,
                  self.has_qk_norm, h, cos, sin)

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """RoPE tables for ``positions``, reused while consecutive calls (the
        layers of one forward) pass the same positions tensor, or equal host
        positions."""
        last = self._rope_memo
        if last is not None and last[1] == dtype:
            if last[4] is positions:
                return last[2], last[3]
            # Comparing values needs the host: only for host tensors (a
            # device comparison would wait for the device at every layer).
            if (positions.device.type == "cpu" and last[0].device.type == "cpu"
                    and torch.equal(last[0], positions)):
                return last[2], last[3]
        cos, sin = self.rope.cos_sin(positions, dtype, self.device)
        self._rope_memo = (positions.clone(), dtype, cos, sin, positions)
        return cos, sin

    def _out(self, layer: int, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``out`` of ``attn`` [T, Hq*D] (the body CUDA graphs capture;
        compiled when ``enable_compile`` was called)."""
        return self._compiled.get("out", _out_piece)(self.layers[layer], attn, residual)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] -> logits [T, vocab] (final norm + lm_head)."""
        return self.model.lm_head(self.model.model.norm(h))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_positions: torch.Tensor | None = None,
               k_positions: torch.Tensor | None = None,
               q_start: int | None = None) -> torch.Tensor:
        """Attention of queries q [Tq,Hq,D] over keys/values [Tk,Hkv,D] -> [Tq,Hq,D].

        With no positions, q and k are the same tokens in order and a plain
        causal mask applies.  ``q_start``: the queries are the positions
        [q_start, q_start + Tq) and the keys the positions [0, Tk) in order
        (Tk = q_start + Tq; a prefill after a cached prefix, or a decode step):
        the bottom-right aligned causal mask.  Otherwise query i sees key j
        exactly when k_positions[j] <= q_positions[i], whatever the order of
        the rows.  The layer's sliding window, if any, applies in every case.

        On CUDA the KV heads go to SDPA unexpanded (``enable_gqa``) and the
        causal cases take its fused kernels without a materialized mask; on the
        CPU the KV heads are expanded first (enable_gqa takes the slow math
        kernel there).
        """
        window = self.sliding_windows[layer]
        rep = self.num_q_heads // self.num_kv_heads
        cuda = q.device.type == "cuda"
        if rep > 1 and not cuda:
            # Expand KV heads as transformers' repeat_kv does.
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        gqa = {"enable_gqa": True} if cuda and rep > 1 else {}
        qh, kh, vh = (x[None].transpose(1, 2) for x in (q, k, v))
        Tq, Tk = q.shape[0], k.shape[0]
        if q_start is not None and q_start + Tq != Tk:
            raise ValueError(f"q_start={q_start}: {Tq} queries end at {q_start + Tq}, "
                             f"but there are {Tk} keys")
        if q_start == 0:
            q_start = None
        if q_positions is None and q_start is None and window is None and Tq == Tk:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale, **gqa)
        elif q_start is not None and window is None and cuda:
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(Tq, Tk),
                                               scale=self.scale, **gqa)
        elif q_start is not None and window is None and Tq >= q_start:
            # Mostly new tokens after a short prefix: pad the queries to the
            # full length and take SDPA's fused causal path (an explicit
            # [Tq, Tk] mask would fall back to the slow kernel on the CPU).
            pad = qh.new_zeros(qh.shape[:2] + (q_start, qh.shape[3]))
            o = F.scaled_dot_product_attention(torch.cat((pad, qh), dim=2), kh, vh,
                                               is_causal=True, scale=self.scale)[:, :, q_start:]
        else:
            if q_positions is None:
                q_positions = torch.arange(Tk - Tq, Tk, device=q.device)
                k_positions = torch.arange(Tk, device=q.device)
            qp = q_positions.to(q.device)[:, None]
            kp = k_positions.to(q.device)[None, :]
            mask = kp <= qp
            if window is not None:
                mask &= kp > qp - window
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale, **gqa)
        return o[0].transpose(0, 1)


def _qkv_piece(norm, attn, rope: RopeSpec, head_size: int, qk_norm: bool,
               h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """input_layernorm, projections, q/k norms and RoPE of one layer (its
    modules given): h [T, hidden] -> (q [T,Hq,D], k [T,Hkv,D], v [T,Hkv,D])."""
    x = norm(h)
    T = x.shape[0]
    q = attn.q_proj(x).view(T, -1, head_size)
    k = attn.k_proj(x).view(T, -1, head_size)
    v = attn.v_proj(x).view(T, -1, head_size)
    if qk_norm:
        q = attn.q_norm(q)
        k = attn.k_norm(k)
    return rope.apply(q, cos, sin), rope.apply(k, cos, sin), v


def _out_piece(mod, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """o_proj of ``attn`` [T, Hq*D] + residual, then the MLP block of the
    decoder layer ``mod``."""
    h = residual + mod.self_attn.o_proj(attn)
    return h + mod.mlp(mod.post_attention_layernorm(h))


class LayerGraphs:
    """Per-layer CUDA graphs of a decoder layer's two dense pieces, the way
    vLLM's piecewise graphs run small batches: "qkv" (input norm,
    projections, q/k norms, RoPE with the tables given) and "out" (o_proj,
    residual, post-attention norm, MLP, residual).  Attention and the KV
    cache writes stay eager between them.

    A call with T rows runs the graph of the smallest bucket that holds T
    (powers of two up to 256, then multiples of 128 up to ``max_tokens``):
    inputs are copied into the graph's static buffers (rows past T keep
    earlier finite values; every row is computed independently, so they
    never touch the first T), the graph is replayed, and views of the first
    T rows of its static outputs are returned.  A graph is captured the
    first time its (piece, layer, bucket, dtypes) is used, on a side stream,
    with one shared memory pool; a capture that fails (logged once) leaves
    that piece eager.  The outputs stay valid until the same
    piece of the same layer runs again in the same bucket.

    Graphs of at most ``max_buckets`` buckets are kept: using another one
    drops the least recently used bucket's graphs (their static buffers
    return to the pool), which bounds the memory a server with many prompt
    lengths spends on them.
    """

    def __init__(self, adapter: ModelAdapter, max_tokens: int, max_buckets: int = 4):
        self.adapter = adapter
        self.max_tokens = max_tokens
        self.max_buckets = max(1, max_buckets)
        self.buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_tokens]
        self.buckets += list(range(384, max_tokens, 128)) + [max_tokens]
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict = {}
        # static inputs shared by the layers of a piece and bucket, with the
        # tensor last copied into each (held, so a later tensor can never be
        # mistaken for it)
        self.inputs: dict = {}
        self.recent: list[int] = []  # buckets, least recently used first
        self.captures = 0
        self.failures = 0

    def fits(self, h: torch.Tensor) -> bool:
        """Whether rows of ``h`` [T, hidden] go through a graph."""
        return h.is_cuda and 0 < h.shape[0] <= self.max_tokens and not torch.is_grad_enabled()

    def bucket(self, T: int) -> int:
        """The bucket that runs T rows."""
        return next(b for b in self.buckets if b >= T)

    def run(self, piece: str, layer: int, inputs: tuple):
        """Replay (capturing first if needed) ``piece`` of ``layer`` on
        ``inputs`` (each [T, ...]); returns views of the outputs' first T rows."""
        T = inputs[0].shape[0]
        bucket = self.bucket(T)
        if not self.recent or self.recent[-1] != bucket:
            if bucket in self.recent:
                self.recent.remove(bucket)
            self.recent.append(bucket)
            while len(self.recent) > self.max_buckets:
                old = self.recent.pop(0)
                self.graphs = {k: v for k, v in self.graphs.items() if k[2] != old}
                self.inputs = {k: v for k, v in self.inputs.items() if k[1] != old}
        key = (piece, layer, bucket) + tuple((x.dtype, tuple(x.shape[1:])) for x in inputs)
        entry = self.graphs.get(key, False)
        if entry is False:
            entry = self.graphs[key] = self._capture(piece, layer, bucket, inputs)
        if entry is None:  # its capture failed: this piece runs eagerly
            a = self.adapter
            out = a._qkv(layer, *inputs) if piece == "qkv" else a._out(layer, *inputs)
            return out if isinstance(out, tuple) else (out,)
        graph, static_in, static_out, last = entry
        for i, (buf, x) in enumerate(zip(static_in, inputs)):
            # "qkv"'s cos/sin (inputs 1, 2) come from the adapter's RoPE memo
            # and are the same tensors for every layer of a step: copy them
            # once per step, not once per layer
            if piece == "qkv" and i > 0 and last[i] is x:
                continue
            buf[:T].copy_(x)
            last[i] = x
        graph.replay()
        return tuple(o[:T] for o in static_out)

    def _capture(self, piece: str, layer: int, bucket: int, inputs: tuple):
        """Capture ``piece`` of ``layer`` for ``bucket`` rows: one eager run on
        a side stream (lazy initialisations), then the capture on the same
        stream into the shared pool."""
        a = self.adapter
        fn = a._qkv if piece == "qkv" else a._out
        ikey = (piece, bucket) + tuple((x.dtype, tuple(x.shape[1:])) for x in inputs)
        shared = self.inputs.get(ikey)
        if shared is None:
            shared = self.inputs[ikey] = (tuple(
                torch.zeros((bucket,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
                for x in inputs), [None] * len(inputs))
        static_in, last = shared
        try:
            graph, out = capture_cuda_graph(lambda: fn(layer, *static_in), pool=self.pool,
                                            warm_up=True)
        except Exception as e:  # noqa: BLE001 - that piece runs eagerly
            self.failures += 1
            if self.failures == 1:
                logging.getLogger("kvblend").warning(
                    "kvblend: CUDA graph capture of %s (layer %d, %d rows) failed (%s: %s); "
                    "it runs eagerly", piece, layer, bucket, type(e).__name__, e)
            return None
        out = out if isinstance(out, tuple) else (out,)
        self.captures += 1
        return graph, static_in, out, last


def capture_cuda_graph(fn, pool=None, warm_up: bool = False):
    """Capture ``fn()`` into a CUDA graph on a side stream (ordered after
    the current stream's work; nothing runs during the capture itself) and
    return (graph, fn's output); replay it on any stream.  ``warm_up`` runs
    ``fn`` once eagerly on that stream first (lazy initialisations, which a
    capture cannot do) and waits for it.  ``pool``: a graph memory pool
    handle to share.  Errors propagate; the caller falls back to eager."""
    cur = torch.cuda.current_stream()
    side = torch.cuda.Stream(device=cur.device)
    side.wait_stream(cur)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            if warm_up:
                fn()
                side.synchronize()
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                out = fn()
            finally:
                graph.capture_end()
    finally:
        cur.wait_stream(side)
    return graph, out


def get_adapter(model) -> ModelAdapter:
    """Return a ModelAdapter for ``model``.

    Raises ValueError naming the architecture when it is not one of
    SUPPORTED_ARCHITECTURES, or when its RoPE cannot be expressed by a fixed
    inv_freq.
    """
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported model architecture {name!r}: kvblend supports "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return ModelAdapter(model)
