"""HF's rotary embedding through vLLM's own rotary kernel, where the model's function is the standard one:
the ``rotary`` speed pass (:mod:`.passes`).

Decode step: inside each attention layer, after the q/k projections and before the
attention function, HF's ``apply_rotary_pos_emb(q, k, cos, sin)`` rotates q and k with
``q * cos + rotate_half(q) * sin``: about ten small kernels per layer (slices, negation, concatenation,
products, sums), as costly as the layer's GEMMs at decode batch sizes. vLLM's ``rotary_embedding`` kernel
does both in one launch, in place, from positions and a ``[positions, rot_dim]`` table of cos|sin halves.

The pass rebinds ``apply_rotary_pos_emb`` in the model's modeling module to :func:`make_fused`'s function,
after checking numerically that the module's function is the standard formula (a CPU float32 probe, as for
RMS norms). That binding is shared by the process (a module global HF's attention code calls), so it is
registered in :mod:`.runtime` for the model that installed it, and it acts only inside that model's
forward: the step's attention context carries the model's own rotary state (which modeling modules it
rotates this way, and whether their cos/sin halves were found equal on its first step); anywhere else the
original function runs. Inside such a forward it takes this step's ``cos``/``sin`` (whatever rope type
HF computed them with), builds the table once per step (``[tokens, cos half | sin half]``, positions
``0..tokens-1``), and calls the kernel on the ``[tokens, heads * head_dim]`` views of q and k.

Anything it does not handle (a batch dimension, partial rotary, other ``unsqueeze_dim``, layouts whose
heads are not contiguous rows, a call outside such a forward) goes to the original function.
``VLLM_TRANSFORMERS_BACKEND_FUSED_ROTARY=0`` turns the pass off; ``=all`` also runs it on devices without
vLLM GPU kernels where ``vllm._C`` has the op (the CPU build: tests compare it with HF there).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vllm import _custom_ops as ops

from . import envs, runtime
from ._logging import get_logger
from .attention import get_attention_context
from .devices import cpu_probe, has_vllm_gpu_kernels
from .passes import Build, Replacement, SpeedPass, Verdict

logger = get_logger(__name__)

_ENV = "VLLM_TRANSFORMERS_BACKEND_FUSED_ROTARY"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def is_standard_rotary(fn: Callable) -> bool:
    """Whether ``fn(q, k, cos, sin)`` computes the standard (NeoX-style) rotation, checked on CPU float32."""
    with cpu_probe():
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(2, 3, 5, 8, generator=gen)
        k = torch.randn(2, 1, 5, 8, generator=gen)
        freqs = torch.randn(2, 5, 4, generator=gen)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        try:
            got = fn(q, k, cos, sin)
        except Exception:  # a different signature: not the standard function
            return False
    if not isinstance(got, tuple) or len(got) != 2:
        return False
    want = reference_rotary(q, k, cos, sin)
    return all(isinstance(g, torch.Tensor) and g.shape == w.shape and torch.allclose(g, w, atol=1e-6)
               for g, w in zip(got, want))


class _StepTable:
    """This step's cos|sin table for vLLM's kernel, built once from HF's ``cos``/``sin`` (same objects for
    every layer of a step) and kept on the attention context."""

    __slots__ = ("cos", "sin", "table", "positions")

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        half = cos.shape[-1] // 2
        self.cos, self.sin = cos, sin
        self.table = torch.cat((cos[0, :, :half], sin[0, :, :half]), dim=-1)
        self.positions = torch.arange(cos.shape[1], device=cos.device)


def _rows(x: torch.Tensor) -> Optional[torch.Tensor]:
    """``[1, heads, tokens, head_dim]`` as a ``[tokens, heads * head_dim]`` view (no copy), or None."""
    t = x[0].transpose(0, 1)
    if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
        return None
    return t.view(t.shape[0], -1) if t.is_contiguous() else t.as_strided(
        (t.shape[0], t.shape[1] * t.shape[2]), (t.stride(0), 1))


def make_fused(original: Callable, module_name: str = "") -> Callable:
    def fused_apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        ctx = get_attention_context()
        # The model's rotary state: the modeling modules it rotates through the kernel (None: a bare context
        # outside any backend model, as in the kernel tests, where every call checks the halves itself).
        scope = ctx.rotary_modules if ctx is not None else None
        usable = (
            ctx is not None and (scope is None or module_name in scope) and position_ids is None
            and unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4
            and q.shape[0] == 1 and cos.dim() == 3 and cos.shape[0] == 1 and cos.shape == sin.shape
            and cos.shape[-1] == q.shape[-1] == k.shape[-1] and q.shape[-1] % 2 == 0
            and q.dtype == k.dtype == cos.dtype == sin.dtype and not torch.is_grad_enabled()
        )
        q_rows = _rows(q) if usable else None
        k_rows = _rows(k) if q_rows is not None else None
        if k_rows is None or not _halves_ok(scope, module_name, cos, sin):
            if position_ids is not None:
                return original(q, k, cos, sin, position_ids, unsqueeze_dim)
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        step = ctx.rotary
        if step is None or step.cos is not cos or step.sin is not sin:
            step = ctx.rotary = _StepTable(cos, sin)
        ops.rotary_embedding(step.positions, q_rows, k_rows, q.shape[-1], step.table, True)
        return q, k

    fused_apply_rotary_pos_emb.__wrapped__ = original  # type: ignore[attr-defined]
    return fused_apply_rotary_pos_emb


def _halves_ok(scope: Optional[Dict[str, Optional[bool]]], module_name: str, cos: torch.Tensor,
               sin: torch.Tensor) -> bool:
    """Whether HF's cos/sin have equal halves (the kernel reads one half): models whose rotary embedding
    differs keep HF's math. Checked once per model and modeling module, on the model's first (eager,
    profiling) step, where a device sync is fine; the verdict stays in the model's rotary state."""
    ok = scope.get(module_name) if scope is not None else None
    if ok is None:
        half = cos.shape[-1] // 2
        ok = bool(torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:]))
        if scope is not None:
            scope[module_name] = ok
            if not ok:
                logger.info("%s: rotary cos/sin halves differ; HF's rotation kept", module_name)
    return ok


class RotaryKernel(SpeedPass):
    """A modeling module's standard ``apply_rotary_pos_emb`` -> vLLM's ``rotary_embedding`` kernel on HF's
    cos/sin (a process-wide binding, active only inside the models that installed it)."""

    name = "rotary"
    switches = (_ENV,)

    def unavailable(self, build: Build) -> Optional[str]:
        if envs.VLLM_TRANSFORMERS_BACKEND_FUSED_ROTARY != "all" and not has_vllm_gpu_kernels(build.device):
            return f"vLLM's GPU kernels do not run on {build.device.type} ({_ENV}=all uses vllm._C's op anyway)"
        return None

    def sites(self, build: Build) -> List[Tuple[str, Any]]:
        modules: Dict[str, Any] = {}
        for sub in build.body.modules():
            name = type(sub).__module__
            if "attention" in type(sub).__name__.lower() and name in sys.modules:
                modules[name] = sys.modules[name]
        return [(name, module) for name, module in modules.items()
                if getattr(module, "apply_rotary_pos_emb", None) is not None]

    def key(self, site: Tuple[str, Any]) -> Hashable:
        return site[0]

    def validate(self, site: Tuple[str, Any], build: Build) -> Verdict:
        name, module = site
        if is_standard_rotary(runtime.original(module, "apply_rotary_pos_emb")):
            return Verdict()
        return Verdict(f"{name}.apply_rotary_pos_emb is not the standard rotation")

    def install(self, accepted: Sequence[Tuple[Any, Verdict]], build: Build) -> Tuple[List[Replacement], Any]:
        state: Dict[str, Optional[bool]] = {}
        for (name, module), _ in accepted:
            runtime.bind(module, "apply_rotary_pos_emb", lambda original, name=name: make_fused(original, name),
                         by=self.name, user=build.owner)
            state[name] = None  # cos/sin halves: checked on the model's first step
        return [Replacement(f"{name}.apply_rotary_pos_emb", "vLLM rotary_embedding kernel", 1, "process")
                for name in state], state


def fuse_rotary(model: nn.Module, device: torch.device) -> Optional[str]:
    """Runs the rotary pass on ``model`` alone (no owner: a binding it makes is kept for the process);
    returns the modeling modules whose function now calls vLLM's kernel, or None."""
    report = RotaryKernel().run(Build(model, device))
    return ", ".join(report.forward_state or ()) or None
