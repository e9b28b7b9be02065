"""What runs in a mixture-of-experts block the backend has taken over (see :mod:`.moe`).

* :class:`HFFusedMoE`: one vLLM ``FusedMoE`` (its ``w13_weight``/``w2_weight``, sharded over the intermediate
  size, one all-reduce) called the way transformers 5 calls its experts module,
  ``experts(hidden_states, top_k_index, top_k_weights)``: the HF router's choices go to vLLM's kernel as they
  are, so routing stays exactly the model's own;
* :func:`routed_block_forward`: for transformers 4.x blocks, whose forward routes and loops over the experts in
  one piece, the same routing written out (softmax, top-k, optional renormalisation, optional gated shared
  expert), installed only after a CPU probe has shown it equals the block's own forward (:mod:`.moe_probe`);
* :func:`fused_experts_reference`: the kernel's arithmetic in plain PyTorch, expert by expert as HF computes it;
  the probes compare HF's code with it, and on a device without vLLM's kernel it stands in for the kernel
  when the fused layout is forced (``VLLM_TRANSFORMERS_BACKEND_MOE=fused``, how the CPU tests run this path);
* :func:`shard_packed_experts`: transformers 5 packed experts split over tensor-parallel ranks for HF's own code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.fused_moe.layer import FusedMoE

from .moe_weights import ExpertsShape


def fused_experts_reference(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                            topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """``sum_k weight_k * down_e(silu(gate_e(x)) * up_e(x))`` with ``w13[e] = [gate_e; up_e]`` and ``w2[e] = down_e``
    (vLLM's ``fused_experts`` semantics), experts in ascending order and accumulated as HF's loops do."""
    out = torch.zeros_like(hidden_states)
    local = w13.shape[1] // 2
    for expert in range(w13.shape[0]):
        token_idx, slot = torch.where(topk_ids == expert)
        if token_idx.numel() == 0:
            continue
        gate_up = F.linear(hidden_states[token_idx], w13[expert])
        hidden = F.silu(gate_up[:, :local]) * gate_up[:, local:]
        expert_out = F.linear(hidden, w2[expert]) * topk_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, expert_out.to(out.dtype))
    return out


def _kernel() -> Callable[..., torch.Tensor]:
    from vllm.model_executor.layers.fused_moe import fused_experts

    def run(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor) -> torch.Tensor:
        # inplace=False: HF code may still read the block's input after its experts (Qwen2-MoE's shared gate).
        return fused_experts(hidden_states, w13, w2, topk_weights, topk_ids, inplace=False)

    return run


class HFFusedMoE(FusedMoE):
    """vLLM's ``FusedMoE`` in place of an HF experts module, fed with HF's top-k ids and weights.

    Parameters are ``FusedMoE``'s own (``w13_weight`` ``[E, 2I/tp, H]``, gate rows then up rows; ``w2_weight``
    ``[E, H, I/tp]``); checkpoints of either layout reach them through :mod:`.moe_weights`. ``use_kernel``:
    vLLM's Triton kernel, else :func:`fused_experts_reference` (devices without the kernel, forced layout).
    """

    def __init__(self, shape: ExpertsShape, top_k: Optional[int], tp_size: int, params_dtype: torch.dtype,
                 prefix: str, use_kernel: bool) -> None:
        super().__init__(num_experts=shape.num_experts, top_k=top_k or 1, hidden_size=shape.hidden_size,
                         intermediate_size=shape.intermediate_size, params_dtype=params_dtype, reduce_results=True,
                         renormalize=False, quant_config=None, tp_size=tp_size, prefix=prefix)
        self.uses_kernel = use_kernel
        self._experts = _kernel() if use_kernel else fused_experts_reference

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,  # type: ignore[override]
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = self._experts(hidden_states.contiguous(), self.w13_weight, self.w2_weight, top_k_weights.contiguous(),
                            top_k_index.to(torch.int32))
        return tensor_model_parallel_all_reduce(out) if self.tp_size > 1 else out

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, intermediate_per_rank={self.intermediate_size_per_partition}, "
                f"{'vLLM fused_experts kernel' if self.uses_kernel else 'PyTorch reference of the kernel'}")


@dataclass(frozen=True)
class RoutingSpec:
    """A transformers 4.x block's routing written out (attribute names are the block's own)."""

    router: str  # linear giving the router logits
    experts: str
    top_k: int
    renormalize: bool  # top-k probabilities divided by their sum (Mixtral; ``norm_topk_prob``)
    shared: Optional[str] = None  # shared expert added to every token's output
    shared_gate: Optional[str] = None  # its sigmoid gate (Qwen2-MoE's ``shared_expert_gate``)
    returns_logits: bool = False  # the block returns ``(hidden_states, router_logits)``

    def describe(self) -> str:
        steps = f"softmax -> top-{self.top_k}" + (" -> renormalised" if self.renormalize else "")
        if self.shared:
            steps += f", + {'sigmoid-gated ' if self.shared_gate else ''}shared expert"
        return steps


def route(spec: RoutingSpec, router_logits: torch.Tensor, dtype: torch.dtype):
    """HF's softmax top-k routing: probabilities in float32, the chosen ones renormalised where the model does,
    cast back to the hidden states' dtype."""
    weights = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(weights, spec.top_k, dim=-1)
    if spec.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), ids


def routed_block_forward(self: nn.Module, hidden_states: torch.Tensor) -> Any:
    """The forward installed on a transformers 4.x MoE block whose experts became :class:`HFFusedMoE`."""
    spec: RoutingSpec = self._vtb_routing
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    router_logits = getattr(self, spec.router)(x)
    weights, ids = route(spec, router_logits, x.dtype)
    out = getattr(self, spec.experts)(x, ids, weights)
    if spec.shared:
        shared = getattr(self, spec.shared)(x)
        if spec.shared_gate:
            shared = torch.sigmoid(getattr(self, spec.shared_gate)(x)) * shared
        out = out + shared
    out = out.reshape(shape)
    return (out, router_logits) if spec.returns_logits else out


def install_routed_forward(block: nn.Module, spec: RoutingSpec) -> None:
    import types

    block._vtb_routing = spec
    block.forward = types.MethodType(routed_block_forward, block)


def _all_reduce_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return tensor_model_parallel_all_reduce(output)


def shard_packed_experts(experts: nn.Module, tp_size: int) -> int:
    """Splits a transformers 5 packed experts module over ``tp_size`` ranks for HF's own forward: each rank keeps
    its slice of every expert's intermediate size (``gate_up_proj`` ``[E, 2I/tp, H]`` with its gate and up rows,
    ``down_proj`` ``[E, H, I/tp]``), computes a partial sum and the ranks add them up (transformers' own
    ``moe_tp_experts`` arithmetic). Parameters stay on meta until the backend allocates them. Returns I/tp."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    num_experts, hidden, intermediate = down.shape[0], down.shape[1], down.shape[2]
    local = intermediate // tp_size
    experts._parameters["gate_up_proj"] = nn.Parameter(
        torch.empty(num_experts, 2 * local, hidden, dtype=gate_up.dtype, device="meta"), requires_grad=False)
    experts._parameters["down_proj"] = nn.Parameter(
        torch.empty(num_experts, hidden, local, dtype=down.dtype, device="meta"), requires_grad=False)
    experts.register_forward_hook(_all_reduce_output)
    return local
