"""Mixture-of-experts blocks: found by their structure, run by HF's code or by one vLLM ``FusedMoE`` each.

A block is a module holding a router and gated experts of one of transformers' two forms:

* **per-expert modules** (transformers 4.x): an ``nn.ModuleList`` of same-class modules, each with linears
  ``gate_proj``/``up_proj``/``down_proj`` (or Mixtral's ``w1``/``w3``/``w2``); the block's forward routes and
  loops over them itself;
* **packed experts** (transformers 5): one module with 3-D ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj``
  ``[E, H, I]``, called by the block as ``experts(hidden_states, top_k_index, top_k_weights)`` after its own
  router module chose them;

and a router: a linear or a module with a ``weight`` of ``[E, H]``. Names of model classes play no part.

Each block takes one of two paths (:func:`prepare_moe`):

* **fused**, the speed pass :class:`FusedExperts` (:mod:`.passes`; where vLLM's fused MoE kernel runs: CUDA):
  the experts become one :class:`.moe_layers.HFFusedMoE`
  fed with the HF router's top-k ids and weights. transformers 5 blocks keep their forward and router
  untouched; a 4.x block gets its routing written out (:func:`.moe_layers.routed_block_forward`), which a CPU
  probe has matched against the block's own forward first (:mod:`.moe_probe`). Tensor parallelism splits
  every expert's intermediate size (``FusedMoE``), one all-reduce per block.
* **hf** (the CPU engine and other devices, quantized models, ``VLLM_TRANSFORMERS_BACKEND_MOE=hf``, or a block
  the probe did not qualify): HF's own expert code. Per-expert linears become vLLM linears by the ``tp_plan``
  as any linear; packed experts at TP > 1 keep each rank's slice of the intermediate size and add the ranks'
  partial sums (:func:`.moe_layers.shard_packed_experts`).

``VLLM_TRANSFORMERS_BACKEND_MOE`` (:mod:`.envs`, the pass's switch): ``auto`` (default), ``hf`` (or ``0``), or
``fused`` (the fused layout everywhere; where the kernel does not run, its arithmetic in PyTorch: how the CPU
tests run the GPU path). Checkpoints of either expert layout load into either path (:mod:`.moe_weights`).

Decode step: the fused path is on it (one routed FusedMoE call per block); choosing and loading are not.
"""
from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import devices, envs
from ._logging import get_logger
from .moe_weights import (PER_EXPERT_TRIPLES, ExpertSlots, ExpertsShape, ExpertTensors, LinearsTarget,
                          PackedTarget, Target, block_aliases)
from .passes import Build, PassReport, Replacement, SpeedPass, Verdict

logger = get_logger(__name__)

MOE_ENV = "VLLM_TRANSFORMERS_BACKEND_MOE"
#: Children that hold a block's shared expert and its gate (Qwen2-MoE; DeepSeek-style ``shared_experts``).
_SHARED_NAMES = ("shared_expert", "shared_experts")
_SHARED_GATE_NAMES = ("shared_expert_gate",)


class MoEError(ValueError):
    """A mixture-of-experts block cannot run as configured (the message says why and what to do)."""


def moe_mode() -> str:
    """``auto``, ``hf`` or ``fused`` (:mod:`.envs`); a value it does not know is refused."""
    try:
        return envs.VLLM_TRANSFORMERS_BACKEND_MOE
    except ValueError as exc:
        raise MoEError(str(exc)) from exc


# --- finding blocks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertsLayout:
    kind: str  # "per-expert" | "packed"
    shape: ExpertsShape
    names: Tuple[str, str, str]  # per-expert: the (gate, up, down) linears of each expert
    class_name: str  # the packed module's class, or one expert's


def experts_layout(module: nn.Module) -> Optional[ExpertsLayout]:
    """The layout of ``module`` if it holds gated experts of a form the backend knows, else None."""
    if isinstance(module, nn.ModuleList):
        if not len(module) or len({type(m) for m in module}) != 1:
            return None
        first = module[0]
        for names in PER_EXPERT_TRIPLES:
            gate, up, down = (first._modules.get(n) for n in names)
            if not all(isinstance(m, nn.Linear) and m.bias is None for m in (gate, up, down)):
                continue
            hidden, inter = gate.in_features, gate.out_features
            if (up.in_features, up.out_features) == (hidden, inter) and \
                    (down.in_features, down.out_features) == (inter, hidden):
                return ExpertsLayout("per-expert", ExpertsShape(len(module), hidden, inter), names,
                                     type(first).__name__)
        return None
    gate_up, down = module._parameters.get("gate_up_proj"), module._parameters.get("down_proj")
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3):
        return None
    # transformers 5 flags other packings on the experts class (use_experts_implementation)
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False) or \
            not getattr(module, "is_concatenated", True) or "gate_up_proj_bias" in module._parameters:
        return None
    experts, hidden, inter = down.shape
    if tuple(gate_up.shape) != (experts, 2 * inter, hidden):
        return None
    return ExpertsLayout("packed", ExpertsShape(experts, hidden, inter), ("gate_up_proj", "", "down_proj"),
                         type(module).__name__)


@dataclass
class MoEBlock:
    qualname: str  # relative to the body
    module: nn.Module
    experts_attr: str
    layout: ExpertsLayout
    router_attr: str
    top_k: Optional[int]
    router_hands_choices: bool  # transformers 5: the block calls experts(hidden, top_k_index, top_k_weights)
    shared_attr: Optional[str] = None
    shared_gate_attr: Optional[str] = None

    @property
    def experts_qualname(self) -> str:
        return f"{self.qualname}.{self.experts_attr}" if self.qualname else self.experts_attr


def _router_of(block: nn.Module, experts_attr: str, shape: ExpertsShape) -> Optional[str]:
    for name, child in block._modules.items():
        if name == experts_attr or child is None:
            continue
        weight = child._parameters.get("weight") if isinstance(child, nn.Module) else None
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (shape.num_experts, shape.hidden_size):
            return name
    return None


def _takes_routing(experts: nn.Module) -> bool:
    try:
        params = [p for p in inspect.signature(type(experts).forward).parameters.values()][1:]
    except (TypeError, ValueError):
        return False
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 3


def find_moe_blocks(body: nn.Module) -> List[MoEBlock]:
    """Every block of ``body`` with gated experts and a router of matching size."""
    blocks: List[MoEBlock] = []
    for qualname, module in body.named_modules():
        for attr, child in module._modules.items():
            layout = experts_layout(child) if child is not None else None
            if layout is None:
                continue
            router = _router_of(module, attr, layout.shape)
            if router is None:
                continue
            top_k = next((v for v in (getattr(module, "top_k", None), getattr(module._modules[router], "top_k", None))
                          if isinstance(v, int) and 0 < v <= layout.shape.num_experts), None)
            shared = next((n for n in _SHARED_NAMES if isinstance(module._modules.get(n), nn.Module)), None)
            gate = next((n for n in _SHARED_GATE_NAMES if isinstance(module._modules.get(n), nn.Linear)
                         and module._modules[n].out_features == 1), None) if shared else None
            blocks.append(MoEBlock(qualname, module, attr, layout, router, top_k,
                                   layout.kind == "packed" and _takes_routing(child), shared, gate))
    return blocks


# --- the speed pass: FusedMoE ------------------------------------------------------------------------


@dataclass
class BlockPlan:
    block: MoEBlock
    path: str  # "fused" | "hf"
    reason: str
    routing: Optional[object] = None  # RoutingSpec of a 4.x block on the fused path


def probe_key(block: MoEBlock) -> Hashable:
    """What a block's qualification holds for: its classes, layout and routing shape."""
    experts = block.module._modules[block.experts_attr]
    return (type(block.module), type(experts), block.layout.kind, block.layout.shape.num_experts, block.top_k,
            block.shared_attr, block.shared_gate_attr)


def qualify_for_fused(block: MoEBlock) -> Tuple[Optional[object], Optional[str]]:
    """``(routing spec or None, problem or None)``: whether vLLM's FusedMoE can compute ``block`` with HF's
    routing (CPU probes of the block's own code, :mod:`.moe_probe`)."""
    from .moe_probe import probe_expert_module, probe_inline_routing, probe_packed_experts

    experts = block.module._modules[block.experts_attr]
    if block.layout.kind == "packed":
        if not block.router_hands_choices:
            return None, (f"{block.layout.class_name}.forward does not take (hidden_states, top_k_index, "
                          "top_k_weights)")
        return None, probe_packed_experts(experts, block.layout.shape.num_experts, block.top_k)
    if block.top_k is None:
        return None, f"{type(block.module).__name__} has no top_k attribute"
    problem = probe_expert_module(experts[0], block.layout.names)
    if problem:
        return None, problem
    return probe_inline_routing(block.module, block.router_attr, block.experts_attr, block.layout.shape.num_experts,
                                block.layout.shape.hidden_size, block.top_k, block.shared_attr, block.shared_gate_attr)


def routing_description(block: MoEBlock, spec: Optional[object]) -> str:
    router = type(block.module._modules[block.router_attr]).__name__
    if spec is None:
        return f"HF's router ({router}) hands the experts its top-{block.top_k or 'k'} ids and weights"
    return f"{type(block.module).__name__}'s routing ({spec.describe()}) matched its forward on a CPU probe"


def _check_divisible(block: MoEBlock, tp_size: int, prefix: str) -> None:
    if block.layout.shape.intermediate_size % tp_size:
        raise MoEError(f"{prefix}.{block.experts_qualname}: the experts' intermediate size "
                       f"{block.layout.shape.intermediate_size} is not divisible by tensor_parallel_size={tp_size}")


class FusedExperts(SpeedPass):
    """Mixture-of-experts blocks' experts (HF's loop over expert MLPs) -> one vLLM FusedMoE per block fed with
    the HF router's top-k ids and weights; a 4.x block's routing written out once a CPU probe matched it (this
    model's modules, before the linear swap; blocks it leaves keep HF's code)."""

    name = "moe"
    switches = (MOE_ENV,)
    before_linears = True

    def __init__(self) -> None:
        #: probe key -> verdict, for the blocks this run kept on HF's code (:func:`prepare_moe` names why)
        self.verdicts: Dict[Hashable, Verdict] = {}

    def switched_off(self) -> Optional[str]:
        return f"{MOE_ENV}=hf" if moe_mode() == "hf" else None

    def unavailable(self, build: Build) -> Optional[str]:
        if build.quant_config is not None:
            return "quantized model: the backend's FusedMoE path loads unquantized experts only"
        if moe_mode() == "auto" and not devices.has_fused_moe_kernel(build.device):
            return "vLLM's fused MoE kernel does not run on this device"
        return None

    def sites(self, build: Build) -> List[MoEBlock]:
        return find_moe_blocks(build.body)

    def key(self, block: MoEBlock) -> Hashable:
        return probe_key(block)

    def validate(self, block: MoEBlock, build: Build) -> Verdict:
        spec, problem = qualify_for_fused(block)
        self.verdicts[probe_key(block)] = verdict = Verdict(problem, spec)
        return verdict

    def install(self, accepted: Sequence[Tuple[MoEBlock, Verdict]], build: Build
                ) -> Tuple[List[Replacement], List[BlockPlan]]:
        from .moe_layers import HFFusedMoE, install_routed_forward

        use_kernel = devices.has_fused_moe_kernel(build.device)
        dtype = build.dtype or torch.get_default_dtype()
        plans, replaced = [], Counter()
        for block, verdict in accepted:
            _check_divisible(block, build.tp_size, build.prefix)
            layer = HFFusedMoE(block.layout.shape, block.top_k, build.tp_size, dtype,
                               f"{build.prefix}.{block.experts_qualname}", use_kernel)
            setattr(block.module, block.experts_attr, layer)
            if verdict.data is not None:
                install_routed_forward(block.module, verdict.data)
            plans.append(BlockPlan(block, "fused", routing_description(block, verdict.data), verdict.data))
            replaced[f"{block.layout.class_name} experts" + (" and routing" if verdict.data is not None else "")] += 1
        by = "vLLM FusedMoE" + ("" if use_kernel else " (its arithmetic in PyTorch: no kernel on this device)")
        return [Replacement(target, by, n) for target, n in replaced.items()], plans


# --- the model's blocks -----------------------------------------------------------------------------


class MoEPlan:
    """The blocks of a backend model and their paths (the FusedMoE pass's and HF's code); loads their experts."""

    def __init__(self, plans: List[BlockPlan], tp_size: int) -> None:
        self.plans = plans
        self.tp_size = tp_size
        self._handled: Dict[int, BlockPlan] = {id(p.block.module._modules[p.block.experts_attr]): p for p in plans}

    def __bool__(self) -> bool:
        return bool(self.plans)

    def handles(self, module: nn.Module) -> bool:
        """Whether ``module`` is an experts module this plan runs (its tp_plan styles are honoured here)."""
        return id(module) in self._handled

    def weight_consumer(self, model: nn.Module, mapper: Optional[object] = None,
                        prefix: str = "model") -> ExpertTensors:
        """Where each block's expert tensors go in ``model`` (the backend model; its body under ``prefix``);
        ``mapper`` (the backend's weights mapper) finds per-expert linears that fusion merged."""
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank() if self.tp_size > 1 else 0
        params = dict(model.named_parameters(remove_duplicate=False))

        def target(plan: BlockPlan) -> Target:
            experts = plan.block.module._modules[plan.block.experts_attr]
            if plan.path == "fused":
                return PackedTarget(experts.w13_weight, experts.w2_weight, rank)
            if plan.block.layout.kind == "packed":
                return PackedTarget(experts.gate_up_proj, experts.down_proj, rank)
            return LinearsTarget(params, f"{prefix}.{plan.block.experts_qualname}", plan.block.layout.names,
                                 _locator(mapper))

        return expert_tensors(model, [p.block for p in self.plans], [target(p) for p in self.plans], prefix)

    def describe(self) -> List[str]:
        lines = []
        for path in ("fused", "hf"):
            chosen = [p for p in self.plans if p.path == path]
            if chosen:
                reasons = sorted({p.reason for p in chosen})
                lines.append(f"{len(chosen)} MoE block(s) on the {path} path ({'; '.join(reasons)})")
        return lines


def expert_tensors(model: nn.Module, blocks: List[MoEBlock], targets: Optional[List[Target]] = None,
                   prefix: str = "model") -> ExpertTensors:
    """The loader's consumer of ``blocks``' expert tensors in ``model`` (its body under ``prefix``): each piece
    goes to its block's target, or, without targets (``check``'s dry run), is only checked, its problems
    listed (``errors``) rather than raised."""
    params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    slots, owned = [], []
    for i, block in enumerate(blocks):
        name = f"{prefix}.{block.experts_qualname}"
        slots.append(ExpertSlots(name, block.layout.shape, targets[i] if targets else None, block_aliases(name)))
        owned += [n for n in params if n.startswith(name + ".")]
    return ExpertTensors(slots, owned, collect_errors=not targets)


def _locator(mapper: Optional[object]):
    if mapper is not None:
        return mapper.locate
    return lambda name, params: (name if name in params else None, None)


def prepare_moe(build: Build, *, enforce_eager: bool) -> Tuple[MoEPlan, PassReport]:
    """Runs the FusedMoE pass on ``build.body`` (before the backend swaps linears: experts handed to FusedMoE
    never become per-expert vLLM linears), then readies the blocks it left for HF's code: packed experts split
    for tensor parallelism; refused where CUDA graphs would capture HF's data-dependent expert loop."""
    fused_pass = FusedExperts()
    report = fused_pass.run(build)
    plans: List[BlockPlan] = list(report.forward_state or [])
    for block in find_moe_blocks(build.body):  # what the pass did not take (HF's experts are still there)
        verdict = fused_pass.verdicts.get(probe_key(block))
        plans.append(BlockPlan(block, "hf", verdict.problem if verdict and verdict.problem else report.reason))
    hf_loops = [p for p in plans if p.path == "hf"]
    if hf_loops and devices.captures_graphs(build.device) and not enforce_eager:
        first = hf_loops[0]
        raise MoEError(
            f"{len(hf_loops)} MoE block(s) run HF's expert loop ({build.prefix}.{first.block.qualname}: "
            f"{first.reason}). That loop asks the device which experts were chosen, which CUDA-graph capture cannot "
            f"record: run with enforce_eager=True (--enforce-eager), or let the block use vLLM's FusedMoE "
            f"({MOE_ENV}=auto).")
    for plan in hf_loops:
        if plan.block.layout.kind == "packed" and build.tp_size > 1:
            from .moe_layers import shard_packed_experts

            _check_divisible(plan.block, build.tp_size, build.prefix)
            shard_packed_experts(plan.block.module._modules[plan.block.experts_attr], build.tp_size)
    plan = MoEPlan(plans, build.tp_size)
    for line in plan.describe():
        logger.info("%s", line)
    return plan, report
