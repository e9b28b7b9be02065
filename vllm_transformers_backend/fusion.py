"""Projection fusion: sibling linears of one HF module (q/k/v, gate/up) run as one vLLM GEMM.

After the per-module replacement every HF ``nn.Linear`` is its own vLLM linear, so a Llama layer runs
q, k and v as three GEMMs and gate/up as two, where vLLM's own models run one ``QKVParallelLinear`` and
one ``MergedColumnParallelLinear``. :func:`fuse_projections` builds those merged layers and puts a
:class:`FusedSlice` in place of each sibling, keeping HF's forward untouched:

* the first slice called computes the fused GEMM for its input and keeps the per-rank split; a sibling
  called with the very same tensor object returns its part of it; once every sibling has taken its
  part the cache is dropped, so no step's tensors outlive it (CUDA-graph capture runs this Python once
  per batch size; replays run the recorded kernels and no Python at all);
* a sibling called with any other input (cross-attention keys, a model calling it twice) computes the
  fused GEMM for that input and returns its part: always correct, only the saving is lost;
* checkpoint names stay HF's (``...q_proj.weight``): each slice holds ``weight``/``bias`` Parameters
  that are views into the fused layer's per-rank tensors, and whose ``weight_loader`` hands the tensor
  to the fused layer's loader with the shard id (``"q"``/``"k"``/``"v"``, ``0``/``1``), as vLLM's
  native ``stacked_params_mapping`` does. The fused layer itself is kept out of the module tree
  (a plain attribute), so every checkpoint key maps to exactly one parameter and the strict loader sees
  no parameter left unloaded. A consequence: ``model.to(...)`` after construction would not reach it
  (vLLM builds on the target device and never moves the model).

Only well-known sibling names are fused, only when they are plain (column-parallel or replicated) vLLM
linears of the same input size with stock weight loaders, and never for quantized models.
``VLLM_TRANSFORMERS_BACKEND_FUSE=0`` turns fusion off (A/B benchmarks).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vllm.model_executor.layers.linear import (ColumnParallelLinear, LinearBase, MergedColumnParallelLinear,
                                               QKVParallelLinear, ReplicatedLinear)

from ._logging import get_logger
from .weights import WeightsLoadingError

logger = get_logger(__name__)

FUSE_ENV = "VLLM_TRANSFORMERS_BACKEND_FUSE"

#: Sibling names fused into a ``QKVParallelLinear`` (shard ids "q", "k", "v").
QKV_NAMES: Tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")
#: Sibling names fused into a ``MergedColumnParallelLinear`` (shard ids 0, 1): gate/up of gated MLPs.
MERGED_NAMES: Tuple[Tuple[str, ...], ...] = (("gate_proj", "up_proj"), ("w1", "w3"))


def switched_on(env: str) -> bool:
    """An on/off environment switch, on unless set to 0/false/no/off."""
    return os.environ.get(env, "1").strip().lower() not in ("0", "false", "no", "off")


def fusion_enabled() -> bool:
    return switched_on(FUSE_ENV)


class _FusedGroup:
    """The fused layer and the cache its slices share for one input (a plain object: not a module)."""

    __slots__ = ("layer", "sizes", "full", "input", "outputs", "taken")

    def __init__(self, layer: LinearBase, sizes: Sequence[int]) -> None:
        self.layer = layer
        self.sizes = list(sizes)
        self.full = (1 << len(self.sizes)) - 1
        self.input: Optional[torch.Tensor] = None
        self.outputs: Optional[Tuple[torch.Tensor, ...]] = None
        self.taken = 0

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        bit = 1 << index
        # Identity, not equality: the cached tensor is held, so no other tensor can be this object.
        if self.outputs is not None and x is self.input and not self.taken & bit:
            out = self.outputs[index]
            self.taken |= bit
            if self.taken == self.full:
                self.clear()
            return out
        output, _ = self.layer(x)
        self.outputs = output.split(self.sizes, dim=-1)
        self.input = x
        self.taken = bit
        return self.outputs[index]

    def clear(self) -> None:
        self.input = None
        self.outputs = None
        self.taken = 0


class FusedSlice(nn.Module):
    """Stands in for one sibling linear: its per-rank part of the fused layer's output."""

    def __init__(self, group: _FusedGroup, index: int, shard_id: Any, original: LinearBase) -> None:
        super().__init__()
        self._group = group
        self.index = index
        self.shard_id = shard_id
        self.input_size = original.input_size
        self.output_size = original.output_size
        offset = sum(group.sizes[:index])
        size = group.sizes[index]
        fused = group.layer
        self.weight = _proxy(fused.weight, offset, size, shard_id, (original.output_size, original.input_size))
        if fused.bias is not None:
            self.bias = _proxy(fused.bias, offset, size, shard_id, (original.output_size,))
        else:
            self.register_parameter("bias", None)

    @property
    def fused_layer(self) -> LinearBase:
        return self._group.layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.part(x, self.index)

    def extra_repr(self) -> str:
        fused = type(self._group.layer).__name__
        return f"shard={self.shard_id!r} of {fused}, output_features={self._group.sizes[self.index]}"


def _proxy(fused_param: nn.Parameter, offset: int, size: int, shard_id: Any,
           checkpoint_shape: Tuple[int, ...]) -> nn.Parameter:
    """A view of the fused parameter's rows for one shard; loading it loads the fused parameter."""
    proxy = nn.Parameter(fused_param.data.narrow(0, offset, size), requires_grad=False)
    loader = fused_param.weight_loader

    def weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
        # The merged loaders narrow the tensor to the shard without checking its full size: a checkpoint
        # tensor of the wrong shape must still be refused, as the unfused layer's loader does.
        if tuple(loaded_weight.shape) != checkpoint_shape:
            raise WeightsLoadingError(f"shape mismatch: checkpoint {tuple(loaded_weight.shape)}, expected "
                                      f"{checkpoint_shape} (shard {shard_id!r} of a fused layer)")
        loader(fused_param, loaded_weight, shard_id)

    proxy.weight_loader = weight_loader  # type: ignore[attr-defined]
    return proxy


# --- deciding what to fuse ------------------------------------------------------------------------


def _plain_linear_problem(module: nn.Module, tp_size: int) -> Optional[str]:
    """Why ``module`` cannot be a slice of a fused column-parallel layer (None: it can)."""
    if isinstance(module, (MergedColumnParallelLinear, QKVParallelLinear)) or \
            not isinstance(module, (ColumnParallelLinear, ReplicatedLinear)):
        return f"{type(module).__name__} is not a plain column-parallel/replicated vLLM linear"
    if tp_size > 1 and (not isinstance(module, ColumnParallelLinear) or module.gather_output):
        return f"{type(module).__name__} is not sharded column-wise without gathering at TP={tp_size}"
    if getattr(module, "skip_bias_add", False):
        return "skip_bias_add is set"
    loader = getattr(module.weight, "weight_loader", None)
    # A wrapped loader transforms the checkpoint tensor (GPT-2 Conv1D transposes): not ours to merge.
    if getattr(loader, "__self__", None) is not module:
        return "its weight loader is not the layer's own"
    return None


def _siblings(parent: nn.Module, names: Sequence[str], tp_size: int) -> Tuple[Optional[List[LinearBase]], str]:
    children = [parent._modules.get(name) for name in names]
    if any(child is None for child in children):
        return None, ""
    for name, child in zip(names, children):
        problem = _plain_linear_problem(child, tp_size)
        if problem:
            return None, f"{name}: {problem}"
    if len({child.input_size for child in children}) != 1:
        return None, "input sizes differ"
    if len({child.bias is None for child in children}) != 1:
        return None, "some have a bias and some do not"
    if len({child.weight.dtype for child in children}) != 1:
        return None, "weight dtypes differ"
    return children, ""  # type: ignore[return-value]


def _qkv_layer(parent: nn.Module, q: LinearBase, k: LinearBase, v: LinearBase, head_size: int,
               tp_size: int, prefix: str) -> Tuple[Optional[LinearBase], str]:
    head_dim = getattr(parent, "head_dim", None)
    head = head_dim if isinstance(head_dim, int) and head_dim > 0 else head_size
    if k.output_size != v.output_size:
        return None, "k and v output sizes differ"
    if q.output_size % head or k.output_size % head:
        return None, f"output sizes {q.output_size}/{k.output_size} are not whole heads of {head}"
    heads, kv_heads = q.output_size // head, k.output_size // head
    if heads % tp_size or (kv_heads % tp_size and tp_size % kv_heads):
        return None, f"{heads} query / {kv_heads} kv heads do not shard over TP={tp_size}"
    layer = QKVParallelLinear(q.input_size, head, heads, kv_heads, bias=q.bias is not None,
                              params_dtype=q.weight.dtype, quant_config=None, prefix=f"{prefix}.qkv_proj")
    return layer, ""


def _merged_layer(children: Sequence[LinearBase], tp_size: int, prefix: str) -> Tuple[Optional[LinearBase], str]:
    sizes = [child.output_size for child in children]
    if any(size % tp_size for size in sizes):
        return None, f"output sizes {sizes} do not shard over TP={tp_size}"
    first = children[0]
    layer = MergedColumnParallelLinear(first.input_size, sizes, bias=first.bias is not None,
                                       params_dtype=first.weight.dtype, quant_config=None,
                                       prefix=f"{prefix}.gate_up_proj")
    return layer, ""


def _install(parent: nn.Module, names: Sequence[str], shard_ids: Sequence[Any], layer: LinearBase,
             originals: Sequence[LinearBase]) -> None:
    group = _FusedGroup(layer, layer.output_partition_sizes)
    for index, (name, shard_id, original) in enumerate(zip(names, shard_ids, originals)):
        setattr(parent, name, FusedSlice(group, index, shard_id, original))


def fuse_projections(model: nn.Module, *, quant_config: Any, tp_size: int, head_size: int,
                     prefix: str = "model") -> Dict[str, int]:
    """Fuses q/k/v and gate/up siblings in ``model`` (already holding vLLM linears), in place.

    Returns how many groups of each kind were fused (empty when fusion is off or not applicable).
    """
    if not fusion_enabled():
        logger.info("projection fusion off (%s=0)", FUSE_ENV)
        return {}
    if quant_config is not None:
        # Quantized layers pack and scale per shard; their merged loaders differ per method.
        logger.info("projection fusion skipped: quantized model (%s)", type(quant_config).__name__)
        return {}
    counts = {"qkv": 0, "gate_up": 0}
    skipped: Dict[str, int] = {}
    for qualname, parent in list(model.named_modules()):
        where = f"{prefix}.{qualname}" if qualname else prefix
        children, why = _siblings(parent, QKV_NAMES, tp_size)
        if children is not None:
            layer, why = _qkv_layer(parent, *children, head_size=head_size, tp_size=tp_size, prefix=where)
            if layer is not None:
                _install(parent, QKV_NAMES, ("q", "k", "v"), layer, children)
                counts["qkv"] += 1
        if why:
            skipped[f"q/k/v: {why}"] = skipped.get(f"q/k/v: {why}", 0) + 1
        for names in MERGED_NAMES:
            children, why = _siblings(parent, names, tp_size)
            if children is not None:
                layer, why = _merged_layer(children, tp_size, where)
                if layer is not None:
                    _install(parent, names, tuple(range(len(names))), layer, children)
                    counts["gate_up"] += 1
            if why:
                key = f"{'/'.join(names)}: {why}"
                skipped[key] = skipped.get(key, 0) + 1
    for reason, n in skipped.items():
        logger.info("projection fusion: %d module(s) left unfused (%s)", n, reason)
    logger.info("projection fusion: %d q/k/v and %d gate/up groups fused", counts["qkv"], counts["gate_up"])
    return counts


# --- gated MLPs: the activation and the product in one kernel -------------------------------------

#: HF activation class names -> the vLLM "act and mul" layer for a fused [gate | up] output.
_GLU_ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "PytorchGELUTanh": "gelu_tanh", "GELUTanh": "gelu_tanh"}


def _is_standard_glu_forward(mlp: nn.Module) -> bool:
    """Whether ``type(mlp).forward`` is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (read from its
    source, so a forward with any other step, such as a scaling or a dropout, is never replaced)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(mlp).forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    func = tree.body[0] if tree.body else None
    if not isinstance(func, ast.FunctionDef) or len(func.args.args) != 2 or func.args.vararg or func.args.kwarg:
        return False
    arg = func.args.args[1].arg
    body = [node for node in func.body
            if not (isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant))]
    template = ast.dump(ast.parse(f"self.down_proj(self.act_fn(self.gate_proj({arg})) * self.up_proj({arg}))",
                                  mode="eval").body)
    if len(body) == 1 and isinstance(body[0], ast.Return):
        return body[0].value is not None and ast.dump(body[0].value) == template
    if len(body) == 2 and isinstance(body[0], ast.Assign) and isinstance(body[1], ast.Return):
        target = body[0].targets[0] if len(body[0].targets) == 1 else None
        returned = body[1].value
        return (isinstance(target, ast.Name) and isinstance(returned, ast.Name) and target.id == returned.id
                and ast.dump(body[0].value) == template)
    return False


def _glu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate_up, _ = self.gate_proj.fused_layer(x)
    return self.down_proj(self.vllm_act_and_mul(gate_up))


def fuse_glu_activations(model: nn.Module, *, use_kernels: bool) -> int:
    """Runs standard gated MLPs whose gate/up are fused as ``down(act_and_mul(gate_up(x)))``: one vLLM
    activation kernel instead of HF's activation and product. ``use_kernels=False`` keeps the same PyTorch
    math as HF (devices without vLLM kernels; the CPU engine, where tests compare with HF exactly).
    Returns how many MLPs now run this way."""
    import types

    from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul

    if not fusion_enabled():
        return 0
    count = 0
    for module in model.modules():
        gate, up = module._modules.get("gate_proj"), module._modules.get("up_proj")
        if not (isinstance(gate, FusedSlice) and isinstance(up, FusedSlice) and gate._group is up._group
                and (gate.index, up.index) == (0, 1) and isinstance(module._modules.get("down_proj"), nn.Module)):
            continue
        kind = _GLU_ACTIVATIONS.get(type(getattr(module, "act_fn", None)).__name__)
        if kind is None or (kind == "gelu_tanh" and getattr(module.act_fn, "approximate", "tanh") != "tanh"):
            continue
        if not _is_standard_glu_forward(module):
            continue
        act = SiluAndMul() if kind == "silu" else GeluAndMul(approximate="tanh")
        if not use_kernels:
            act._forward_method = act.forward_native
        module.vllm_act_and_mul = act
        module.forward = types.MethodType(_glu_forward, module)
        count += 1
    if count:
        logger.info("gated MLPs: %d run their activation and product as one vLLM %s", count,
                    "kernel" if use_kernels else "PyTorch step")
    return count
