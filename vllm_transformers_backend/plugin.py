"""Entry point of vLLM's ``vllm.general_plugins`` group.

vLLM 0.6.2 calls it in the engine and in each worker, after ``EngineArgs``/``ModelConfig`` exist, so
it is a second line behind the start-up hook (``_startup``): it makes sure worker processes that were
started without the hook (an unusual ``sys.path``, a disabled ``.pth``) are patched too.

Decode step: not on it (runs once per process).
"""
from __future__ import annotations


def register() -> None:
    from vllm_transformers_backend.patches import apply_all

    apply_all(origin="vllm plugin")
