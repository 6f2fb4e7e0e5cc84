"""vLLM general plugin: registers KVBlendConnector and hands the model over.

Declared as the ``vllm.general_plugins`` entry point ``kvblend``.  vLLM calls
``register()`` in every process it starts (API server, engine core, workers),
possibly several times; it is idempotent and cheap:

* it registers the connector name 'KVBlendConnector' with vLLM's connector
  factory (a lazy entry: nothing of kvblend's is imported until vLLM builds
  the connector);
* only when blending is configured (``LMCACHE_ENABLE_BLENDING`` true), it
  arranges for vLLM's model runners to pass the loaded model to
  ``kvblend.runtime.set_model`` after ``load_model``.  The runner modules are
  not imported for this: a finder on ``sys.meta_path`` patches each one when
  vLLM itself imports it (at once if it already has), so processes that never
  load a model (the API server) never import them.

Without vLLM, or with blending off, it changes nothing.
"""

from __future__ import annotations

import functools
import importlib.abc
import logging
import os
import sys

logger = logging.getLogger("kvblend")

# (module, class) of the model runners whose load_model is wrapped.
RUNNERS = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner"),
)

_registered = False
_hooked = False


def _blending_enabled() -> bool:
    """LMCACHE_ENABLE_BLENDING parsed as LMCache does ("true"/"1")."""
    return os.environ.get("LMCACHE_ENABLE_BLENDING", "").strip().lower() in ("true", "1")


def _wrap_load_model(cls) -> None:
    """Wrap ``cls.load_model`` (defined on ``cls`` itself) so the model it
    loads reaches kvblend; a second call on the same class does nothing."""
    orig = cls.__dict__.get("load_model")
    if orig is None or getattr(orig, "_kvblend_wrapped", False):
        return

    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        result = orig(self, *args, **kwargs)
        from .. import runtime

        model = self.get_model() if hasattr(self, "get_model") else getattr(self, "model", None)
        if model is not None:
            runtime.set_model(model)
            logger.debug("kvblend: model %s handed over", type(model).__name__)
        return result

    load_model._kvblend_wrapped = True
    cls.load_model = load_model


def _patch_module(module) -> None:
    """Wrap load_model of every runner class ``module`` defines."""
    for mod_name, cls_name in RUNNERS:
        if module.__name__ == mod_name:
            cls = getattr(module, cls_name, None)
            if cls is not None:
                _wrap_load_model(cls)


class _RunnerFinder(importlib.abc.MetaPathFinder):
    """Patches the runner modules right after vLLM imports them.

    It finds the module's spec through the other finders and wraps the
    loader's ``exec_module``; every other import passes straight through.
    """

    _names = {m for m, _ in RUNNERS}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self._names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch_module(module)

        loader.exec_module = exec_and_patch
        return spec


def _install_hook() -> None:
    """Patch runner modules already imported; catch the others on import."""
    global _hooked
    if _hooked:
        return
    for mod_name, _ in RUNNERS:
        module = sys.modules.get(mod_name)
        if module is not None:
            _patch_module(module)
    if not any(isinstance(f, _RunnerFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RunnerFinder())
    _hooked = True


def _share_vllm_logging() -> None:
    """Route the 'kvblend' logger through vLLM's handlers (vLLM configures
    only its own 'vllm' logger), at INFO unless configured otherwise, so
    kvblend's start-up and per-request lines show in every vLLM process."""
    kb = logging.getLogger("kvblend")
    if kb.handlers:
        return  # the application configured it
    vl = logging.getLogger("vllm")
    if not vl.handlers:
        return
    for h in vl.handlers:
        kb.addHandler(h)
    if kb.level == logging.NOTSET:
        kb.setLevel(logging.INFO)
    kb.propagate = False


def register() -> None:
    """Register 'KVBlendConnector' with vLLM and, when blending is
    configured, hook model loading (see the module doc).  Idempotent."""
    global _registered
    if not _registered:
        try:
            from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        except ImportError:
            return
        registry = getattr(KVConnectorFactory, "_registry", {})
        if "KVBlendConnector" not in registry:
            try:
                KVConnectorFactory.register_connector("KVBlendConnector", "kvblend.vllm.connector",
                                                      "KVBlendConnector")
            except ValueError:
                pass  # registered concurrently under the same name
        _registered = True
        _share_vllm_logging()
    if _blending_enabled():
        _install_hook()
