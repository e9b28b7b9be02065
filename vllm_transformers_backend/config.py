"""The configuration bundle vLLM 0.6.2 does not hand to models.

vLLM 0.6.2 constructs a model as ``cls(config=hf_config, cache_config=..., quant_config=...)``; the
backend also needs the ``ModelConfig`` (dtype, ``trust_remote_code``, ``model_impl``,
``max_model_len``) and the ``LoadConfig``. The ``model_loader`` patch wraps model construction in
:func:`backend_config_scope`, and the backend reads the bundle back with :func:`current_backend_config`.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator, Optional


@dataclass(frozen=True)
class BackendConfig:
    model_config: Any
    load_config: Any = None
    cache_config: Any = None
    scheduler_config: Any = None
    lora_config: Any = None

    @property
    def trust_remote_code(self) -> bool:
        return bool(getattr(self.model_config, "trust_remote_code", False))

    @property
    def model_impl(self) -> str:
        return getattr(self.model_config, "model_impl", "auto")


_CURRENT: contextvars.ContextVar[Optional[BackendConfig]] = contextvars.ContextVar(
    "vllm_transformers_backend_config", default=None
)


@contextlib.contextmanager
def backend_config_scope(bundle: BackendConfig) -> Iterator[BackendConfig]:
    token = _CURRENT.set(bundle)
    try:
        yield bundle
    finally:
        _CURRENT.reset(token)


def current_backend_config() -> Optional[BackendConfig]:
    return _CURRENT.get()
