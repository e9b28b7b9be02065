"""What the CPU-only patches share: they act on vLLM's CPU build (``vllm.utils.is_cpu()``) only.

vLLM 0.6.2's CPU executor has tensor-parallel code that does not run as shipped (see each patch). On
any other build (CUDA, ROCm, MLU forks) those code paths are never taken, so a CPU-only patch leaves the
build untouched and counts as applied there: nothing is needed.

Decode step: not on it (patch machinery).
"""
from __future__ import annotations

from ._base import Patch


def is_cpu_build() -> bool:
    from vllm.utils import is_cpu

    return bool(is_cpu())


class CpuBuildPatch(Patch):
    """A patch that wraps its target on vLLM's CPU build and is a no-op elsewhere."""

    def is_applied(self) -> bool:
        return not is_cpu_build() or super().is_applied()
