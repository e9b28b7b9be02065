"""Patch of ``vllm.config.get_config`` (vLLM 0.6.2): configs in the shape vLLM 0.6.2 reads.

vLLM 0.6.2's config code and native models read configs the transformers-4 way. Two things break with
newer configs, so they are normalised once, right after vLLM loads the config:

* ``head_dim=None`` (Mistral configs of recent transformers): vLLM's ``get_head_size`` returns None and
  its Llama/Mistral multiply by it. It becomes ``hidden_size // num_attention_heads``, which is what
  transformers itself computes for it.
* transformers 5 moved ``rope_theta`` into ``rope_parameters``; vLLM's native models read
  ``getattr(config, "rope_theta", 10000)`` and would silently use 10000. ``rope_theta`` is set again
  as a plain attribute from ``rope_parameters``.

Before the config is loaded, a model path that is neither an existing file or folder nor a possible Hugging
Face repo id (an absolute or ``./`` path, ``~``, more than one ``/``) is refused with "No such folder":
vLLM handed it to the hub, whose ``HFValidationError`` ("Repo id must be in the form ...") did not say
that the folder is missing.

Decode step: not on it (applied at ``import vllm``; acts when the engine is configured or loads the model).
"""
from __future__ import annotations

import os
from typing import Any

from ._base import Patch, require_parameters, wrap


def _text_configs(config: Any):
    seen = [config]
    getter = getattr(config, "get_text_config", None)
    text = getter() if callable(getter) else None
    if text is not None and text is not config:
        seen.append(text)
    return seen


def normalise_config(config: Any) -> Any:
    for cfg in _text_configs(config):
        if getattr(cfg, "head_dim", 0) is None and getattr(cfg, "num_attention_heads", None):
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        params = getattr(cfg, "rope_parameters", None)
        if isinstance(params, dict) and "rope_theta" in params and "rope_theta" not in vars(cfg):
            cfg.rope_theta = params["rope_theta"]
    return config


def check_model_path(model: Any) -> None:
    """Raises ``FileNotFoundError`` for a model path that does not exist and cannot be a hub repo id."""
    if not isinstance(model, str) or os.path.exists(model):
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
        return  # possibly a hub repo id: the hub's own errors apply
    except HFValidationError:
        pass
    expanded = os.path.expanduser(model)
    hint = f" ('~' is not expanded; {expanded!r} exists: pass that path)" if expanded != model and \
        os.path.exists(expanded) else ""
    raise FileNotFoundError(
        f"No such folder: {model!r}: the model path does not exist{hint}. Give the folder that holds the "
        "model's config.json and weights, or a Hugging Face repo id such as 'org/name'.")


class HFConfigPatch(Patch):
    name = "hf_config"
    target = "vllm.config.get_config: missing model folders named, head_dim=None and transformers-5 rope_theta normalised"

    wraps = (("vllm.config", "get_config"),)

    def _apply(self) -> None:
        module = self.owner()
        require_parameters(module.get_config, ["model", "trust_remote_code"], self.target)

        def make(original):
            def get_config(*args, **kwargs):
                check_model_path(kwargs["model"] if "model" in kwargs else args[0] if args else None)
                return normalise_config(original(*args, **kwargs))

            return get_config

        wrap(module, "get_config", self.name, make)
