"""Sliding windows per layer: which layers attend within a window, and what vLLM 0.6.2 is told.

vLLM 0.6.2 knows one sliding window for the whole engine (``ModelConfig.get_sliding_window()``, handed to
``CacheConfig.sliding_window``). Read from its source, it does this with it:

* **Per instance?** ``Attention.__init__`` takes the window from ``cache_config`` only, so every layer gets
  the same one. The impl receives it at construction (one impl per ``Attention``), so an ``Attention`` given
  its own ``CacheConfig`` copy would hold its own window; but on CUDA a window also switches that layer's
  backend from FlashAttention to XFormers (``selector.which_attn_to_use``), whose metadata is not the one the
  runner builds for the engine. And a per-impl window does not help where the backends apply it:
* **Which backend applies it where** (impl files under ``vllm/attention/backends/``):

  ================= ======================================== =================================================
  backend           prompt (prefill)                         decode step (paged cache)
  ================= ======================================== =================================================
  FlashAttention    the impl **refuses** any window, so the   ``flash_attn_with_kvcache`` without a window
  (CUDA fp16/bf16)  selector falls back to XFormers; the     (vLLM clips block tables instead); the kernel
                    varlen kernel takes ``window_size``,     takes ``window_size`` with a block table.
                    also with a block table (prefix
                    caching, chunked prefill), where vLLM
                    passes none
  XFormers (CUDA)   ``make_local_attention(window)``, but    paged-attention kernel: no window at all
                    the mask is cached on the step's         (clipped block tables). Prefix-cached and
                    metadata and reused by every layer       chunked prompts: the Triton prefix kernel
                                                             takes the impl's window
  Torch SDPA (CPU)  a window mask, also cached on the        paged-attention kernel: no window (clipped
                    metadata and reused by every layer       block tables); no prefix caching, no chunked
                                                             prefill on the CPU
  FlashInfer        refuses any window                       refuses any window
  ================= ======================================== =================================================

* **Model runner** (``worker/model_runner.py:_compute_for_sliding_window``, ``cpu_model_runner.py``):
  decode steps clip every sequence's length and block table to the window, prompt slots before the window
  are not written, and the block manager (``block_manager_v1``) recycles blocks as a ring of
  ``ceil(window / block_size)``; prefix caching and chunked prefill are refused with a window. All of this is
  per engine, for every layer.
* vLLM's own Gemma 2 turns the window off and caps ``max_model_len`` to it (``ModelConfig.__init__``).

So no vLLM backend applies a window per layer in decode steps, and the shared mask breaks prompts as soon
as two layers differ: interleaved windows (Gemma 2, Gemma 3, ``layer_types``) cannot be expressed through
vLLM. The backend therefore:

* derives each layer's window from the config (:func:`layer_windows`: ``layer_types``, else
  ``sliding_window_pattern``, else Gemma 2's alternation, else Qwen2's ``use_sliding_window`` /
  ``max_window_layers``, else one ``sliding_window`` for all);
* keeps vLLM's own mechanism when every layer has vLLM's window (Mistral-style configs);
* otherwise turns vLLM's global window off for the model (``ModelConfig.disable_sliding_window``, set by the
  ``model_config`` patch after vLLM's ``__init__``, and no Gemma 2 cap: the ``rope`` patch's wrapper of the
  length check), so the KV cache keeps every token and no block table is clipped, and gives each layer whose
  window is shorter than ``max_model_len`` a :class:`~.windowed_attention.WindowedAttention` (FlashAttention's
  own window on CUDA, the backend's attention over vLLM's paged cache elsewhere; see that module).

A window is the number of keys a query sees, itself included (``q - k < window``), as transformers applies it.

Decode step: not on it (decides at load which layers :mod:`.windowed_attention` windows).
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

SLIDING = "sliding_attention"
FULL = "full_attention"
#: Llama 4's chunked attention restarts at chunk boundaries: it is not a sliding window.
_REFUSED_LAYER_TYPES = ("chunked_attention",)


class SlidingWindowError(ValueError):
    """The config's windows cannot be applied (the message says why and what to do)."""


# --- which layer has which window ----------------------------------------------------------------


def _num_layers(text_config: Any) -> int:
    return int(getattr(text_config, "num_hidden_layers", 0) or 0)


def _window(text_config: Any) -> Optional[int]:
    window = getattr(text_config, "sliding_window", None)
    return int(window) if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


def layer_windows(text_config: Any) -> List[Optional[int]]:
    """Each decoder layer's window (``None``: full context), as the config's own transformers model applies it."""
    n = _num_layers(text_config)
    window = _window(text_config)
    layer_types = getattr(text_config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and layer_types:
        refused = sorted({t for t in layer_types if t in _REFUSED_LAYER_TYPES})
        if refused:
            raise SlidingWindowError(
                f"layer_types {refused} are not sliding windows (attention restarts at chunk boundaries); the "
                "Transformers backend on vLLM 0.6.2 applies full and sliding-window attention only.")
        if len(layer_types) != n:
            raise SlidingWindowError(f"config.layer_types has {len(layer_types)} entries for {n} layers")
        return [window if t == SLIDING else None for t in layer_types]
    if window is None:
        return [None] * n
    pattern = getattr(text_config, "sliding_window_pattern", None) or getattr(text_config, "_sliding_window_pattern",
                                                                              None)
    if isinstance(pattern, int) and pattern > 0:  # Gemma 3 / Cohere 2 before layer_types: every pattern-th is full
        return [window if (i + 1) % pattern else None for i in range(n)]
    if getattr(text_config, "model_type", None) == "gemma2":  # before layer_types: even layers slide
        return [window if i % 2 == 0 else None for i in range(n)]
    if hasattr(text_config, "use_sliding_window"):  # Qwen2 family: the first max_window_layers attend fully
        if not text_config.use_sliding_window:
            return [None] * n
        first = int(getattr(text_config, "max_window_layers", 0) or 0)
        return [window if i >= first else None for i in range(n)]
    return [window] * n


def vllm_global_window(text_config: Any) -> Optional[int]:
    """The window vLLM 0.6.2 would apply to every layer (``ModelConfig.get_hf_config_sliding_window``)."""
    if hasattr(text_config, "use_sliding_window") and not text_config.use_sliding_window:
        return None
    return getattr(text_config, "sliding_window", None)


def needs_per_layer(windows: Sequence[Optional[int]], vllm_window: Optional[int]) -> bool:
    """Whether vLLM's one window misdescribes the layers (then the backend applies them per layer)."""
    return any(w != vllm_window for w in windows)


def describe(windows: Sequence[Optional[int]], layer_types: Optional[Sequence[str]] = None) -> List[str]:
    """``["sliding_attention x5: window 512 (layers 0-4, 6-10, ...)", "full_attention x1: full context ..."]``."""
    groups: Dict[Tuple[str, Optional[int]], List[int]] = {}
    for i, w in enumerate(windows):
        kind = (layer_types[i] if layer_types and i < len(layer_types) else (SLIDING if w else FULL))
        groups.setdefault((kind, w), []).append(i)
    rows = []
    for (kind, w), layers in groups.items():
        shown = ", ".join(map(str, layers[:8])) + (f", ... {len(layers) - 8} more" if len(layers) > 8 else "")
        rows.append(f"{kind} x{len(layers)}: {'window ' + str(w) if w else 'full context'} (layers {shown})")
    return rows


# --- vLLM's ModelConfig (the model_config and sliding_window patches) ------------------------------


def _backend_runs(model_config: Any) -> bool:
    """Whether the backend builds this model (as the registry resolves ``model_impl``; by generation runner)."""
    impl = getattr(model_config, "model_impl", "auto")
    if impl == "transformers":
        return True
    if impl != "auto":
        return False
    from .registry import native_architecture

    return native_architecture(list(getattr(model_config.hf_config, "architectures", None) or [])) is None


def _per_layer(model_config: Any) -> Optional[List[Optional[int]]]:
    """The layers' windows when the backend must apply them per layer for this ModelConfig, else None."""
    if not _backend_runs(model_config):
        return None
    text_config = model_config.hf_text_config
    try:
        windows = layer_windows(text_config)
    except SlidingWindowError:
        return None  # the backend raises it with the model's name at build time
    return windows if needs_per_layer(windows, model_config.get_hf_config_sliding_window()) else None


#: The ModelConfig vLLM is constructing and whether its user asked for disable_sliding_window.
_CONSTRUCTING: contextvars.ContextVar[Optional[Tuple[Any, bool]]] = contextvars.ContextVar(
    "vllm_transformers_backend_model_config", default=None)


@contextlib.contextmanager
def model_config_scope(model_config: Any, init: Callable, args: tuple, kwargs: dict) -> Iterator[None]:
    """Around vLLM's ``ModelConfig.__init__`` (the model_config patch). Inside: vLLM's Gemma 2 cap is lifted
    for models the backend windows per layer (:func:`keeps_full_context`). After: their global window is off,
    and ``model_config.backend_layer_windows`` holds the per-layer windows."""
    try:
        requested = inspect.signature(init).bind_partial(model_config, *args, **kwargs).arguments
    except TypeError:  # a fork's signature: vLLM's own __init__ reports the problem
        requested = kwargs
    token = _CONSTRUCTING.set((model_config, bool(requested.get("disable_sliding_window", False))))
    try:
        yield
    finally:
        _CONSTRUCTING.reset(token)
    windows = _per_layer(model_config)
    model_config.backend_layer_windows = windows
    if windows is not None:
        # vLLM's meaning of the flag: no engine-wide window (cache config, block manager, runners, selector).
        model_config.disable_sliding_window = True


def keeps_full_context() -> bool:
    """Inside vLLM's ``_get_and_verify_max_len`` (the sliding_window patch): True when vLLM disabled the window
    on its own (Gemma 2) for a model the backend windows per layer, so ``max_model_len`` must not be capped."""
    current = _CONSTRUCTING.get()
    if current is None:
        return False
    model_config, user_disabled = current
    return not user_disabled and _per_layer(model_config) is not None


# --- the backend's layers ----------------------------------------------------------------------------


def backend_windows(model_config: Any, text_config: Any, cache_config: Any) -> List[Optional[int]]:
    """Per layer, the window the backend applies itself (``None``: vLLM's ``Attention`` as it is, which applies
    vLLM's global window if it has one). A window no shorter than ``max_model_len`` never takes effect."""
    from .base import BackendError

    try:
        windows = layer_windows(text_config)
    except SlidingWindowError as exc:
        raise BackendError(str(exc)) from exc
    global_window = getattr(cache_config, "sliding_window", None) if cache_config is not None else None
    if global_window is not None:
        if needs_per_layer(windows, global_window):
            raise BackendError(
                f"vLLM applies one sliding window ({global_window}) to every layer, but this model's layers have "
                f"{describe(windows, getattr(text_config, 'layer_types', None))}. The backend turns vLLM's window "
                "off for such models when it is chosen at engine creation (model_impl='transformers', or 'auto' "
                "without a native vLLM model); build the engine that way.")
        return [None] * len(windows)
    max_len = int(model_config.max_model_len)
    return [w if w is not None and w < max_len else None for w in windows]


def check_module_windows(modules: Dict[int, Any], windows: Sequence[Optional[int]], model_name: str) -> None:
    """The HF attention modules that carry ``sliding_window`` must agree with the windows derived from the
    config (a disagreement would be a wrong result, so it is an error)."""
    from .base import BackendError

    wrong = []
    for idx, module in modules.items():
        if idx >= len(windows) or not hasattr(module, "sliding_window"):
            continue
        own = module.sliding_window
        own = None if own in (None, 0, -1) else own
        if isinstance(own, int) and own != windows[idx] or own is None and windows[idx] is not None:
            wrong.append(f"layer {idx}: module {own}, config {windows[idx]}")
    if wrong:
        raise BackendError(f"{model_name}: the sliding windows derived from the config disagree with the attention "
                           f"modules' own ({'; '.join(wrong[:4])}); please report this config.")
