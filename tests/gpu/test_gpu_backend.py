"""On a CUDA GPU (bf16): the backend's log-probabilities stay close to native vLLM 0.6.2's, with CUDA
graphs off and on (vLLM's ``check_logprobs_close`` rule: at the first differing token each side's token
is in the other's top-5)."""
from __future__ import annotations

import pytest
import torch

from tests.gpu.support import check_logprobs_close, run_engine

MAX_TOKENS = 32
PROMPTS = [[1, 15, 27, 300, 4000, 12, 7], [5, 6], [900 + i for i in range(40)], [31] * 12]


def _llama(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                         initializer_range=0.05, torch_dtype="bfloat16")
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_logprobs_close_to_native(tmp_path, enforce_eager):
    path = _llama(tmp_path / "llama")
    native = run_engine(path, "vllm", enforce_eager, PROMPTS, MAX_TOKENS, max_model_len=1024)
    backend = run_engine(path, "transformers", enforce_eager, PROMPTS, MAX_TOKENS, max_model_len=1024)
    assert (native.model_class, backend.model_class) == ("LlamaForCausalLM", "TransformersForCausalLM")
    assert backend.norm_classes == {"HFRMSNorm"}, backend.norm_classes
    # the speed replacements engaged under the GPU loader (bf16 default dtype, CUDA device context)
    # (body_forward: the lean body forward equalled HF's body bit for bit in bf16 at the profiling run)
    assert backend.speed_paths == {"residual", "act_and_mul", "rotary", "rotary_table", "body_forward"}, \
        backend.speed_paths
    same = check_logprobs_close(native.outputs, backend.outputs, "native", "backend")
    print(f"enforce_eager={enforce_eager}: {same}/{len(PROMPTS)} prompts token-identical over {MAX_TOKENS} tokens")
