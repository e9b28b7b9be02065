"""Patch of ``vllm.config.ModelConfig.__init__`` (vLLM 0.6.2): ``model_impl``.

``__init__`` takes ``model_impl`` (or the value ``EngineArgs.create_model_config`` is passing) and
stores it before vLLM's own checks run, so that everything downstream, including worker processes
that receive the pickled config, can see it. (``head_dim=None`` configs are normalised where vLLM
loads them: the hf_config patch.)
"""
from __future__ import annotations

from ._base import Patch, is_wrapped, wrap
from .engine_args import PENDING_MODEL_IMPL, validate_model_impl


class ModelConfigPatch(Patch):
    name = "model_config"
    target = "vllm.config.ModelConfig.__init__: model_impl"

    def _owner(self):
        from vllm.config import ModelConfig

        return ModelConfig

    def is_applied(self) -> bool:
        return is_wrapped(self._owner().__dict__["__init__"], self.name)

    def _apply(self) -> None:
        def make_init(original):
            def __init__(self, *args, model_impl=None, **kwargs):
                if model_impl is None:
                    model_impl = PENDING_MODEL_IMPL.get()
                self.model_impl = validate_model_impl(model_impl)
                original(self, *args, **kwargs)

            return __init__

        wrap(self._owner(), "__init__", self.name, make_init)
