"""Projection and gated-MLP fusion: the ``projections`` and ``glu`` speed passes (:mod:`.passes`).

Decode step: each attention's q/k/v projections run as one ``QKVParallelLinear`` GEMM and each gated
MLP's gate/up as one ``MergedColumnParallelLinear`` GEMM (as in vLLM's own models), and a standard gated
MLP runs ``down(act_and_mul(gate_up(x)))``: vLLM's one-kernel activation and product instead of HF's
activation, product and the two slices.

After the per-module replacement every HF ``nn.Linear`` is its own vLLM linear, so a Llama layer would
run q, k and v as three GEMMs and gate/up as two. :class:`ProjectionFusion` builds the merged layers, adds each to the
HF parent under vLLM's name for it (``self_attn.qkv_proj``, ``mlp.gate_up_proj``), and puts a
:class:`FusedSlice` in place of each sibling, keeping HF's forward untouched:

* the first slice called computes the fused GEMM for its input and keeps the per-rank split; a sibling
  called with the very same tensor object returns its part of it; once every sibling has taken its
  part the cache is dropped, so no step's tensors outlive it (CUDA-graph capture runs this Python once
  per batch size; replays run the recorded kernels and no Python at all);
* a sibling called with any other input (cross-attention keys, a model calling it twice) computes the
  fused GEMM for that input and returns its part: always correct, only the saving is lost;
* the fused layer is an ordinary module of the tree, named as in vLLM's own models, so everything vLLM
  does to a model's modules reaches it: the quantization method's ``process_weights_after_loading``,
  LoRA's layer replacement (``packed_modules_mapping`` maps ``qkv_proj`` to ``q_proj``/``k_proj``/``v_proj``,
  see :func:`packed_modules_mapping`), and a replaced layer is found again by name on every call;
* checkpoint names stay HF's (``...q_proj.weight``, ``...q_proj.qweight``): the weights mapper routes a
  sibling's tensors to the fused layer's parameter of the same name with the shard id (``"q"``/``"k"``/
  ``"v"``, ``0``/``1``), as vLLM's native ``stacked_params_mapping`` does (:func:`stacked_shards`).

Quantized models fuse the same groups as vLLM's own models, through the fused layer's quantization
method: GPTQ/AWQ pack and scale per shard, FP8 keeps one scale per shard. They fuse only groups whose
names vLLM 0.6.2 unfolds in its ignore-list checks (``qkv_proj`` -> q/k/v, ``gate_up_proj`` -> gate/up:
``FUSED_LAYER_NAME_MAPPING``), so a checkpoint that leaves some layers unquantized is read the same way
as by vLLM's own models; a group whose shards the checkpoint quantizes differently stays unfused.

Only well-known sibling names are fused, only when they are plain (column-parallel or replicated) vLLM
linears of the same input size and quantization method with stock weight loaders.
:class:`GluFusion` replaces an MLP's forward only when its source is exactly
``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with an activation vLLM has as ``act_and_mul``.
``VLLM_TRANSFORMERS_BACKEND_FUSE=0`` turns both off (A/B benchmarks); ``..._FUSE_GLU=0`` the second only.
"""
from __future__ import annotations

import types
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vllm.model_executor.layers.linear import (ColumnParallelLinear, LinearBase, MergedColumnParallelLinear,
                                               QKVParallelLinear, ReplicatedLinear, UnquantizedLinearMethod)

from . import devices
from .layers import linear_rows
from .passes import Build, Replacement, SpeedPass, Verdict
from .weights import StackedShard

#: The switch of projection fusion (``0`` also turns off the gated-MLP and residual fusions).
FUSE_ENV = "VLLM_TRANSFORMERS_BACKEND_FUSE"

#: Sibling names fused into a ``QKVParallelLinear`` (shard ids "q", "k", "v") named ``qkv_proj``.
QKV_NAMES: Tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")
QKV_FUSED_NAME = "qkv_proj"
#: Sibling names fused into a ``MergedColumnParallelLinear`` (shard ids 0, 1) and the fused layer's name:
#: gate/up of gated MLPs (InternLM2-style ``w1``/``w3`` too, under the name vLLM's InternLM2 gives them).
MERGED_GROUPS: Tuple[Tuple[Tuple[str, ...], str], ...] = ((("gate_proj", "up_proj"), "gate_up_proj"),
                                                          (("w1", "w3"), "gate_up_proj"))


class _FusedGroup:
    """Where the fused layer lives and the cache its slices share for one input (a plain object: not a
    module). The layer is looked up in its parent on each call: vLLM's LoRA manager replaces it there."""

    __slots__ = ("parent", "name", "sizes", "full", "input", "outputs", "taken")

    def __init__(self, parent: nn.Module, name: str, sizes: Sequence[int]) -> None:
        self.parent = parent
        self.name = name
        self.sizes = list(sizes)
        self.full = (1 << len(self.sizes)) - 1
        self.input: Optional[torch.Tensor] = None
        self.outputs: Optional[Tuple[torch.Tensor, ...]] = None
        self.taken = 0

    @property
    def layer(self) -> nn.Module:
        return self.parent._modules[self.name]

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        bit = 1 << index
        # Identity, not equality: the cached tensor is held, so no other tensor can be this object.
        if self.outputs is not None and x is self.input and not self.taken & bit:
            out = self.outputs[index]
            self.taken |= bit
            if self.taken == self.full:
                self.clear()
            return out
        output = linear_rows(self.layer, x)
        self.outputs = output.split(self.sizes, dim=-1)
        self.input = x
        self.taken = bit
        return self.outputs[index]

    def clear(self) -> None:
        self.input = None
        self.outputs = None
        self.taken = 0


class FusedSlice(nn.Module):
    """Stands in for one sibling linear: its per-rank part of the fused layer's output. It holds no
    parameters (the fused layer does); ``weight``/``bias`` read its rows of an unquantized fused layer."""

    def __init__(self, group: _FusedGroup, index: int, shard_id: Any, original: LinearBase) -> None:
        super().__init__()
        self._group = group
        self.index = index
        self.shard_id = shard_id
        self.input_size = original.input_size
        self.output_size = original.output_size
        self.has_bias = getattr(original, "bias", None) is not None

    @property
    def fused_layer(self) -> nn.Module:
        return self._group.layer

    @property
    def fused_name(self) -> str:
        return self._group.name

    def _rows(self, name: str) -> Optional[torch.Tensor]:
        tensor = getattr(self.fused_layer, name, None)
        if tensor is None:
            return None
        offset = sum(self._group.sizes[:self.index])
        return tensor.detach().narrow(0, offset, self._group.sizes[self.index])

    @property
    def weight(self) -> torch.Tensor:
        """This shard's rows of the fused weight (a view), for HF code that reads ``proj.weight``."""
        rows = self._rows("weight")
        if rows is None:
            raise AttributeError(f"{type(self.fused_layer).__name__} has no plain weight (quantized)")
        return rows

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self._rows("bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.part(x, self.index)

    def extra_repr(self) -> str:
        return (f"shard={self.shard_id!r} of {self._group.name} ({type(self.fused_layer).__name__}), "
                f"output_features={self._group.sizes[self.index]}")


def stacked_shards(model: nn.Module) -> Dict[str, StackedShard]:
    """Module name of each fused sibling in ``model`` (as ``named_modules`` spells it) -> where its checkpoint
    tensors load (the weights mapper's ``stacked``); unquantized shards carry their checkpoint shapes."""
    shards: Dict[str, StackedShard] = {}
    for name, module in model.named_modules():
        if not isinstance(module, FusedSlice):
            continue
        parent = name.rpartition(".")[0]
        fused = f"{parent}.{module.fused_name}" if parent else module.fused_name
        shapes: Dict[str, Tuple[int, ...]] = {}
        if isinstance(getattr(module.fused_layer, "quant_method", None), UnquantizedLinearMethod):
            shapes["weight"] = (module.output_size, module.input_size)
            if module.has_bias:
                shapes["bias"] = (module.output_size,)
        shards[name] = StackedShard(fused, module.shard_id, shapes)
    return shards


def packed_modules_mapping(model: nn.Module) -> Dict[str, List[str]]:
    """vLLM's ``packed_modules_mapping`` for the groups fused in ``model``: fused name -> sibling names in
    shard order (what LoRA reads to split an adapter's q/k/v over ``qkv_proj``)."""
    mapping: Dict[str, List[str]] = {}
    for parent in model.modules():
        groups: Dict[str, List[Tuple[int, str]]] = {}
        for name, child in parent._modules.items():
            if isinstance(child, FusedSlice):
                groups.setdefault(child.fused_name, []).append((child.index, name))
        for fused, slices in groups.items():
            mapping.setdefault(fused, [name for _, name in sorted(slices)])
    return mapping


# --- deciding what to fuse ------------------------------------------------------------------------


def _loaders_are_own(module: nn.Module) -> bool:
    # A wrapped loader transforms the checkpoint tensor (GPT-2 Conv1D transposes): not ours to merge.
    loaders = [getattr(p, "weight_loader", None) for p in module.parameters(recurse=False)]
    return bool(loaders) and all(getattr(loader, "__self__", None) is module for loader in loaders)


def _plain_linear_problem(module: nn.Module, tp_size: int) -> Optional[str]:
    """Why ``module`` cannot be a slice of a fused column-parallel layer (None: it can)."""
    if isinstance(module, (MergedColumnParallelLinear, QKVParallelLinear)) or \
            not isinstance(module, (ColumnParallelLinear, ReplicatedLinear)):
        return f"{type(module).__name__} is not a plain column-parallel/replicated vLLM linear"
    if tp_size > 1 and (not isinstance(module, ColumnParallelLinear) or module.gather_output):
        return f"{type(module).__name__} is not sharded column-wise without gathering at TP={tp_size}"
    if getattr(module, "skip_bias_add", False):
        return "skip_bias_add is set"
    if not _loaders_are_own(module):
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
    if len({child.params_dtype for child in children}) != 1:
        return None, "parameter dtypes differ"
    if len({type(child.quant_method) for child in children}) != 1:
        return None, "the checkpoint quantizes them differently"
    return children, ""  # type: ignore[return-value]


def _qkv_layer(parent: nn.Module, q: LinearBase, k: LinearBase, v: LinearBase, head_size: int,
               tp_size: int, quant_config: Any, prefix: str) -> Tuple[Optional[LinearBase], str]:
    head_dim = getattr(parent, "head_dim", None)
    head = head_dim if isinstance(head_dim, int) and head_dim > 0 else head_size
    if k.output_size != v.output_size:
        return None, "k and v output sizes differ"
    if q.output_size % head or k.output_size % head:
        return None, f"output sizes {q.output_size}/{k.output_size} are not whole heads of {head}"
    heads, kv_heads = q.output_size // head, k.output_size // head
    if heads % tp_size or (kv_heads % tp_size and tp_size % kv_heads):
        return None, f"{heads} query / {kv_heads} kv heads do not shard over TP={tp_size}"
    return _build(QKVParallelLinear, q.input_size, head, heads, kv_heads, bias=q.bias is not None,
                  params_dtype=q.params_dtype, quant_config=quant_config, prefix=prefix)


def _merged_layer(children: Sequence[LinearBase], tp_size: int, quant_config: Any,
                  prefix: str) -> Tuple[Optional[LinearBase], str]:
    sizes = [child.output_size for child in children]
    if any(size % tp_size for size in sizes):
        return None, f"output sizes {sizes} do not shard over TP={tp_size}"
    first = children[0]
    return _build(MergedColumnParallelLinear, first.input_size, sizes, bias=first.bias is not None,
                  params_dtype=first.params_dtype, quant_config=quant_config, prefix=prefix)


def _build(cls: type, *args: Any, **kwargs: Any) -> Tuple[Optional[LinearBase], str]:
    try:
        return cls(*args, **kwargs), ""
    except ValueError as exc:
        # The quantization method refuses the fused shape or prefix (e.g. shards quantized differently,
        # sizes its kernels cannot pack): the siblings, already built, keep working unfused.
        return None, f"{cls.__name__} refused: {exc}"


def _quantized_fusable(names: Sequence[str], fused_name: str) -> bool:
    from vllm.model_executor.layers.quantization.utils.quant_utils import FUSED_LAYER_NAME_MAPPING

    return list(FUSED_LAYER_NAME_MAPPING.get(fused_name, ())) == list(names)


def _release(layer: LinearBase) -> None:
    """Frees a replaced sibling's tensors now. They were allocated on the model's device when the HF linear
    became a vLLM linear, and each vLLM parameter's ``weight_loader`` is a method of its layer: a reference
    cycle that only a garbage collection breaks. vLLM measures the model's memory ("Loading model weights
    took") before it collects, so the dropped q/k/v and gate/up weights counted as the backend's, beside the
    fused layer's own copy (and stayed allocated until some later collection)."""
    for module in layer.modules():
        module._parameters.clear()
        module._buffers.clear()


def _install(parent: nn.Module, names: Sequence[str], shard_ids: Sequence[Any], layer: LinearBase,
             originals: Sequence[LinearBase], fused_name: str) -> None:
    parent.add_module(fused_name, layer)
    group = _FusedGroup(parent, fused_name, layer.output_partition_sizes)
    for index, (name, shard_id, original) in enumerate(zip(names, shard_ids, originals)):
        setattr(parent, name, FusedSlice(group, index, shard_id, original))
        _release(original)


_SHARD_IDS = {"qkv": ("q", "k", "v"), "gate_up": (0, 1)}


class ProjectionFusion(SpeedPass):
    """Sibling linears of one HF module (q/k/v, gate/up) -> one ``QKVParallelLinear`` /
    ``MergedColumnParallelLinear`` GEMM each, under vLLM's names (this model's modules)."""

    name = "projections"
    switches = (FUSE_ENV,)

    def sites(self, build: Build) -> List[Tuple[str, nn.Module, str, Tuple[str, ...], str]]:
        self._packed: Dict[str, Tuple[str, ...]] = {}  # one sibling list per fused name (LoRA maps by name)
        self._claimed: set = set()  # (parent, fused name) given to a group already in this run
        found = []
        groups = [("qkv", QKV_NAMES, QKV_FUSED_NAME)] + [("gate_up", names, fused) for names, fused in MERGED_GROUPS]
        for qualname, parent in build.body.named_modules():
            where = ".".join(p for p in (build.prefix, qualname) if p)
            for kind, names, fused_name in groups:
                if all(parent._modules.get(name) is not None for name in names):
                    found.append((where, parent, kind, names, fused_name))
        return found

    def validate(self, site: Tuple[str, nn.Module, str, Tuple[str, ...], str], build: Build) -> Verdict:
        where, parent, kind, names, fused_name = site
        problem = self._problem(site, build)
        if problem is None:
            children, _ = _siblings(parent, names, build.tp_size)
            full_name = f"{where}.{fused_name}" if where else fused_name
            if kind == "qkv":
                layer, problem = _qkv_layer(parent, *children, head_size=build.head_size, tp_size=build.tp_size,
                                            quant_config=build.quant_config, prefix=full_name)
            else:
                layer, problem = _merged_layer(children, build.tp_size, build.quant_config, full_name)
            if layer is not None:
                self._packed[fused_name] = names
                self._claimed.add((id(parent), fused_name))
                return Verdict(None, (layer, children))
        return Verdict(f"{'/'.join(names)}: {problem}")

    def _problem(self, site: Tuple[str, nn.Module, str, Tuple[str, ...], str], build: Build) -> Optional[str]:
        _, parent, _, names, fused_name = site
        children, why = _siblings(parent, names, build.tp_size)
        if children is None:
            return why
        if build.quant_config is not None and not _quantized_fusable(names, fused_name):
            return f"quantized, and vLLM 0.6.2 does not unfold {fused_name} into {'/'.join(names)}"
        if fused_name in parent._modules or hasattr(parent, fused_name) or (id(parent), fused_name) in self._claimed:
            return f"{type(parent).__name__} already has a {fused_name!r} attribute"
        if self._packed.get(fused_name, names) != names:
            return f"{fused_name} already stands for {'/'.join(self._packed[fused_name])} in this model"
        return None

    def install(self, accepted: Sequence[Tuple[Any, Verdict]], build: Build) -> Tuple[List[Replacement], Any]:
        replaced: Dict[Tuple[str, str], int] = {}
        for (_, parent, kind, names, fused_name), verdict in accepted:
            layer, children = verdict.data
            _install(parent, names, _SHARD_IDS[kind], layer, children, fused_name)
            key = (f"{type(parent).__name__}.{'/'.join(names)}", f"{fused_name} ({type(layer).__name__})")
            replaced[key] = replaced.get(key, 0) + 1
        return [Replacement(target, by, n) for (target, by), n in replaced.items()], None


def fuse_projections(model: nn.Module, *, quant_config: Any, tp_size: int, head_size: int,
                     prefix: str = "model") -> Dict[str, int]:
    """Runs the projections pass on ``model`` (already holding vLLM linears) alone, in place.

    ``prefix``: the name of ``model`` in the checkpoint (its modules' quantization prefixes are
    ``{prefix}.{qualname}``, as the checkpoint's ignore lists spell them; "" when it has none).
    Returns how many groups of each kind were fused (empty when fusion is off).
    """
    report = ProjectionFusion().run(Build(model, torch.device("cpu"), tp_size=tp_size, quant_config=quant_config,
                                          head_size=head_size, prefix=prefix))
    if report.status != "on":
        return {}
    counts = {"qkv": 0, "gate_up": 0}
    for r in report.replacements:
        counts["qkv" if r.by.startswith(QKV_FUSED_NAME) else "gate_up"] += r.count
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
    gate_up = linear_rows(self.gate_proj.fused_layer, x)
    return self.down_proj(self.vllm_act_and_mul(gate_up))


def is_lean_glu(mlp: nn.Module) -> bool:
    """Whether the glu pass gave ``mlp`` its ``down(act_and_mul(gate_up(x)))`` forward."""
    forward = mlp.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _glu_forward


class GluFusion(SpeedPass):
    """A standard gated MLP forward -> ``down(act_and_mul(gate_up(x)))``, vLLM's one activation kernel
    instead of HF's activation and product (instance forward of this model's MLPs).

    Its gate/up must be fused. On devices without vLLM kernels (the CPU engine, where tests compare with HF
    exactly) the same PyTorch math as HF runs (``forward_native``)."""

    name = "glu"
    switches = (FUSE_ENV, "VLLM_TRANSFORMERS_BACKEND_FUSE_GLU")

    def sites(self, build: Build) -> List[nn.Module]:
        found = []
        for module in build.body.modules():
            gate, up = module._modules.get("gate_proj"), module._modules.get("up_proj")
            if (isinstance(gate, FusedSlice) and isinstance(up, FusedSlice) and gate._group is up._group
                    and (gate.index, up.index) == (0, 1) and isinstance(module._modules.get("down_proj"), nn.Module)):
                found.append(module)
        return found

    def key(self, mlp: nn.Module) -> Hashable:
        act = getattr(mlp, "act_fn", None)
        return type(mlp), type(act), getattr(act, "approximate", None)

    def validate(self, mlp: nn.Module, build: Build) -> Verdict:
        act = getattr(mlp, "act_fn", None)
        kind = _GLU_ACTIVATIONS.get(type(act).__name__)
        if kind is None or (kind == "gelu_tanh" and getattr(act, "approximate", "tanh") != "tanh"):
            return Verdict(f"{type(mlp).__name__}: activation {type(act).__name__} has no vLLM act_and_mul")
        if not _is_standard_glu_forward(mlp):
            return Verdict(f"{type(mlp).__name__}.forward is not down(act(gate(x)) * up(x))")
        return Verdict(None, kind)

    def install(self, accepted: Sequence[Tuple[Any, Verdict]], build: Build) -> Tuple[List[Replacement], Any]:
        from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul

        use_kernels = devices.runs_vllm_activation_kernels(build.device)
        replaced: Dict[str, int] = {}
        for mlp, verdict in accepted:
            act = SiluAndMul() if verdict.data == "silu" else GeluAndMul(approximate="tanh")
            if not use_kernels:
                devices.use_native_forward(act)
            mlp.vllm_act_and_mul = act
            mlp.forward = types.MethodType(_glu_forward, mlp)
            replaced[type(mlp).__name__] = replaced.get(type(mlp).__name__, 0) + 1
        by = "down(act_and_mul(gate_up(x))) " + ("(vLLM kernel)" if use_kernels else "(PyTorch step)")
        return [Replacement(f"{name}.forward", by, n) for name, n in replaced.items()], None
