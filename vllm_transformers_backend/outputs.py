"""Pooling outputs shaped like newer vLLM's (``vllm.outputs`` there), which vLLM 0.6.2 lacks.

``LLM.classify`` returns :class:`ClassificationRequestOutput` (``.outputs.probs``), ``LLM.score``
:class:`ScoringRequestOutput` (``.outputs.score``), ``LLM.reward`` :class:`PoolingRequestOutput`
(``.outputs.data``, a tensor). Each is built from what vLLM 0.6.2's engine returns for a pooling request
(an ``EmbeddingRequestOutput`` whose ``.outputs.embedding`` holds the model's floats).

Decode step: not on it (shapes a pooling request's result).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, List, TypeVar

import torch

_O = TypeVar("_O")


def _floats(request_output: Any) -> List[float]:
    values = getattr(getattr(request_output, "outputs", None), "embedding", None)
    if values is None:
        raise ValueError(f"request {getattr(request_output, 'request_id', '?')} has no output: the engine did not run "
                         f"its prompt of {len(request_output.prompt_token_ids or [])} tokens (longer than "
                         "max_model_len?)")
    return list(values)


class PoolingRequestOutput(Generic[_O]):
    """One pooling request's result: ``request_id``, ``outputs``, ``prompt_token_ids``, ``finished``."""

    def __init__(self, request_id: str, outputs: _O, prompt_token_ids: List[int], finished: bool = True,
                 num_cached_tokens: int = 0) -> None:
        self.request_id = request_id
        self.outputs = outputs
        self.prompt_token_ids = prompt_token_ids
        self.finished = finished
        self.num_cached_tokens = num_cached_tokens

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(request_id={self.request_id!r}, outputs={self.outputs!r}, "
                f"prompt_token_ids={self.prompt_token_ids}, finished={self.finished})")


@dataclass
class PoolingOutput:
    """The raw output of a pooling request: ``data``, a tensor (``[num_labels]`` for a reward model)."""

    data: torch.Tensor


@dataclass
class ClassificationOutput:
    """Class probabilities (or raw logits with ``use_activation=False``), one per label."""

    probs: List[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    """The similarity score of one pair."""

    score: float


class ClassificationRequestOutput(PoolingRequestOutput[ClassificationOutput]):
    @staticmethod
    def from_base(request_output: Any) -> "ClassificationRequestOutput":
        return ClassificationRequestOutput(request_output.request_id, ClassificationOutput(_floats(request_output)),
                                           request_output.prompt_token_ids, request_output.finished)


class ScoringRequestOutput(PoolingRequestOutput[ScoringOutput]):
    @staticmethod
    def from_base(request_output: Any) -> "ScoringRequestOutput":
        values = _floats(request_output)
        if len(values) != 1:
            raise ValueError(f"a score is one number; the model returned {len(values)}")
        return ScoringRequestOutput(request_output.request_id, ScoringOutput(values[0]),
                                    request_output.prompt_token_ids, request_output.finished)


def pooling_output_from_base(request_output: Any) -> PoolingRequestOutput[PoolingOutput]:
    return PoolingRequestOutput(request_output.request_id, PoolingOutput(torch.tensor(_floats(request_output))),
                                request_output.prompt_token_ids, request_output.finished)

