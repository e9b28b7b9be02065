"""Loggers under vLLM's ``vllm`` namespace, so vLLM's handler, format and level apply to them; and the one
way messages list many names.

Decode step: not on it (nothing logs per step).
"""
from __future__ import annotations

import logging
from typing import Any, Iterable


def get_logger(module_name: str) -> logging.Logger:
    from vllm.logger import init_logger

    return init_logger("vllm.transformers_backend." + module_name.split(".", 1)[-1])


def preview(items: Iterable[Any], limit: int = 8) -> str:
    """``"a, b, c, ... (N more)"``: the first ``limit`` items of a list a message names."""
    items = [str(item) for item in items]
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
