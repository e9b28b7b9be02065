"""Versions of transformers, vLLM and torch, and the few API differences between them.

Every version check of the backend lives here, so that the rest of the code asks questions
("which dtype keyword does from_config take?") instead of comparing version strings.

Decode step: not on it (read while a model is built).
"""
from __future__ import annotations

import functools
import importlib.metadata
from typing import Any, Dict, Optional

from packaging.version import Version

#: transformers 4.48 introduced ``ALL_ATTENTION_FUNCTIONS``, which the backend plugs into.
MIN_TRANSFORMERS = Version("4.48.0")
#: The vLLM release whose internals the patches know. Forks carry local suffixes (``0.6.2+cpu``,
#: ``0.6.2+mlu...``); they compare by base version.
SUPPORTED_VLLM = Version("0.6.2")
#: transformers 4.56 renamed ``torch_dtype`` (config attribute, ``from_config``/``from_pretrained`` keyword)
#: to ``dtype`` and logs a deprecation warning for the old name.
DTYPE_KEYWORD_SINCE = Version("4.56.0")


class UnsupportedVersionError(RuntimeError):
    """A dependency is installed in a version the backend cannot work with."""


#: Model types whose HF attention goes through ALL_ATTENTION_FUNCTIONS only from a given release (found by
#: reading each release's modeling file); older releases build name-keyed attention classes. The backend
#: builds them there with their SDPA classes, the SDPA call routed (legacy_attention.py).
INTERFACE_SINCE: Dict[str, str] = {
    "gpt_neox": "4.49.0",
    "opt": "4.52.0",
    "esm": "4.56.0",
    **{model_type: "5.0.0" for model_type in ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert",
                                              "albert", "data2vec-text", "ernie")},
    # mixture-of-experts decoders whose 4.x code (4.57.6 included) looks attention classes up by name
    "qwen2_moe": "5.0.0",
    "olmoe": "5.0.0",
}


def predates_interface(model_type: Optional[str]) -> bool:
    """Whether the installed transformers builds this model type's attention without the interface."""
    since = INTERFACE_SINCE.get(model_type or "")
    return bool(since) and transformers_version() < Version(since)


def attention_interface_hint(model_type: Optional[str]) -> str:
    """Which transformers release to install for a model type whose attention bypasses the interface."""
    since = INTERFACE_SINCE.get(model_type or "")
    if since is None:
        return ""
    return f" {model_type} goes through the attention interface from transformers {since}: install transformers>={since}."


@functools.lru_cache(maxsize=None)
def installed_version(dist: str) -> Optional[Version]:
    try:
        return Version(importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        return None


def vllm_version_string() -> str:
    # vllm.__version__ says 0.6.1.dev238 in the 0.6.2 wheel; the distribution metadata is right.
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def vllm_is_supported() -> bool:
    version = installed_version("vllm")
    return version is not None and Version(version.base_version) == SUPPORTED_VLLM


def transformers_version() -> Version:
    version = installed_version("transformers")
    if version is None:
        raise UnsupportedVersionError("transformers is not installed: pip install 'transformers>=4.48'")
    return version


def is_transformers_v5() -> bool:
    return transformers_version().major >= 5


def check_transformers() -> None:
    version = transformers_version()
    if Version(version.base_version) < MIN_TRANSFORMERS:
        raise UnsupportedVersionError(
            f"The Transformers backend needs transformers>={MIN_TRANSFORMERS} (the first release with the "
            f"attention interface ALL_ATTENTION_FUNCTIONS), but transformers {version} is installed. "
            f"Fix: pip install 'transformers>={MIN_TRANSFORMERS}', or use model_impl='vllm' for a model "
            "vLLM supports natively."
        )


def dtype_keyword() -> str:
    """The name transformers gives the dtype: ``dtype`` from 4.56 on (``torch_dtype`` is deprecated there),
    ``torch_dtype`` before."""
    return "dtype" if Version(transformers_version().base_version) >= DTYPE_KEYWORD_SINCE else "torch_dtype"


def dtype_kwargs(dtype: Any) -> Dict[str, Any]:
    """The keyword ``from_config``/``from_pretrained`` take for the dtype."""
    return {dtype_keyword(): dtype}


def set_config_dtype(config: Any, dtype: Any) -> None:
    setattr(config, dtype_keyword(), dtype)


def transformers_config(config: Any) -> Any:
    """The same configuration as an instance of transformers' own class for its ``model_type``."""
    from transformers import AutoConfig

    values = config.to_dict()
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    return AutoConfig.for_model(config.model_type, **values)


def get_text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def ties_word_embeddings(config: Any) -> bool:
    """v4 keeps the flag on the text config, v5 on the top-level config; either counts."""
    text_config = get_text_config(config)
    return bool(getattr(text_config, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))


def checkpoint_transforms(hf_model: Any) -> list:
    """transformers 5's checkpoint transforms for this model (``WeightRenaming``/``WeightConverter``);
    empty on 4.x, where ``_checkpoint_conversion_mapping`` plays that role."""
    if not is_transformers_v5():
        return []
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return []
    return list(get_model_conversion_mapping(hf_model))


def attention_functions() -> Any:
    check_transformers()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS
