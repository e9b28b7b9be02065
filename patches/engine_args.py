"""Patch of ``vllm.engine.arg_utils.EngineArgs`` / ``AsyncEngineArgs`` (vLLM 0.6.2): ``model_impl``.

vLLM 0.6.2 has no ``model_impl``; ``LLM(model_impl=...)`` raises ``TypeError`` in ``EngineArgs``.
This patch makes ``model_impl`` a field of both dataclasses (``from_cli_args`` builds the object from
``dataclasses.fields``), validates it, and hands it to ``ModelConfig`` in ``create_model_config``.
``LLM.__init__`` forwards unknown keywords to ``EngineArgs``, so ``LLM`` needs nothing more.
"""
from __future__ import annotations

import contextvars
import dataclasses

from ._base import Patch, PatchError, is_wrapped, wrap

MODEL_IMPLS = ("auto", "vllm", "transformers")
DEFAULT_MODEL_IMPL = "auto"

#: ``create_model_config`` sets this for the ``ModelConfig`` it builds (see the model_config patch).
PENDING_MODEL_IMPL: contextvars.ContextVar = contextvars.ContextVar("pending_model_impl", default=None)


def validate_model_impl(value: object) -> str:
    if value is None:
        return DEFAULT_MODEL_IMPL
    if not isinstance(value, str) or value.lower() not in MODEL_IMPLS:
        raise ValueError(
            f"Unknown model_impl {value!r}. Choose one of {', '.join(MODEL_IMPLS)}: 'vllm' uses vLLM's "
            "own model, 'transformers' the Hugging Face implementation through vllm-transformers-backend, "
            "'auto' vLLM's own when vLLM has the architecture and the Transformers backend otherwise."
        )
    return value.lower()


def _model_impl_field() -> dataclasses.Field:
    field = dataclasses.field(default=DEFAULT_MODEL_IMPL)
    field.name = "model_impl"
    field.type = "str"
    field._field_type = dataclasses._FIELD  # type: ignore[attr-defined]
    return field


class EngineArgsPatch(Patch):
    name = "engine_args"
    target = "vllm.engine.arg_utils.EngineArgs (+ AsyncEngineArgs): model_impl field"

    def _classes(self):
        from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

        return EngineArgs, AsyncEngineArgs

    def is_applied(self) -> bool:
        return all(
            "model_impl" in cls.__dataclass_fields__
            and is_wrapped(cls.__dict__["__init__"], self.name)
            for cls in self._classes()
        ) and is_wrapped(self._classes()[0].create_model_config, self.name)

    def _apply(self) -> None:
        engine_args, async_engine_args = self._classes()
        for cls in (engine_args, async_engine_args):
            if not dataclasses.is_dataclass(cls) or "__init__" not in cls.__dict__:
                raise PatchError(f"{cls.__qualname__} is not the dataclass vLLM 0.6.2 defines")
            cls.model_impl = DEFAULT_MODEL_IMPL
            cls.__dataclass_fields__.setdefault("model_impl", _model_impl_field())

            def make_init(original):
                def __init__(self, *args, model_impl=DEFAULT_MODEL_IMPL, **kwargs):
                    original(self, *args, **kwargs)
                    self.model_impl = validate_model_impl(model_impl)

                return __init__

            wrap(cls, "__init__", self.name, make_init)

        def make_create_model_config(original):
            def create_model_config(self):
                token = PENDING_MODEL_IMPL.set(validate_model_impl(getattr(self, "model_impl", None)))
                try:
                    return original(self)
                finally:
                    PENDING_MODEL_IMPL.reset(token)

            return create_model_config

        wrap(engine_args, "create_model_config", self.name, make_create_model_config)
