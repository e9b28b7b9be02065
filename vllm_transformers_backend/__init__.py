"""vllm-transformers-backend: vLLM's Transformers modeling backend for vLLM 0.6.2 and its forks.

Installing the package is enough: a start-up hook patches vLLM when it is imported, and
``LLM(model=..., model_impl="transformers")`` runs the Hugging Face implementation of the model inside
vLLM's engine. Importing this package stays cheap (no torch, no vLLM); the backend classes load lazily.

Decode step: not on it (the package entry; README "Layout" lists the path of one decode step).
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "TransformersForCausalLM": "vllm_transformers_backend.causal",
    "Base": "vllm_transformers_backend.base",
    "BackendError": "vllm_transformers_backend.base",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
