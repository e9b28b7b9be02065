"""Patch of ``vllm.worker.model_runner.GPUModelRunnerBase.capture_model`` (vLLM 0.6.2): CUDA-graph capture
with Python's collector frozen, as vLLM itself captures since 0.10 (``freeze_gc``).

vLLM 0.6.2 captures one graph per decode batch size (35 of them by default) and runs two full collections
for each: ``torch.cuda.graph`` collects on entry, and vLLM's ``CUDAGraphRunner.capture`` collects after the
warm-up forwards. A full collection walks every object the process holds, about 470 thousand once vLLM,
torch and transformers are imported (200-350 ms each, measured on the CPU build with SmolLM2 loaded), so
the collections alone are some 15-20 s of an engine start whose whole capture takes 18-24 s on an H200, and
they grow with whatever else the process imports. With the heap alive before capture moved to the
permanent generation (``gc.freeze()``) each of those collections sees only what the capture itself makes:
the tensors it frees (vLLM's reason for collecting) are freed as before, the objects from before capture
are left alone (they were alive and stay alive), and after capture the heap is returned to the collector
and collected once. It acts for every model, vLLM's own as the backend's, as vLLM's later releases do.
``VLLM_ENABLE_CUDAGRAPH_GC=1`` (vLLM's own name for the setting) keeps 0.6.2's collections.

Decode step: not on it (engine start only).
"""
from __future__ import annotations

import gc
import os
from typing import Any, Callable

from ._base import FixPatch, PatchError, wrap

#: vLLM's (>= 0.10) switch for collecting during capture; set to 1 it keeps 0.6.2's collections.
KEEP_COLLECTIONS_ENV = "VLLM_ENABLE_CUDAGRAPH_GC"


def collections_kept() -> bool:
    return os.environ.get(KEEP_COLLECTIONS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def run_with_heap_frozen(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` with the objects alive before it out of the collector's sight."""
    if collections_kept() or gc.get_freeze_count():  # asked for, or the heap is frozen already (by the caller)
        return function(*args, **kwargs)
    gc.collect()
    gc.freeze()
    try:
        return function(*args, **kwargs)
    finally:
        gc.unfreeze()
        gc.collect()


class CudaGraphCapturePatch(FixPatch):
    name = "cuda_graph_capture"
    target = "vllm.worker.model_runner.GPUModelRunnerBase.capture_model: collector frozen during capture"

    wraps = (("vllm.worker.model_runner:GPUModelRunnerBase", "capture_model"),)

    def _apply(self) -> None:
        owner = self.owner()
        if "capture_model" not in vars(owner):
            raise PatchError(f"{self.target}: GPUModelRunnerBase defines no capture_model; unknown vLLM build")

        def make(original):
            def capture_model(self, *args, **kwargs):
                return run_with_heap_frozen(original, self, *args, **kwargs)

            return capture_model

        wrap(owner, "capture_model", self.name, make)
