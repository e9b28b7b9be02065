"""A standard attention module's forward as the few steps vLLM's own attention layers take: the
``attention_forward`` speed pass (:mod:`.passes`).

Decode step: each qualifying attention module runs ``qkv_proj`` on the step's rows, splits the output into
q/k/v row views, rotates q and k in place with vLLM's rotary kernel (the step's table from the
``rotary_table`` pass), hands the rows to the layer's vLLM ``Attention`` and runs ``o_proj``: what vLLM's
``LlamaAttention.forward`` does. CUDA graphs replay decode steps without Python, so this matters where
steps run eagerly: prefills on GPUs (where a short model's step is host-bound) and every step on the CPU.

Through HF's forward the same kernels run, wrapped in about a dozen more host operations per layer:
q/k/v each through its fused slice module, ``view`` and ``transpose`` to ``[1, heads, tokens, head_dim]``,
the rotary function's and the attention function's views back to rows, the output's ``reshape`` and
``contiguous``, the attention function looked up by name (measured on the 1B Llama shape: 1622 host
operators per eager prefill step against native vLLM's 1127).

A module qualifies when its q/k/v are one fused ``qkv_proj`` (the ``projections`` pass), its modeling
module rotates through vLLM's kernel (the ``rotary`` pass), and its class's forward, run once on the CPU in
float32 with stand-in projections, a recording attention and CPU float32 copies of any other modules it has
that sit on a device or in another dtype (so a GPU model's verdict is the CPU one), computes exactly
``o_proj(attention(rotate(q(x)), rotate(k(x)), v(x)))``, at input magnitudes from 0.01 to 30 (clamps
and rescalings show), for one token and several, and passes its ``scaling`` attribute as the softmax
scale. Query/key norms, partial or interleaved rotations, scaled queries, clipped projections and cross
attention all fail that check and keep HF's forward. At run time a call the lean forward does not
describe (positional arguments, a KV cache object, other tensors, no table for this step's cos/sin, a
batch dimension) goes to HF's forward.

``VLLM_TRANSFORMERS_BACKEND_FUSE_ATTENTION=0`` (or ``VLLM_TRANSFORMERS_BACKEND_FUSE=0``) keeps HF's forward.
"""
from __future__ import annotations

import copy
import sys
import types
from typing import Any, Dict, Hashable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from vllm import _custom_ops as ops

from . import devices, envs, runtime
from .attention import AttentionContext, attention_context, get_attention_context
from .fusion import FUSE_ENV, QKV_NAMES, FusedSlice
from .layers import linear_rows
from .passes import Build, Replacement, SpeedPass, Verdict
from .rotary import RotaryKernel, reference_rotary

ATTENTION_ENV = "VLLM_TRANSFORMERS_BACKEND_FUSE_ATTENTION"

#: Keyword arguments HF's decoder layers hand their attention that the lean forward may leave unread when
#: they are not tensors (a KV cache object always sends the call to HF's forward).
_CACHE_KWARGS = ("past_key_values", "past_key_value")
#: Tensors the lean forward does not need: the mask (vLLM's metadata stands for it) and the positions (the
#: step's table has them).
_UNNEEDED_TENSORS = frozenset({"attention_mask", "position_ids", "cache_position"})


class _Lean(NamedTuple):
    """What the lean forward needs of one module: the q/k/v split of its fused layer (per rank), head size."""

    sizes: Tuple[int, int, int]
    head_dim: int


def _lean_attention_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    ctx = get_attention_context()
    step = None
    if ctx is not None and not args and hidden_states.dim() == 3 and hidden_states.shape[0] == 1:
        embeddings = kwargs.get("position_embeddings")
        if isinstance(embeddings, tuple) and len(embeddings) == 2 and _plain_call(kwargs):
            cos, sin = embeddings
            step = ctx.rotary.get(id(cos))
            if step is not None and (step.cos is not cos or step.sin is not sin):
                step = None
    if step is None:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    lean: _Lean = self._vtb_lean
    layer_idx = self.layer_idx
    attn = ctx.instances[layer_idx]
    if ctx.called is not None:  # the model's first forward (vLLM's eager profiling run)
        ctx.first_forward_call(layer_idx, attn, getattr(self, "scaling", None), lean.head_dim)
    qkv = linear_rows(self.q_proj.fused_layer, hidden_states[0])
    q, k, v = qkv.split(lean.sizes, dim=-1)
    ops.rotary_embedding(step.positions, q, k, lean.head_dim, step.table, True)
    out = attn(q, k, v, ctx.kv_caches[layer_idx - ctx.start_layer], ctx.attn_metadata)
    return self.o_proj(out)[None], None


def _plain_call(kwargs: Dict[str, Any]) -> bool:
    """Whether a call carries nothing the lean forward would drop: no KV cache object and no tensor beyond
    the position embeddings and those it does not need."""
    for name, value in kwargs.items():
        if name in _CACHE_KWARGS:
            if value is not None:
                return False
        elif name != "position_embeddings" and name not in _UNNEEDED_TENSORS and isinstance(value, torch.Tensor):
            return False
    return True


def is_lean(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _lean_attention_forward


def restore_hf_attention(body: nn.Module) -> int:
    """Puts HF's forward back on every lean attention module of ``body`` (hooks on q/k/v projections then
    fire again); returns how many modules changed."""
    modules = [module for module in body.modules() if is_lean(module)]
    for module in modules:
        del module.__dict__["forward"]
    return len(modules)


# --- the CPU probe ---------------------------------------------------------------------------------

#: Input magnitudes the probe runs at: a clamp or a rescaling inside the forward shows at one of them.
_PROBE_SCALES = (0.01, 1.0, 30.0)
_PROBE_TOKENS = (1, 5)
#: Hidden (input) and output widths of the probe's stand-in projections. Only q/k/v widths and head_dim are
#: the layer's own: at an 8B model's real widths (4096 in and out) drawing the stand-ins and running them made
#: the probe ~1 s of the engine start; a forward that needs its real widths is probed again at them.
_PROBE_HIDDEN, _PROBE_OUT = 24, 40
#: Largest other module (elements) the probe copies to the CPU: norms and gates are vectors; a large one (the
#: fused ``qkv_proj`` is skipped by name of its slices anyway: an 8B layer's is 25M elements) stays where it is.
_PROBE_COPY_LIMIT = 1 << 20


class _Recorder:
    """Stands in for a layer's vLLM attention in the probe: records the rows it is handed and returns a
    fixed function of them (each of q, k and v counts)."""

    def __init__(self, scale: float) -> None:
        self.impl = types.SimpleNamespace(scale=scale)
        self.calls: List[Tuple[torch.Tensor, ...]] = []

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: Any, metadata: Any) -> torch.Tensor:
        self.calls.append((q.clone(), k.clone(), v.clone()))
        return probe_attention_output(q, k, v)


def probe_attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.tanh(q) * 0.5 + k.mean(-1, keepdim=True) * 0.3 + v.sum(-1, keepdim=True) * 0.2


def standard_attention_problem(module: nn.Module, sizes: Sequence[int], head_dim: int, hidden: int, out_size: int,
                               qkv_bias: bool, o_bias: bool) -> Optional[str]:
    """Why ``type(module).forward`` is not ``o_proj(attention(rotate(q(x)), rotate(k(x)), v(x)))`` with its
    ``scaling`` as the softmax scale (None: it is), run on the CPU in float32 with stand-in projections of
    ``sizes`` (q, k, v output widths of this rank) from a narrow input to a narrow output; where that fails,
    once more with the layer's ``hidden`` input and ``out_size`` output features, whose verdict stands."""
    layer_idx = getattr(module, "layer_idx", None)
    if not isinstance(layer_idx, int):
        return "it has no layer_idx"
    scale = getattr(module, "scaling", None)
    scale = float(scale) if isinstance(scale, (int, float)) else head_dim ** -0.5
    if any(size % head_dim for size in sizes) or sizes[0] % sizes[1] or sizes[1] != sizes[2]:
        return f"q/k/v widths {list(sizes)} are not query and key/value heads of {head_dim}"
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with devices.cpu_probe():
            narrow = (min(hidden, _PROBE_HIDDEN), min(out_size, _PROBE_OUT))
            problem = _probe(module, sizes, head_dim, *narrow, qkv_bias, o_bias, layer_idx, scale)
            if problem is None or narrow == (hidden, out_size):
                return problem
            return _probe(module, sizes, head_dim, hidden, out_size, qkv_bias, o_bias, layer_idx, scale)
    finally:
        for m, mode in modes:
            m.training = mode


def _probe(module: nn.Module, sizes: Sequence[int], head_dim: int, hidden: int, out_size: int, qkv_bias: bool,
           o_bias: bool, layer_idx: int, scale: float) -> Optional[str]:
    gen = torch.Generator().manual_seed(0)

    def linear(inp: int, out: int, bias: bool) -> nn.Linear:
        lin = nn.Linear(inp, out, bias=bias, device="meta")  # no default init: the weights are drawn here
        lin.weight = nn.Parameter(torch.randn(out, inp, generator=gen) / inp ** 0.5, requires_grad=False)
        if bias:
            lin.bias = nn.Parameter(torch.randn(out, generator=gen) * 0.5, requires_grad=False)
        return lin

    projections = {name: linear(hidden, size, qkv_bias) for name, size in zip(QKV_NAMES, sizes)}
    o_proj = linear(sizes[0], out_size, o_bias)
    probe = copy.copy(module)  # own __dict__; the children dict is replaced, never written through
    probe.__dict__.pop("forward", None)
    fused = {id(getattr(module._modules.get(name), "fused_layer", None)) for name in QKV_NAMES}
    others = {name: _on_cpu(child) for name, child in module._modules.items()
              if child is not None and name not in projections and name != "o_proj" and id(child) not in fused}
    probe._modules = {**module._modules, **others, **projections, "o_proj": o_proj}
    forward = type(module).forward
    for scale_x in _PROBE_SCALES:
        for tokens in _PROBE_TOKENS:
            x = torch.randn(1, tokens, hidden, generator=gen) * scale_x
            angles = torch.randn(1, tokens, head_dim // 2, generator=gen) * 3
            cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
            recorder = _Recorder(scale)
            # rotary_modules={}: a rotation bound to vLLM's kernel runs HF's original function here
            ctx = AttentionContext({layer_idx: recorder}, [None] * (layer_idx + 1), None, record_calls=True,
                                   rotary_modules={})
            try:
                with attention_context(ctx):
                    out = forward(probe, hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)
            except Exception as exc:  # a forward that needs more than a self-attention's inputs
                return f"its forward does not run as a plain self-attention ({type(exc).__name__})"
            if not (isinstance(out, tuple) and len(out) == 2 and out[1] is None):
                return "its forward does not return (output, None) as the attention functions leave it"
            if len(recorder.calls) != 1:
                return "its forward does not call the attention once"
            if recorder.impl.scale != scale:
                return "its forward passes a softmax scale other than its scaling attribute"
            want = _formula(x, projections, o_proj, cos, sin, head_dim)
            got_q, got_k, got_v = recorder.calls[0]
            atol = 1e-5 * max(1.0, scale_x)
            if not all(isinstance(t, torch.Tensor) and t.shape == w.shape and torch.allclose(t, w, atol=atol, rtol=1e-5)
                       for t, w in zip((got_q, got_k, got_v, out[0]), want)):
                return "its forward is not o_proj(attention(rotate(q), rotate(k), v))"
    return None


def _on_cpu(child: nn.Module) -> nn.Module:
    """``child`` as the probe runs it: itself where its tensors are CPU float32 already, else a CPU float32 copy.

    On a GPU the probe runs while the layer's other modules (query/key norms, say) sit on the device in the
    model's dtype, so their forward would fail on the probe's CPU tensors and the verdict would name a device
    error instead of the step they add. vLLM ops in the copy (a norm the ``rms_norm`` pass made vLLM's) run
    their PyTorch form: the kernel they chose at build is the device's. Modules with tensors still on meta are
    not copied: made-up values could turn an extra step into a no-op (a zero bias) and let a forward pass that
    is not the standard one.
    """
    tensors = list(child.parameters()) + list(child.buffers())
    if all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        return child
    if any(t.is_meta for t in tensors) or sum(t.numel() for t in tensors) > _PROBE_COPY_LIMIT:
        return child
    try:
        copied = copy.deepcopy(child).to("cpu").float()
    except Exception:  # a module that does not copy (custom tensors): probed where it is, as before
        return child
    from vllm.model_executor.custom_op import CustomOp

    for op in copied.modules():  # vLLM ops (the rms_norm pass's norms) chose their device's kernel at build
        if isinstance(op, CustomOp):
            devices.use_native_forward(op)
    return copied


def _formula(x: torch.Tensor, projections: Dict[str, nn.Linear], o_proj: nn.Linear, cos: torch.Tensor,
             sin: torch.Tensor, head_dim: int) -> Tuple[torch.Tensor, ...]:
    """The standard attention's q/k/v rows and output (3-D) for the probe's stand-ins."""
    rows = x[0]
    q, k, v = (projections[name](rows) for name in QKV_NAMES)
    heads = lambda t: t.view(t.shape[0], -1, head_dim).transpose(0, 1)[None]  # noqa: E731
    q_rot, k_rot = reference_rotary(heads(q), heads(k), cos, sin)
    as_rows = lambda t: t[0].transpose(0, 1).reshape(t.shape[2], -1)  # noqa: E731
    q, k = as_rows(q_rot), as_rows(k_rot)
    return q, k, v, o_proj(probe_attention_output(q, k, v))[None]


# --- the pass --------------------------------------------------------------------------------------


def _rotates_through_kernel(module: nn.Module, owner: Any) -> bool:
    """Whether the rotary pass bound ``module``'s modeling function to vLLM's kernel for this model (``owner``)."""
    modeling = sys.modules.get(type(module).__module__)
    return modeling is not None and runtime.bound_by(modeling, "apply_rotary_pos_emb", owner) == RotaryKernel.name


def _qkv_group(module: nn.Module) -> Optional[Any]:
    slices = [module._modules.get(name) for name in QKV_NAMES]
    if not all(isinstance(s, FusedSlice) for s in slices):
        return None
    group = slices[0]._group
    if any(s._group is not group for s in slices) or [s.index for s in slices] != [0, 1, 2] or len(group.sizes) != 3:
        return None
    return group


class AttentionForward(SpeedPass):
    """A standard attention forward -> ``o_proj(attention(rotary(split(qkv_proj(x)))))`` on token rows, as
    vLLM's own attention layers run (instance forward of this model's attention modules)."""

    name = "attention_forward"
    switches = (FUSE_ENV, ATTENTION_ENV)

    def unavailable(self, build: Build) -> Optional[str]:
        if build.is_encoder:
            return "encoder-only model (its attention holds no KV cache)"
        if envs.VLLM_TRANSFORMERS_BACKEND_FUSED_ROTARY == "0":
            return "VLLM_TRANSFORMERS_BACKEND_FUSED_ROTARY=0 (the lean forward rotates through vLLM's kernel)"
        return None

    def sites(self, build: Build) -> List[nn.Module]:
        return [module for module in build.body.modules()
                if _qkv_group(module) is not None and isinstance(module._modules.get("o_proj"), nn.Module)]

    def key(self, module: nn.Module) -> Hashable:
        return type(module)

    def validate(self, module: nn.Module, build: Build) -> Verdict:
        name = type(module).__name__
        if not _rotates_through_kernel(module, build.owner):
            return Verdict(f"{name}: its modeling module does not rotate through vLLM's kernel")
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            return Verdict(f"{name}: no even head_dim attribute")
        group = _qkv_group(module)
        o_proj = module._modules["o_proj"]
        out_size = getattr(o_proj, "output_size", None)
        if not isinstance(out_size, int):
            return Verdict(f"{name}: o_proj has no output_size (not a vLLM linear)")
        problem = standard_attention_problem(module, group.sizes, head_dim, module.q_proj.input_size, out_size,
                                             module.q_proj.has_bias, getattr(o_proj, "bias", None) is not None)
        return Verdict(f"{name}: {problem}" if problem else None)

    def install(self, accepted: Sequence[Tuple[Any, Verdict]], build: Build) -> Tuple[List[Replacement], Any]:
        replaced: Dict[str, int] = {}
        for module, _ in accepted:
            module._vtb_lean = _Lean(tuple(_qkv_group(module).sizes), module.head_dim)
            module.forward = types.MethodType(_lean_attention_forward, module)
            replaced[type(module).__name__] = replaced.get(type(module).__name__, 0) + 1
        by = "qkv_proj, vLLM rotary kernel and Attention on token rows, o_proj"
        return [Replacement(f"{name}.forward", by, n) for name, n in replaced.items()], None
