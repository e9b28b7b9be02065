"""What the backend's construction allocates on the model's device: only what the model keeps.

vLLM 0.6.2 sizes the KV cache from the device memory in use after its profiling run (``mem_get_info``), so
parameters that construction allocated and then dropped cost KV blocks wherever the caching allocator keeps
their space in segments that also hold live weights (``empty_cache`` frees whole segments only). The backend
built every HF linear as a vLLM linear on the device, then projection fusion replaced q/k/v and gate/up, and a
tied head allocated its own weight before taking the embedding's. On GPUs the backend's engines had 0.5-1.3%
fewer KV blocks than native's (README, Performance; ``benchmarks/forward_peak.py`` measures the blocks).

Here each model is built in this process on the CPU; every parameter of a vLLM or backend layer registered on
a real device after the HF model is built (HF's own parameters are made on meta) is recorded, and at the end
those not in the model are what construction allocated for nothing. Architectures with fused q/k/v
and gate/up, biases, tied and untied heads, GPT-2's Conv1D, OPT's projected head, and mixture-of-experts bodies.
"""
from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from tests.test_pipeline_parallel import _model_config

ARCHS = ["llama", "qwen2", "gemma", "qwen3", "gpt2", "opt", "olmo2"]


def _build_recording(path, monkeypatch):
    """The backend model of the checkpoint at ``path`` and the parameters registered on a real device while
    the backend built it (after HF's build): (weak reference, bytes, where)."""
    from vllm_transformers_backend import hf_model
    from vllm_transformers_backend.causal import TransformersForCausalLM
    from vllm_transformers_backend.config import BackendConfig, backend_config_scope

    registered = []
    original_register = nn.Module.register_parameter
    original_build = hf_model.build

    def register(module: nn.Module, name: str, param) -> None:
        original_register(module, name, param)
        # vLLM's layers and the backend's own; not the CPU probes' float32 stand-ins (torch.nn.Linear)
        ours = type(module).__module__.startswith(("vllm.", "vllm_transformers_backend."))
        if ours and param is not None and not param.is_meta:
            registered.append((weakref.ref(param), param.numel() * param.element_size(),
                               f"{type(module).__name__}.{name} {tuple(param.shape)}"))

    def build(*args, **kwargs):
        model = original_build(*args, **kwargs)
        monkeypatch.setattr(nn.Module, "register_parameter", register)
        return model

    monkeypatch.setattr(hf_model, "build", build)
    model_config = _model_config(path)
    with backend_config_scope(BackendConfig(model_config=model_config)), torch.device("cpu"):
        model = TransformersForCausalLM(config=model_config.hf_config)
    monkeypatch.setattr(nn.Module, "register_parameter", original_register)
    return model, registered


def _assert_keeps_what_it_allocates(path, monkeypatch) -> nn.Module:
    """Builds the backend model of ``path``; every parameter registered on the device is in it, and it is whole
    (every parameter on the device, none left on meta)."""
    model, registered = _build_recording(path, monkeypatch)
    assert registered, "no parameter was registered on the device: the recording saw nothing"
    kept = {id(p) for p in model.parameters()}
    dropped = [(size, where) for ref, size, where in registered if ref() is None or id(ref()) not in kept]
    assert not dropped, f"{sum(s for s, _ in dropped)} bytes allocated and dropped: {dropped[:8]}"
    params = list(model.parameters())
    assert params and all(p.device.type == "cpu" for p in params)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_construction_allocates_only_what_the_model_keeps(arch, checkpoints, one_process_group, monkeypatch):
    from tests import helpers

    helpers.require_architecture(arch)
    model = _assert_keeps_what_it_allocates(checkpoints(arch), monkeypatch)
    fused = [name for name, _ in model.named_modules() if name.endswith(("qkv_proj", "gate_up_proj"))]
    if arch in ("llama", "qwen2", "gemma", "qwen3", "olmo2"):
        assert fused, "projection fusion did not run: the case this test is about"


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe"])
def test_mixture_of_experts_construction_allocates_only_what_the_model_keeps(arch, tmp_path, one_process_group,
                                                                             monkeypatch):
    """The same for mixture-of-experts bodies (router, experts, Qwen2-MoE's shared expert and its gate), whose
    experts run HF's code on the CPU as vLLM linears."""
    from tests import helpers

    helpers.require_architecture(arch)
    _assert_keeps_what_it_allocates(helpers.build_moe_checkpoint(arch, tmp_path / arch), monkeypatch)
