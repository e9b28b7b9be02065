"""Loggers under vLLM's ``vllm`` namespace, so vLLM's handler, format and level apply to them."""
from __future__ import annotations

import logging


def get_logger(module_name: str) -> logging.Logger:
    from vllm.logger import init_logger

    return init_logger("vllm.transformers_backend." + module_name.split(".", 1)[-1])
