"""Patch of ``vllm.model_executor.model_loader.utils.get_model_architecture`` (vLLM 0.6.2).

Resolves ``model_impl``: ``transformers`` returns the backend's class, ``vllm`` vLLM's own,
``auto`` vLLM's own when vLLM has the architecture and the backend otherwise. vLLM 0.6.2 imports the
function by name into ``model_loader.loader`` and ``model_loader/__init__`` (``inputs/registry.py`` and
``multimodal/base.py`` import it lazily from the latter), so every binding is replaced.

Decode step: not on it (applied at ``import vllm``; acts when the engine is configured or loads the model).
"""
from __future__ import annotations

from ._base import Patch, require_parameters, wrap

_BINDINGS = (
    "vllm.model_executor.model_loader.utils",
    "vllm.model_executor.model_loader.loader",
    "vllm.model_executor.model_loader",
)


class ModelArchitecturePatch(Patch):
    name = "model_architecture"
    target = "vllm.model_executor.model_loader.utils.get_model_architecture (3 bindings)"

    wraps = tuple((name, "get_model_architecture") for name in _BINDINGS)

    def _apply(self) -> None:
        from vllm_transformers_backend.registry import resolve_model_architecture

        utils, *others = (self.owner(i) for i in range(len(self.wraps)))
        require_parameters(utils.get_model_architecture, ["model_config"], self.target)

        def make(original):
            def get_model_architecture(model_config):
                return resolve_model_architecture(model_config, original)

            return get_model_architecture

        wrap(utils, "get_model_architecture", self.name, make)
        for module in others:
            module.get_model_architecture = utils.get_model_architecture
