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
The pass runs where ``vllm._C`` serves the device (CUDA, and vLLM's CPU build, whose kernel computes
``x * cos - y * sin`` in float32 bit for bit as HF's formula does: tests compare tokens exactly there; in
bf16 both round differently, on the CPU as on GPUs). ``VLLM_TRANSFORMERS_BACKEND_FUSED_ROTARY=0`` turns the
pass off; ``=all`` also runs it on other devices.

The ``rotary_table`` speed pass: HF computes ``cos``/``sin`` anew every forward (a float32 outer product of
positions and frequencies, a concatenation, cos, sin, scaling, casts: about nine kernels and twenty host
operators per step), where vLLM looks rows up in a table computed once. The pass does the same for rotary
modules whose values depend on the position alone (rope types in :data:`STATIC_ROPE_TYPES`): it gives such
a module an instance ``forward`` that, at the model's first forward inside the engine (vLLM's eager
profiling run), runs the module's own forward once over every position below ``max_model_len``, checks on
random positions that a row lookup returns exactly what the module computes, and from then on answers with
one ``index_select``. When the model rotates through the kernel, the lookup also hands it a table built
once (``[positions, cos half | sin half]``) and the step's real positions, so the fused rotation needs no
per-step table either. Dynamic rope types (``dynamic``, ``longrope``: frequencies that change with the
sequence length) keep HF's forward. ``VLLM_TRANSFORMERS_BACKEND_ROTARY_TABLE=0`` turns the pass off.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vllm import _custom_ops as ops

from . import envs, runtime
from ._logging import get_logger
from .attention import get_attention_context, token_rows
from .devices import cpu_probe, has_vllm_cpu_kernels, has_vllm_gpu_kernels, is_capturing_graph
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
    """What vLLM's kernel needs for this step's ``cos``/``sin`` (same objects for every layer of a step): a
    ``[positions, cos half | sin half]`` table and the row of each token. Kept on the attention context,
    keyed by ``id(cos)`` (the entry holds ``cos``, so the id cannot be reused within the step)."""

    __slots__ = ("cos", "sin", "table", "positions")

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, table: Optional[torch.Tensor] = None,
                 positions: Optional[torch.Tensor] = None) -> None:
        self.cos, self.sin = cos, sin
        if table is None:  # built from this step's values: row i is token i
            half = cos.shape[-1] // 2
            table = torch.cat((cos[0, :, :half], sin[0, :, :half]), dim=-1)
            positions = torch.arange(cos.shape[1], device=cos.device)
        self.table, self.positions = table, positions


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
        q_rows = token_rows(q) if usable else None
        k_rows = token_rows(k) if q_rows is not None else None
        # this step's table: from the rotary module's table computed once (rotary_table pass), else built here
        step = ctx.rotary.get(id(cos)) if k_rows is not None else None
        if step is None or step.cos is not cos or step.sin is not sin:
            if k_rows is None or not _halves_ok(scope, module_name, cos, sin):
                if position_ids is not None:
                    return original(q, k, cos, sin, position_ids, unsqueeze_dim)
                return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
            step = ctx.rotary[id(cos)] = _StepTable(cos, sin)
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
        if envs.VLLM_TRANSFORMERS_BACKEND_FUSED_ROTARY != "all" and not (
                has_vllm_gpu_kernels(build.device) or has_vllm_cpu_kernels(build.device)):
            return f"vLLM's compiled ops do not serve {build.device.type} ({_ENV}=all calls vllm._C's op anyway)"
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


# --- cos/sin from a table computed once -----------------------------------------------------------

#: HF rope types whose cos/sin are a function of the position alone.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
_TABLE_ENV = "VLLM_TRANSFORMERS_BACKEND_ROTARY_TABLE"
_TABLE_CHECK_LENGTHS = (1, 5, 67)


class _RotaryTable:
    """Every position's ``cos|sin`` for one rotary module (``[positions, 2 * dim]``, the model's dtype) and,
    when both halves of each are equal (the standard layout), the ``[positions, cos half | sin half]`` table
    vLLM's kernel reads."""

    __slots__ = ("full", "kernel", "dim")

    def __init__(self, full: torch.Tensor, kernel: Optional[torch.Tensor], dim: int) -> None:
        self.full, self.kernel, self.dim = full, kernel, dim

    def lookup(self, position_ids: torch.Tensor) -> Any:
        rows = self.full.index_select(0, position_ids.reshape(-1)).view(*position_ids.shape, 2 * self.dim)
        return rows[..., :self.dim], rows[..., self.dim:]


def _rope_type(module: nn.Module) -> Optional[str]:
    rope_type = getattr(module, "rope_type", None)
    return rope_type if isinstance(rope_type, str) else None


def _build_table(original: Callable, x: torch.Tensor, max_positions: int, name: str,
                 kernel: bool) -> Optional[_RotaryTable]:
    """Runs the module's forward over every position and checks the lookup against it (exactly) on random
    positions; None when anything differs (the module keeps its forward)."""
    device = x.device
    try:
        cos, sin = original(x, torch.arange(max_positions, device=device)[None])
    except Exception as exc:  # an unexpected signature or output: not ours to cache
        logger.info("%s: rotary table not built (%s: %s); HF's forward kept", name, type(exc).__name__, exc)
        return None
    if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor) and cos.shape == sin.shape
            and cos.dim() == 3 and cos.shape[:2] == (1, max_positions)):
        logger.info("%s: rotary output is not [1, positions, dim]; HF's forward kept", name)
        return None
    dim = cos.shape[-1]
    full = torch.cat((cos[0], sin[0]), dim=-1)
    table = _RotaryTable(full, None, dim)
    gen = torch.Generator().manual_seed(0)
    for length in _TABLE_CHECK_LENGTHS:
        positions = torch.randint(0, max_positions, (1, length), generator=gen).to(device)
        want = original(x, positions)
        got = table.lookup(positions)
        if not all(torch.equal(g, w) for g, w in zip(got, want)):
            logger.info("%s: a rotary table lookup differs from the module's forward; HF's forward kept", name)
            return None
    half = dim // 2
    if kernel and dim % 2 == 0 and torch.equal(cos[..., :half], cos[..., half:]) and \
            torch.equal(sin[..., :half], sin[..., half:]):
        table.kernel = torch.cat((cos[0, :, :half], sin[0, :, :half]), dim=-1)
    return table


def _table_forward(original: Callable, max_positions: int, name: str) -> Callable:
    state: Dict[str, Any] = {}  # "table": the built table, or None when the module keeps its forward

    def forward(x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kwargs: Any):
        ctx = get_attention_context()
        if ctx is None or args or kwargs or position_ids.dim() != 2:
            return original(x, position_ids, *args, **kwargs)
        if "table" not in state:
            if is_capturing_graph(x.device):  # building compares on the host: not while a graph records
                return original(x, position_ids)
            # The first forward inside the engine: vLLM's profiling run, eager; synchronising here is fine (and
            # the table counts in the memory vLLM profiles). The kernel's table only where the model rotates
            # through the kernel (its rotary state is not empty; None: a bare context, as in the tests).
            kernel = ctx.rotary_modules is None or bool(ctx.rotary_modules)
            state["table"] = _build_table(original, x, max_positions, name, kernel)
            if state["table"] is not None:
                logger.info("%s: cos/sin from a table of %d positions computed once", name, max_positions)
        table: Optional[_RotaryTable] = state["table"]
        if table is None or x.dtype != table.full.dtype or x.device != table.full.device:
            return original(x, position_ids)
        cos, sin = table.lookup(position_ids)
        if table.kernel is not None and position_ids.shape[0] == 1 and position_ids.dtype == torch.int64:
            # (vLLM's kernel reads int64 positions; MLU runners pass int32: those get a per-step table.)
            ctx.rotary[id(cos)] = _StepTable(cos, sin, table.kernel, position_ids[0])
        return cos, sin

    forward.__wrapped__ = original  # type: ignore[attr-defined]
    forward.table_state = state  # type: ignore[attr-defined]  (what tests and benchmarks inspect)
    return forward


def rotary_table(module: nn.Module) -> Optional[_RotaryTable]:
    """The table a rotary module answers from (None: not built yet, or the module keeps HF's forward)."""
    state = getattr(module.__dict__.get("forward"), "table_state", None)
    return None if state is None else state.get("table")


class RotaryTable(SpeedPass):
    """A rotary embedding module whose cos/sin depend on the position alone -> one row lookup in a cos|sin
    table computed once, at the model's first forward (and vLLM's kernel fed a table built once)."""

    name = "rotary_table"
    switches = (_TABLE_ENV,)

    def unavailable(self, build: Build) -> Optional[str]:
        if build.max_positions <= 0:
            return "no position limit known (max_model_len) to size a table"
        return None

    def sites(self, build: Build) -> List[Tuple[str, nn.Module]]:
        return [(name or type(module).__name__, module) for name, module in build.body.named_modules()
                if isinstance(module._buffers.get("inv_freq"), torch.Tensor)]

    def validate(self, site: Tuple[str, nn.Module], build: Build) -> Verdict:
        _, module = site
        rope_type = _rope_type(module)
        if rope_type not in STATIC_ROPE_TYPES:
            return Verdict(f"rope type {rope_type!r}: cos/sin may depend on more than the position")
        if module._buffers["inv_freq"].is_meta:
            return Verdict("inv_freq not computed (meta)")
        if "forward" in module.__dict__:
            return Verdict("its forward is already replaced on the instance")
        return Verdict()

    def install(self, accepted: Sequence[Tuple[Any, Verdict]], build: Build) -> Tuple[List[Replacement], Any]:
        classes: Dict[str, int] = {}
        for (name, module), _ in accepted:
            module.forward = _table_forward(module.forward, build.max_positions, name)
            classes[type(module).__name__] = classes.get(type(module).__name__, 0) + 1
        return [Replacement(f"{cls}.forward", f"cos|sin table of {build.max_positions} positions", count)
                for cls, count in classes.items()], None


def cache_rotary_tables(model: nn.Module, device: torch.device, max_positions: int) -> int:
    """Runs the rotary_table pass on ``model`` alone; returns how many rotary modules now answer from a table."""
    return RotaryTable().run(Build(model, device, max_positions=max_positions)).replaced
