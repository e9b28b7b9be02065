"""vLLM layers that stand in for HF modules: linears by tensor-parallel style, RMSNorms, embeddings.

Decode step: these are the HF model's input embedding (``VocabParallelEmbedding``,
keeping ``embed_scale``), every projection (vLLM linears: column/row-parallel by ``tp_plan`` style, each
returning the tensor HF expects) and every RMS norm (the ``rms_norm`` speed pass: vLLM's ``RMSNorm`` /
``GemmaRMSNorm``, whose ``norm(x, residual)`` is also the fused add-and-norm of :mod:`.residual`).

vLLM 0.6.2's linears return ``(output, bias)`` and have no ``return_bias``; HF modules expect a
tensor, so each vLLM linear gets a thin subclass returning the output alone.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_gather)
from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
from vllm.model_executor.layers.linear import (ColumnParallelLinear, ReplicatedLinear, RowParallelLinear,
                                               UnquantizedLinearMethod)
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

from . import devices, kernels
from .passes import Build, Replacement, SpeedPass, Verdict


def linear_rows(layer: nn.Module, x: torch.Tensor,
                forward: Optional[Callable[[torch.Tensor], Any]] = None) -> torch.Tensor:
    """The output tensor of a vLLM linear ``layer`` (whose ``forward``, or the given one, returns ``(output,
    bias)``), called on ``x`` as rows: HF keeps a batch dimension (``[1, tokens, hidden]``) and vLLM's
    quantization methods take ``[tokens, hidden]`` (FP8's ``scaled_fp8_quant`` and the CUTLASS GEMMs assert
    2-D input; GPTQ/AWQ flatten themselves). The leading dimensions are folded into one and restored on the
    output: views unless ``x`` is not contiguous (a copy the GEMM would need anyway). 2-D input, and any input
    of a layer that :func:`takes_any_rank` (``F.linear`` folds it in C++: two Python-level views fewer per
    linear, host time per layer in eager prefills and on the CPU), is passed as is."""
    forward = layer if forward is None else forward
    if x.dim() <= 2 or takes_any_rank(layer):
        output, _ = forward(x)  # the bias comes back only with skip_bias_add, never set here
        return output
    output, _ = forward(x.reshape(-1, x.shape[-1]))
    return output.view(*x.shape[:-1], output.shape[-1])


#: Linear methods that compute ``F.linear(x, weight, bias)`` and nothing else on ``x`` (exact types: a
#: subclass may do more).
ANY_RANK_METHODS: Tuple[type, ...] = (UnquantizedLinearMethod,)


def takes_any_rank(layer: nn.Module) -> bool:
    """Whether a vLLM linear takes input of any rank: its method is one of :data:`ANY_RANK_METHODS`, on a
    device where that method is stock vLLM's, and it has no LoRA (whose punica kernels take rows). Decided
    once per layer, at its first call."""
    decided = layer.__dict__.get("_vtb_any_rank")
    if decided is None:
        weight = getattr(layer, "weight", None)
        decided = (type(getattr(layer, "quant_method", None)) in ANY_RANK_METHODS
                   and isinstance(weight, torch.Tensor) and devices.stock_linear_takes_any_rank(weight.device)
                   and not hasattr(layer, "base_layer"))
        layer.__dict__["_vtb_any_rank"] = decided
    return decided


class TensorOutput:
    """Mixin for a vLLM layer returning ``(output, bias)``: returns the output tensor, as HF modules expect,
    for input of HF's shape (:func:`linear_rows`). vLLM's LoRA layers of the backend's linears mix it in too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return linear_rows(self, x, super().forward)


class HFReplicatedLinear(TensorOutput, ReplicatedLinear):
    pass


class HFColumnParallelLinear(TensorOutput, ColumnParallelLinear):
    pass


class HFRowParallelLinear(TensorOutput, RowParallelLinear):
    pass


class UnsupportedTPStyleError(ValueError):
    pass


class HFKVHeadColumnParallelLinear(TensorOutput, ColumnParallelLinear):
    """A column-parallel K or V projection with fewer KV heads than TP ranks.

    A plain ``ColumnParallelLinear`` would split one head's rows between ranks. vLLM's own
    ``QKVParallelLinear`` instead gives every rank one whole head, rank ``r`` holding head
    ``r * num_kv_heads // tp`` (each head replicated on ``tp // num_kv_heads`` ranks); this layer does
    the same for a separate ``k_proj``/``v_proj``, so that each rank's query heads find their KV head.
    ``output_size`` stays the checkpoint's (all heads), as for any column-parallel layer.
    """

    def __init__(self, input_size: int, output_size: int, head_size: int, bias: bool, quant_config: Any = None,
                 prefix: str = "") -> None:
        tp_size = get_tensor_model_parallel_world_size()
        num_heads = output_size // head_size
        if num_heads * head_size != output_size or num_heads >= tp_size or tp_size % num_heads:
            raise UnsupportedTPStyleError(
                f"{prefix}: {output_size} output features are not {num_heads} KV heads of size {head_size} that "
                f"can be replicated over {tp_size} ranks (the ranks must be a multiple of the KV heads)")
        self.num_kv_head_replicas = tp_size // num_heads
        # The base class divides output_size by tp_size: ask for one head per rank (as QKVParallelLinear does).
        super().__init__(input_size, head_size * tp_size, bias=bias, quant_config=quant_config, prefix=prefix)
        self.output_size = output_size

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        output_dim = getattr(param, "output_dim", None)
        if output_dim is not None:
            if loaded_weight.shape[output_dim] != self.output_size:
                raise UnsupportedTPStyleError(
                    f"checkpoint tensor has {loaded_weight.shape[output_dim]} output features, expected "
                    f"{self.output_size}")
            size = param.data.shape[output_dim]
            head = get_tensor_model_parallel_rank() // self.num_kv_head_replicas
            loaded_weight = loaded_weight.narrow(output_dim, head * size, size)
        if param.data.shape != loaded_weight.shape:
            raise UnsupportedTPStyleError(f"shape mismatch: {tuple(param.data.shape)} vs {tuple(loaded_weight.shape)}")
        param.data.copy_(loaded_weight)

    def weight_loader_v2(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        raise UnsupportedTPStyleError(
            "KV heads replicated over ranks are not supported with this quantization method; run with "
            "tensor_parallel_size <= the number of KV heads")


class HFPackedColumnParallelLinear(TensorOutput, ColumnParallelLinear):
    """``packed_colwise``: the output packs two projections (``gate_up_proj`` = [gate; up]); each rank keeps
    its slice of each half, in order, so that HF's ``chunk(2)`` of the output still splits gate from up."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, quant_config: Any = None,
                 prefix: str = "") -> None:
        tp_size = get_tensor_model_parallel_world_size()
        if output_size % (2 * tp_size):
            raise UnsupportedTPStyleError(f"{prefix}: packed_colwise needs output features ({output_size}) "
                                          f"divisible by 2 x {tp_size} ranks")
        super().__init__(input_size, output_size, bias=bias, quant_config=quant_config, prefix=prefix)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        output_dim = getattr(param, "output_dim", None)
        if output_dim is not None:
            size = param.data.shape[output_dim] // 2
            rank = get_tensor_model_parallel_rank()
            loaded_weight = torch.cat([half.narrow(output_dim, rank * size, size)
                                       for half in loaded_weight.chunk(2, dim=output_dim)], dim=output_dim)
        if param.data.shape != loaded_weight.shape:
            raise UnsupportedTPStyleError(f"shape mismatch: {tuple(param.data.shape)} vs {tuple(loaded_weight.shape)}")
        param.data.copy_(loaded_weight)

    def weight_loader_v2(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        raise UnsupportedTPStyleError("packed_colwise is not supported with this quantization method")


#: ``tp_plan`` styles of transformers (4.48-4.57 names and the 5.x ones) for an ``nn.Linear`` -> vLLM linear.
#: Semantics follow transformers' own: a column layer keeps its output sharded unless the style gathers it;
#: a row layer takes a sharded input (or splits a full one: ``*_rep``/``split_input``) and sums the ranks.
#: ``local_rowwise`` leaves that sum to an enclosing ``gather`` module in transformers; vLLM's row layer
#: reduces itself and ``gather`` modules are left alone (see :mod:`.tp_plan`), which is the same sum.
_STYLE_TO_LINEAR: Dict[str, Tuple[type, Dict[str, Any]]] = {
    "colwise": (HFColumnParallelLinear, {}),
    "local_colwise": (HFColumnParallelLinear, {}),
    "colwise_rep": (HFColumnParallelLinear, {"gather_output": True}),
    "colwise_gather_output": (HFColumnParallelLinear, {"gather_output": True}),
    "packed_colwise": (HFPackedColumnParallelLinear, {}),
    "rowwise": (HFRowParallelLinear, {}),
    "local_rowwise": (HFRowParallelLinear, {}),
    "rowwise_rep": (HFRowParallelLinear, {"input_is_parallel": False}),
    "rowwise_split_input": (HFRowParallelLinear, {"input_is_parallel": False}),
    "replicate": (HFReplicatedLinear, {}),
    "replicated_with_grad_allreduce": (HFReplicatedLinear, {}),
    "sequence_parallel": (HFReplicatedLinear, {}),
    # DeepSeek's kv_a_proj_with_mqa: replicated weights (the style only fixes gradients in training).
    "mla_kv_a_proj": (HFReplicatedLinear, {}),
    # transformers divides a "local" layer's weights by the ranks and lets the enclosing "gather" module sum
    # them back; here the weights stay whole and "gather" does nothing: the same result.
    "local": (HFReplicatedLinear, {}),
}


#: The tp_plan styles the backend turns into a vLLM linear.
KNOWN_LINEAR_STYLES = frozenset(_STYLE_TO_LINEAR)


def linear_class_for_style(style: Optional[str]) -> Tuple[type, Dict[str, Any]]:
    if style is None:
        return _STYLE_TO_LINEAR["replicate"]
    try:
        return _STYLE_TO_LINEAR[style]
    except KeyError:
        raise UnsupportedTPStyleError(
            f"tp_plan style {style!r} has no vLLM equivalent for an nn.Linear in this backend (known: "
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
    *,
    kv_head_size: Optional[int] = None,
) -> nn.Module:
    """A vLLM linear for one HF ``nn.Linear`` (or GPT-2 ``Conv1D`` with ``transposed_checkpoint``).

    ``kv_head_size``: the layer is a K or V projection with fewer heads than ranks; a column-parallel
    style then gives each rank one whole (replicated) head instead of splitting heads.
    """
    cls, extra = linear_class_for_style(style)
    if kv_head_size is not None and cls is HFColumnParallelLinear and not extra.get("gather_output"):
        layer: nn.Module = HFKVHeadColumnParallelLinear(in_features, out_features, kv_head_size, bias=bias,
                                                        quant_config=quant_config, prefix=prefix)
    else:
        layer = cls(in_features, out_features, bias=bias, quant_config=quant_config, prefix=prefix, **extra)
    if transposed_checkpoint and getattr(layer, "weight", None) is not None:
        # Conv1D stores its weight as [in, out]; vLLM's loaders shard [out, in]. (Packed quantized formats
        # have no ``weight``: their tensors keep the method's own layout.)
        loader = layer.weight.weight_loader
        layer.weight.weight_loader = lambda param, loaded, *args: loader(param, loaded.t(), *args)
    return layer


class _HFNormCall:
    """How HF calls a norm, ``norm(x)``, on a vLLM norm; ``norm(x, residual)`` is vLLM's fused add-and-norm
    (see ``residual.py``)."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> Any:
        # vLLM's kernels index the input by data pointer: they need it contiguous.
        x = x if x.is_contiguous() else x.contiguous()
        return self._forward_method(x) if residual is None else self._forward_method(x, residual)


class HFRMSNorm(_HFNormCall, RMSNorm):
    """vLLM's RMSNorm (``w * x / rms(x)``) as a drop-in for an HF norm."""


class HFGemmaRMSNorm(_HFNormCall, GemmaRMSNorm):
    """vLLM's GemmaRMSNorm (``(1 + w) * x / rms(x)``) as a drop-in for an HF norm."""


def _eps_of(module: nn.Module) -> Optional[float]:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _looks_like_a_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 1 and _eps_of(module) is not None
            and not list(module.children()))


def rms_norm_form(module: nn.Module) -> Optional[str]:
    """``"plain"``, ``"gemma"`` (``1 + w``) or None (keep the HF module), decided numerically.

    Class names lie both ways (gated or mean-centred norms called RMSNorm), so the HF forward runs on a
    small CPU probe with a random weight and is compared with both forms (the ``rms_norm`` pass does it
    once per class).
    """
    if not _looks_like_a_norm(module):
        return None
    with devices.cpu_probe():
        return _probe_norm_form(module, module.weight.shape[0], _eps_of(module))


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x)``: the reference the CPU probes compare HF modules with."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _probe_norm_form(module: nn.Module, hidden: int, eps: float) -> Optional[str]:
    if any(b is not None and b.is_meta for b in module._buffers.values()):
        return None
    probe = copy.copy(module)
    probe._parameters = dict(module._parameters)
    probe._buffers = dict(module._buffers)
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(hidden, generator=generator) * 0.5
    probe._parameters["weight"] = nn.Parameter(w, requires_grad=False)
    x = torch.randn(3, hidden, generator=generator)
    try:
        out = probe(x)
    except Exception:
        return None
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return None
    normed = rms_normalize(x, eps)
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
    # on devices without vLLM kernels (MLU) only the PyTorch forward exists; the CPU kernels need a width
    # of whole 8-value vectors (they stop at the first step otherwise).
    if (form == "gemma" and device.type == "cpu") or devices.prefers_native_layer_forward(device) \
            or not kernels.norm_kernel_accepts(device, hidden):
        devices.use_native_forward(norm)
    return norm


class RmsNormPass(SpeedPass):
    """HF RMS norms (any class name, found by their numerics) -> vLLM's ``RMSNorm`` / ``GemmaRMSNorm`` (this
    model's modules)."""

    name = "rms_norm"
    switches = ("VLLM_TRANSFORMERS_BACKEND_RMS_NORM",)

    def sites(self, build: Build) -> List[Tuple[nn.Module, str, nn.Module]]:
        return [(parent, name, child) for parent in build.body.modules() for name, child in parent._modules.items()
                if child is not None and _looks_like_a_norm(child)]

    def key(self, site: Tuple[nn.Module, str, nn.Module]) -> Hashable:
        return type(site[2])

    def validate(self, site: Tuple[nn.Module, str, nn.Module], build: Build) -> Verdict:
        form = rms_norm_form(site[2])
        return Verdict(None, form) if form else Verdict(f"{type(site[2]).__name__} is not an RMS norm")

    def install(self, accepted: Sequence[Tuple[Any, Verdict]], build: Build) -> Tuple[List[Replacement], Any]:
        replaced: Dict[Tuple[str, str], int] = {}
        for (parent, name, child), verdict in accepted:
            norm = make_rms_norm(child, verdict.data, build.device)
            setattr(parent, name, norm)
            key = (type(child).__name__, type(norm).__name__)
            replaced[key] = replaced.get(key, 0) + 1
        return [Replacement(hf, vllm, n) for (hf, vllm), n in replaced.items()], None


class ScaledVocabParallelEmbedding(VocabParallelEmbedding):
    """``VocabParallelEmbedding`` that keeps an HF embedding's ``embed_scale`` (Gemma 3 and kin)."""

    def __init__(self, *args: Any, embed_scale: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # HF casts the scale to the weight dtype before multiplying; so does this.
        self.embed_scale = float(torch.tensor(embed_scale, dtype=torch.float32).to(self.weight.dtype))

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        return super().forward(input_) * self.embed_scale


def make_embedding(module: nn.Module, quant_config: Any, prefix: str, extra_rows: int = 0) -> VocabParallelEmbedding:
    """vLLM's vocabulary embedding for an HF input embedding; ``extra_rows``: zero rows after the checkpoint's
    vocabulary (the tokens LoRA adapters may add, as vLLM's Llama sizes them)."""
    num, dim = module.weight.shape
    scale = getattr(module, "embed_scale", None)
    kwargs = dict(org_num_embeddings=num, quant_config=quant_config, prefix=prefix)
    if scale is not None:
        value = float(scale.item() if isinstance(scale, torch.Tensor) and not scale.is_meta else scale)
        return ScaledVocabParallelEmbedding(num + extra_rows, dim, embed_scale=value, **kwargs)
    return VocabParallelEmbedding(num + extra_rows, dim, **kwargs)


def plan_regexes(plan: Dict[str, str]) -> list:
    """transformers' plan keys use ``*`` for layer indices; match them against module qualnames."""
    compiled = []
    for pattern, style in plan.items():
        regex = re.compile("^" + re.escape(pattern.lstrip("^").rstrip("$")).replace(r"\*", r"[^.]+") + "$")
        compiled.append((regex, style))
    return compiled


class GatheredHeadsAttention(nn.Module):
    """vLLM ``Attention`` for a layer whose HF module computes q/k/v for every head on every rank.

    Plans replicate attention where a full-width step sits between the projections and the heads (OLMo 2's
    q/k norms, Phi-3's fused qkv slicing): q/k/v are ``colwise_rep`` (gathered) and ``o_proj`` is
    ``rowwise_rep`` (splits its full input). vLLM's KV cache holds only this rank's heads, so this rank
    attends with its own query heads and KV head(s) (vLLM's assignment: rank ``r`` keeps KV heads from
    ``r * num_kv_heads // tp``), and the ranks' outputs are gathered back to all heads.
    """

    def __init__(self, attn: nn.Module, num_heads: int, num_kv_heads: int, head_size: int) -> None:
        super().__init__()
        tp_size, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        self.attn = attn
        local_q, local_kv = num_heads // tp_size, max(1, num_kv_heads // tp_size)
        self.full_q, self.full_kv = num_heads * head_size, num_kv_heads * head_size
        self.q_start, self.q_size = rank * local_q * head_size, local_q * head_size
        self.kv_start, self.kv_size = (rank * num_kv_heads // tp_size) * head_size, local_kv * head_size

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: Any, attn_metadata: Any):
        gathered = q.shape[-1] == self.full_q
        if gathered:
            q = q.narrow(-1, self.q_start, self.q_size).contiguous()
        if k.shape[-1] == self.full_kv and self.full_kv != self.kv_size:
            k = k.narrow(-1, self.kv_start, self.kv_size).contiguous()
            v = v.narrow(-1, self.kv_start, self.kv_size).contiguous()
        out = self.attn(q, k, v, kv_cache, attn_metadata)
        return tensor_model_parallel_all_gather(out) if gathered else out
