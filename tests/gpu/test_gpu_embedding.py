"""Embeddings on the GPU: vLLM 0.6.2's own ``EmbeddingModelRunner`` (FlashAttention metadata) drives the
backend's pooling model. bf16 engine vs HF in float32 on the same prompts: cosine close to 1."""
from __future__ import annotations

import gc

import pytest
import torch

from tests import helpers
from tests.test_embedding import _encoder_checkpoint, _prompts_for, hf_pooled, vllm_embed

MIN_COSINE = 0.999  # bf16 hidden states of a 2-layer model vs float32


def _embed(path, prompts, **kwargs):
    from vllm import LLM
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    llm = LLM(model=str(path), model_impl="transformers", runner="pooling", dtype="bfloat16", skip_tokenizer_init=True,
              gpu_memory_utilization=0.3, seed=0, **kwargs)
    try:
        return vllm_embed(llm, prompts).float()
    finally:
        del llm
        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()
        torch.cuda.empty_cache()


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def test_gpu_decoder_embeddings(tmp_path):
    path = helpers.build_checkpoint("llama", tmp_path / "llama")
    got = _embed(path, helpers.PROMPTS, max_model_len=256)
    want = hf_pooled(path, helpers.PROMPTS, "LAST", normalize=True)
    assert _cosines(got, want).min().item() > MIN_COSINE


def test_gpu_encoder_embeddings(tmp_path):
    if not helpers.interface_supported("esm"):
        pytest.skip("ESM goes through the attention interface from transformers 4.56")
    path = _encoder_checkpoint("esm", tmp_path / "esm")
    prompts = _prompts_for("esm")
    got = _embed(path, prompts, max_model_len=128)
    want = hf_pooled(path, prompts, "CLS", normalize=True)
    assert _cosines(got, want).min().item() > MIN_COSINE
