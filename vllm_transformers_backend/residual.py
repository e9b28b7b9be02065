"""Residual adds of pre-norm decoder layers folded into vLLM's add-and-norm kernel: the ``residual`` speed
pass (:mod:`.passes`).

Decode step: each qualifying decoder layer runs its own forward instead of HF's: ``input_layernorm(x,
residual)`` (vLLM's fused add-and-norm, adding the residual the previous layer left), attention,
``post_attention_layernorm(attn, residual)`` (fused again), the MLP, and it hands its MLP output and the
residual to the next layer instead of adding them.

An HF pre-norm layer (Llama, Mistral, Qwen, Gemma...) computes
``h = x + attn(norm1(x)); out = h + mlp(norm2(h))``: two residual adds and two stand-alone norms, four
kernels, where vLLM's own models run two ``fused_add_rms_norm`` calls by carrying the residual from one
layer to the next (``norm(x, residual)`` adds, stores the sum as the new residual and normalises it, in
place). At decode batch sizes those kernels cost as much as a tenth of the step.

:class:`ResidualFusion` gives each decoder layer that qualifies a forward doing what vLLM's layers do:

* a layer in the middle of a run of such layers returns only its MLP output and leaves the residual on a
  carry object shared by the run; the next layer's ``input_layernorm(hidden_states, residual)`` adds the
  two back in the fused kernel. The last layer of the run (the model's last, or this pipeline rank's
  last) returns the true hidden states, so the final norm, the pipeline hand-over and anything after the
  layers see exactly what HF computes;
* the first layer of a run never writes into its input (it may be the caller's ``inputs_embeds``).

A layer qualifies when its class's forward, run once on CPU with stand-in attention, MLP and norms,
computes exactly the pre-norm formula above, passes its keyword arguments to the attention untouched,
and both norms are vLLM RMS norms (plain or Gemma form). Layers with extra steps (residual multipliers,
sandwich norms, parallel attention and MLP, post-norms) fail that check and keep HF's forward. At run
time a layer expecting a carried residual checks that its input is the very tensor the previous layer
returned; a model that changes hidden states between its layers is refused loudly at the first forward
(vLLM's start-up profiling run), never answered wrongly.

``VLLM_TRANSFORMERS_BACKEND_FUSE_RESIDUAL=0`` (or ``VLLM_TRANSFORMERS_BACKEND_FUSE=0``) keeps HF's layers.
"""
from __future__ import annotations

import copy
import inspect
import types
from typing import Any, Dict, Hashable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from . import devices
from .fusion import FUSE_ENV
from .layers import HFGemmaRMSNorm, HFRMSNorm, rms_normalize
from .passes import Build, Replacement, SpeedPass, Verdict
from .pipeline import PPMissingLayer

RESIDUAL_ENV = "VLLM_TRANSFORMERS_BACKEND_FUSE_RESIDUAL"
_NORM_NAMES = ("input_layernorm", "post_attention_layernorm")


class ResidualFusionError(RuntimeError):
    pass


class _Carry:
    """The residual one layer of a run leaves for the next, and the tensor it returned alongside."""

    __slots__ = ("residual", "sent")

    def __init__(self) -> None:
        self.residual: Optional[torch.Tensor] = None
        self.sent: Optional[torch.Tensor] = None


def _fused_layer_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    if args:
        kwargs.update(zip(self._vtb_positional_names, args))
    for name, value in self._vtb_attention_defaults.items():
        kwargs.setdefault(name, value)  # what HF's forward would pass the attention when the caller did not
    carry: _Carry = self._vtb_carry
    if self._vtb_takes_residual:
        if hidden_states is not carry.sent:
            raise ResidualFusionError(
                f"{type(self).__name__} expected the previous decoder layer's output as its input, but "
                f"{self._vtb_body_name} changed the hidden states between its layers. The backend's residual "
                f"fusion cannot run this model: set {RESIDUAL_ENV}=0."
            )
        residual, carry.residual, carry.sent = carry.residual, None, None
        normed, residual = self.input_layernorm(hidden_states, residual)
        attn_out = self.self_attn(hidden_states=normed, **kwargs)[0]
        normed, residual = self.post_attention_layernorm(attn_out, residual)
    else:
        attn_out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)[0]
        # A fresh sum: the fused kernel would write into ``hidden_states``, which the caller may own.
        residual = hidden_states + attn_out
        normed = self.post_attention_layernorm(residual)
    mlp_out = self.mlp(normed)
    if isinstance(mlp_out, tuple):  # MoE blocks also return router logits
        mlp_out = mlp_out[0]
    if self._vtb_gives_residual:
        carry.residual, carry.sent = residual, mlp_out
        out = mlp_out
    else:
        out = residual + mlp_out
    return (out,) if self._vtb_returns_tuple else out


# --- the CPU probe ---------------------------------------------------------------------------------


class _ProbeNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> Any:
        if residual is not None:
            x = x + residual
            residual = x
        out = rms_normalize(x, self.eps) * self.weight
        return out if residual is None else (out, residual)


def _probe_attention_output(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * 0.7 + 0.1


def _probe_mlp_output(x: torch.Tensor) -> torch.Tensor:
    return x * x * 0.3 - 0.2


class _ProbeAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: List[Dict[str, Any]] = []

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Tuple[torch.Tensor, None]:
        self.calls.append({"args": args, **kwargs})
        return _probe_attention_output(hidden_states), None


class _ProbeMLP(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _probe_mlp_output(x)


def _probe_kwargs(params: Any) -> Dict[str, Any]:
    """Stand-ins for what an HF model hands its layers (only the names the forward accepts)."""
    sentinel: Dict[str, Any] = {name: torch.zeros(1) for name in ("attention_mask", "position_ids", "cache_position")}
    sentinel["position_embeddings"] = (torch.zeros(1), torch.zeros(1))
    any_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {name: value for name, value in sentinel.items() if any_kwargs or name in params}


class _Form(NamedTuple):
    problem: Optional[str]  # why the layer class keeps HF's forward (None: it can use the fused one)
    returns_tuple: bool = False  # HF's forward returns ``(hidden_states,)``
    attention_defaults: Dict[str, Any] = {}  # the forward's defaults that it hands the attention
    positional_names: Tuple[str, ...] = ()  # the forward's parameters after ``hidden_states``, in order


def _qualification(layer: nn.Module) -> _Form:
    children = layer._modules
    norms = [children.get(name) for name in _NORM_NAMES]
    if not all(isinstance(n, (HFRMSNorm, HFGemmaRMSNorm)) for n in norms) or type(norms[0]) is not type(norms[1]):
        return _Form("its input/post-attention norms are not both vLLM RMS norms")
    if not isinstance(children.get("self_attn"), nn.Module) or not isinstance(children.get("mlp"), nn.Module):
        return _Form("it has no self_attn/mlp pair")
    forward = type(layer).forward
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return _Form("its forward has no readable signature")
    modes = [(module, module.training) for module in layer.modules()]
    try:
        layer.eval()  # vLLM's loader sets eval mode too; dropout must not make the probe random
        with devices.cpu_probe():
            return _probe(layer, forward, params, norms[0].weight.shape[0])
    finally:
        for module, mode in modes:
            module.training = mode


def _probe(layer: nn.Module, forward: Any, params: Any, hidden: int) -> _Form:
    kwargs = _probe_kwargs(params)
    gen = torch.Generator().manual_seed(0)
    norm1, norm2 = (_ProbeNorm(torch.rand(hidden, generator=gen) + 0.5) for _ in range(2))
    x = torch.randn(1, 3, hidden, generator=gen)
    positional = tuple(p.name for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))[2:]

    def stand_in(carry: Optional[_Carry] = None, takes: bool = False, gives: bool = False
                 ) -> Tuple[nn.Module, _ProbeAttention]:
        probe = copy.copy(layer)  # own __dict__; the children dict is replaced, never written through
        probe.__dict__.pop("forward", None)
        attention = _ProbeAttention()
        probe._modules = {**layer._modules, "self_attn": attention, "mlp": _ProbeMLP(),
                          "input_layernorm": norm1, "post_attention_layernorm": norm2}
        if carry is not None:
            install(probe, carry, _Form(None, False, defaults, positional), takes=takes, gives=gives,
                    body_name="probe")
        return probe, attention

    def formula(h: torch.Tensor) -> torch.Tensor:
        h = h + _probe_attention_output(norm1(h))
        return h + _probe_mlp_output(norm2(h))

    original, attention = stand_in()
    try:
        out = forward(original, x, **kwargs)
    except Exception as exc:  # a forward that needs more than a pre-norm layer's inputs
        return _Form(f"its forward does not run as a plain pre-norm layer ({type(exc).__name__})")
    if isinstance(out, tuple) and len(out) != 1:
        return _Form("its forward returns more than the hidden states")
    returns_tuple = isinstance(out, tuple)
    value = out[0] if returns_tuple else out
    if not isinstance(value, torch.Tensor) or value.shape != x.shape or \
            not torch.allclose(value, formula(x), atol=1e-5, rtol=1e-5):
        return _Form("its forward is not the plain pre-norm residual formula")
    if len(attention.calls) != 1:
        return _Form("its forward does not call the attention once")
    call = attention.calls[0]
    # Extra keywords the layer adds itself (use_cache=False, output_attentions=False...) reach the attention
    # at run time as the model passes them; what matters is that the model's tensors arrive untouched.
    if call.pop("args") or any(call.get(k) is not v for k, v in kwargs.items()):
        return _Form("its forward does not pass its arguments to the attention unchanged")
    defaults = {name: params[name].default for name in call
                if name in params and params[name].default is not inspect.Parameter.empty}
    # The fused forward itself, alone and as a run of three layers, on the same stand-ins.
    alone = _fused_layer_forward(stand_in(_Carry())[0], x.clone(), **kwargs)
    carry = _Carry()
    chained = x.clone()
    for takes, gives in ((False, True), (True, True), (True, False)):
        chained = _fused_layer_forward(stand_in(carry, takes, gives)[0], chained, **kwargs)
    if not (torch.allclose(alone, formula(x), atol=1e-5, rtol=1e-5)
            and torch.allclose(chained, formula(formula(formula(x))), atol=1e-4, rtol=1e-4)):
        return _Form("the fused forward does not reproduce it (a backend bug)")
    return _Form(None, returns_tuple, defaults, positional)


# --- installing ------------------------------------------------------------------------------------


def install(layer: nn.Module, carry: _Carry, verdict: _Form, *, takes: bool, gives: bool, body_name: str) -> None:
    layer._vtb_positional_names = verdict.positional_names
    layer._vtb_carry = carry
    layer._vtb_takes_residual = takes
    layer._vtb_gives_residual = gives
    layer._vtb_returns_tuple = verdict.returns_tuple
    layer._vtb_attention_defaults = verdict.attention_defaults
    layer._vtb_body_name = body_name
    layer.forward = types.MethodType(_fused_layer_forward, layer)


def is_fused(layer: nn.Module) -> bool:
    forward = layer.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _fused_layer_forward


def unfuse_residual_norms(body: nn.Module) -> int:
    """Puts HF's forward back on every fused layer of ``body`` (HF's forward calls the norms with one argument,
    which vLLM's norms accept); returns how many layers changed."""
    layers = [module for module in body.modules() if is_fused(module)]
    for layer in layers:
        del layer.__dict__["forward"]
        layer._vtb_carry.residual = layer._vtb_carry.sent = None
    return len(layers)


def decoder_layers(body: nn.Module, num_layers: int) -> Optional[nn.ModuleList]:
    """The body's list of decoder layers: its one direct ``nn.ModuleList`` of ``num_hidden_layers`` modules."""
    lists = [child for child in body.children() if isinstance(child, nn.ModuleList) and len(child) == num_layers]
    return lists[0] if len(lists) == 1 else None


class ResidualFusion(SpeedPass):
    """A pre-norm decoder layer's forward -> residual adds inside vLLM's fused add-and-norm, the residual
    carried from layer to layer through each run of such layers (instance forward of this model's layers)."""

    name = "residual"
    switches = (FUSE_ENV, RESIDUAL_ENV)

    def unavailable(self, build: Build) -> Optional[str]:
        if build.is_encoder:
            return "encoder-only model (decoder layers only)"
        if decoder_layers(build.body, build.num_layers) is None:
            return f"{type(build.body).__name__} has no single list of {build.num_layers} decoder layers"
        return None

    def sites(self, build: Build) -> List[Tuple[int, nn.Module]]:
        layers = decoder_layers(build.body, build.num_layers)
        # another pipeline rank's layer is no site: a run ends there
        return [(index, layer) for index, layer in enumerate(layers) if not isinstance(layer, PPMissingLayer)]

    def key(self, site: Tuple[int, nn.Module]) -> Hashable:
        return type(site[1])

    def validate(self, site: Tuple[int, nn.Module], build: Build) -> Verdict:
        form = _qualification(site[1])
        return Verdict(f"{type(site[1]).__name__}: {form.problem}" if form.problem else None, form)

    def install(self, accepted: Sequence[Tuple[Any, Verdict]], build: Build) -> Tuple[List[Replacement], Any]:
        runs: List[List[Tuple[nn.Module, _Form]]] = []
        previous = None
        for (index, layer), verdict in accepted:  # consecutive layers form a run
            if previous is None or index != previous + 1:
                runs.append([])
            runs[-1].append((layer, verdict.data))
            previous = index
        replaced: Dict[str, int] = {}
        for run in runs:
            carry = _Carry()
            for position, (layer, form) in enumerate(run):
                install(layer, carry, form, takes=position > 0, gives=position < len(run) - 1,
                        body_name=type(build.body).__name__)
                replaced[type(layer).__name__] = replaced.get(type(layer).__name__, 0) + 1
        by = f"vLLM fused add-and-norm, residual carried ({len(runs)} run{'s' if len(runs) > 1 else ''})"
        return [Replacement(f"{name}.forward", by, n) for name, n in replaced.items()], None


def fuse_residual_norms(body: nn.Module, num_layers: int) -> List[nn.Module]:
    """Runs the residual pass on ``body`` alone; returns the decoder layers now fused."""
    ResidualFusion().run(Build(body, torch.device("cpu"), num_layers=num_layers))
    layers = decoder_layers(body, num_layers)
    return [layer for layer in layers if is_fused(layer)] if layers is not None else []
