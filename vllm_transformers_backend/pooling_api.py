"""What ``LLM.classify`` / ``LLM.score`` / ``LLM.reward`` (llm patch) and the server's ``/classify``,
``/score`` and ``/rerank`` (api_server patch) share: which engine serves which call, the per-request
parameters, cross-encoder pair prompts, and score inputs, as newer vLLM shapes them.

``score`` works two ways, as in newer vLLM: on a sequence-classification engine (a cross-encoder) each
pair is tokenized together with the tokenizer's pair template (``tokenizer(text=q, text_pair=d)``, its
token type ids carried as :mod:`.token_types` describes) and scored by the head; on an embedding engine
both texts are embedded and the score is their cosine similarity.

Decode step: not on it (request parameters and prompts, before the engine runs them).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from . import token_types
from .options import HEAD_TASKS, pooling_task_of
from .outputs import ScoringOutput, ScoringRequestOutput

CROSS_ENCODER = "cross-encoder"
EMBEDDING = "embedding"


def require_head(model_config: Any, api: str) -> None:
    """``api`` (e.g. ``"LLM.classify()"``) needs an engine running a sequence-classification head."""
    task = pooling_task_of(model_config)
    if task in HEAD_TASKS:
        return
    if task is None:
        raise ValueError(f"{api} needs a pooling engine with a sequence-classification head; this engine generates. "
                         "Create it with task='classify' (or 'score' / 'reward'): LLM(model=..., task='classify'), "
                         "`vllm serve ... --task classify`.")
    raise ValueError(f"{api} needs a sequence-classification head, but this engine runs task={task!r} (embeddings, "
                     "no head). Load a ...ForSequenceClassification checkpoint with task='classify'.")


def score_mode(model_config: Any) -> str:
    """How this engine scores pairs: :data:`CROSS_ENCODER` or :data:`EMBEDDING` (cosine); refuses others."""
    task = pooling_task_of(model_config)
    if task in HEAD_TASKS:
        labels = int(getattr(model_config.hf_config, "num_labels", 0) or 0)
        if labels != 1:
            raise ValueError(f"score needs a cross-encoder with one output (num_labels=1); this classifier has "
                             f"{labels} labels, which is not a pair score. Use classify for its class probabilities.")
        return CROSS_ENCODER
    if task == "embed":
        return EMBEDDING
    raise ValueError("score needs a pooling engine: a cross-encoder (task='score') or an embedding model "
                     "(task='embed'); this engine generates.")


def params_for(task: str, use_activation: Optional[bool] = None, token_type_ids: Optional[Sequence[int]] = None,
               base: Any = None) -> Any:
    """The ``PoolingParams`` of one request: its task, activation choice and token types."""
    if use_activation is not None and not isinstance(use_activation, bool):
        raise ValueError(f"use_activation must be true, false or null, got {use_activation!r}")
    return token_types.with_backend_data(base, task=task, use_activation=use_activation,
                                         **token_types.type_start_data(token_type_ids))


def _as_text(prompt: Any, tokenizer: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        if "multi_modal_data" in prompt:
            raise ValueError("score takes text only; multi-modal prompts are not supported")
        if "prompt" in prompt:
            return str(prompt["prompt"])
        if "prompt_token_ids" in prompt:
            return tokenizer.decode(prompt["prompt_token_ids"])
    raise ValueError(f"score takes strings (or prompt dicts), got {type(prompt).__name__}")


def score_inputs(text_1: Any, text_2: Any, tokenizer: Any) -> Tuple[List[str], List[str]]:
    """Both sides as lists of text, paired 1-to-1, 1-to-N (``text_1`` repeated) or N-to-N."""
    first = [text_1] if isinstance(text_1, (str, dict)) else list(text_1)
    second = [text_2] if isinstance(text_2, (str, dict)) else list(text_2)
    if not first or not second:
        raise ValueError("score needs at least one text on each side")
    if len(first) > 1 and len(first) != len(second):
        raise ValueError(f"score pairs 1-to-1, 1-to-N or N-to-N; got {len(first)} texts against {len(second)}. "
                         "Give one text_1 for many text_2, or two lists of the same length.")
    first = [_as_text(t, tokenizer) for t in first]
    second = [_as_text(t, tokenizer) for t in second]
    return (first * len(second) if len(first) == 1 else first), second


def pair_prompt(tokenizer: Any, model_config: Any, query: str, document: str,
                truncate_prompt_tokens: Optional[int] = None) -> Tuple[dict, Optional[List[int]]]:
    """A cross-encoder prompt (token ids by the tokenizer's pair template) and its token types (None when
    they are all 0 or the model has no token type embedding to read them with)."""
    kwargs = {} if truncate_prompt_tokens is None else {"truncation": True, "max_length": truncate_prompt_tokens}
    encoded = tokenizer(text=query, text_pair=document, **kwargs)
    ids = list(encoded["input_ids"])
    max_len = model_config.max_model_len
    if len(ids) > max_len:
        raise ValueError(f"This model's maximum context length is {max_len} tokens; the pair has {len(ids)} tokens. "
                         "Shorten it or pass truncate_prompt_tokens.")
    types = encoded.get("token_type_ids")
    if types is None or not any(types) or int(getattr(model_config.hf_text_config, "type_vocab_size", 0) or 0) < 2:
        # no segment ids, or a model without a token type embedding (which could not read them)
        return {"prompt_token_ids": ids}, None
    return {"prompt_token_ids": ids}, list(types)


def cross_encoder_requests(tokenizer: Any, model_config: Any, first: Sequence[str], second: Sequence[str],
                           use_activation: Optional[bool] = None,
                           truncate_prompt_tokens: Optional[int] = None) -> Tuple[List[dict], List[Any]]:
    """The prompts and per-request ``PoolingParams`` of a cross-encoder score over paired texts."""
    prompts, params = [], []
    for query, document in zip(first, second):
        prompt, types = pair_prompt(tokenizer, model_config, query, document, truncate_prompt_tokens)
        prompts.append(prompt)
        params.append(params_for("score", use_activation, types))
    return prompts, params


def cosine_scores(first: Sequence[Any], second: Sequence[Any]) -> List[ScoringRequestOutput]:
    """Scores of an embedding engine: cosine similarity of paired embedding outputs (``first`` repeated
    when it holds one)."""
    first = list(first) * len(second) if len(first) == 1 else list(first)
    outputs = []
    for a, b in zip(first, second):
        score = torch.nn.functional.cosine_similarity(torch.tensor(a.outputs.embedding),
                                                      torch.tensor(b.outputs.embedding), dim=0).item()
        outputs.append(ScoringRequestOutput(f"{a.request_id}_{b.request_id}", ScoringOutput(score),
                                            list(a.prompt_token_ids) + list(b.prompt_token_ids)))
    return outputs

