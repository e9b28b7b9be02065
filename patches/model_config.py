"""Patch of ``vllm.config.ModelConfig`` (vLLM 0.6.2): ``model_impl`` and ``get_head_size``.

* ``__init__`` takes ``model_impl`` (or the value ``EngineArgs.create_model_config`` is passing) and
  stores it before vLLM's own checks run, so that everything downstream, including worker processes
  that receive the pickled config, can see it.
* ``get_head_size`` returns ``None`` for configs that carry ``head_dim=None``; it falls back to
  ``hidden_size // num_attention_heads`` (the hf_config patch also normalises the config itself, but a
  config handed over from elsewhere may not have passed through it).
"""
from __future__ import annotations

from ._base import Patch, is_wrapped, wrap
from .engine_args import PENDING_MODEL_IMPL, validate_model_impl


class ModelConfigPatch(Patch):
    name = "model_config"
    target = "vllm.config.ModelConfig.__init__ (model_impl) and .get_head_size (head_dim=None)"

    def _owner(self):
        from vllm.config import ModelConfig

        return ModelConfig

    def is_applied(self) -> bool:
        owner = self._owner()
        return is_wrapped(owner.__dict__["__init__"], self.name) and is_wrapped(owner.get_head_size, self.name)

    def _apply(self) -> None:
        owner = self._owner()

        def make_init(original):
            def __init__(self, *args, model_impl=None, **kwargs):
                if model_impl is None:
                    model_impl = PENDING_MODEL_IMPL.get()
                self.model_impl = validate_model_impl(model_impl)
                original(self, *args, **kwargs)

            return __init__

        def make_get_head_size(original):
            def get_head_size(self):
                head_size = original(self)
                if head_size is None:
                    text_config = self.hf_text_config
                    return text_config.hidden_size // text_config.num_attention_heads
                return head_size

            return get_head_size

        wrap(owner, "__init__", self.name, make_init)
        wrap(owner, "get_head_size", self.name, make_get_head_size)
