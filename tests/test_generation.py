"""End to end on the CPU engine (float32): the backend generates exactly what HF ``generate`` does,
and what vLLM's own implementation does where vLLM 0.6.2 has one."""
from __future__ import annotations

import pytest

from tests.helpers import (ARCHITECTURES, PROMPTS, Engine, greedy, hf_greedy, interface_supported,
                           require_architecture, vllm_greedy, vllm_model)

MAX_TOKENS = 12


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_backend_matches_hf_and_native(arch, checkpoints):
    require_architecture(arch)
    path = checkpoints(arch)
    if not interface_supported(arch):
        with pytest.raises(Exception, match="does not support the Transformers attention interface"):
            with Engine(path, "transformers"):
                pass
        return
    expected = hf_greedy(path, PROMPTS, MAX_TOKENS)
    with Engine(path, "transformers") as llm:
        assert type(vllm_model(llm)).__name__ == "TransformersForCausalLM"
        got = vllm_greedy(llm, PROMPTS, MAX_TOKENS)
    assert got == expected
    if ARCHITECTURES[arch][1]:
        native = greedy(path, "vllm", PROMPTS, MAX_TOKENS)
        assert native == expected, "vLLM's own implementation disagrees with HF: the reference is suspect"


def test_auto_uses_backend_only_without_native(checkpoints):
    with Engine(checkpoints("olmo2"), "auto") as llm:  # vLLM 0.6.2 has no Olmo2
        assert type(vllm_model(llm)).__name__ == "TransformersForCausalLM"
        got = vllm_greedy(llm, PROMPTS[:2], MAX_TOKENS)
    assert got == hf_greedy(checkpoints("olmo2"), PROMPTS[:2], MAX_TOKENS)
    with Engine(checkpoints("llama"), "auto") as llm:
        assert type(vllm_model(llm)).__name__ == "LlamaForCausalLM"
