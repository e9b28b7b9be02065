"""Which model class vLLM builds: ``model_impl`` resolution.

``transformers`` forces the backend, ``vllm`` forces vLLM's own model, ``auto`` takes vLLM's own when
vLLM 0.6.2 has one of the config's architectures and the backend otherwise. With ``runner="pooling"``
vLLM's own counts only for its embedding architectures (0.6.2 cannot pool a ``...ForCausalLM``), and the
backend builds its embedding model, or its sequence-classification model for the classify / score /
reward tasks. Called by the patched
``get_model_architecture`` at model load and per request (input processing), so it is cheap and always
returns the same class object for the same model.

Decode step: not on it (runs when the engine loads the model and per request's input processing).
"""
from __future__ import annotations

from typing import Any, Callable, Set, Tuple, Type

from torch import nn

from .options import HEAD_TASKS, pooling_task_of, runner_of

_logged: Set[Tuple[str, str, str]] = set()


def _log_choice(model_config: Any, impl: str, choice: str, arch: str) -> None:
    key = (str(getattr(model_config, "model", "")), impl, choice)
    if key in _logged:
        return
    _logged.add(key)
    from ._logging import get_logger

    get_logger(__name__).info("model_impl=%r: %s runs %s for %s", impl, arch, choice, key[0])


def native_architecture(architectures: list) -> str | None:
    from vllm.model_executor.models import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    return next((a for a in architectures if a in supported), None)


def native_architecture_for(model_config: Any, architectures: list) -> str | None:
    """vLLM's own architecture able to run this config's runner, if any."""
    arch = native_architecture(architectures)
    if arch is None or runner_of(model_config) != "pooling":
        return arch
    from vllm.model_executor.models import ModelRegistry

    return arch if ModelRegistry.is_embedding_model(arch) else None


def runs_on_backend(model_config: Any) -> bool:
    """Whether ``model_impl`` resolves to the backend for this config (``auto``: vLLM has no own
    implementation of its architectures for its runner)."""
    impl = getattr(model_config, "model_impl", "auto")
    if impl in ("vllm", "transformers"):
        return impl == "transformers"
    architectures = list(getattr(model_config.hf_config, "architectures", None) or [])
    return native_architecture_for(model_config, architectures) is None


def backend_class(model_config: Any) -> Type[nn.Module]:
    if pooling_task_of(model_config) in HEAD_TASKS:
        from .sequence_classification import TransformersForSequenceClassification

        return TransformersForSequenceClassification
    if runner_of(model_config) == "pooling":
        from .pooling import TransformersForEmbedding

        return TransformersForEmbedding
    from .causal import TransformersForCausalLM

    return TransformersForCausalLM


def resolve_model_architecture(model_config: Any, native: Callable[[Any], Tuple[Type[nn.Module], str]]):
    impl = getattr(model_config, "model_impl", "auto")
    architectures = list(getattr(model_config.hf_config, "architectures", None) or [])
    if impl == "vllm" and runner_of(model_config) == "pooling" and not native_architecture_for(
            model_config, architectures):
        raise ValueError(
            f"vLLM 0.6.2 has no embedding implementation of {architectures}: runner='pooling' with "
            "model_impl='vllm' works only for its own embedding models. Use model_impl='transformers' (or 'auto')."
        )
    if not runs_on_backend(model_config):
        cls, arch = native(model_config)
        _log_choice(model_config, impl, f"vLLM's own {cls.__name__}", arch)
        return cls, arch
    cls = backend_class(model_config)
    arch = architectures[0] if architectures else cls.__name__
    _log_choice(model_config, impl, f"the Transformers backend ({cls.__name__})", arch)
    return cls, arch
