"""The HF model the backend wraps: building it on the meta device, and what the backend reads off it.

Used by the backend (:mod:`.base`) while it builds a model and by ``check`` (no weights, no engine), so
that both decide the same way: the build and its error classification, the body (base model) and its
name in checkpoints, the output embedding, the attention modules, whether the model is an encoder.
Decode step: not on it (everything here runs once, at load).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple

from torch import nn

from . import compat, legacy_attention
from ._logging import preview
from .attention import ATTN_IMPLEMENTATION


class BackendError(ValueError):
    """The model cannot run on the Transformers backend (the message says why and what to do)."""


class AttentionInterfaceError(BackendError):
    """The model's attention does not go through transformers' attention interface."""

    def __init__(self, config: Any, detail: object, name_keyed: bool = False) -> None:
        self.detail = str(detail)
        #: the modeling code picks attention classes from a dict keyed by implementation name
        self.name_keyed = name_keyed
        arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        super().__init__(
            f"{arch} does not support the Transformers attention interface in transformers "
            f"{compat.transformers_version()} ({detail}). The backend needs a model whose attention modules "
            "call ALL_ATTENTION_FUNCTIONS[config._attn_implementation], carry `layer_idx`, pass **kwargs down, "
            "and whose class sets `_supports_attention_backend = True`. Fix: upgrade transformers, adapt the "
            "custom modeling code, or use model_impl='vllm' if vLLM has the architecture."
            + compat.attention_interface_hint(getattr(config, "model_type", None))
        )


class NoAutoClassError(BackendError):
    """transformers has no class of the requested auto class for this config."""


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters are created on the meta device, buffers where the ambient device says."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            kwargs = dict(param.__dict__)
            module._parameters[name] = type(param)(param.to("meta"), **kwargs) if kwargs else \
                nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


# --- building -------------------------------------------------------------------------------------


def _configs_to_try(config: Any) -> Iterator[Any]:
    """The config as vLLM loaded it, then, for the configs vLLM 0.6.2 loads with classes of its own (Granite,
    ...) that transformers' auto classes do not know, transformers' own class for the same model_type."""
    yield config
    try:
        yield compat.transformers_config(config)
    except ValueError:  # not a model type transformers knows either
        pass


def build(config: Any, auto_class: str, *, dtype: Any, trust_remote_code: bool,
          attn_implementation: str = ATTN_IMPLEMENTATION) -> nn.Module:
    """``transformers.<auto_class>.from_config(config)`` with its parameters on the meta device (buffers
    on the ambient device) and ``attn_implementation``, in ``dtype``. ``config`` is set up for it in place
    (attention implementation, dtype).

    A model whose installed transformers code picks attention classes by name (the release predates the
    interface for its type, or the name lookup fails) is built with its SDPA classes, their SDPA call routed
    to the ``"vllm"`` function (:mod:`.legacy_attention`).

    Raises :class:`AttentionInterfaceError` when the model cannot take the implementation and
    :class:`NoAutoClassError` when transformers has no such class for the config."""
    import transformers

    auto = getattr(transformers, auto_class)
    text_config = compat.get_text_config(config)
    wants_vllm = attn_implementation == ATTN_IMPLEMENTATION
    for candidate in _configs_to_try(config):
        candidate_text = compat.get_text_config(candidate)  # the text model's attention only (not a vision tower's)
        for cfg in {id(candidate): candidate, id(candidate_text): candidate_text}.values():
            compat.set_config_dtype(cfg, dtype)
        try:
            if wants_vllm and compat.predates_interface(getattr(candidate_text, "model_type", None)):
                return _from_config_routed(auto, candidate, candidate_text, dtype, trust_remote_code)
            candidate_text._attn_implementation = attn_implementation
            try:
                return _from_config(auto, candidate, dtype, trust_remote_code, attn_implementation)
            except AttentionInterfaceError as exc:
                if not (wants_vllm and exc.name_keyed):
                    raise
            return _from_config_routed(auto, candidate, candidate_text, dtype, trust_remote_code)
        except ValueError as exc:
            if not _unrecognized(exc):
                raise
    raise NoAutoClassError(
        f"transformers has no {auto_class} class for model_type {getattr(text_config, 'model_type', '?')!r}. If "
        "this is an encoder or embedding model, run it with runner='pooling'; a custom model needs `auto_map` and "
        "trust_remote_code=True.")


def _from_config_routed(auto: Any, config: Any, text_config: Any, dtype: Any, trust_remote_code: bool) -> nn.Module:
    """A model built without the interface: its SDPA classes, routed (:mod:`.legacy_attention`)."""
    implementation = legacy_attention.LEGACY_IMPLEMENTATION
    text_config._attn_implementation = implementation
    model = _from_config(auto, config, dtype, trust_remote_code, implementation)
    if not legacy_attention.route(model):
        raise AttentionInterfaceError(config, "its attention classes are picked by implementation name and none of "
                                              "its modules calls scaled_dot_product_attention")
    legacy_attention.number_layers(model, getattr(text_config, "num_hidden_layers", None))
    return model


def _unrecognized(exc: Exception) -> bool:
    return "Unrecognized configuration class" in str(exc)


def _from_config(auto: Any, config: Any, dtype: Any, trust_remote_code: bool, attn_implementation: str) -> nn.Module:
    with parameters_on_meta():
        try:
            return auto.from_config(config, trust_remote_code=trust_remote_code,
                                    attn_implementation=attn_implementation, **compat.dtype_kwargs(dtype))
        except KeyError as exc:
            # transformers < 4.49 models that pick attention classes from a dict keyed by name
            if exc.args == (attn_implementation,):
                raise AttentionInterfaceError(config, "its attention classes are looked up by implementation "
                                                      "name", name_keyed=True) from exc
            raise
        except ValueError as exc:
            message = str(exc)
            if not _unrecognized(exc) and ("attn_implementation" in message or "attention" in message.lower()):
                raise AttentionInterfaceError(config, exc) from exc
            raise


def check_attention_backend_support(hf_model: nn.Module) -> None:
    """transformers >= 4.50 declares ``_supports_attention_backend``; False means the modeling code bypasses
    the interface (a model whose SDPA classes the backend routed says so too: the first forward checks those)."""
    if getattr(type(hf_model), "_supports_attention_backend", None) is False and \
            not any(legacy_attention.is_routed(module) for module in hf_model.modules()):
        raise AttentionInterfaceError(hf_model.config, "_supports_attention_backend is False")


def undispatched_layers(missing: Sequence[int]) -> str:
    """What the first forward (the backend's, or ``check``'s on meta) says about layers that never reached
    the ``"vllm"`` attention function."""
    return (f"layers {preview(missing)} did not call the 'vllm' attention function (their modules ignore "
            "config._attn_implementation or drop **kwargs)")


# --- what the backend reads off the model ------------------------------------------------------------


def base_model_of(hf_model: nn.Module) -> Tuple[str, nn.Module]:
    """The body the wrapper calls and the attribute name it has in HF checkpoints."""
    prefix = getattr(hf_model, "base_model_prefix", "")
    body = getattr(hf_model, prefix, None) if prefix else None
    if body is None:
        getter = getattr(hf_model, "get_decoder", None)
        body = getter() if callable(getter) else None
    if body is None or body is hf_model:
        return "", hf_model
    name = next((n for n, child in hf_model.named_children() if child is body), prefix)
    return name, body


def output_embedding_names(hf_model: nn.Module) -> List[str]:
    """Qualified names of HF's output embedding (``lm_head``, ``embed_out``), if the model has one."""
    getter = getattr(hf_model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return []
    return [name for name, module in hf_model.named_modules() if module is head]


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear storing its weight as ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_linear(module: nn.Module) -> bool:
    """What the backend replaces by a vLLM linear: ``nn.Linear`` and GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: nn.Module) -> Tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_features, out_features = module.weight.shape
    return int(in_features), int(out_features)


def _names_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


def _innermost(modules: Iterable[nn.Module]) -> List[nn.Module]:
    found = list(modules)
    ids = {id(m) for m in found}
    return [m for m in found if not any(id(c) in ids for c in m.modules() if c is not m)]


def attention_modules(body: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The attention module of each layer: the first module per ``layer_idx`` whose class name says attention;
    else (custom code calls them anything) the innermost modules carrying an integer ``layer_idx``."""
    found: List[Tuple[str, nn.Module]] = []
    seen: set = set()
    for name, module in body.named_modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and _names_attention(module) and idx not in seen:
            seen.add(idx)
            found.append((name, module))
    if found:
        return found
    carriers = [(n, m) for n, m in body.named_modules() if isinstance(getattr(m, "layer_idx", None), int)]
    inner = {id(m) for m in _innermost(m for _, m in carriers)}
    return [(n, m) for n, m in carriers if id(m) in inner]


@dataclass
class ModelKind:
    """Decoder or encoder, as upstream decides it: attention modules declaring ``is_causal = False`` make an
    encoder. Older encoder code (BERT-style, transformers 4) declares ``is_decoder`` instead."""

    kind: str  # "decoder" | "encoder" | "mixed"
    evidence: str
    #: the attention modules the verdict rests on (innermost ones)
    modules: List[nn.Module] = field(default_factory=list)


def model_kind(model: nn.Module) -> ModelKind:
    candidates = {id(m): m for m in model.modules() if _names_attention(m)}
    candidates.update({id(m): m for _, m in attention_modules(model)})
    declared = _innermost(m for m in candidates.values() if isinstance(getattr(m, "is_causal", None), bool))
    if declared:
        if len({m.is_causal for m in declared}) > 1:
            flags = sorted({f"{type(m).__name__}={m.is_causal}" for m in declared})
            return ModelKind("mixed", "is_causal=True and False: " + ", ".join(flags), declared)
        kind = "decoder" if declared[0].is_causal else "encoder"
        classes = sorted({type(m).__name__ for m in declared})
        return ModelKind(kind, f"is_causal={kind == 'decoder'} on " + ", ".join(classes), declared)
    legacy = _innermost(m for m in candidates.values() if isinstance(getattr(m, "is_decoder", None), bool))
    if legacy and not any(m.is_decoder for m in legacy):
        return ModelKind("encoder", "no is_causal; is_decoder=False on " + ", ".join(sorted({type(m).__name__
                                                                                            for m in legacy})), legacy)
    return ModelKind("decoder", "no attention module says is_causal=False")
