"""Models whose transformers release predates the attention interface for them: their SDPA attention classes,
with the one ``scaled_dot_product_attention`` call sent to the ``"vllm"`` attention function.

transformers 4.x builds some models' attention from a dict keyed by implementation name
(``QWEN2MOE_ATTENTION_CLASSES[config._attn_implementation]``: Qwen2-MoE and OLMoE up to 4.57, the BERT family
up to 4.57, GPT-NeoX, OPT and ESM in earlier releases), so ``attn_implementation="vllm"`` cannot build them and
their attention never reaches ``ALL_ATTENTION_FUNCTIONS``. Their ``"sdpa"`` classes do everything the model
needs around attention (projections, per-head norms, rotation, the output projection) and hand q/k/v to one
``torch.nn.functional.scaled_dot_product_attention`` call. The backend builds such a model with ``"sdpa"``
and gives each of those modules a subclass whose ``forward`` is the class's own code (the same code object and
closure) run with globals in which that one function is :func:`_routed_sdpa`: the call goes to
:func:`.attention.vllm_attention_forward` with the layer's module, as an interface model's call would. Every
other name resolves in the modeling module's own globals at call time (so the rotary pass's binding of
``apply_rotary_pos_emb`` applies as for any model). The forward's decorators are not kept: they rename
deprecated keywords, which the body's own layers do not pass.

What the SDPA code hands over differs from the interface in two ways, both undone here: keys and values come
repeated to the query's head count (``repeat_kv``, for grouped-query attention) and the output is expected as
``[batch, heads, tokens, head_dim]``. Whether every layer's call arrived is checked as for any model, by the
first forward's dispatch record (a class whose SDPA path falls back to eager code for some setting, BERT's
relative positions for one, fails there with the reason).

Tensor parallel: the same SDPA code sizes its views by the module's head counts and width, which
:func:`shard_for_tensor_parallel` sets to the rank's (or, where the plan gathers the heads, leaves whole).

Outside the engine (no attention context) the call is torch's own, with the arguments HF gave.
"""
from __future__ import annotations

import inspect
import types
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from . import compat
from ._logging import get_logger
from .attention import EncoderOnlyAttention, get_attention_context, vllm_attention_forward, vllm_attention_of

logger = get_logger(__name__)

#: The implementation legacy models are built with (their classes that call scaled_dot_product_attention).
LEGACY_IMPLEMENTATION = "sdpa"
_SDPA = "scaled_dot_product_attention"
_torch_sdpa = torch.nn.functional.scaled_dot_product_attention

#: The attention module whose routed forward is running (forwards do not nest; a plain global like the
#: attention context, readable during CUDA-graph capture).
_current: Optional[nn.Module] = None


def _routed_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                 **kwargs: Any) -> torch.Tensor:
    """``scaled_dot_product_attention`` as the routed forwards see it: ``[batch, heads, tokens, head_dim]`` in
    and out, the layer's vLLM attention inside the engine."""
    module, ctx = _current, get_attention_context()
    if module is None or ctx is None:
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, **kwargs)
    instance = ctx.instances[module.layer_idx]
    if isinstance(instance, EncoderOnlyAttention):  # equal-length prompts, no padding: unmasked, bidirectional
        if ctx.called is not None:
            ctx.called.add(module.layer_idx)
        return _torch_sdpa(query, key, value, scale=scale)
    kv_heads = module.__dict__.get("_vtb_kv_heads")
    if kv_heads is None:  # the layer's first call: what its vLLM attention caches (None: it takes what it gets)
        kv_heads = getattr(getattr(vllm_attention_of(instance), "impl", None), "num_kv_heads", None) or 0
        module._vtb_kv_heads = kv_heads
    if kv_heads and key.shape[1] != kv_heads:
        # repeat_kv laid each key/value head out `repeat` times in a row: every repeat-th one is the original
        repeat = key.shape[1] // kv_heads
        if repeat * kv_heads != key.shape[1]:
            from .hf_model import BackendError  # (hf_model imports this module)

            raise BackendError(f"{type(module).__name__} (layer {module.layer_idx}) hands attention {key.shape[1]} "
                               f"key heads, which are not repeats of the {kv_heads} KV heads vLLM caches")
        key, value = key[:, ::repeat], value[:, ::repeat]
    out, _ = vllm_attention_forward(module, query, key, value, attn_mask, scaling=scale, dropout=dropout_p,
                                    is_causal=is_causal)
    return out.transpose(1, 2)


class _Namespace:
    """A module seen with some attributes replaced (``torch``, ``torch.nn``, ``torch.nn.functional``)."""

    def __init__(self, target: Any, replaced: Dict[str, Any]) -> None:
        self._target = target
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


_functional = _Namespace(torch.nn.functional, {_SDPA: _routed_sdpa})
_nn = _Namespace(torch.nn, {"functional": _functional})
_torch = _Namespace(torch, {"nn": _nn})
_REPLACED = {id(torch): _torch, id(torch.nn): _nn, id(torch.nn.functional): _functional, id(_torch_sdpa): _routed_sdpa}


class _Globals(dict):
    """A modeling module's globals, read live, with the names that lead to torch's SDPA leading to ours."""

    def __init__(self, module_globals: Dict[str, Any]) -> None:
        super().__init__(__builtins__=module_globals.get("__builtins__", __builtins__))
        self.module_globals = module_globals

    def __missing__(self, name: str) -> Any:
        value = self.module_globals[name]  # KeyError: CPython then looks the name up in builtins
        return _REPLACED.get(id(value), value)


def calls_sdpa(cls: type) -> bool:
    """Whether the class's own forward calls ``scaled_dot_product_attention``."""
    forward = inspect.unwrap(cls.__dict__.get("forward", getattr(cls, "forward", None)))
    code = getattr(forward, "__code__", None)
    return code is not None and _SDPA in code.co_names


_routed_classes: Dict[type, type] = {}


def routed_class(cls: type) -> type:
    """``cls`` with its forward's SDPA call routed (one subclass per class)."""
    routed = _routed_classes.get(cls)
    if routed is not None:
        return routed
    inner = inspect.unwrap(cls.forward)
    code_forward = types.FunctionType(inner.__code__, _Globals(inner.__globals__), inner.__name__, inner.__defaults__,
                                      inner.__closure__)
    code_forward.__kwdefaults__ = inner.__kwdefaults__
    params = inspect.signature(inner).parameters
    # None: the forward takes **kwargs. Else the keywords it names: the backend's fused decoder layers (residual.py)
    # hand the attention every keyword the body gave the layer, as interface-era attention modules accept.
    accepted = None if any(p.kind is p.VAR_KEYWORD for p in params.values()) else frozenset(params)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        global _current
        if accepted is not None and not accepted.issuperset(kwargs):
            kwargs = {name: value for name, value in kwargs.items() if name in accepted}
        previous, _current = _current, self
        try:
            return code_forward(self, *args, **kwargs)
        finally:
            _current = previous

    forward.__doc__ = inner.__doc__
    routed = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                         "_vtb_routed_sdpa": True,
                                         "__doc__": f"{cls.__name__} with scaled_dot_product_attention routed to "
                                                    "the 'vllm' attention function (legacy_attention.py)"})
    _routed_classes[cls] = routed
    return routed


def route(body: nn.Module) -> List[str]:
    """Gives every module of ``body`` whose class's forward calls SDPA the routed subclass; the classes routed."""
    verdicts: Dict[type, bool] = {}
    routed: Dict[str, int] = {}
    for module in body.modules():
        cls = type(module)
        if cls not in verdicts:
            verdicts[cls] = not getattr(cls, "_vtb_routed_sdpa", False) and calls_sdpa(cls)
        if not verdicts[cls]:
            continue
        module.__class__ = routed_class(cls)
        routed[cls.__name__] = routed.get(cls.__name__, 0) + 1
    if routed:
        logger.info("transformers %s builds %s without the attention interface: its %s call "
                    "scaled_dot_product_attention, routed to the 'vllm' attention function",
                    compat.transformers_version(), type(body).__name__,
                    ", ".join(f"{name} x{count}" for name, count in routed.items()))
    return list(routed)


def number_layers(model: nn.Module, num_layers: Optional[int]) -> None:
    """Older attention classes (OPT and BERT before the interface) carry no ``layer_idx``, which the ``"vllm"``
    function uses to find the layer's KV cache: where the model has one routed module per layer, they are
    numbered in module order (the order of its layer list)."""
    routed = [m for m in model.modules() if is_routed(m)]
    if all(isinstance(getattr(m, "layer_idx", None), int) for m in routed):
        return
    if num_layers is not None and len(routed) != num_layers:
        return  # no numbering to trust: the backend's checks name the problem
    for index, module in enumerate(routed):
        module.layer_idx = index


def is_routed(module: nn.Module) -> bool:
    return bool(getattr(type(module), "_vtb_routed_sdpa", False))


#: Attributes 4.x attention classes size their views by: (name, what it holds: heads, KV heads or their width).
_HEAD_ATTRIBUTES = (("num_heads", "heads"), ("num_attention_heads", "heads"), ("num_key_value_heads", "kv_heads"),
                    ("hidden_size", "width"), ("all_head_size", "width"), ("embed_dim", "width"))


def shard_for_tensor_parallel(model: nn.Module, tp_size: int, total_heads: int, total_kv_heads: int, head_size: int,
                              gathers_heads: Callable[[nn.Module], bool]) -> None:
    """Tensor parallel for routed modules: their SDPA code sizes views by the module's head counts and width
    (``view(bsz, q_len, self.hidden_size)``) and repeats keys by ``num_key_value_groups``, all for the whole
    model; each routed module gets this rank's values (its heads, vLLM's KV heads for the rank, their width, the
    rank's grouping), which is what its column-parallel projections give it. A module whose projections gather
    every head on every rank (OLMoE's plan: its q/k norms span all heads) keeps the model's values: it hands all
    heads, with keys repeated to all of them, so the routed call un-repeats them to the model's KV heads and the
    layer's :class:`.layers.GatheredHeadsAttention` attends with this rank's share and gathers the output."""
    if tp_size == 1:
        return
    heads, kv_heads = total_heads // tp_size, max(1, total_kv_heads // tp_size)
    values = {"heads": (total_heads, heads), "kv_heads": (total_kv_heads, kv_heads),
              "width": (total_heads * head_size, heads * head_size)}
    for module in model.modules():
        if not is_routed(module):
            continue
        if gathers_heads(module):
            module._vtb_kv_heads = total_kv_heads
            continue
        for name, kind in _HEAD_ATTRIBUTES:
            total, local = values[kind]
            if getattr(module, name, None) == total:
                setattr(module, name, local)
        if getattr(module, "num_key_value_groups", None) == total_heads // total_kv_heads:
            module.num_key_value_groups = heads // kv_heads
