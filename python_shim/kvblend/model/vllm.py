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

import logging
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
        # vLLM compiles its model for its own forward only: the blend calls
        # the same modules outside that forward, where (with vLLM's custom
        # ops off, its default under torch.compile) the norms, RoPE and the
        # MLP's activation run in their PyTorch-native forms, ~40 small
        # kernels per layer.  ``enable_compile`` fuses them the way vLLM's
        # own forward does; CUDA graphs (``enable_cuda_graphs``) replay them.
        self._compiled: dict = {}

    def _qkv_inputs(self, positions: torch.Tensor, dtype: torch.dtype):
        """The positions on the device, int64 (vLLM's rotary_emb takes them)."""
        return (positions.to(device=self.device, dtype=torch.int64),)

    def enable_compile(self, on: bool = True, cpu: bool = False) -> bool:
        """Run the two dense pieces of every layer through ``torch.compile``
        (Inductor, dynamic token count): the module forms vLLM's own forward
        compiles, fused the same way.  The layer's modules are arguments of
        the compiled code, so one compilation per piece serves every layer;
        it happens here, on a few rows of layers 0 and 1, not in the first
        request.  Only on CUDA (``cpu=True``: on the CPU too, Inductor's C++
        code, for tests).  A compilation that fails, or that would be
        repeated for every layer, is logged and the pieces stay eager.
        Returns whether they are compiled."""
        self._compiled = {}
        if not on or (self.device.type != "cuda" and not cpu):
            return False
        compiled = {"qkv": torch.compile(_qkv_piece, dynamic=True),
                    "out": torch.compile(_out_piece, dynamic=True)}
        try:
            from torch._dynamo.utils import counters

            with torch.inference_mode():
                h = torch.zeros(4, self.hidden_size, dtype=self.dtype, device=self.device)
                pos = torch.arange(4, device=self.device)
                attn = torch.zeros(4, self.num_q_heads * self.head_size, dtype=self.dtype,
                                   device=self.device)
                graphs = []
                for layer in range(min(2, self.num_layers)):
                    compiled["qkv"](self.layers[layer], self._sizes(), self.has_qk_norm, h, pos)
                    compiled["out"](self.layers[layer], attn, h)
                    graphs.append(counters["stats"]["unique_graphs"])
        except Exception as e:  # noqa: BLE001 - eager pieces are slower, not wrong
            logging.getLogger("kvblend").warning(
                "kvblend: torch.compile of %s's layer pieces failed (%s: %s); the blend runs "
                "them eagerly", self.architecture, type(e).__name__, str(e)[:300])
            return False
        if len(graphs) == 2 and graphs[1] != graphs[0]:
            # one compilation per layer would stall the first requests for
            # minutes: eager pieces instead
            logging.getLogger("kvblend").warning(
                "kvblend: torch.compile of %s's layer pieces compiled again for layer 1 (%d new "
                "graphs): the blend runs them eagerly", self.architecture,
                graphs[1] - graphs[0])
            return False
        self._compiled = compiled
        return True

    def _sizes(self) -> tuple[int, int, int]:
        return (self.q_size, self.kv_size, self.head_size)

    def _qkv(self, layer: int, h: torch.Tensor, pos: torch.Tensor):
        """``qkv`` with positions already on the device (the body CUDA
        graphs capture; compiled when ``enable_compile`` was called)."""
        fn = self._compiled.get("qkv", _qkv_piece)
        return fn(self.layers[layer], self._sizes(), self.has_qk_norm, h, pos)

    def _out(self, layer: int, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``out`` of ``attn`` [T, Hq*D] (the body CUDA graphs capture;
        compiled when ``enable_compile`` was called)."""
        return self._compiled.get("out", _out_piece)(self.layers[layer], attn, residual)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] -> logits [T, vocab] (final norm, lm_head
        through vLLM's logits processor)."""
        return self.model.compute_logits(self.model.model.norm(h))


def _qkv_piece(mod, sizes: tuple[int, int, int], qk_norm: bool, h: torch.Tensor,
               pos: torch.Tensor):
    """input_layernorm, the fused qkv_proj split, q_norm/k_norm where the
    model has them, then vLLM's rotary_emb, of the decoder layer ``mod``:
    h [T, hidden] -> (q [T,Hq,D], k [T,Hkv,D], v [T,Hkv,D])."""
    q_size, kv_size, D = sizes
    attn = mod.self_attn
    x = mod.input_layernorm(h)
    qkv, _ = attn.qkv_proj(x)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    T = x.shape[0]
    if qk_norm:
        q = attn.q_norm(q.reshape(T, -1, D)).reshape(T, -1)
        k = attn.k_norm(k.reshape(T, -1, D)).reshape(T, -1)
    q, k = q.contiguous(), k.contiguous()
    q, k = attn.rotary_emb(pos, q, k)
    return (q.reshape(T, -1, D).contiguous(), k.reshape(T, -1, D).contiguous(),
            v.reshape(T, -1, D).contiguous())


def _out_piece(mod, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """vLLM's o_proj of ``attn`` [T, Hq*D] added to ``residual``, then
    post_attention_layernorm, the MLP and its residual add, of the decoder
    layer ``mod``."""
    o, _ = mod.self_attn.o_proj(attn.contiguous())
    h = residual + o
    return h + mod.mlp(mod.post_attention_layernorm(h))
