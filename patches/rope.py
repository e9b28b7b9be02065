"""Patches of vLLM 0.6.2's RoPE readers for transformers-5 ``rope_parameters``.

Targets: ``vllm.config._get_and_verify_max_len`` and
``vllm.model_executor.layers.rotary_embedding.get_rope`` (re-bound in the model modules already
imported; the others import the patched one).

transformers 5 exposes ``rope_scaling`` as an alias of ``rope_parameters``, which is never None: plain
RoPE reads ``{"rope_type": "default", "rope_theta": ...}`` and models with per-layer RoPE nest one dict
per layer type. vLLM 0.6.2 treats any non-None ``rope_scaling`` as a scaling method: its max-length
check asserts ``"factor" in rope_scaling`` and ``get_rope`` raises on the unknown type. Both now see
None where the parameters describe unscaled RoPE (or per-layer dicts, which no native model handles).

The max-length check has one more caller-side adjustment (this patch owns the wrapper of that target):
vLLM turns Gemma 2's sliding window off and caps ``max_model_len`` to it; for a model the backend windows
per layer (``vllm_transformers_backend.sliding_window``) the length is checked as if the window were on, so
the model keeps its context, unless the user asked for ``disable_sliding_window``. ``ModelConfig.__init__``
passes every argument by keyword.

Decode step: not on it (applied at ``import vllm``; acts when the engine is configured or loads the model).
"""
from __future__ import annotations

import sys
from typing import Any

from ._base import Patch, require_parameters, wrap


def effective_rope_scaling(rope_scaling: Any) -> Any:
    if not isinstance(rope_scaling, dict):
        return rope_scaling
    if rope_scaling and all(isinstance(v, dict) for v in rope_scaling.values()):
        return None
    kind = rope_scaling.get("type", rope_scaling.get("rope_type"))
    return None if kind == "default" else rope_scaling


class _RopeView:
    """The config as vLLM's max-length check should see it (everything else passes through)."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._config, name)
        return effective_rope_scaling(value) if name == "rope_scaling" else value


class RopePatch(Patch):
    name = "rope"
    target = ("vllm.config._get_and_verify_max_len and rotary_embedding.get_rope: transformers-5 rope_parameters; "
              "no Gemma 2 length cap for per-layer windows")

    wraps = (("vllm.config", "_get_and_verify_max_len"), ("vllm.model_executor.layers.rotary_embedding", "get_rope"))

    def _apply(self) -> None:
        from vllm_transformers_backend.sliding_window import keeps_full_context

        config, rotary = self.owner(0), self.owner(1)
        require_parameters(config._get_and_verify_max_len, ["hf_config", "max_model_len", "disable_sliding_window"],
                           self.target)
        require_parameters(rotary.get_rope, ["rope_scaling", "base"], self.target)

        def make_max_len(original):
            def _get_and_verify_max_len(hf_config, *args, **kwargs):
                if kwargs.get("disable_sliding_window") and keeps_full_context():
                    kwargs["disable_sliding_window"] = False
                return original(_RopeView(hf_config), *args, **kwargs)

            return _get_and_verify_max_len

        def make_get_rope(original):
            def get_rope(*args, **kwargs):
                if "rope_scaling" in kwargs:
                    kwargs["rope_scaling"] = effective_rope_scaling(kwargs["rope_scaling"])
                elif len(args) > 5:
                    args = args[:5] + (effective_rope_scaling(args[5]),) + args[6:]
                return original(*args, **kwargs)

            return get_rope

        original_get_rope = rotary.get_rope
        wrap(config, "_get_and_verify_max_len", self.name, make_max_len)
        wrap(rotary, "get_rope", self.name, make_get_rope)
        for name, module in list(sys.modules.items()):
            if name.startswith("vllm.model_executor.models.") and getattr(module, "get_rope", None) is original_get_rope:
                module.get_rope = rotary.get_rope
