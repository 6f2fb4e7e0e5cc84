"""kvblend's view of a model: ``base.LayerModel`` (what the blend, the gate
and the built-in engine call) with its adapters for transformers
(``hf.HFAdapter``) and vLLM (``vllm.VllmAdapter``), per-layer CUDA graphs
(``graphs``), and ``attention``: attention by position and the blend's
subset-attention strategies."""

from __future__ import annotations

from .base import LayerModel, LayerModelBase, RopeSpec

__all__ = ["LayerModel", "LayerModelBase", "RopeSpec", "SUPPORTED_ARCHITECTURES", "get_adapter",
           "is_vllm_model"]

# Llama-family decoders, from transformers or vLLM (which also loads Mistral
# checkpoints as LlamaForCausalLM); Qwen2 adds QKV bias, Qwen3 q/k norms.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM",
                           "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def is_vllm_model(model) -> bool:
    """True when ``model`` is a module class defined by vLLM."""
    return type(model).__module__.startswith("vllm.")


def get_adapter(model) -> LayerModel:
    """The ``LayerModel`` of ``model``: ``VllmAdapter`` for vLLM's modules,
    ``HFAdapter`` for transformers models.

    Raises ValueError naming the architecture when it is not one of
    SUPPORTED_ARCHITECTURES (under vLLM this happens when the connector
    starts, before any request), and for rotary embeddings whose frequencies
    are not fixed.
    """
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"kvblend: unsupported model architecture {name!r} "
                         f"({'vLLM' if is_vllm_model(model) else 'transformers'}); kvblend "
                         f"supports {', '.join(SUPPORTED_ARCHITECTURES)}")
    if is_vllm_model(model):
        from .vllm import VllmAdapter

        return VllmAdapter(model)
    from .hf import HFAdapter

    return HFAdapter(model)
