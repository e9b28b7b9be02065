"""Sequence classification on the GPU: vLLM 0.6.2's own ``EmbeddingModelRunner`` (with the embedding_runner
patch, which carries cross-encoder token types) drives the backend's sequence-classification model.
bf16 engine vs HF in float32 on the same prompts: logits within bf16 rounding of a 2-layer model."""
from __future__ import annotations

import gc

import pytest
import torch

from tests import helpers
from tests import seq_cls_models as models

#: bf16 logits of order 1 after two layers vs float32
MAX_ABS = 5e-2


def _engine(path, **kwargs):
    from vllm import LLM

    return LLM(model=str(path), model_impl="transformers", dtype="bfloat16", gpu_memory_utilization=0.3, seed=0,
               **kwargs)


def _close(llm) -> None:
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    del llm
    destroy_model_parallel()
    destroy_distributed_environment()
    gc.collect()
    torch.cuda.empty_cache()


def test_gpu_runner_is_patched():
    from vllm.worker.embedding_model_runner import EmbeddingModelRunner

    from vllm_transformers_backend.patches._base import is_wrapped

    assert is_wrapped(EmbeddingModelRunner.__dict__["prepare_model_input"], "embedding_runner")


def test_gpu_reward_model(tmp_path):
    """A Llama reward model: LLM.reward and LLM.classify(use_activation=False) vs HF's logits."""
    path = models.build("llama", tmp_path / "llama", with_tokenizer=False)
    llm = _engine(path, task="reward", skip_tokenizer_init=True, max_model_len=256)
    try:
        prompts = [{"prompt_token_ids": p} for p in models.PROMPTS]
        rewards = torch.stack([o.outputs.data for o in llm.reward(prompts, use_tqdm=False)])
        raw = torch.tensor([o.outputs.probs for o in llm.classify(prompts, use_activation=False, use_tqdm=False)])
    finally:
        _close(llm)
    want = models.hf_logits(path, models.PROMPTS)
    assert (rewards - want).abs().max().item() < MAX_ABS
    assert (raw - want).abs().max().item() < MAX_ABS


def test_gpu_bert_cross_encoder_token_types(tmp_path):
    """A BERT cross-encoder's pairs through the GPU runner: raw scores vs HF with the pair's token types."""
    if not helpers.interface_supported("bert"):
        pytest.skip(f"transformers {helpers.transformers_version()} runs no BERT (needs transformers>=5)")
    if helpers.bundled_model("all-MiniLM-L6-v2") is None:
        pytest.skip("needs the all-MiniLM-L6-v2 tokenizer of the CPU set-up's models cache")
    path = models.build("bert", tmp_path / "bert")
    llm = _engine(path, task="score", max_model_len=128)
    try:
        got = torch.tensor([o.outputs.score for o in llm.score([q for q, _ in models.PAIRS],
                                                               [d for _, d in models.PAIRS], use_activation=False,
                                                               use_tqdm=False)])
    finally:
        _close(llm)
    want = models.hf_pair_logits(path, models.PAIRS)[:, 0]
    assert (got - want).abs().max().item() < MAX_ABS
