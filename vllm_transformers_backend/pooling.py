"""``TransformersForEmbedding``: embeddings through vLLM 0.6.2's embedding path (``runner="pooling"``).

The HF base model (``AutoModel``: ``BertModel``, ``EsmModel``, ``LlamaModel``, ...) runs without its task
heads; the step's hidden states are pooled per prompt (CLS, MEAN or LAST, optionally L2-normalised) and
returned to vLLM's ``EmbeddingModelRunner`` (or the CPU one the cpu_embedding patch adds) as a
``PoolerOutput``. vLLM 0.6.2's own ``Pooler`` knows LAST only, hence :class:`EmbeddingPooler`.

Which pooling: ``override_pooler_config`` if the user gave one, else the checkpoint's
sentence-transformers layout (``modules.json``, its Pooling module's ``config.json``, a ``Normalize``
module), else CLS for encoders and LAST for decoders, normalised (what vLLM's embedding models do).

Decode step: none (prompts only); after the body, the step's hidden states are pooled per prompt
instead of turned into logits.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

from vllm.model_executor.pooling_metadata import PoolingMetadata, PoolingTensors
from vllm.sequence import EmbeddingSequenceGroupOutput, PoolerOutput

from ._logging import get_logger
from .base import Base, BackendError
from .options import POOLING_TYPES
from .weights import WeightsMapper

logger = get_logger(__name__)

#: sentence-transformers Pooling config flag -> our pooling type.
_ST_MODES = {"pooling_mode_cls_token": "CLS", "pooling_mode_mean_tokens": "MEAN", "pooling_mode_lasttoken": "LAST"}
_ST_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
#: sentence-transformers modules that do not change the pooled vector.
_ST_NEUTRAL = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class PoolingSpec:
    pooling_type: str
    normalize: bool
    source: str


class EmbeddingPooler(nn.Module):
    """CLS, MEAN or LAST over each prompt's tokens of the flattened step, then optional L2 norm."""

    def __init__(self, pooling_type: str, normalize: bool) -> None:
        super().__init__()
        if pooling_type not in POOLING_TYPES:
            raise ValueError(f"unknown pooling type {pooling_type!r}")
        self.pooling_type = pooling_type
        self.normalize = normalize

    def pool(self, hidden_states: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
        ends = torch.cumsum(prompt_lens, dim=0)
        starts = ends - prompt_lens
        if self.pooling_type == "CLS":
            pooled = hidden_states[starts]
        elif self.pooling_type == "LAST":
            pooled = hidden_states[ends - 1]
        else:
            # Mean in float32: the sum over long prompts loses precision in 16-bit types.
            sums = torch.cumsum(hidden_states.float(), dim=0)
            totals = sums[ends - 1] - torch.where((starts > 0)[:, None], sums[(starts - 1).clamp(min=0)], 0.0)
            pooled = (totals / prompt_lens[:, None]).to(hidden_states.dtype)
        if self.normalize:
            pooled = nn.functional.normalize(pooled.float(), p=2, dim=1).to(hidden_states.dtype)
        return pooled

    def forward(self, hidden_states: torch.Tensor, pooling_metadata: PoolingMetadata) -> PoolerOutput:
        prompt_lens = PoolingTensors.from_pooling_metadata(pooling_metadata, hidden_states.device).prompt_lens
        pooled = self.pool(hidden_states, prompt_lens)
        return PoolerOutput(outputs=[EmbeddingSequenceGroupOutput(row.tolist()) for row in pooled])


def _read_json(model: str, name: str, revision: Optional[str]) -> Optional[Dict[str, Any]]:
    """A JSON file of the checkpoint (local folder, or the Hugging Face cache/hub), or None."""
    if os.path.isdir(model):
        path = os.path.join(model, name)
        if not os.path.isfile(path):
            return None
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model, name, revision=revision)
        except Exception:  # no such file, or offline: the checkpoint has no such layout
            return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def sentence_transformers_pooling(model: str, revision: Optional[str] = None) -> Optional[Tuple[str, bool]]:
    """(pooling type, normalize) from a sentence-transformers layout, None without one."""
    modules = _read_json(model, "modules.json", revision)
    if not modules:
        return None
    pooling_type, normalize = None, False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            config = _read_json(model, os.path.join(module.get("path", ""), "config.json"), revision) or {}
            unsupported = [k for k in _ST_UNSUPPORTED if config.get(k)]
            chosen = [mode for key, mode in _ST_MODES.items() if config.get(key)]
            if unsupported or len(chosen) != 1:
                raise BackendError(
                    f"{model}: sentence-transformers pooling {sorted(k for k, v in config.items() if v is True)} "
                    "is not supported; the backend pools by exactly one of CLS, MEAN or LAST. Pass "
                    "override_pooler_config={'pooling_type': ...} to choose one."
                )
            pooling_type = chosen[0]
        elif kind not in _ST_NEUTRAL:
            raise BackendError(
                f"{model}: the sentence-transformers module {module.get('type')!r} ({module.get('path')}) changes "
                "the embedding after pooling and is not applied by the backend; its vectors would differ from "
                "sentence-transformers'. Use a checkpoint without it."
            )
    return (pooling_type, normalize) if pooling_type else None


def strip_hf_pooler(body: nn.Module) -> None:
    """Drops HF's own pooler (BERT's dense + tanh over CLS): not what embeddings use, and task checkpoints
    (masked LM, classification) do not carry its weights."""
    if isinstance(getattr(body, "pooler", None), nn.Module):
        body.pooler = None


def is_task_head_key(key: str, body_children: Iterable[str], prefixes: Sequence[str]) -> bool:
    """A checkpoint key the embedding model does not use: task heads (masked-LM, classifiers) live outside
    the body's own children, and HF's pooler is dropped. Applies to keys that map nowhere only."""
    for prefix in filter(None, prefixes):
        if key.startswith(prefix + "."):
            key = key[len(prefix) + 1:]
            break
    first = key.split(".", 1)[0]
    return first == "pooler" or first not in set(body_children)


class TransformersForEmbedding(Base):
    """Any HF base model as a vLLM 0.6.2 embedding model (encoders and decoders)."""

    hf_auto_class = "AutoModel"
    supports_encoder = True

    def _post_init(self, hf_model: nn.Module) -> None:
        strip_hf_pooler(self.model)
        spec = self._pooling_spec()
        logger.info("Transformers backend embeddings: %s pooling, normalize=%s (%s)", spec.pooling_type,
                    spec.normalize, spec.source)
        self.embedding_pooler = EmbeddingPooler(spec.pooling_type, spec.normalize)

    def _pooling_spec(self) -> PoolingSpec:
        model_config = self.bundle.model_config
        default = ("CLS", True, "default for encoders") if self.is_encoder else ("LAST", True, "default for decoders")
        found = sentence_transformers_pooling(str(model_config.model), getattr(model_config, "revision", None))
        pooling_type, normalize, source = (found + ("sentence-transformers config",)) if found else default
        override = getattr(model_config, "override_pooler_config", None)
        if override is not None:
            pooling_type = override.pooling_type or pooling_type
            normalize = normalize if override.normalize is None else override.normalize
            source = "override_pooler_config"
        return PoolingSpec(pooling_type, normalize, source)

    @classmethod
    def checkpoint_mapper(cls, hf_model: nn.Module, checkpoint_prefix: str, body: nn.Module) -> WeightsMapper:
        mapper = super().checkpoint_mapper(hf_model, checkpoint_prefix, body)
        children = {name for name, _ in body.named_children()}
        prefixes = (checkpoint_prefix, getattr(type(hf_model), "base_model_prefix", ""))
        mapper.ignore_unexpected_fns.append(lambda key: is_task_head_key(key, children, prefixes))
        return mapper

    @classmethod
    def checkpoint_target(cls, hf_model: nn.Module, body: nn.Module) -> nn.Module:
        strip_hf_pooler(body)
        return super().checkpoint_target(hf_model, body)

    def pooler(self, hidden_states: torch.Tensor, pooling_metadata: PoolingMetadata) -> PoolerOutput:
        return self.embedding_pooler(hidden_states, pooling_metadata)
