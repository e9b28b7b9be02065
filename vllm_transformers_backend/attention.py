"""Attention: the ``"vllm"`` entry of transformers' ``ALL_ATTENTION_FUNCTIONS``.

HF attention modules call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v,
attention_mask, scaling=..., **kwargs)``. vLLM 0.6.2 has no forward context: its ``Attention.forward``
needs the layer's KV cache and the step's metadata as arguments. The backend's ``forward`` therefore
opens an :class:`AttentionContext` (per-layer ``Attention`` instances, this step's KV caches and
metadata) for the duration of the HF call; the attention function finds the layer's instance through
it. The context is a plain module global, readable from anywhere (MLU attention backends that look
for a global forward context, CUDA-graph capture, which runs the Python once), and always cleared.

Encoder-only models (attention modules with ``is_causal=False``: BERT, RoBERTa, ESM, ...) get an
:class:`EncoderOnlyAttention` per layer instead: vLLM 0.6.2 has no encoder-only attention type, and its
one backend with non-causal ``ENCODER`` attention (XFormers) must be forced for the whole process. The
backend runs an encoder on batches of equal-length prompts, so attention is unmasked SDPA within each
sequence: no KV cache, no padding, no attention across sequences.

With no context (the HF model called outside the engine) the function falls back to SDPA with the mask
the HF code passed.

Decode step: the context opens around the HF body call; inside each layer, after q/k/v, the
rotation and before ``o_proj``, the ``"vllm"`` function hands q/k/v to the layer's vLLM ``Attention``
(paged KV cache; FlashAttention/XFormers/SDPA as vLLM selected). On the first forward only it records
which layers called it and adopts the softmax scale HF passes.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Set

import torch

ATTN_IMPLEMENTATION = "vllm"


class EncoderOnlyAttention:
    """Bidirectional attention for one layer of an encoder; holds no cache."""

    __slots__ = ("layer_idx",)

    def __init__(self, layer_idx: int) -> None:
        self.layer_idx = layer_idx

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 scaling: Optional[float], **kwargs: Any):
        # Batches hold equal-length prompts without padding: whatever mask HF built (all keep) is moot.
        kwargs.pop("is_causal", None)
        return sdpa_fallback(module, query, key, value, None, scaling=scaling, dropout=0.0, is_causal=False, **kwargs)

    def __repr__(self) -> str:
        return f"EncoderOnlyAttention(layer_idx={self.layer_idx})"


class AttentionContext:
    """What one forward step's attention calls need: instances, KV caches, metadata."""

    __slots__ = ("instances", "kv_caches", "attn_metadata", "start_layer", "called", "rotary", "rotary_modules")

    def __init__(
        self,
        instances: Dict[int, Any],
        kv_caches: List[Optional[torch.Tensor]],
        attn_metadata: Any,
        start_layer: int = 0,
        record_calls: bool = False,
        rotary_modules: Optional[Dict[str, Optional[bool]]] = None,
    ) -> None:
        self.instances = instances
        self.kv_caches = kv_caches
        self.attn_metadata = attn_metadata
        self.start_layer = start_layer
        #: This step's rotary tables for vLLM's kernel by ``id(cos)`` (see rotary.py).
        self.rotary: Dict[int, Any] = {}
        #: The model's rotary state (rotary.py): the modeling modules whose rotation runs through vLLM's kernel
        #: in this model's forward. None: not scoped to a model (a bare context, as in the kernel tests).
        self.rotary_modules = rotary_modules
        #: Layers whose attention ran through the interface; recorded on the first step only.
        self.called: Optional[Set[int]] = set() if record_calls else None

    def first_forward_call(self, layer_idx: int, attn: Any, scaling: Any, head_dim: int) -> None:
        """A layer's attention call on the model's first forward (``called`` is set: vLLM's eager profiling
        run): recorded for the dispatch check, and the softmax scale HF passes adopted (:func:`adopt_scaling`)."""
        self.called.add(layer_idx)
        adopt_scaling(attn, scaling, head_dim, layer_idx)


_ACTIVE: Optional[AttentionContext] = None


def get_attention_context() -> Optional[AttentionContext]:
    return _ACTIVE


@contextlib.contextmanager
def attention_context(ctx: AttentionContext) -> Iterator[AttentionContext]:
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, ctx
    try:
        yield ctx
    finally:
        _ACTIVE = previous


def token_rows(x: torch.Tensor) -> Optional[torch.Tensor]:
    """``[1, heads, tokens, head_dim]`` as a ``[tokens, heads * head_dim]`` view without a copy, when each
    token's heads lie side by side in memory and rows do not overlap (HF's ``view(...).transpose(1, 2)`` of
    a projection output, also a slice of a fused one); else None. One ``as_strided`` instead of a transpose,
    a reshape and their aliases: host time per layer."""
    if x.dim() != 4 or x.shape[0] != 1:
        return None
    _, heads, tokens, dim = x.shape
    if x.stride(3) != 1 or (heads > 1 and x.stride(1) != dim) or (tokens > 1 and x.stride(2) < heads * dim):
        return None
    return x.as_strided((tokens, heads * dim), (x.stride(2) if tokens > 1 else heads * dim, 1))


def vllm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs: Any,
):
    """``[1, heads, tokens, head_dim]`` in, ``[1, tokens, heads, head_dim]`` out, as HF's own functions."""
    ctx = _ACTIVE
    if ctx is None:
        return sdpa_fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer_idx = module.layer_idx
    attn = ctx.instances[layer_idx]
    if isinstance(attn, EncoderOnlyAttention):
        if ctx.called is not None:
            ctx.called.add(layer_idx)
        return attn(module, query, key, value, scaling, **kwargs)
    if ctx.called is not None:  # the model's first forward only (vLLM's eager profiling run)
        ctx.first_forward_call(layer_idx, attn, scaling, query.shape[-1])
    num_tokens = query.shape[-2]
    out = attn(vllm_rows(query), vllm_rows(key), vllm_rows(value), ctx.kv_caches[layer_idx - ctx.start_layer],
               ctx.attn_metadata)
    # vLLM promises the shape [tokens, heads * head_dim], not a layout: reshape (a view when it can be).
    return out.reshape(1, num_tokens, -1, query.shape[-1]), None


def vllm_rows(x: torch.Tensor) -> torch.Tensor:
    """``[1, heads, tokens, head_dim]`` as the ``[tokens, heads * head_dim]`` tensor vLLM's attention takes.

    What vLLM 0.6.2's backends assume (their forward code and kernels): a 2-D tensor whose rows may lie
    at any distance apart (``stride(0)``: the cache writers ``reshape_and_cache[_flash]``, paged attention
    and FlashAttention read it; vLLM's own models pass slices of one qkv projection), but whose
    ``heads * head_dim`` values of a row are contiguous: the kernels index inside a row by pointer, and
    ``view(-1, heads, head_dim)`` in the backends keeps any other inner stride, which the kernels would
    misread without an error. Anything else (heads apart in memory, a strided last dimension,
    overlapping rows) is copied into that layout. The common case, HF's ``view(...).transpose(1, 2)`` of a
    projection output, is one view (:func:`token_rows`: fewer host operators per layer)."""
    rows = token_rows(x)
    if rows is not None:
        return rows
    rows = x.transpose(1, 2).reshape(x.shape[-2], -1)
    if rows.stride(-1) == 1 and (rows.shape[0] <= 1 or rows.stride(0) >= rows.shape[-1]):
        return rows
    return rows.contiguous()


def vllm_attention_of(instance: Any) -> Any:
    """The vLLM ``Attention`` inside a layer's attention instance: the backend's wrappers (GatheredHeadsAttention,
    WindowedAttention, nested) hold it as ``.attn``; other instances (EncoderOnlyAttention) are returned as they
    are."""
    while not hasattr(instance, "impl") and hasattr(instance, "attn"):
        instance = instance.attn
    return instance


def adopt_scaling(attn: Any, scaling: Any, head_dim: int, layer_idx: int) -> None:
    """Makes the layer's vLLM attention use the softmax scale HF passes per call (``scaling=``; None means
    HF's default, ``head_dim ** -0.5``). The instance was built with the module's ``scaling`` attribute,
    which is what HF passes for transformers' own models; custom code may keep the scale elsewhere.

    Runs on the model's first forward only: vLLM's profiling run, eager, before any CUDA graph is captured,
    so a graph records the adopted scale and steps pay nothing. HF passes the same scale on every call of a
    layer (vLLM's kernels take one scale per layer)."""
    impl = getattr(vllm_attention_of(attn), "impl", None)
    if impl is None:
        return
    wanted = float(scaling) if scaling is not None else head_dim ** -0.5
    if wanted != impl.scale:
        from ._logging import get_logger

        get_logger(__name__).info("layer %d: attention scale %g (passed by the HF module) replaces %g", layer_idx,
                                  wanted, impl.scale)
        impl.scale = wanted


def sdpa_fallback(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register_attention_function() -> None:
    """Adds ``"vllm"`` to ``ALL_ATTENTION_FUNCTIONS`` (idempotent; needs transformers >= 4.48)."""
    from .compat import attention_functions

    from . import runtime

    functions = attention_functions()
    register = getattr(functions, "register", None)
    if register is not None:
        register(ATTN_IMPLEMENTATION, vllm_attention_forward)
    else:  # 4.48-4.49: a plain mapping
        functions[ATTN_IMPLEMENTATION] = vllm_attention_forward
    runtime.add(functions, ATTN_IMPLEMENTATION, vllm_attention_forward, by="attention",
                where="transformers ALL_ATTENTION_FUNCTIONS")
