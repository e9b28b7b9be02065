"""Per-layer sliding windows on a CUDA GPU.

* FlashAttention's own window (the path bf16/fp16 models take) equals the backend's gathered attention over
  the same paged cache, for prompts, cached prefixes / chunked prefill, decode steps and soft-capping: the
  kernels vLLM 0.6.2 ships (vllm-flash-attn) apply ``window_size`` with a block table as documented.
* End to end, CUDA graphs on: tiny Gemma 2 (with attention soft-capping: FlashAttention only), Gemma 3 and
  Ministral (``layer_types``) checkpoints with windows of 16-32 tokens and prompts up to ten windows long stay
  close to HF transformers by vLLM's ``check_logprobs_close`` rule (bf16, FlashAttention), and in float32
  (XFormers: the gathered path, under CUDA graphs); prefix caching and chunked prefill with a window.
"""
from __future__ import annotations

import pytest
import torch

from tests.gpu.support import check_logprobs_close, hf_top_logprobs, run_engine
from tests.test_sliding_window import (STEPS, WINDOWED, _build, _Cache, _check_against_reference, _gemma2,
                                       _prompts)

MAX_TOKENS = 32


class _CudaCache(_Cache):
    """The CPU tests' cache, on the GPU in FlashAttention's layout, written by vLLM's own cache op."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__("flash")
        self.tensor = self.tensor.to("cuda", dtype)

    def write_flash(self, key, value, kv_cache, slot_mapping, *_):
        torch.ops.vllm.reshape_and_cache_flash(key.to(kv_cache.dtype), value.to(kv_cache.dtype), kv_cache,
                                               slot_mapping.to("cuda"), "auto", 1.0, 1.0)


@pytest.mark.parametrize("step_case", sorted(STEPS))
def test_flash_window_equals_gathered_attention(step_case, monkeypatch):
    import vllm.attention.backends.flash_attn  # noqa: F401  (registers vLLM's FlashAttention custom ops)

    from vllm_transformers_backend.windowed_attention import (FlashLayout, FlashWindowAttention,
                                                              GatheredWindowAttention, vllm_flash_kernels)

    kernels = vllm_flash_kernels()
    assert kernels is not None, "vllm_flash_attn.flash_attn_with_kvcache takes no window_size"
    torch.set_default_device("cuda")
    monkeypatch.setattr(torch, "randn", _bf16_randn(torch.randn))
    try:
        for attention in (lambda impl, window, cache: FlashWindowAttention(impl, window, kernels),
                          lambda impl, window, cache: GatheredWindowAttention(impl, window, FlashLayout("auto"))):
            _check_against_reference(attention, step_case, "flash", tables_for_prompts=step_case == "mixed-chunked",
                                     cache_factory=lambda: _CudaCache(torch.bfloat16), atol=3e-2)
    finally:
        torch.set_default_device("cpu")


def _bf16_randn(randn):
    def bf16(*shape, **kwargs):
        return randn(*shape, **kwargs).to(torch.bfloat16)

    return bf16


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-windowed")
    cache = {}

    def get(name: str):
        if name not in cache:
            if name == "gemma2-softcap":  # attention logits soft-capped, as Gemma 2's (FlashAttention only)
                factory = lambda window: _softcapped(_gemma2(window))  # noqa: E731
                cache[name] = (_build(name, factory, 16, root), 16)
            else:
                factory, window = WINDOWED[name]
                cache[name] = (_build(name, factory, window, root), window)
        return cache[name]

    return get


def _softcapped(built):
    config, cls_name = built
    config.attn_logit_softcapping = 2.0  # small, so that it changes these small random models' scores
    return config, cls_name


CASES = [("gemma2-softcap", "bfloat16"), ("gemma3", "bfloat16"), ("ministral", "bfloat16"), ("gemma3", "float32")]


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_windowed_models_close_to_hf_with_cuda_graphs(name, dtype, checkpoints):
    path, window = checkpoints(name)
    prompts = _prompts(window)
    torch_dtype = getattr(torch, dtype)
    # HF's eager attention is the reference: its SDPA ignores soft-capping (Gemma 2), and on CUDA its SDPA with
    # a mask (the sliding layers' mask once a prompt is longer than the window) runs PyTorch's memory-efficient
    # kernel, which returns wrong output in bf16 when the key length is 1 mod 32 (pytorch/pytorch#191937, fixed
    # after torch 2.4): Ministral's 65-token prompt got logits from it that HF itself on the CPU (float32 and
    # bf16, SDPA and eager, forward and generate) does not give, while the backend's equalled the CPU ones.
    reference, _ = hf_top_logprobs(path, prompts, MAX_TOKENS, torch_dtype, "cuda", attn_implementation="eager")
    sdpa, _ = hf_top_logprobs(path, prompts, MAX_TOKENS, torch_dtype, "cuda", attn_implementation="sdpa")
    print(f"{name} {dtype}: HF SDPA vs eager on CUDA, step-0 greedy token differs for prompts "
          f"{[i for i, (a, b) in enumerate(zip(reference, sdpa)) if a[0][:1] != b[0][:1]]}")
    run = run_engine(path, "transformers", False, prompts, MAX_TOKENS, dtype=dtype, max_model_len=512,
                     max_num_seqs=len(prompts))
    assert run.model_class == "TransformersForCausalLM"
    same = check_logprobs_close(reference, run.outputs, "HF", "backend")
    print(f"{name} {dtype}: {same}/{len(prompts)} prompts token-identical to HF over {MAX_TOKENS} tokens")


def test_windowed_prefill_over_cached_prefix(checkpoints):
    """A prompt, then prompts that share its first blocks (a prefix longer than the window) and go on past
    them: their prefill reads the cached blocks (FlashAttention's varlen kernel with the block table)."""
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
    from vllm.utils import Device

    from tests.gpu.support import ENGINE_DEFAULTS

    path, window = checkpoints("gemma3")
    shared = _prompts(window)[5]
    prompts = [shared + [7, 8, 9], shared + [11], shared[:4 * window] + [5, 6]]
    reference, _ = hf_top_logprobs(path, prompts, MAX_TOKENS, torch.bfloat16, "cuda")
    llm = LLM(model=str(path), model_impl="transformers", enforce_eager=False, enable_prefix_caching=True,
              **ENGINE_DEFAULTS)
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True)
        llm.generate([{"prompt_token_ids": shared}], params, use_tqdm=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        hit_rate = llm.llm_engine.scheduler[0].get_prefix_cache_hit_rate(Device.GPU)
    finally:
        del llm
        destroy_model_parallel()
        destroy_distributed_environment()
        torch.cuda.empty_cache()
    assert hit_rate > 0, "no prompt block came from the prefix cache"
    check_logprobs_close(reference, [(list(o.outputs[0].token_ids), list(o.outputs[0].logprobs)) for o in outs],
                         "HF", "backend")


def test_windowed_chunked_prefill(checkpoints):
    """Prompts longer than the step's token budget are prefilled in chunks, mixed with decode steps."""
    path, window = checkpoints("gemma3")
    prompts = _prompts(window)
    reference, _ = hf_top_logprobs(path, prompts, MAX_TOKENS, torch.bfloat16, "cuda")
    run = run_engine(path, "transformers", False, prompts, MAX_TOKENS, enable_chunked_prefill=True,
                     max_num_batched_tokens=64, max_num_seqs=len(prompts))
    check_logprobs_close(reference, run.outputs, "HF", "backend")
