"""Patch of ``vllm.entrypoints.llm.LLM`` (vLLM 0.6.2): ``embed``, ``classify``, ``score``, ``reward``.

Newer vLLM's pooling methods; 0.6.2 has only ``llm.encode`` (kept as it is). Each added method runs
``encode`` with the request parameters the backend's models read (``vllm_transformers_backend.pooling_api``)
and returns newer vLLM's output shapes (``vllm_transformers_backend.outputs``):

* ``embed(prompts)`` -> ``EmbeddingRequestOutput`` (``.outputs.embedding``);
* ``classify(prompts, use_activation=None)`` -> ``ClassificationRequestOutput`` (``.outputs.probs``);
* ``score(text_1, text_2, use_activation=None, truncate_prompt_tokens=None)`` -> ``ScoringRequestOutput``
  (``.outputs.score``), 1-to-1, 1-to-N or N-to-N, by a cross-encoder or by embedding cosine similarity;
* ``reward(prompts)`` -> ``PoolingRequestOutput`` (``.outputs.data``: the head's raw logits).

A call the engine cannot serve (``classify`` on a generating engine, ``score`` on a multi-label
classifier, ...) raises an error that names the fix.

Decode step: not on it (applied at ``import vllm``; acts when the engine is configured or loads the model).
"""
from __future__ import annotations

from typing import Any, List, Optional

from vllm_transformers_backend import pooling_api
from vllm_transformers_backend.outputs import (ClassificationRequestOutput, ScoringRequestOutput,
                                               pooling_output_from_base)

from ._base import Patch, mark, require_parameters


def embed(self, prompts: Any, pooling_params: Any = None, *, use_tqdm: bool = True, lora_request: Any = None,
          prompt_adapter_request: Any = None) -> List[Any]:
    """One embedding per prompt (``output.outputs.embedding``) from a ``runner="pooling"`` engine."""
    if not self.llm_engine.model_config.embedding_mode:
        raise ValueError("LLM.embed() needs an embedding engine: create it with runner='pooling' "
                         "(LLM(model=..., runner='pooling')).")
    return self.encode(prompts, pooling_params=pooling_params, use_tqdm=use_tqdm, lora_request=lora_request,
                       prompt_adapter_request=prompt_adapter_request)


def classify(self, prompts: Any, *, use_activation: Optional[bool] = None, use_tqdm: bool = True,
             lora_request: Any = None, prompt_adapter_request: Any = None) -> List[ClassificationRequestOutput]:
    """Class probabilities per prompt (``output.outputs.probs``); raw logits with ``use_activation=False``."""
    pooling_api.require_head(self.llm_engine.model_config, "LLM.classify()")
    items = self.encode(prompts, pooling_api.params_for("classify", use_activation), use_tqdm=use_tqdm,
                        lora_request=lora_request, prompt_adapter_request=prompt_adapter_request)
    return [ClassificationRequestOutput.from_base(item) for item in items]


def reward(self, prompts: Any, *, use_tqdm: bool = True, lora_request: Any = None,
           prompt_adapter_request: Any = None) -> List[Any]:
    """The reward model's raw head output per prompt (``output.outputs.data``, one value per label)."""
    pooling_api.require_head(self.llm_engine.model_config, "LLM.reward()")
    items = self.encode(prompts, pooling_api.params_for("reward"), use_tqdm=use_tqdm, lora_request=lora_request,
                        prompt_adapter_request=prompt_adapter_request)
    return [pooling_output_from_base(item) for item in items]


def score(self, text_1: Any, text_2: Any, *, use_activation: Optional[bool] = None,
          truncate_prompt_tokens: Optional[int] = None, use_tqdm: bool = True, lora_request: Any = None,
          prompt_adapter_request: Any = None) -> List[ScoringRequestOutput]:
    """A score per ``(text_1, text_2)`` pair: 1-to-1, 1-to-N (``text_1`` repeated) or N-to-N."""
    model_config = self.llm_engine.model_config
    mode = pooling_api.score_mode(model_config)
    tokenizer = self.get_tokenizer()
    if tokenizer is None:
        raise ValueError("LLM.score() tokenizes its texts: create the engine without skip_tokenizer_init.")
    first, second = pooling_api.score_inputs(text_1, text_2, tokenizer)
    if mode == pooling_api.EMBEDDING:
        # embed each distinct first text once
        unique_first = first[:1] if len(set(first)) == 1 and len(first) > 1 else first
        items = self.encode(unique_first + second, pooling_api.params_for("embed"), use_tqdm=use_tqdm,
                            lora_request=lora_request, prompt_adapter_request=prompt_adapter_request)
        return pooling_api.cosine_scores(items[:len(unique_first)], items[len(unique_first):])
    prompts, params = pooling_api.cross_encoder_requests(tokenizer, model_config, first, second, use_activation,
                                                         truncate_prompt_tokens)
    items = self.encode(prompts, params, use_tqdm=use_tqdm, lora_request=lora_request,
                        prompt_adapter_request=prompt_adapter_request)
    return [ScoringRequestOutput.from_base(item) for item in items]


_METHODS = {"embed": embed, "classify": classify, "reward": reward, "score": score}
for _method in _METHODS.values():
    mark(_method, "llm")


class LLMPatch(Patch):
    name = "llm"
    target = "vllm.entrypoints.llm.LLM.embed / classify / score / reward (newer vLLM's pooling methods)"

    wraps = tuple(("vllm.entrypoints.llm:LLM", name) for name in _METHODS)

    def _apply(self) -> None:
        owner = self.owner()
        require_parameters(owner.encode, ["prompts", "pooling_params", "use_tqdm", "lora_request",
                                          "prompt_adapter_request"], self.target)
        for name, method in _METHODS.items():
            if name in owner.__dict__ and owner.__dict__[name] is not method:
                raise RuntimeError(f"{self.target}: this LLM already has a {name} method; unknown vLLM build")
            setattr(owner, name, method)
