"""Attention of one layer with its own sliding window, over vLLM 0.6.2's paged KV cache.

:mod:`.sliding_window` explains why vLLM cannot apply a window per layer. For a layer whose window is shorter
than ``max_model_len``, :class:`WindowedAttention` wraps the layer's vLLM ``Attention`` (created without a
window, so it shares the engine's backend, metadata and cache layout) and computes the layer's attention
itself, in one of two ways chosen from the impl vLLM built (its class, not its backend name: forks reuse the
names with other cache layouts):

* **FlashAttention** (CUDA, fp16/bf16): vLLM's own kernels with ``window_size=(window - 1, 0)``: the same
  cache write, the varlen kernel for prompts (with the block table when a prefix is cached or prefill is
  chunked) and ``flash_attn_with_kvcache`` for decode steps, which vLLM calls without a window. Soft-capping
  is passed as vLLM passes it. CUDA-graph safe as vLLM's own call is. ``VLLM_TRANSFORMERS_BACKEND_FLASH_WINDOW=0``
  uses the gathered path below instead (same cache layout), for comparison.
* **Gathered** (Torch SDPA on the CPU, XFormers on CUDA, any dtype): the new keys/values go into the cache
  through vLLM's own write (``PagedAttention.write_to_paged_cache`` of the backend, or FlashAttention's
  ``reshape_and_cache_flash``); a decode step gathers, for every sequence at once, the cache slots of the
  last ``window`` positions through its block table (one ``[batch, window]`` index: no per-sequence loop, no
  host sync, static shapes, so CUDA graphs capture it) and attends over them with a mask for positions
  before the sequence start; a prompt attends in query chunks over the keys within reach (its own keys, or
  keys gathered from the cache when a prefix is cached or prefill is chunked).

Other impls (FlashInfer, ROCm, forks' backends) are refused at load with the fix: FlashAttention, or
``max_model_len`` no longer than the window (then it never applies and no layer needs this class).

Decode step: in place of vLLM's ``Attention`` call (step 3.4 of README "Layout") for the layers with
their own window.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn

from ._logging import get_logger

logger = get_logger(__name__)

FLASH_WINDOW_ENV = "VLLM_TRANSFORMERS_BACKEND_FLASH_WINDOW"
#: Prompt queries attend in chunks of this many (keys: the chunk plus the window before it).
_QUERY_CHUNK = 512


def _impl_class_is(impl: Any, module_name: str, class_name: str) -> bool:
    module = sys.modules.get(module_name)
    return module is not None and type(impl) is getattr(module, class_name, None)


def _paged_attention_of(impl: Any) -> Any:
    """The ``PagedAttention`` class an impl's module uses (vLLM's ops one, or IPEX's on some CPU builds)."""
    return getattr(sys.modules.get(type(impl).__module__), "PagedAttention", None)


# --- cache layouts -----------------------------------------------------------------------------------


class PagedLayout:
    """vLLM's ``PagedAttention`` layout (XFormers, Torch SDPA): keys ``[blocks, kv_heads, head/x, block, x]``,
    values ``[blocks, kv_heads, head, block]``."""

    def __init__(self, paged_attention: Any, num_kv_heads: int, head_size: int, kv_cache_dtype: str) -> None:
        self.ops, self.num_kv_heads, self.head_size, self.kv_cache_dtype = (paged_attention, num_kv_heads, head_size,
                                                                            kv_cache_dtype)

    def _split(self, kv_cache: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.ops.split_kv_cache(kv_cache, self.num_kv_heads, self.head_size)

    def write(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
              k_scale: float, v_scale: float) -> None:
        key_cache, value_cache = self._split(kv_cache)
        self.ops.write_to_paged_cache(key, value, key_cache, value_cache, slot_mapping, self.kv_cache_dtype,
                                      k_scale, v_scale)

    def block_size(self, kv_cache: torch.Tensor) -> int:
        return self._split(kv_cache)[1].shape[-1]

    def gather(self, kv_cache: torch.Tensor, blocks: torch.Tensor,
               offsets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[*blocks.shape, kv_heads, head]`` at the given (block, offset) slots."""
        key_cache, value_cache = self._split(kv_cache)
        keys = key_cache[blocks, :, :, offsets, :]  # [*S, kv_heads, head/x, x]
        return keys.reshape(*blocks.shape, self.num_kv_heads, self.head_size), value_cache[blocks, :, :, offsets]


class FlashLayout:
    """FlashAttention's layout: ``[2, blocks, block, kv_heads, head]``."""

    def __init__(self, kv_cache_dtype: str) -> None:
        self.kv_cache_dtype = kv_cache_dtype

    def write(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
              k_scale: float, v_scale: float) -> None:
        torch.ops.vllm.reshape_and_cache_flash(key, value, kv_cache, slot_mapping.flatten(), self.kv_cache_dtype,
                                               k_scale, v_scale)

    def block_size(self, kv_cache: torch.Tensor) -> int:
        return kv_cache.shape[2]

    def gather(self, kv_cache: torch.Tensor, blocks: torch.Tensor,
               offsets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return kv_cache[0][blocks, offsets], kv_cache[1][blocks, offsets]


# --- attention math ----------------------------------------------------------------------------------


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           softcap: Optional[float] = None) -> torch.Tensor:
    """Grouped-query attention without repeating keys: ``q [N, kv_heads, group, Lq, D]``, ``k``/``v``
    ``[N, kv_heads, Lk, D]``, ``mask`` (True: attend) broadcastable to ``[N, kv_heads, group, Lq, Lk]``.
    Scores and softmax in float32; returns ``[N, kv_heads, group, Lq, D]`` in ``q``'s dtype."""
    scores = torch.matmul(q.float(), k.float().unsqueeze(2).transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(probs, v.float().unsqueeze(2)).to(q.dtype)


class GatheredWindowAttention:
    """A layer's windowed attention computed by the backend over vLLM's paged cache (any device, any dtype)."""

    def __init__(self, impl: Any, window: int, layout: Any) -> None:
        self.impl, self.window, self.layout = impl, window, layout
        self.num_heads, self.num_kv_heads, self.head_size = impl.num_heads, impl.num_kv_heads, impl.head_size
        self.group = self.num_heads // self.num_kv_heads
        # FlashAttention stores "no soft-cap" as 0; the other impls refuse one.
        self.softcap = getattr(impl, "logits_soft_cap", None) or None

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: Optional[torch.Tensor],
                 meta: Any, k_scale: float, v_scale: float) -> torch.Tensor:
        tokens = query.shape[0]
        q = query.view(tokens, self.num_heads, self.head_size)
        k = key.view(tokens, self.num_kv_heads, self.head_size)
        v = value.view(tokens, self.num_kv_heads, self.head_size)
        cache = kv_cache if kv_cache is not None and kv_cache.numel() > 0 else None  # None: profile/embedding runs
        if cache is not None:
            self.layout.write(k, v, cache, meta.slot_mapping, k_scale, v_scale)
        out = torch.empty_like(q)
        prefill_tokens = meta.num_prefill_tokens
        prefill = meta.prefill_metadata
        if prefill is not None:
            out[:prefill_tokens] = self._prefill(q[:prefill_tokens], k[:prefill_tokens], v[:prefill_tokens], cache,
                                                 prefill)
        decode = meta.decode_metadata
        if decode is not None:
            out[prefill_tokens:] = self._decode(q[prefill_tokens:], cache, decode)
        return out.view(tokens, self.num_heads * self.head_size)

    def _grouped(self, q: torch.Tensor) -> torch.Tensor:
        """``[L, heads, D]`` -> ``[1, kv_heads, group, L, D]`` (head h reads KV head h // group, as vLLM and HF)."""
        return q.view(q.shape[0], self.num_kv_heads, self.group, self.head_size).permute(1, 2, 0, 3).unsqueeze(0)

    def _decode(self, q: torch.Tensor, cache: torch.Tensor, meta: Any) -> torch.Tensor:
        batch, window = q.shape[0], self.window
        block_size = self.layout.block_size(cache)
        # Positions of the last `window` tokens of every sequence (oldest first); those before 0 are masked.
        positions = meta.seq_lens_tensor[:batch].long().unsqueeze(1) - window + torch.arange(window, device=q.device)
        valid = positions >= 0
        positions = positions.clamp(min=0)
        blocks = meta.block_tables[:batch].gather(1, positions // block_size)
        keys, values = self.layout.gather(cache, blocks, positions % block_size)  # [batch, window, kv_heads, D]
        out = attend(q.view(batch, self.num_kv_heads, self.group, 1, self.head_size), keys.transpose(1, 2),
                     values.transpose(1, 2), valid.view(batch, 1, 1, 1, window), self.impl.scale, self.softcap)
        return out.reshape(batch, self.num_heads, self.head_size)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: Optional[torch.Tensor],
                 meta: Any) -> torch.Tensor:
        seq_lens = list(meta.seq_lens)
        block_tables = getattr(meta, "block_tables", None)
        with_context = cache is not None and block_tables is not None and block_tables.numel() > 0
        if with_context:  # prefix caching / chunked prefill: queries are each sequence's last tokens
            starts = meta.query_start_loc.tolist()
            query_lens = [b - a for a, b in zip(starts, starts[1:])]
        else:
            query_lens = seq_lens
        out = torch.empty_like(q)
        start = 0
        for i, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens)):
            context = seq_len - query_len
            first_key = max(0, context - self.window + 1)
            if context == 0:
                keys, values = k[start:start + query_len], v[start:start + query_len]
            else:
                positions = torch.arange(first_key, seq_len, device=q.device)
                block_size = self.layout.block_size(cache)
                keys, values = self.layout.gather(cache, block_tables[i][positions // block_size],
                                                  positions % block_size)
            out[start:start + query_len] = self._prompt(q[start:start + query_len], keys, values, context, first_key)
            start += query_len
        return out

    def _prompt(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, context: int,
                first_key: int) -> torch.Tensor:
        """One sequence's queries (positions ``context...``) over its keys (positions ``first_key...``)."""
        out = torch.empty_like(q)
        for lo in range(0, q.shape[0], _QUERY_CHUNK):
            hi = min(q.shape[0], lo + _QUERY_CHUNK)
            key_lo = max(first_key, context + lo - self.window + 1)
            key_hi = context + hi
            q_pos = torch.arange(context + lo, key_hi, device=q.device).unsqueeze(1)
            k_pos = torch.arange(key_lo, key_hi, device=q.device).unsqueeze(0)
            mask = (k_pos <= q_pos) & (k_pos > q_pos - self.window)
            chunk_keys = keys[key_lo - first_key:key_hi - first_key].permute(1, 0, 2).unsqueeze(0)
            chunk_values = values[key_lo - first_key:key_hi - first_key].permute(1, 0, 2).unsqueeze(0)
            o = attend(self._grouped(q[lo:hi]), chunk_keys, chunk_values, mask, self.impl.scale, self.softcap)
            out[lo:hi] = o[0].permute(2, 0, 1, 3).reshape(hi - lo, self.num_heads, self.head_size)
        return out


@dataclass(frozen=True)
class FlashKernels:
    """The FlashAttention calls vLLM 0.6.2's FlashAttention backend makes (its custom ops) plus the decode kernel
    with a window, which vLLM's custom op does not pass on."""

    write: Callable  # torch.ops.vllm.reshape_and_cache_flash
    varlen: Callable  # torch.ops.vllm.flash_attn_varlen_func (takes window_size as a list)
    with_kvcache: Callable  # vllm.vllm_flash_attn.flash_attn_with_kvcache (takes window_size)


def vllm_flash_kernels() -> Optional[FlashKernels]:
    """vLLM's FlashAttention kernels, if its decode kernel takes a window (vllm-flash-attn's does)."""
    try:
        from vllm.vllm_flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    try:
        takes_window = "window_size" in inspect.signature(flash_attn_with_kvcache).parameters
    except (TypeError, ValueError):
        takes_window = False
    if not takes_window:
        return None
    return FlashKernels(torch.ops.vllm.reshape_and_cache_flash, torch.ops.vllm.flash_attn_varlen_func,
                        flash_attn_with_kvcache)


class FlashWindowAttention:
    """vLLM 0.6.2's FlashAttention forward with the layer's window in every kernel call (vLLM passes its window,
    when it has one at all, to the prompt-only call)."""

    def __init__(self, impl: Any, window: int, kernels: FlashKernels) -> None:
        # FlashAttention's window is (left, right) around the query, both inclusive: window - 1 keys before it.
        self.impl, self.window_size, self.kernels = impl, (window - 1, 0), kernels

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: Optional[torch.Tensor],
                 meta: Any, k_scale: float, v_scale: float) -> torch.Tensor:
        impl, kernels = self.impl, self.kernels
        hidden = query.shape[1]
        query = query.view(-1, impl.num_heads, impl.head_size)
        key = key.view(-1, impl.num_kv_heads, impl.head_size)
        value = value.view(-1, impl.num_kv_heads, impl.head_size)
        if kv_cache is not None:
            kernels.write(key, value, kv_cache, meta.slot_mapping.flatten(), impl.kv_cache_dtype, k_scale, v_scale)
        prefill_tokens = meta.num_prefill_tokens
        outputs = []
        if (prefill := meta.prefill_metadata) is not None:
            common = dict(softmax_scale=impl.scale, causal=True, window_size=list(self.window_size),
                          alibi_slopes=impl.alibi_slopes, softcap=impl.logits_soft_cap)
            if kv_cache is None or prefill.block_tables is None or prefill.block_tables.numel() == 0:
                outputs.append(kernels.varlen(
                    q=query[:prefill_tokens], k=key[:prefill_tokens], v=value[:prefill_tokens],
                    cu_seqlens_q=prefill.seq_start_loc, cu_seqlens_k=prefill.seq_start_loc,
                    max_seqlen_q=prefill.max_prefill_seq_len, max_seqlen_k=prefill.max_prefill_seq_len, **common))
            else:  # cached prefix or chunked prefill: keys from the cache through the block table
                outputs.append(kernels.varlen(
                    q=query[:prefill_tokens], k=kv_cache[0], v=kv_cache[1], cu_seqlens_q=prefill.query_start_loc,
                    max_seqlen_q=prefill.max_query_len, cu_seqlens_k=prefill.seq_start_loc,
                    max_seqlen_k=max(prefill.seq_lens), block_table=prefill.block_tables, **common))
        if (decode := meta.decode_metadata) is not None:
            outputs.append(kernels.with_kvcache(
                query[prefill_tokens:].unsqueeze(1), kv_cache[0], kv_cache[1], block_table=decode.block_tables,
                cache_seqlens=decode.seq_lens_tensor, softmax_scale=impl.scale, causal=True,
                window_size=self.window_size, alibi_slopes=impl.alibi_slopes,
                softcap=impl.logits_soft_cap).squeeze(1))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
        return out.view(-1, hidden)


# --- choosing the computation ------------------------------------------------------------------------


def _windowed_computation(impl: Any, window: int) -> Any:
    from . import envs
    from .base import BackendError

    name = type(impl).__name__
    if _impl_class_is(impl, "vllm.attention.backends.flash_attn", "FlashAttentionImpl"):
        kernels = vllm_flash_kernels()
        if kernels is not None and envs.VLLM_TRANSFORMERS_BACKEND_FLASH_WINDOW:
            return FlashWindowAttention(impl, window, kernels)
        if kernels is None:
            logger.warning("vllm_flash_attn.flash_attn_with_kvcache takes no window_size: sliding-window layers "
                           "attend through the backend's gathered attention")
        return GatheredWindowAttention(impl, window, FlashLayout(impl.kv_cache_dtype))
    paged = _paged_attention_of(impl)
    known = (_impl_class_is(impl, "vllm.attention.backends.torch_sdpa", "TorchSDPABackendImpl")
             or _impl_class_is(impl, "vllm.attention.backends.xformers", "XFormersImpl"))
    from vllm.attention.ops.paged_attn import PagedAttention

    if known and paged is PagedAttention:
        if impl.kv_cache_dtype != "auto":
            raise BackendError(f"per-layer sliding windows with {name} need an unquantized KV cache "
                               f"(kv_cache_dtype={impl.kv_cache_dtype!r}); use kv_cache_dtype='auto'.")
        return GatheredWindowAttention(impl, window, PagedLayout(paged, impl.num_kv_heads, impl.head_size,
                                                                 impl.kv_cache_dtype))
    raise BackendError(
        f"a layer of this model attends within a sliding window of {window} tokens, which vLLM 0.6.2's {name} cannot "
        "apply per layer and whose cache layout the backend does not know. Use the FlashAttention backend (CUDA, "
        "bf16/fp16; the default there) or XFormers, or set max_model_len <= "
        f"{window} (then the window never applies).")


class WindowedAttention(nn.Module):
    """One layer's vLLM ``Attention`` (built without a window) attending within ``window`` tokens."""

    def __init__(self, attn: nn.Module, window: int) -> None:
        super().__init__()
        self.attn = attn
        self.window = window
        self.computation = _windowed_computation(attn.impl, window)

    @property
    def kind(self) -> str:
        """``"flash"`` or ``"gathered"``: which computation applies the window."""
        return "flash" if isinstance(self.computation, FlashWindowAttention) else "gathered"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: Optional[torch.Tensor],
                attn_metadata: Any) -> torch.Tensor:
        return self.computation(q, k, v, kv_cache, attn_metadata, self.attn._k_scale, self.attn._v_scale)

    def extra_repr(self) -> str:
        return f"window={self.window}, computation={self.kind}"
