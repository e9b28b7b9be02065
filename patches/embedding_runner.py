"""Patch of ``vllm.worker.embedding_model_runner.EmbeddingModelRunner.prepare_model_input`` (vLLM 0.6.2):
token types for cross-encoders.

vLLM 0.6.2's prompts carry token ids only; a BERT-style cross-encoder also needs the pair's token type ids
(``[CLS] query [SEP]`` = 0, ``document [SEP]`` = 1). The frontend puts them in the request's
``PoolingParams.additional_data``; this patch ORs them into the high bits of the step's input ids on the
driver, before the ids are broadcast to the other tensor-parallel ranks, for models that declare
``accepts_token_types`` (the backend's sequence-classification model splits them off again). Other
models and requests without types are untouched. The CPU build's embedding runner (cpu_embedding patch)
does the same. See ``vllm_transformers_backend.token_types``.

Decode step: none (embedding mode runs prompts only); each prompt step on a GPU build runs through
the runner it patches.
"""
from __future__ import annotations

from vllm_transformers_backend import token_types

from ._base import Patch, require_parameters, wrap


class EmbeddingRunnerPatch(Patch):
    #: Only cross-encoder token types need it: a model that reads them refuses to load without it.
    required = False
    name = "embedding_runner"
    target = "vllm.worker.embedding_model_runner.EmbeddingModelRunner.prepare_model_input: cross-encoder token types"

    wraps = (("vllm.worker.embedding_model_runner:EmbeddingModelRunner", "prepare_model_input"),)

    def _apply(self) -> None:
        owner = self.owner()
        require_parameters(owner.prepare_model_input, ["seq_group_metadata_list", "virtual_engine",
                                                       "finished_requests_ids"], self.target)

        def make(original):
            def prepare_model_input(self, seq_group_metadata_list, virtual_engine=0, finished_requests_ids=None):
                model_input = original(self, seq_group_metadata_list, virtual_engine, finished_requests_ids)
                if getattr(self.model, "accepts_token_types", False) and model_input.input_tokens is not None:
                    token_types.encode_into_input_ids(model_input.input_tokens, model_input.seq_lens or [],
                                                      token_types.pooling_params_of(seq_group_metadata_list))
                return model_input

            return prepare_model_input

        wrap(owner, "prepare_model_input", self.name, make)
