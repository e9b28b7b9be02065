"""Patch of ``vllm.engine.arg_utils.EngineArgs`` / ``AsyncEngineArgs`` (vLLM 0.6.2): the backend's options.

vLLM 0.6.2 has no ``model_impl``, ``runner``/``task`` (embed, classify, score, reward) or ``override_pooler_config``; ``LLM(model_impl=...)``
raises ``TypeError`` in ``EngineArgs``. This patch makes them fields of both dataclasses
(``from_cli_args`` builds the object from ``dataclasses.fields``), validates them, and hands them to
``ModelConfig`` in ``create_model_config``. ``LLM.__init__`` forwards unknown keywords to ``EngineArgs``,
so ``LLM`` needs nothing more. ``create_engine_config`` also refuses, before any worker starts, what the
backend cannot run on the engine's device (quantized checkpoints and LoRA on vLLM's CPU engine:
:mod:`vllm_transformers_backend.engine_checks`).

Decode step: not on it (applied at ``import vllm``; acts when the engine is configured or loads the model).
"""
from __future__ import annotations

import contextvars
import dataclasses
from typing import Any, Dict

from vllm_transformers_backend.options import (DEFAULTS, validate_model_impl, validate_pooler_override,
                                               validate_runner)

from ._base import Patch, PatchError, wrap

#: ``create_model_config`` sets this for the ``ModelConfig`` it builds (see the model_config patch).
PENDING_OPTIONS: contextvars.ContextVar = contextvars.ContextVar("pending_backend_options", default=None)


def validated_options(model_impl: Any = None, runner: Any = None, task: Any = None,
                      override_pooler_config: Any = None) -> Dict[str, Any]:
    return {
        "model_impl": validate_model_impl(model_impl),
        "runner": validate_runner(runner, task),
        "task": None if task is None else str(task).lower(),
        "override_pooler_config": validate_pooler_override(override_pooler_config),
    }


def _field(name: str, default: Any) -> dataclasses.Field:
    field = dataclasses.field(default=default)
    field.name = name
    field.type = "Any"
    field._field_type = dataclasses._FIELD  # type: ignore[attr-defined]
    return field


class EngineArgsPatch(Patch):
    name = "engine_args"
    target = ("vllm.engine.arg_utils.EngineArgs (+ AsyncEngineArgs): model_impl, runner/task, override_pooler_config; "
              "device requirements")

    wraps = (("vllm.engine.arg_utils:EngineArgs", "__init__"), ("vllm.engine.arg_utils:AsyncEngineArgs", "__init__"),
             ("vllm.engine.arg_utils:EngineArgs", "create_model_config"),
             ("vllm.engine.arg_utils:EngineArgs", "create_engine_config"))

    def is_applied(self) -> bool:
        return super().is_applied() and all(name in self.owner(i).__dataclass_fields__
                                            for i in (0, 1) for name in DEFAULTS)

    def _apply(self) -> None:
        engine_args, async_engine_args = self.owner(0), self.owner(1)
        for cls in (engine_args, async_engine_args):
            if not dataclasses.is_dataclass(cls) or "__init__" not in cls.__dict__:
                raise PatchError(f"{cls.__qualname__} is not the dataclass vLLM 0.6.2 defines")
            for name, default in DEFAULTS.items():
                setattr(cls, name, default)
                cls.__dataclass_fields__.setdefault(name, _field(name, default))

            def make_init(original):
                def __init__(self, *args, model_impl=DEFAULTS["model_impl"], runner=DEFAULTS["runner"],
                             task=DEFAULTS["task"], override_pooler_config=None, **kwargs):
                    original(self, *args, **kwargs)
                    options = validated_options(model_impl, runner, task, override_pooler_config)
                    self.model_impl = options["model_impl"]
                    self.runner = options["runner"]
                    self.task = task if task is not None else DEFAULTS["task"]
                    self.override_pooler_config = override_pooler_config

                return __init__

            wrap(cls, "__init__", self.name, make_init)

        def make_create_model_config(original):
            def create_model_config(self):
                options = validated_options(getattr(self, "model_impl", None), getattr(self, "runner", None),
                                            getattr(self, "task", None), getattr(self, "override_pooler_config", None))
                token = PENDING_OPTIONS.set(options)
                try:
                    return original(self)
                finally:
                    PENDING_OPTIONS.reset(token)

            return create_model_config

        wrap(engine_args, "create_model_config", self.name, make_create_model_config)

        def make_create_engine_config(original):
            def create_engine_config(self):
                from vllm_transformers_backend.engine_checks import check_engine_config

                config = original(self)
                check_engine_config(config)
                return config

            return create_engine_config

        wrap(engine_args, "create_engine_config", self.name, make_create_engine_config)
