"""vLLM layers that stand in for HF modules: linears by tensor-parallel style, RMSNorms, embeddings.

vLLM 0.6.2's linears return ``(output, bias)`` and have no ``return_bias``; HF modules expect a
tensor, so each vLLM linear gets a thin subclass returning the output alone.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Dict, Optional, Tuple, Type

import torch
from torch import nn

from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

from . import devices


class _TensorOutput:
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        output, _ = super().forward(x)  # the bias comes back only with skip_bias_add, never set here
        return output


class HFReplicatedLinear(_TensorOutput, ReplicatedLinear):
    pass


class HFColumnParallelLinear(_TensorOutput, ColumnParallelLinear):
    pass


class HFRowParallelLinear(_TensorOutput, RowParallelLinear):
    pass


class UnsupportedTPStyleError(ValueError):
    pass


#: Tensor-parallel styles of transformers' ``tp_plan`` (4.x names and the 5.1 renames) -> a vLLM linear.
#: "local_*" styles mean "shard without DTensor", which is what vLLM's layers do anyway.
_STYLE_TO_LINEAR: Dict[str, Tuple[type, Dict[str, Any]]] = {
    "colwise": (HFColumnParallelLinear, {}),
    "local_colwise": (HFColumnParallelLinear, {}),
    "colwise_rep": (HFColumnParallelLinear, {"gather_output": True}),
    "colwise_gather_output": (HFColumnParallelLinear, {"gather_output": True}),
    "rowwise": (HFRowParallelLinear, {}),
    "local_rowwise": (HFRowParallelLinear, {}),
    "rowwise_rep": (HFRowParallelLinear, {"input_is_parallel": False}),
    "rowwise_split_input": (HFRowParallelLinear, {"input_is_parallel": False}),
    "replicate": (HFReplicatedLinear, {}),
    "replicated_with_grad_allreduce": (HFReplicatedLinear, {}),
    "sequence_parallel": (HFReplicatedLinear, {}),
    "local": (HFReplicatedLinear, {}),
}


def linear_class_for_style(style: Optional[str]) -> Tuple[type, Dict[str, Any]]:
    if style is None:
        return _STYLE_TO_LINEAR["replicate"]
    try:
        return _STYLE_TO_LINEAR[style]
    except KeyError:
        raise UnsupportedTPStyleError(
            f"tp_plan style {style!r} has no vLLM equivalent in this backend (known: "
            f"{', '.join(sorted(_STYLE_TO_LINEAR))})"
        ) from None


def make_linear(
    in_features: int,
    out_features: int,
    bias: bool,
    style: Optional[str],
    quant_config: Any,
    prefix: str,
    transposed_checkpoint: bool = False,
) -> nn.Module:
    """A vLLM linear for one HF ``nn.Linear`` (or GPT-2 ``Conv1D`` with ``transposed_checkpoint``)."""
    cls, extra = linear_class_for_style(style)
    layer = cls(in_features, out_features, bias=bias, quant_config=quant_config, prefix=prefix, **extra)
    if transposed_checkpoint:
        # Conv1D stores its weight as [in, out]; vLLM's loaders shard [out, in].
        loader = layer.weight.weight_loader
        layer.weight.weight_loader = lambda param, loaded, *args: loader(param, loaded.t(), *args)
    return layer


class HFRMSNorm(RMSNorm):
    """vLLM's RMSNorm (``w * x / rms(x)``) as a drop-in for an HF norm called as ``norm(x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # vLLM's kernels index the input by data pointer: they need it contiguous.
        return self._forward_method(x if x.is_contiguous() else x.contiguous())


class HFGemmaRMSNorm(GemmaRMSNorm):
    """vLLM's GemmaRMSNorm (``(1 + w) * x / rms(x)``) as a drop-in for an HF norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self._forward_method(x if x.is_contiguous() else x.contiguous())


_NORM_FORMS: Dict[type, Optional[str]] = {}


def _eps_of(module: nn.Module) -> Optional[float]:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def rms_norm_form(module: nn.Module) -> Optional[str]:
    """``"plain"``, ``"gemma"`` (``1 + w``) or None (keep the HF module), decided numerically.

    Class names lie both ways (gated or mean-centred norms called RMSNorm), so the HF forward runs
    once per class on a small CPU probe with a random weight and is compared with both forms.
    """
    cls = type(module)
    if cls in _NORM_FORMS:
        return _NORM_FORMS[cls]
    form = None
    weight = getattr(module, "weight", None)
    eps = _eps_of(module)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1 and eps is not None and not list(module.children()):
        # The probe runs on the CPU whatever device vLLM's loader made the default.
        with torch.device("cpu"), torch.no_grad():
            form = _probe_norm_form(module, weight.shape[0], eps)
    _NORM_FORMS[cls] = form
    return form


def _probe_norm_form(module: nn.Module, hidden: int, eps: float) -> Optional[str]:
    if any(b is not None and b.is_meta for b in module._buffers.values()):
        return None
    probe = copy.copy(module)
    probe._parameters = dict(module._parameters)
    probe._buffers = dict(module._buffers)
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(hidden, generator=generator, dtype=torch.float32) * 0.5
    probe._parameters["weight"] = nn.Parameter(w, requires_grad=False)
    x = torch.randn(3, hidden, generator=generator, dtype=torch.float32)
    try:
        out = probe(x)
    except Exception:
        return None
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return None
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if torch.allclose(out, normed * w, atol=1e-5, rtol=1e-4):
        return "plain"
    if torch.allclose(out, normed * (1.0 + w), atol=1e-5, rtol=1e-4):
        return "gemma"
    return None


def make_rms_norm(module: nn.Module, form: str, device: torch.device) -> nn.Module:
    hidden = module.weight.shape[0]
    cls: Type[RMSNorm] = HFGemmaRMSNorm if form == "gemma" else HFRMSNorm
    norm = cls(hidden, eps=_eps_of(module))
    # GemmaRMSNorm's kernel path is torch.compile, which on the CPU means compiling C++ at first call;
    # on devices without vLLM kernels (MLU) only the PyTorch forward exists.
    if (form == "gemma" and device.type == "cpu") or devices.prefers_native_layer_forward(device):
        norm._forward_method = norm.forward_native
    return norm


class ScaledVocabParallelEmbedding(VocabParallelEmbedding):
    """``VocabParallelEmbedding`` that keeps an HF embedding's ``embed_scale`` (Gemma 3 and kin)."""

    def __init__(self, *args: Any, embed_scale: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # HF casts the scale to the weight dtype before multiplying; so does this.
        self.embed_scale = float(torch.tensor(embed_scale, dtype=torch.float32).to(self.weight.dtype))

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        return super().forward(input_) * self.embed_scale


def make_embedding(module: nn.Module, quant_config: Any, prefix: str) -> VocabParallelEmbedding:
    num, dim = module.weight.shape
    scale = getattr(module, "embed_scale", None)
    kwargs = dict(org_num_embeddings=num, quant_config=quant_config, prefix=prefix)
    if scale is not None:
        value = float(scale.item() if isinstance(scale, torch.Tensor) and not scale.is_meta else scale)
        return ScaledVocabParallelEmbedding(num, dim, embed_scale=value, **kwargs)
    return VocabParallelEmbedding(num, dim, **kwargs)


def plan_regexes(plan: Dict[str, str]) -> list:
    """transformers' plan keys use ``*`` for layer indices; match them against module qualnames."""
    compiled = []
    for pattern, style in plan.items():
        regex = re.compile("^" + re.escape(pattern).replace(r"\*", r"[^.]+") + "$")
        compiled.append((regex, style))
    return compiled
