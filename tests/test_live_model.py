"""Live-model access: forward hooks by HF module names fire inside the engine and see what HF computes."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import Engine
from vllm_transformers_backend.live import get_hf_model


def test_hook_captures_a_layer_like_plain_hf(checkpoints):
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    path = checkpoints("llama")
    prompt = [1, 5, 7, 9, 11, 13, 200, 300]
    reference = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    expected, expected_layer = [], []

    def first(out):  # a decoder layer returns a tensor or a 1-tuple depending on the transformers version
        return (out[0] if isinstance(out, tuple) else out).detach().clone()

    handles = [reference.model.layers[1].mlp.register_forward_hook(lambda m, a, out: expected.append(out.detach())),
               reference.model.layers[0].register_forward_hook(lambda m, a, out: expected_layer.append(first(out)))]
    with torch.no_grad():
        reference(input_ids=torch.tensor([prompt]))
    for handle in handles:
        handle.remove()

    captured, captured_layer = [], []
    with Engine(path, "transformers") as llm:
        body = get_hf_model(llm)
        assert type(body).__name__ == "LlamaModel"
        handles = [body.layers[1].mlp.register_forward_hook(lambda m, a, out: captured.append(out.detach().clone())),
                   body.layers[0].register_forward_hook(lambda m, a, out: captured_layer.append(first(out)))]
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
        for handle in handles:
            handle.remove()
    # one prefill of the 8 prompt tokens, then one decode step per new token after the first
    assert [c.shape[-2] for c in captured] == [8, 1, 1]
    torch.testing.assert_close(captured[0].reshape(1, 8, -1), expected[0], atol=1e-5, rtol=1e-5)
    # a whole layer's output is HF's hidden states (not the residual-fused partial sum)
    torch.testing.assert_close(captured_layer[0].reshape(1, 8, -1), expected_layer[0], atol=1e-5, rtol=1e-5)


def test_native_model_is_refused(checkpoints):
    with Engine(checkpoints("llama"), "vllm") as llm:
        with pytest.raises(ValueError, match="runs vLLM's own LlamaForCausalLM.*model_impl='transformers'"):
            get_hf_model(llm)
