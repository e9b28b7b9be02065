"""Backend features that need vLLM's CUDA kernels, refused on vLLM's CPU engine before it starts.

vLLM 0.6.2's CPU engine has no quantized GEMMs (GPTQ, AWQ, FP8 and the rest are CUDA kernels) and its
executor asserts LoRA away (``cpu backend doesn't support LoRA``); a quantized checkpoint would otherwise
stop at a dtype check whose message points at the wrong fix. ``check_engine_config`` runs on the engine
configuration (the engine_args patch, for ``LLM`` and ``vllm serve`` alike), for models the backend runs;
vLLM's own models keep vLLM's behaviour.

Decode step: not on it (runs on the engine configuration, before any worker starts).
"""
from __future__ import annotations

from typing import Any, List

from .registry import runs_on_backend


class EngineRequirementError(ValueError):
    """The engine cannot provide what the model or an option needs (the message names what does)."""


def check_engine_config(engine_config: Any) -> None:
    model_config = engine_config.model_config
    device_type = getattr(engine_config.device_config, "device_type", None)
    if device_type != "cpu" or not runs_on_backend(model_config):
        return
    needs: List[str] = []
    if getattr(model_config, "quantization", None):
        needs.append(f"quantization {model_config.quantization!r} (vLLM 0.6.2's quantized linear kernels exist for "
                     "CUDA GPUs only; its CPU build has none)")
    if getattr(engine_config, "lora_config", None) is not None:
        needs.append("LoRA adapters, enable_lora=True (vLLM 0.6.2's LoRA kernels are CUDA/Triton; its CPU executor "
                     "refuses LoRA)")
    if needs:
        raise EngineRequirementError(
            f"{getattr(model_config, 'model', 'this model')} asks for " + " and ".join(needs) +
            ": this needs a CUDA GPU, and this is vLLM's CPU engine. Run on a GPU host, or use an unquantized "
            "checkpoint without enable_lora on the CPU."
        )
