"""Quantized checkpoints through the backend: what vLLM 0.6.2's quantization methods need from its layers.

vLLM builds the checkpoint's ``quant_config`` (GPTQ, AWQ, FP8, compressed-tensors, ... or ``quantization=
"fp8"`` for online FP8) and hands it to the model. The backend's linears, input embedding and LM head are
vLLM's own layer classes, so each asks ``quant_config.get_quant_method(layer, prefix)`` as in vLLM's own
models, with ``prefix`` the module's checkpoint name (``model.layers.0.mlp.down_proj``), which the ignore
lists (FP8 ``ignored_layers``, compressed-tensors ``ignore``) are written in. q/k/v and gate/up fuse as in
vLLM's models (``fusion.py``), so the methods that pack or scale per shard load each shard through vLLM's
merged loaders; the per-layer ``Attention`` instances get the method's KV-cache scales.

What this module adds: the methods the backend refuses, the checkpoint extras a method's files carry, and
the post-load step of the attention instances (they are not modules of the tree, so vLLM's loader does not
reach them). vLLM's quantized kernels are CUDA kernels: on vLLM's CPU engine the engine checks refuse a
quantized model before it starts (``engine_checks.py``).

Decode step: the quantized linears (vLLM's quantization methods in the backend's layers) run each
projection; the KV-cache scales are read by vLLM's attention. Everything here runs at load.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from .weights import WeightsMapper

#: Methods the backend's GPU tests run against vLLM's own model on the same checkpoint
#: (tests/gpu/test_gpu_quantization.py), by the name in the checkpoint or given as ``quantization=``; GPTQ and
#: AWQ checkpoints run as ``gptq_marlin``/``awq_marlin`` where the GPU has those kernels. compressed-tensors:
#: its FP8 W8A8 scheme.
TESTED_METHODS = ("gptq", "gptq_marlin", "awq", "awq_marlin", "fp8", "compressed-tensors")

#: Methods the backend refuses, and why (what to do instead).
REFUSED_METHODS = {
    "gguf": "GGUF checkpoints need vLLM's GGUF loader, which maps tensor names per architecture for vLLM's own "
            "models. Dequantize the file with transformers (from_pretrained(..., gguf_file=...) then "
            "save_pretrained) and serve that folder, or use model_impl='vllm' if vLLM has the architecture.",
}

#: Methods whose checkpoints carry a ``.bias`` for every linear, zeros where the model has none (AutoGPTQ);
#: vLLM's own models skip those (``if name.endswith(".bias") and name not in params_dict``).
_EXTRA_BIAS_METHODS = ("gptq", "gptq_marlin", "gptq_marlin_24", "marlin")


def method_name(quant_config: Any) -> Optional[str]:
    """vLLM's name of the quantization method (``gptq_marlin``, ``fp8``, ...), None when not quantized."""
    if quant_config is None:
        return None
    return str(quant_config.get_name())


def refusal(quant_config: Any) -> Optional[str]:
    """Why the backend cannot run this quantization method (None: it can)."""
    name = method_name(quant_config)
    reason = REFUSED_METHODS.get(name or "")
    return f"quantization method {name!r} is not supported by the Transformers backend: {reason}" if reason else None


def add_checkpoint_rules(mapper: WeightsMapper, quant_config: Any) -> None:
    """Checkpoint tensors the method's files carry that map to no parameter and are skipped, as vLLM's own
    models skip them (only when they map nowhere: a real bias still loads)."""
    if method_name(quant_config) in _EXTRA_BIAS_METHODS:
        mapper.ignore_unexpected_fns.append(lambda name: name.endswith(".bias"))


def finish_attention_loading(instances: Iterable[Any]) -> None:
    """Runs the KV-cache scale method of each ``Attention`` after loading, as vLLM's loader does for the
    attention modules of its own models: it settles the scales (1.0 when the checkpoint has none) and frees
    the placeholder parameters."""
    from .attention import vllm_attention_of

    for instance in instances:
        attn = vllm_attention_of(instance)  # inside the backend's wrappers (TP-gathered heads, a layer's window)
        method = getattr(attn, "quant_method", None)
        if method is not None and hasattr(attn, "k_scale"):
            method.process_weights_after_loading(attn)
