"""On a CUDA GPU (bf16): the backend's log-probabilities stay close to native vLLM 0.6.2's, with CUDA
graphs off and on (vLLM's ``check_logprobs_close`` rule: at the first differing token each side's token
is in the other's top-5)."""
from __future__ import annotations

import gc

import pytest
import torch

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


def _run(path, model_impl, enforce_eager):
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    llm = LLM(model=str(path), model_impl=model_impl, dtype="bfloat16", skip_tokenizer_init=True,
              enforce_eager=enforce_eager, gpu_memory_utilization=0.3, max_model_len=1024, seed=0)
    try:
        model = llm.llm_engine.model_executor.driver_worker.model_runner.model
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True),
                            use_tqdm=False)
        norms = {type(m).__name__ for n, m in model.named_modules() if n.endswith("norm")}
        return type(model).__name__, norms, [(list(o.outputs[0].token_ids), o.outputs[0].logprobs) for o in outs]
    finally:
        del llm
        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()
        torch.cuda.empty_cache()


def check_logprobs_close(a, b):
    for (tokens_a, lps_a), (tokens_b, lps_b) in zip(a, b):
        for i, (ta, tb) in enumerate(zip(tokens_a, tokens_b)):
            if ta != tb:
                assert ta in lps_b[i] and tb in lps_a[i], f"step {i}: {ta} vs {tb} not in each other's top-5"
                break


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_logprobs_close_to_native(tmp_path, enforce_eager):
    path = _llama(tmp_path / "llama")
    native_cls, _, native = _run(path, "vllm", enforce_eager)
    backend_cls, backend_norms, backend = _run(path, "transformers", enforce_eager)
    assert (native_cls, backend_cls) == ("LlamaForCausalLM", "TransformersForCausalLM")
    assert backend_norms == {"HFRMSNorm"}, backend_norms
    check_logprobs_close(native, backend)
    same = sum(a[0] == b[0] for a, b in zip(native, backend))
    print(f"enforce_eager={enforce_eager}: {same}/{len(PROMPTS)} prompts token-identical over {MAX_TOKENS} tokens")
