"""``TransformersForCausalLM``: decoder-only generation through the backend.

Decode step: last, after the body's final norm: ``compute_logits`` (``ParallelLMHead`` and vLLM's
``LogitsProcessor``: scale, soft-cap), then vLLM's ``Sampler``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.sampler import Sampler
from vllm.model_executor.layers.vocab_parallel_embedding import (DEFAULT_VOCAB_PADDING_SIZE, ParallelLMHead,
                                                                   VocabParallelEmbedding)
from vllm.model_executor.sampling_metadata import SamplingMetadata

from . import compat, hf_model as hf, lora
from .base import Base
from .pipeline import PPMissingLayer


def logit_scale_of(text_config: Any) -> float:
    """The factor HF's causal head multiplies logits by (Cohere ``logit_scale``, Granite's divisor)."""
    scale = getattr(text_config, "logit_scale", None)
    if isinstance(scale, (int, float)):
        return float(scale)
    divisor = getattr(text_config, "logits_scaling", None)
    if isinstance(divisor, (int, float)) and divisor:
        return 1.0 / float(divisor)
    return 1.0


class TransformersForCausalLM(Base):
    hf_auto_class = "AutoModelForCausalLM"

    # vLLM's SupportsLoRA interface: vLLM checks the class for these, then reads each instance's own,
    # computed from the layers the backend built (Base._declare_lora_modules, lora.py).
    supports_lora = True
    packed_modules_mapping: Dict[str, List[str]] = {}
    supported_lora_modules: List[str] = []
    embedding_modules: Dict[str, str] = {}
    embedding_padding_modules: List[str] = []

    def _post_init(self, hf_model: nn.Module) -> None:
        text_config = self.text_config
        vocab_size = text_config.vocab_size
        head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
        has_bias = head is not None and getattr(head, "bias", None) is not None
        # The head's input width: the hidden size, or a projection's (OPT's word_embed_proj_dim).
        width = getattr(head, "in_features", None) or text_config.hidden_size
        self.tie_word_embeddings = compat.ties_word_embeddings(self.config)
        # With LoRA on the vocabulary, vLLM's Llama layout: the head has room for the adapters' extra tokens,
        # padded for the LoRA kernels, and the logits cover them.
        extra = lora.extra_vocab_rows(self.lora_config)[1] if self.vocabulary_lora else 0
        if self.pipeline is not None and not self.pipeline.is_last:
            # The LM head lives on the last pipeline rank (vLLM computes logits there only).
            self.lm_head = PPMissingLayer()
            self._pp_missing_prefixes.append("lm_head.")
        else:
            padding = self.lora_config.lora_vocab_padding_size if self.vocabulary_lora else DEFAULT_VOCAB_PADDING_SIZE
            # a tied head's weight is the embedding's, so its own is never allocated (Base._unallocated)
            with self._unallocated() if self.tie_word_embeddings else contextlib.nullcontext():
                self.lm_head = ParallelLMHead(
                    vocab_size + extra, width, bias=has_bias, org_num_embeddings=vocab_size,
                    padding_size=padding, quant_config=self.quant_config,
                    prefix=(self._output_embedding_names or ["lm_head"])[0],
                )
        if self.tie_word_embeddings and not isinstance(self.lm_head, PPMissingLayer):
            embedding = self.model.get_input_embeddings()
            if not isinstance(embedding, VocabParallelEmbedding):
                raise ValueError(f"cannot tie lm_head to {type(embedding).__name__}")
            self.lm_head.weight = embedding.weight
        self.logits_processor = LogitsProcessor(
            vocab_size + extra,
            vocab_size,
            logit_scale_of(text_config),
            soft_cap=getattr(text_config, "final_logit_softcapping", None),
        )
        self.sampler = Sampler()

    @classmethod
    def skipped_weights(cls, config: Any) -> Tuple[str, ...]:
        return ("lm_head.weight",) if compat.ties_word_embeddings(config) else ()

    @classmethod
    def checkpoint_target(cls, hf_model: nn.Module, body: nn.Module) -> nn.Module:
        target = super().checkpoint_target(hf_model, body)
        if hf.output_embedding_names(hf_model):  # HF's head, as the wrapper's lm_head
            target.lm_head = hf_model.get_output_embeddings()
        return target

    def compute_logits(self, hidden_states: torch.Tensor, sampling_metadata: SamplingMetadata) -> Optional[torch.Tensor]:
        return self.logits_processor(self.lm_head, hidden_states, sampling_metadata, getattr(self.lm_head, "bias", None))

    def sample(self, logits: torch.Tensor, sampling_metadata: SamplingMetadata):
        return self.sampler(logits, sampling_metadata)
