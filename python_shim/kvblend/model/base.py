"""The layer-by-layer model interface the blend, the gate and the built-in
engine call (``LayerModel``), and what its adapters share (``LayerModelBase``).

An adapter exposes a decoder one layer at a time so a paged KV cache (and
the blend) can sit between the projections and the attention, always by
calling the model's own modules (norms, projections, MLP).  Tensors are
unbatched: ``[T, ...]`` for T tokens; the residual stream is the caller's
(``qkv`` reads ``h`` without changing it, ``out`` returns the next ``h``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .attention import sdpa


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
    # inv_freq as float32 on each device it was used on: copying it from
    # the host each time would make the host wait for the device's queue
    _on: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _inv(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        inv = self._on.get(key)
        if inv is None:
            inv = self._on[key] = self.inv_freq.to(device=device, dtype=torch.float32)
        return inv

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin) of shape [T, rotary_dim] for ``positions`` [T].

        Computed in fp32 exactly as transformers does (outer product, duplicated
        halves, cos/sin, times attention_scaling), then cast to ``dtype``.
        For the "gptj" style the frequencies are repeated pairwise instead.
        """
        inv = self._inv(torch.device(device))
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


class LayerModel(Protocol):
    """A causal LM run one decoder layer at a time (see the module doc).

    Geometry: ``num_layers``, ``num_q_heads``, ``num_kv_heads``, ``head_size``,
    ``hidden_size``, ``vocab_size``, the attention ``scale``, the weights'
    ``dtype`` and ``device``, the ``rope`` (fixed frequencies, so stored keys
    can be re-rotated) and ``sliding_windows`` (per layer, None = full
    attention).  ``model`` is the wrapped model, ``architecture`` its class name.
    """

    model: Any
    architecture: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    hidden_size: int
    vocab_size: int
    scale: float
    dtype: torch.dtype
    device: torch.device
    rope: RopeSpec
    sliding_windows: list[int | None]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> hidden states [T, hidden]."""

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q [T,Hq,D], k [T,Hkv,D], v [T,Hkv,D]) of ``layer`` for hidden
        ``h`` [T, hidden], rotated at ``positions`` [T]."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_positions: torch.Tensor | None = None, k_positions: torch.Tensor | None = None,
               q_start: int | None = None) -> torch.Tensor:
        """Attention of q [Tq,Hq,D] over k/v [Tk,Hkv,D] -> [Tq,Hq,D] with the
        layer's scale and window, causal by position (``attention.sdpa``:
        no positions = the same rows in order, ``q_start`` = queries at
        [q_start, Tk), else key j is seen iff k_positions[j] <= q_positions[i])."""

    def out(self, layer: int, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """o_proj of ``attn`` [T,Hq,D] + residual, then the MLP block."""

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] -> logits [T, vocab] (final norm + lm_head)."""

    def enable_compile(self, on: bool = True) -> bool:
        """Compile the dense pieces of every layer; returns whether it is on."""

    def enable_cuda_graphs(self, max_tokens: int = 2048) -> bool:
        """Replay ``qkv``/``out`` of up to ``max_tokens`` rows from per-layer
        CUDA graphs; returns whether they are on."""


class LayerModelBase(LayerModel):
    """What the adapters share.  A subclass sets the geometry and defines
    ``_qkv_inputs(positions, dtype)`` (a tuple of tensors), the two dense
    pieces of a layer, ``_qkv(layer, h, *inputs)`` and ``_out(layer, attn
    [T, Hq*D], residual)``, which ``qkv`` and ``out`` run eagerly or replay
    from per-layer CUDA graphs (``kvblend.model.graphs.LayerGraphs``), and
    ``logits``.  Methods without a docstring have LayerModel's."""

    graphs: Any = None  # per-layer CUDA graphs (``enable_cuda_graphs``); None: eager

    def __init__(self, model):
        self.model = model
        self.architecture = type(model).__name__
        self.layers = list(model.model.layers)
        self.num_layers = len(self.layers)
        param = next(model.parameters())
        self.dtype = param.dtype
        self.device = param.device
        self.has_qk_norm = hasattr(self.layers[0].self_attn, "q_norm")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids.to(self.device))

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor):
        """Under CUDA graphs the result views the graph's static output,
        valid until the same layer runs again for as many tokens."""
        inputs = self._qkv_inputs(positions, h.dtype)
        g = self.graphs
        if g is not None and g.fits(h):
            return g.run("qkv", layer, (h,) + inputs)
        return self._qkv(layer, h, *inputs)

    def out(self, layer: int, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Under CUDA graphs the result views the graph's static output,
        valid until the same layer runs again for as many tokens."""
        a2 = attn.reshape(attn.shape[0], -1)
        g = self.graphs
        if g is not None and g.fits(residual) and a2.dtype == residual.dtype:
            return g.run("out", layer, (a2, residual))[0]
        return self._out(layer, a2, residual)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               q_positions: torch.Tensor | None = None,
               k_positions: torch.Tensor | None = None,
               q_start: int | None = None) -> torch.Tensor:
        """``kvblend.model.attention.sdpa`` with the layer's scale and window."""
        return sdpa(q, k, v, self.scale, window=self.sliding_windows[layer],
                    q_pos=q_positions, k_pos=k_positions, q_start=q_start)

    def enable_compile(self, on: bool = True) -> bool:
        """This adapter compiles nothing: always False."""
        return False

    def enable_cuda_graphs(self, max_tokens: int = 2048) -> bool:
        """Only on CUDA; ``max_tokens`` 0 turns them off."""
        if self.device.type != "cuda" or max_tokens <= 0:
            self.graphs = None
            return False
        from .graphs import LayerGraphs

        self.graphs = LayerGraphs(self, max_tokens)
        return True
