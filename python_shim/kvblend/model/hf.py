"""The transformers adapter: a Llama-family ``*ForCausalLM`` as a ``LayerModel``.

Supported: LlamaForCausalLM (SmolLM2 included), MistralForCausalLM,
Qwen2ForCausalLM (QKV bias) and Qwen3ForCausalLM (per-head q_norm/k_norm
before RoPE).  Every piece calls the model's own modules; the only math
written here is RoPE (``RopeSpec``), which reproduces transformers' own
rotary embedding operation for operation.
"""

from __future__ import annotations

import torch

from .base import LayerModelBase, RopeSpec

# RoPE types whose frequencies do not depend on the sequence length, so one
# inv_freq serves every position (and cached keys can be re-rotated).
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


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


class HFAdapter(LayerModelBase):
    """Layer-by-layer view of a transformers Llama-family causal LM (see the
    module doc and ``LayerModel``)."""

    def __init__(self, model):
        super().__init__(model)
        config = model.config
        attn0 = self.layers[0].self_attn
        self.num_q_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_size = attn0.head_dim
        self.hidden_size = config.hidden_size
        self.scale = float(attn0.scaling)
        self.vocab_size = model.lm_head.out_features
        self.rope = _rope_spec(model)
        self._rope_memo = None
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

    def _qkv(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``qkv`` with the RoPE tables given (the body CUDA graphs capture;
        compiled when ``enable_compile`` was called)."""
        mod = self.layers[layer]
        fn = self._compiled.get("qkv", _qkv_piece)
        return fn(mod.input_layernorm, mod.self_attn, self.rope, self.head_size,
                  self.has_qk_norm, h, cos, sin)

    def _qkv_inputs(self, positions: torch.Tensor, dtype: torch.dtype):
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

