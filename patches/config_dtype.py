"""Patch of ``vllm.config._get_and_verify_dtype`` (vLLM 0.6.2): the checkpoint's dtype read without
transformers' deprecation warning.

vLLM 0.6.2 reads ``config.torch_dtype``. transformers 4.56 renamed the attribute to ``dtype`` and kept
``torch_dtype`` as a property that logs "`torch_dtype` is deprecated! Use `dtype` instead!", so every
engine start printed it (for vLLM's own models and the backend alike). Where ``torch_dtype`` is that
deprecated alias, vLLM gets a view of the config whose ``torch_dtype`` is the config's ``dtype``; on older
transformers the config goes through untouched.

Decode step: not on it (acts when the engine reads the model's config, once per engine start).
"""
from __future__ import annotations

from typing import Any

from ._base import FixPatch, require_parameters, wrap


def has_deprecated_torch_dtype(config: Any) -> bool:
    """Whether ``config.torch_dtype`` is transformers' deprecated alias of ``config.dtype`` (4.56 and later)."""
    return isinstance(getattr(type(config), "torch_dtype", None), property)


class _DtypeView:
    """The config as vLLM reads it, with ``torch_dtype`` answered from ``dtype`` (no warning)."""

    __slots__ = ("_config",)

    def __init__(self, config: Any) -> None:
        self._config = config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, "dtype" if name == "torch_dtype" else name)


class ConfigDtypePatch(FixPatch):
    name = "config_dtype"
    target = "vllm.config._get_and_verify_dtype: config.dtype instead of the deprecated torch_dtype (transformers >= 4.56)"

    wraps = (("vllm.config", "_get_and_verify_dtype"),)

    def _apply(self) -> None:
        module = self.owner()
        require_parameters(module._get_and_verify_dtype, ["config", "dtype"], self.target)

        def make(original):
            def _get_and_verify_dtype(config, dtype):
                if has_deprecated_torch_dtype(config):
                    config = _DtypeView(config)
                return original(config, dtype)

            return _get_and_verify_dtype

        wrap(module, "_get_and_verify_dtype", self.name, make)
