"""On a CUDA GPU (bf16, CUDA graphs on): shape-sweep cases whose kernels differ from the CPU engine's stay
close to HF (vLLM's ``check_logprobs_close`` rule, top-5), and nothing the CPU engine refuses is refused here.

What each case exercises on CUDA (``tests/sweep.py`` draws them; ``vllm_transformers_backend/kernels.py``
lists what the kernels accept): q/k/v as row-strided slices of one projection into FlashAttention and
``reshape_and_cache_flash`` (GPT-2), the call's softmax scale captured into the CUDA graphs (OPT passes
``scaling=1.0``), partial rotary kept in HF's code next to full-width rotary through vLLM's kernel
(GPT-NeoX), head size 120 (refused on the CPU, XFormers + paged attention here), RMS norms of width 100
through vLLM's CUDA ``rms_norm``/``fused_add_rms_norm`` (Llama, Qwen 3), attention logit soft-capping
through FlashAttention (Gemma 2).
"""
from __future__ import annotations

import pytest
import torch

from tests import sweep
from tests.gpu.support import check_logprobs_close, hf_top_logprobs, run_engine

GPU_CASES = ("gpt2-issue", "opt-issue", "gpt_neox-issue", "gpt_neox-s0", "qwen2-s2", "llama-s0", "qwen3-s7",
             "gemma2-s3")
MAX_TOKENS = 16


@pytest.mark.parametrize("case_id", GPU_CASES)
def test_gpu_shapes_close_to_hf(case_id, tmp_path):
    case = next(c for c in sweep.all_cases() if c.id == case_id)
    sweep.helpers.require_architecture(case.arch)
    if not sweep.helpers.interface_supported(case.arch):
        pytest.skip(f"transformers {sweep.helpers.transformers_version()} has no attention interface for {case.arch}")
    path = sweep.build(case, tmp_path)
    prompts = case.prompts + [case.alone]
    want, _ = hf_top_logprobs(path, prompts, MAX_TOKENS, torch.bfloat16, "cuda")
    with sweep.engine_env(case.env):
        got = run_engine(path, "transformers", False, prompts, MAX_TOKENS, max_model_len=256)
    assert got.model_class == "TransformersForCausalLM"
    same = check_logprobs_close(want, got.outputs, "HF", "backend")
    print(f"{case_id} [{case.describe()}]: {same}/{len(prompts)} prompts token-identical over {MAX_TOKENS} tokens; "
          f"speed paths {sorted(got.speed_paths)}")
