"""Layer replacement pieces that need no engine."""
from __future__ import annotations

import pytest
import torch


def _fresh(cls):
    return type("Probe" + cls.__name__, (cls,), {})  # a new class: the per-class cache starts empty


@pytest.mark.parametrize("name,form", [("LlamaRMSNorm", "plain"), ("GemmaRMSNorm", "gemma"), ("Qwen3RMSNorm", "plain")])
def test_norm_form_detected_under_loader_defaults(name, form):
    """vLLM's loader builds under its device and the model dtype (bf16 on GPUs): the probe must not care."""
    import importlib

    from tests.helpers import require_architecture
    from vllm_transformers_backend.layers import rms_norm_form

    family = name[: -len("RMSNorm")].lower()
    require_architecture(family)
    module_path = f"transformers.models.{family}.modeling_{family}"
    cls = _fresh(getattr(importlib.import_module(module_path), name))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            module = cls(64, eps=1e-6)
            assert rms_norm_form(module) == form
    finally:
        torch.set_default_dtype(old)


def test_non_rms_norms_are_kept():
    from torch import nn

    from vllm_transformers_backend.layers import rms_norm_form

    assert rms_norm_form(_fresh(nn.LayerNorm)(64)) is None  # mean-centred: not an RMS norm
