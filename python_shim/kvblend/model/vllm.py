"""Per-layer access to vLLM's own Llama-family modules.

A ``LayerModel`` (``kvblend.model.base``) over the model vLLM loaded:
``LlamaForCausalLM`` (which vLLM also uses for Mistral checkpoints),
``MistralForCausalLM``, ``Qwen2ForCausalLM`` and ``Qwen3ForCausalLM``.

vLLM fuses the projections (``qkv_proj`` returns q|k|v, ``gate_up_proj``
inside the MLP), returns ``(output, bias)`` from its linear layers, fuses the
residual add into its RMSNorm and applies RoPE with its own ``rotary_emb``.
The adapter calls each of those modules itself, so the numbers are vLLM's;
it keeps the residual stream un-fused (``h`` in, ``h`` out) as the blend
driver expects.  Tensors are unbatched, ``[T, ...]``, on the model's device.
"""

from __future__ import annotations

import math

import torch

from .base import LayerModelBase, RopeSpec

# vLLM rotary classes whose frequencies are fixed (one inv_freq for every
# position), so stored keys can be re-rotated from one position to another.
_STATIC_ROTARY = ("RotaryEmbedding", "Llama3RotaryEmbedding",
                  "LinearScalingRotaryEmbedding", "YaRNScalingRotaryEmbedding")


def _inv_freq(rotary) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) of a vLLM rotary module, checked against
    the module's own cos/sin cache.

    Raises ValueError naming the class for rotary embeddings whose frequencies
    depend on the sequence length (dynamic NTK, longrope, mrope, ...), and
    when the derived frequencies do not reproduce the cache.
    """
    cls = type(rotary).__name__
    if cls not in _STATIC_ROTARY:
        raise ValueError(f"kvblend: vLLM rotary embedding {cls} is not supported (expected one of "
                         f"{', '.join(_STATIC_ROTARY)}); stored keys cannot be re-rotated")
    if cls == "YaRNScalingRotaryEmbedding":
        inv = rotary._compute_inv_freq(rotary.scaling_factor)
        scaling = float(getattr(rotary, "mscale", 1.0))
    else:
        inv = rotary._compute_inv_freq(rotary.base)
        scaling = 1.0
    inv = inv.detach().to("cpu", torch.float32)
    if cls == "LinearScalingRotaryEmbedding":
        inv = inv / float(rotary.scaling_factor)
    cache = rotary.cos_sin_cache.detach().to("cpu", torch.float32)
    n = min(cache.shape[0], 4096)
    pos = torch.arange(n, dtype=torch.float32)
    freqs = pos[:, None] * inv[None, :]
    want = torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1)
    tol = 1e-3 if rotary.cos_sin_cache.dtype == torch.float32 else 2e-2
    err = float((want - cache[:n]).abs().max())
    if not math.isfinite(err) or err > tol:
        raise ValueError(f"kvblend: cannot reproduce the cos/sin cache of vLLM's {cls} "
                         f"(max error {err:.3g} > {tol}); blending would be wrong")
    return inv.contiguous(), scaling


class VllmAdapter(LayerModelBase):
    """Layer-by-layer view of a vLLM Llama-family model (see module doc)."""

    def __init__(self, model):
        super().__init__(model)
        attn0 = self.layers[0].self_attn
        self.num_q_heads = int(attn0.num_heads)
        self.num_kv_heads = int(attn0.num_kv_heads)
        self.head_size = int(attn0.head_dim)
        self.q_size = int(attn0.q_size)
        self.kv_size = int(attn0.kv_size)
        self.hidden_size = int(model.config.hidden_size)
        self.scale = float(attn0.scaling)
        self.vocab_size = int(model.config.vocab_size)
        rotary = attn0.rotary_emb
        inv, scaling = _inv_freq(rotary)
        style = "neox" if getattr(rotary, "is_neox_style", True) else "gptj"
        self.rope = RopeSpec(inv_freq=inv, rotary_dim=int(rotary.rotary_dim), style=style,
                             attention_scaling=scaling, rope_type=type(rotary).__name__)
        self.sliding_windows = [getattr(getattr(l.self_attn, "attn", None), "sliding_window", None)
                                for l in self.layers]
        # vLLM compiles its model for its own forward; kvblend does not
        # compile vLLM's modules a second time (``enable_compile`` is off),
        # but the blend calls them outside vLLM's forward, where CUDA graphs
        # (``enable_cuda_graphs``) save each layer ~20 launches.

    def _qkv_inputs(self, positions: torch.Tensor, dtype: torch.dtype):
        """The positions on the device, int64 (vLLM's rotary_emb takes them)."""
        return (positions.to(device=self.device, dtype=torch.int64),)

    def _qkv(self, layer: int, h: torch.Tensor, pos: torch.Tensor):
        """``qkv`` with positions already on the device (the body CUDA
        graphs capture): input_layernorm, the fused qkv_proj split,
        q_norm/k_norm where the model has them, then vLLM's rotary_emb."""
        mod = self.layers[layer]
        attn = mod.self_attn
        x = mod.input_layernorm(h)
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        T, D = x.shape[0], self.head_size
        if self.has_qk_norm:
            q = attn.q_norm(q.reshape(T, -1, D)).reshape(T, -1)
            k = attn.k_norm(k.reshape(T, -1, D)).reshape(T, -1)
        q, k = q.contiguous(), k.contiguous()
        q, k = attn.rotary_emb(pos, q, k)
        return (q.reshape(T, -1, D).contiguous(), k.reshape(T, -1, D).contiguous(),
                v.reshape(T, -1, D).contiguous())

    def _out(self, layer: int, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``out`` of ``attn`` [T, Hq*D]: vLLM's o_proj added to ``residual``,
        then post_attention_layernorm, the MLP and its residual add (the
        body CUDA graphs capture)."""
        mod = self.layers[layer]
        o, _ = mod.self_attn.o_proj(attn.contiguous())
        h = residual + o
        return h + mod.mlp(mod.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] -> logits [T, vocab] (final norm, lm_head
        through vLLM's logits processor)."""
        return self.model.compute_logits(self.model.model.norm(h))
