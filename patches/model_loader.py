"""Patch of ``vllm.model_executor.model_loader.loader._initialize_model`` (vLLM 0.6.2).

vLLM 0.6.2 builds models as ``cls(config, cache_config, quant_config, ...)`` and never hands them the
``ModelConfig``; the backend needs it (``trust_remote_code``, ``max_model_len``, the head size). Every
loader (default, dummy, bitsandbytes, sharded state) goes through ``_initialize_model``; the patch runs it
inside :func:`vllm_transformers_backend.config.backend_config_scope`.

Before building a model the backend runs (``model_impl`` resolved to it), the patch also makes sure every
required patch is in place (:func:`~vllm_transformers_backend.patches.ensure_applied`), in every worker:
vLLM's plugin loader swallows a failed patch, so this is where a missing one fails loudly. (The backend's
model classes never import the patches: the patches depend on the backend, not the other way round.)

Decode step: not on it (applied at ``import vllm``; acts when the engine is configured or loads the model).
"""
from __future__ import annotations

from ._base import Patch, require_parameters, wrap


class ModelLoaderPatch(Patch):
    name = "model_loader"
    target = "vllm.model_executor.model_loader.loader._initialize_model: backend config bundle"

    wraps = (("vllm.model_executor.model_loader.loader", "_initialize_model"),)

    def _apply(self) -> None:
        from vllm_transformers_backend.config import BackendConfig, backend_config_scope
        from vllm_transformers_backend.registry import runs_on_backend

        loader = self.owner()
        require_parameters(
            loader._initialize_model,
            ["model_config", "load_config", "lora_config", "cache_config", "scheduler_config"],
            self.target,
        )

        def make(original):
            def _initialize_model(model_config, load_config, lora_config, cache_config, scheduler_config=None):
                if runs_on_backend(model_config):
                    from . import ensure_applied

                    ensure_applied()
                with backend_config_scope(BackendConfig(model_config=model_config)):
                    return original(model_config, load_config, lora_config, cache_config, scheduler_config)

            return _initialize_model

        wrap(loader, "_initialize_model", self.name, make)
