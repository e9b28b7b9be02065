"""CPU probes that qualify an HF mixture-of-experts block for vLLM's ``FusedMoE`` (see :mod:`.moe`).

vLLM's kernel computes ``sum_k w_k * down_e(silu(gate_e(x)) * up_e(x))``. Before a block's experts are handed
to it, HF's own code runs once per class on small random stand-ins (float32, on the CPU) and must give what
:func:`.moe_layers.fused_experts_reference` gives:

* transformers 5 packed experts: the experts module's forward with random ``gate_up_proj``/``down_proj`` and
  random routing (checks the ``[gate; up]`` order, the SiLU, no bias);
* transformers 4.x: one expert module with random linears (its math), then the whole block's forward with
  random router and experts against :func:`.moe_layers.routed_block_forward`, for each routing the block may
  do (renormalised or not, a shared expert with or without its gate); the first that matches is the block's.

Whatever fails keeps HF's code. Only the hidden size is shrunk in the stand-ins (the number of experts and the
attribute layout stay the block's own), so a probe costs milliseconds even for large models.
"""
from __future__ import annotations

import copy
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import devices
from .moe_layers import RoutingSpec, fused_experts_reference, routed_block_forward

_HIDDEN, _INTERMEDIATE, _TOKENS = 8, 6, 24


def _randn(generator: torch.Generator, *shape: int, scale: float = 0.5) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * scale


def _close(a: Any, b: Any) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
        torch.allclose(a, b, atol=1e-5, rtol=1e-4)


class _GatedExpert(nn.Module):
    """A stand-in expert: ``down(silu(gate(x)) * up(x))`` with weights ``w13 = [gate; up]`` and ``w2 = down``."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        super().__init__()
        self.w13, self.w2 = w13, w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2)


class _ReferenceExperts(nn.Module):
    """What :class:`.moe_layers.HFFusedMoE` computes, on the probe's weights."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        super().__init__()
        self.w13, self.w2 = w13, w2

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return fused_experts_reference(x, self.w13, self.w2, weights, ids)


def _stand_in(module: nn.Module, modules: dict, params: Optional[dict] = None) -> nn.Module:
    """A shallow copy of ``module`` whose children (and parameters) are replaced; the original is untouched."""
    probe = copy.copy(module)
    probe.__dict__.pop("forward", None)
    probe._modules = {**module._modules, **modules}
    probe._parameters = {**module._parameters, **(params or {})}
    probe.training = False
    return probe


def probe_packed_experts(experts: nn.Module, num_experts: int, top_k: Optional[int]) -> Optional[str]:
    """None when the packed experts module computes the kernel's math, else what differs."""
    with devices.cpu_probe():
        gen = torch.Generator().manual_seed(0)
        w13 = _randn(gen, num_experts, 2 * _INTERMEDIATE, _HIDDEN)
        w2 = _randn(gen, num_experts, _HIDDEN, _INTERMEDIATE)
        x = _randn(gen, _TOKENS, _HIDDEN, scale=1.0)
        k = min(top_k or 2, num_experts)
        weights, ids = torch.softmax(_randn(gen, _TOKENS, num_experts, scale=2.0), dim=-1).topk(k, dim=-1)
        probe = _stand_in(experts, {}, {"gate_up_proj": nn.Parameter(w13, requires_grad=False),
                                        "down_proj": nn.Parameter(w2, requires_grad=False)})
        try:
            out = type(experts).forward(probe, x, ids, weights)
        except Exception as exc:  # a signature or layout other than transformers 5's
            return f"{type(experts).__name__}.forward(hidden_states, top_k_index, top_k_weights) failed on the " \
                   f"probe ({type(exc).__name__}: {exc})"
        if not _close(out, fused_experts_reference(x, w13, w2, weights, ids)):
            return f"{type(experts).__name__} does not compute sum_k w_k * down(silu(gate(x)) * up(x)) with " \
                   "gate_up_proj = [gate; up] (another activation, layout or a bias)"
    return None


def probe_expert_module(expert: nn.Module, names: Tuple[str, str, str]) -> Optional[str]:
    """None when one per-expert module computes ``down(silu(gate(x)) * up(x))`` with its linears ``names``."""
    with devices.cpu_probe():
        gen = torch.Generator().manual_seed(1)
        gate, up, down = (_randn(gen, _INTERMEDIATE, _HIDDEN), _randn(gen, _INTERMEDIATE, _HIDDEN),
                          _randn(gen, _HIDDEN, _INTERMEDIATE))
        linears = {}
        for name, weight in zip(names, (gate, up, down)):
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight = nn.Parameter(weight, requires_grad=False)
            linears[name] = linear
        x = _randn(gen, 5, _HIDDEN, scale=1.0)
        try:
            out = type(expert).forward(_stand_in(expert, linears), x)
        except Exception as exc:
            return f"{type(expert).__name__}.forward failed on the probe ({type(exc).__name__}: {exc})"
        if not _close(out, F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)):
            return f"{type(expert).__name__} does not compute {names[2]}(silu({names[0]}(x)) * {names[1]}(x))"
    return None


def _candidates(block: nn.Module, router: str, experts: str, top_k: int, shared: Optional[str],
                shared_gate: Optional[str], returns_logits: bool) -> List[RoutingSpec]:
    flag = getattr(block, "norm_topk_prob", None)
    renormalize = [bool(flag)] if isinstance(flag, bool) else [True, False]
    shared_forms = [(shared, shared_gate), (shared, None)] if shared and shared_gate else [(shared, None)]
    return [RoutingSpec(router, experts, top_k, renorm, s, g, returns_logits)
            for renorm in renormalize for s, g in shared_forms]


def probe_inline_routing(block: nn.Module, router: str, experts: str, num_experts: int, hidden_size: int,
                         top_k: int, shared: Optional[str], shared_gate: Optional[str]
                         ) -> Tuple[Optional[RoutingSpec], Optional[str]]:
    """The routing a transformers 4.x block does (its forward routes and loops over ``experts`` itself), found by
    running that forward on stand-ins, or why none of the known routings reproduces it."""
    with devices.cpu_probe():
        gen = torch.Generator().manual_seed(2)
        router_linear = nn.Linear(_HIDDEN, num_experts, bias=False)
        router_linear.weight = nn.Parameter(_randn(gen, num_experts, _HIDDEN, scale=1.0), requires_grad=False)
        w13 = _randn(gen, num_experts, 2 * _INTERMEDIATE, _HIDDEN)
        w2 = _randn(gen, num_experts, _HIDDEN, _INTERMEDIATE)
        modules: dict = {router: router_linear,
                         experts: nn.ModuleList([_GatedExpert(w13[e], w2[e]) for e in range(num_experts)])}
        if shared:
            modules[shared] = _GatedExpert(_randn(gen, 2 * _INTERMEDIATE, _HIDDEN), _randn(gen, _HIDDEN, _INTERMEDIATE))
        if shared_gate:
            gate = nn.Linear(_HIDDEN, 1, bias=False)
            gate.weight = nn.Parameter(_randn(gen, 1, _HIDDEN, scale=1.0), requires_grad=False)
            modules[shared_gate] = gate
        probe = _stand_in(block, modules)
        for name, value in vars(block).items():  # sizes the forward may read (Mixtral's hidden_dim)
            if not name.startswith("_") and isinstance(value, int) and not isinstance(value, bool) \
                    and value == hidden_size:
                probe.__dict__[name] = _HIDDEN
        x = _randn(gen, 1, _TOKENS, _HIDDEN, scale=1.0)
        try:
            expected = type(block).forward(probe, x)
        except Exception as exc:
            return None, f"{type(block).__name__}.forward failed on the probe ({type(exc).__name__}: {exc})"
        returns_logits = isinstance(expected, tuple)
        if returns_logits and len(expected) != 2:
            return None, f"{type(block).__name__}.forward returns {len(expected)} values (expected the output and " \
                         "the router logits)"
        for spec in _candidates(block, router, experts, top_k, shared, shared_gate, returns_logits):
            adapted = _stand_in(probe, {experts: _ReferenceExperts(w13, w2)})
            adapted._vtb_routing = spec
            try:
                got = routed_block_forward(adapted, x)
            except Exception:
                continue
            if returns_logits and _close(got[0], expected[0]) and _close(got[1], expected[1]):
                return spec, None
            if not returns_logits and _close(got, expected):
                return spec, None
    return None, (f"{type(block).__name__}.forward is none of the routings the backend writes out (softmax -> "
                  f"top-{top_k}, renormalised or not, plus a shared expert where the block has one)")
