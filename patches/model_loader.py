"""Patch of ``vllm.model_executor.model_loader.loader._initialize_model`` (vLLM 0.6.2).

vLLM 0.6.2 builds models as ``cls(config, cache_config, quant_config, ...)`` and never hands them the
``ModelConfig``; the backend needs it (dtype, ``trust_remote_code``, ``max_model_len``, ``model_impl``).
Every loader (default, dummy, bitsandbytes, sharded state) goes through ``_initialize_model``; the patch
runs it inside :func:`vllm_transformers_backend.config.backend_config_scope`.
"""
from __future__ import annotations

from ._base import Patch, require_parameters, wrap


class ModelLoaderPatch(Patch):
    name = "model_loader"
    target = "vllm.model_executor.model_loader.loader._initialize_model: backend config bundle"

    wraps = (("vllm.model_executor.model_loader.loader", "_initialize_model"),)

    def _apply(self) -> None:
        from vllm_transformers_backend.config import BackendConfig, backend_config_scope

        loader = self.owner()
        require_parameters(
            loader._initialize_model,
            ["model_config", "load_config", "lora_config", "cache_config", "scheduler_config"],
            self.target,
        )

        def make(original):
            def _initialize_model(model_config, load_config, lora_config, cache_config, scheduler_config=None):
                bundle = BackendConfig(
                    model_config=model_config,
                    load_config=load_config,
                    cache_config=cache_config,
                    scheduler_config=scheduler_config,
                    lora_config=lora_config,
                )
                with backend_config_scope(bundle):
                    return original(model_config, load_config, lora_config, cache_config, scheduler_config)

            return _initialize_model

        wrap(loader, "_initialize_model", self.name, make)
