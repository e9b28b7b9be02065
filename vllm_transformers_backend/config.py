"""The configuration bundle vLLM 0.6.2 does not hand to models.

vLLM 0.6.2 constructs a model as ``cls(config=hf_config, cache_config=..., quant_config=...)``; the
backend also needs the ``ModelConfig`` (``trust_remote_code``, ``max_model_len``, the head size, the
pooler override). The ``model_loader`` patch wraps model construction in :func:`backend_config_scope`,
and the backend reads the bundle back with :func:`current_backend_config`.

Decode step: not on it (read once, while the model is built).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator, Optional


@dataclass(frozen=True)
class BackendConfig:
    model_config: Any

    @property
    def trust_remote_code(self) -> bool:
        return bool(getattr(self.model_config, "trust_remote_code", False))


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
