"""Residual fusion (``residual.py``): which HF decoder layers get vLLM's add-and-norm forward, that a fused
body computes what HF computes (alone and as a run carrying the residual between layers), that a model
changing hidden states between layers is refused, and that the engine generates HF's tokens with it."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import ARCHITECTURES, PROMPTS, Engine, hf_greedy, require_architecture, vllm_greedy
from vllm_transformers_backend.layers import make_rms_norm, rms_norm_form
from vllm_transformers_backend.live import get_hf_model
from vllm_transformers_backend.residual import RESIDUAL_ENV, ResidualFusionError, fuse_residual_norms, is_fused

#: Plain pre-norm layers: fused. The others each have a step the fused forward does not do.
FUSED = {"llama", "qwen2", "gemma", "qwen3", "mistral"}
NOT_FUSED = {
    "granite": "residual multiplier", "olmo2": "norms after attention/MLP", "cohere": "parallel attention and MLP",
    "gemma2": "sandwich norms", "gemma3": "sandwich norms", "gpt2": "LayerNorm", "gpt_neox": "LayerNorm, parallel",
}


def _body_pair(arch: str):
    """HF's body as it is, and a copy with vLLM norms swapped in (weights copied) and residual fusion applied."""
    import transformers

    factory, _ = ARCHITECTURES[arch]
    base = factory().to_dict()
    base.pop("layer_types", None)  # derived from the layer count
    config = type(factory())(**{**base, "num_hidden_layers": 3})
    config.initializer_range = 0.1
    torch.manual_seed(0)
    reference = transformers.AutoModel.from_config(config).eval()
    # HF initialises RMSNorm weights to one (or zero for 1 + w): make them matter
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
    body = copy.deepcopy(reference)

    def swap(module: torch.nn.Module) -> None:
        for name, child in list(module.named_children()):
            form = rms_norm_form(child)
            if form is None:
                swap(child)
                continue
            norm = make_rms_norm(child, form, torch.device("cpu"))
            norm._forward_method = norm.forward_native  # exact PyTorch math on the CPU
            norm.weight.data.copy_(child.weight.data)
            setattr(module, name, norm)

    swap(body)
    fused = fuse_residual_norms(body, config.num_hidden_layers)
    return reference, body, fused


@pytest.mark.parametrize("arch", sorted(FUSED | set(NOT_FUSED)))
def test_which_layers_are_fused_and_body_matches_hf(arch, monkeypatch):
    require_architecture(arch)
    monkeypatch.delenv(RESIDUAL_ENV, raising=False)
    reference, body, fused = _body_pair(arch)
    layers = list(body.layers) if hasattr(body, "layers") else list(body.h)
    if arch in FUSED:
        assert fused == layers, arch
        assert [(layer._vtb_takes_residual, layer._vtb_gives_residual) for layer in layers] == \
            [(False, True), (True, True), (True, False)]
    else:
        assert fused == [], f"{arch} has {NOT_FUSED[arch]}: its layers must keep HF's forward"
    ids = torch.tensor([[5, 17, 300, 2, 99, 42, 7]])
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        got = body(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_changed_hidden_states_between_layers_are_refused(monkeypatch):
    monkeypatch.delenv(RESIDUAL_ENV, raising=False)
    _, body, fused = _body_pair("llama")
    assert len(fused) == 3
    hidden = body.embed_tokens(torch.tensor([[5, 17, 300]]))
    positions = torch.arange(3)[None]
    kwargs = {"position_embeddings": body.rotary_emb(hidden, positions), "position_ids": positions}
    with torch.no_grad():
        out = body.layers[0](hidden, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        with pytest.raises(ResidualFusionError, match=RESIDUAL_ENV):
            body.layers[1](out * 1.0, **kwargs)


def test_switched_off_keeps_hf_layers(monkeypatch):
    monkeypatch.setenv(RESIDUAL_ENV, "0")
    _, body, fused = _body_pair("llama")
    assert fused == [] and all("forward" not in layer.__dict__ for layer in body.layers)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_engine_generates_hf_tokens_with_fused_layers(arch, checkpoints, monkeypatch):
    monkeypatch.delenv(RESIDUAL_ENV, raising=False)
    path = checkpoints(arch)
    expected = hf_greedy(path, PROMPTS, 12)
    with Engine(path, "transformers") as llm:
        layers = get_hf_model(llm, hf_layer_outputs=False).layers
        assert all(is_fused(layer) for layer in layers)
        assert vllm_greedy(llm, PROMPTS, 12) == expected
        # live-model access puts HF's layers back (hooks on whole layers then see HF's outputs); still HF's tokens
        layers = get_hf_model(llm).layers
        assert not any(is_fused(layer) for layer in layers)
        assert vllm_greedy(llm, PROMPTS, 12) == expected


def test_layers_qualify_under_the_loaders_bf16_default_dtype(monkeypatch):
    """vLLM's loader builds the model with its dtype as torch's default (bf16 on GPUs): the CPU probe must still
    compare in float32 (on the H100 a probe in the default dtype refused every layer)."""
    monkeypatch.delenv(RESIDUAL_ENV, raising=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        _, body, fused = _body_pair("llama")
    finally:
        torch.set_default_dtype(previous)
    assert len(fused) == 3 and next(body.parameters()).dtype == torch.bfloat16
