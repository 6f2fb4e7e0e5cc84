"""kvblend's stand-ins for vLLM's types (python_shim/kvblend/_vllm_compat.py)
against vLLM's own classes.

The built-in engine hands a connector objects shaped like vLLM's; a
connector that works there must find the same methods, signatures and
fields under vLLM.  So every stand-in names the vLLM class it mirrors, each
of its methods has the signature of vLLM's (parameter names, kinds and
defaults), and each of its fields exists on vLLM's class.

Where vLLM imports, ``kvblend._vllm_compat`` takes vLLM's base classes
instead of its stand-ins, so the stand-ins are loaded from the module's
source with every ``vllm`` module hidden (``standins``).
"""

import dataclasses
import enum
import importlib.util
import inspect
import re
import sys

import pytest

pytest.importorskip("vllm")

import kvblend._vllm_compat as compat  # noqa: E402


def _load_standins():
    """Execute _vllm_compat's source as a new module while ``import vllm``
    fails, so it defines every stand-in; sys.modules is restored after."""
    hidden = {k: m for k, m in sys.modules.items() if k == "vllm" or k.startswith("vllm.")}
    name = "kvblend._vllm_compat_standins"
    spec = importlib.util.spec_from_file_location(name, compat.__file__)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.update({k: None for k in hidden})
    sys.modules["vllm"] = None  # find_spec("vllm") is None, imports raise
    sys.modules[name] = mod  # dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
    finally:
        for k in [k for k in sys.modules if k == "vllm" or k.startswith("vllm.")]:
            del sys.modules[k]
        sys.modules.update(hidden)
        del sys.modules[name]
    assert not mod._HAVE_VLLM
    return mod


standins = _load_standins()


def _vllm_classes() -> dict[str, type]:
    """The vLLM class each stand-in mirrors, by the stand-in's name."""
    from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1 import base
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    return {
        "KVConnectorRole": base.KVConnectorRole,
        "KVConnectorMetadata": base.KVConnectorMetadata,
        "KVConnectorBase_V1": base.KVConnectorBase_V1,
        "KVConnectorWorkerMetadata": base.KVConnectorWorkerMetadata,
        "KVConnectorStats": KVConnectorStats,
        "KVConnectorOutput": KVConnectorOutput,
        "KVTransferConfig": KVTransferConfig,
        "ModelConfig": ModelConfig,
        "CacheConfig": CacheConfig,
        "VllmConfig": VllmConfig,
        "Request": Request,
        "KVCacheBlocks": KVCacheBlocks,
        "NewRequestData": NewRequestData,
        "CachedRequestData": CachedRequestData,
        "SchedulerOutput": SchedulerOutput,
        "AttentionLayer": Attention,  # the layers in forward_context.no_compile_layers
        "AttentionMetadata": CPUAttentionMetadata,  # the CPU backend's
        "ForwardContext": ForwardContext,
    }


VLLM = _vllm_classes()
STANDINS = sorted(n for n, c in vars(standins).items()
                  if inspect.isclass(c) and c.__module__ == standins.__name__)
_DUNDER = re.compile(r"^__\w+__$")
_SELF_ASSIGN = re.compile(r"\bself\.(\w+)\s*(?::[^=\n]*)?=(?!=)")


def _init_attrs(cls) -> set[str]:
    """Names ``cls``'s (or a base's) __init__/__post_init__ assigns to self."""
    names = set()
    for klass in cls.__mro__:
        for fn in (vars(klass).get("__init__"), vars(klass).get("__post_init__")):
            if inspect.isfunction(fn):
                try:
                    names |= set(_SELF_ASSIGN.findall(inspect.getsource(fn)))
                except (OSError, TypeError):
                    pass
    return names


def _members(cls) -> set[str]:
    """What an instance of ``cls`` has: attributes of the class (methods,
    properties), dataclass fields and attributes its __init__ sets."""
    names = set(dir(cls)) | _init_attrs(cls)
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    return names


def _own_members(cls) -> set[str]:
    """The stand-in's own fields, methods and properties.  Private names
    count only for the connector base, whose subclasses use them."""
    names = {n for n in vars(cls) if not _DUNDER.match(n) and n != "_abc_impl"} | _init_attrs(cls)
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    if cls is not standins.KVConnectorBase_V1:
        names = {n for n in names if not n.startswith("_")}
    return names


def _params(fn) -> list[tuple]:
    """(name, kind, default) of each parameter; annotations are not compared."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_every_standin_mirrors_a_vllm_class():
    assert STANDINS == sorted(VLLM)


def test_role_members():
    ours, theirs = standins.KVConnectorRole, VLLM["KVConnectorRole"]
    assert issubclass(ours, enum.Enum)
    assert {m.name: m.value for m in ours} == {m.name: m.value for m in theirs}


@pytest.mark.parametrize("name", ["KVConnectorBase_V1", "KVConnectorWorkerMetadata"])
def test_abstract_methods(name):
    """A connector that implements the stand-in's abstract methods can be
    instantiated under vLLM, and the other way round."""
    assert getattr(standins, name).__abstractmethods__ == VLLM[name].__abstractmethods__


@pytest.mark.parametrize("name", STANDINS)
def test_members_exist_in_vllm(name):
    ours, theirs = getattr(standins, name), VLLM[name]
    missing = sorted(_own_members(ours) - _members(theirs))
    assert not missing, f"{name}: {missing} not on {theirs.__module__}.{theirs.__qualname__}"


@pytest.mark.parametrize("name", STANDINS)
def test_method_signatures_match_vllm(name):
    """Methods compare by signature; constructors only for the connector
    base (subclasses call it; the engine alone builds the other objects)."""
    ours, theirs = getattr(standins, name), VLLM[name]
    attrs = _own_members(ours) | ({"__init__"} if name == "KVConnectorBase_V1" else set())
    compared = 0
    for attr in sorted(attrs):
        mine = inspect.getattr_static(ours, attr, None)
        if not isinstance(mine, (classmethod, staticmethod)) and not inspect.isfunction(mine):
            continue  # a field or a property
        mine, other = getattr(ours, attr), getattr(theirs, attr, None)
        assert callable(other), f"{name}.{attr} is not a method in vLLM"
        assert _params(mine) == _params(other), f"{name}.{attr}{inspect.signature(mine)} " \
            f"differs from vLLM's {attr}{inspect.signature(other)}"
        compared += 1
    if name == "KVConnectorBase_V1":
        assert compared >= 15  # the hooks were compared, not skipped as fields
