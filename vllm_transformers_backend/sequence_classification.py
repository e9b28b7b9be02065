"""``TransformersForSequenceClassification``: classifiers, cross-encoders and reward models.

A ``...ForSequenceClassification`` checkpoint (BERT / RoBERTa / XLM-R cross-encoders, Llama / Qwen2 reward
models with a ``score`` head, ...) is built as HF builds it (``AutoModelForSequenceClassification``). Its
body runs inside vLLM like every backend model (encoders in padding-free equal-length batches, decoders
through the paged prefill); the head then runs as **HF's own forward** of the sequence-classification
class, with the body swapped for :class:`_BodyOutput`, which hands back the body's output instead of
computing it. Whatever HF's head does (BERT's pooler + classifier, RoBERTa's dense + tanh over ``<s>``,
DistilBERT's pre-classifier, a decoder's score over the last non-padding token as the installed
transformers release defines it) is therefore exactly what runs.

The model's forward returns one row of logits per prompt (step order); :meth:`pooler` turns each row into
the request's output: the logits through the activation of the request's task (:func:`activation_for`),
or raw (``use_activation=False``, and always for ``reward``).

Decode step: none (prompts only); after the body, HF's head runs over its output per prompt and the
pooler applies the task's activation.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from vllm.attention import AttentionMetadata
from vllm.model_executor.pooling_metadata import PoolingMetadata
from vllm.sequence import EmbeddingSequenceGroupOutput, PoolerOutput

from . import token_types
from ._logging import get_logger
from .base import Base, BackendError
from .options import HEAD_TASKS, pooling_task_of
from .weights import WeightsMapper

logger = get_logger(__name__)

#: Activation names (what :func:`activation_for` returns) and what they compute over one row of logits.
ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda x: x,
    "sigmoid": torch.sigmoid,
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "tanh": torch.tanh,
}
#: sentence-transformers activation classes (``torch.nn.modules...``) the backend applies, by class name.
_ST_ACTIVATIONS = {"Identity": "none", "Sigmoid": "sigmoid", "Softmax": "softmax", "Tanh": "tanh"}


def _classify_activation(config: Any) -> str:
    """HF's text-classification pipeline (and newer vLLM's ``classify``): regression -> raw logits;
    multi-label, or a single label -> sigmoid; otherwise softmax."""
    problem_type = getattr(config, "problem_type", None)
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


def _cross_encoder_activation(config: Any) -> str:
    """sentence-transformers' ``CrossEncoder``: the activation saved with the model (``config.json``'s
    ``sentence_transformers.activation_fn``, or the older ``sbert_ce_default_activation_function``), else
    sigmoid for one label and raw logits for more."""
    saved = (getattr(config, "sentence_transformers", None) or {}).get("activation_fn") \
        or getattr(config, "sbert_ce_default_activation_function", None)
    if saved:
        module, _, name = str(saved).rpartition(".")
        if not module.startswith("torch.nn.modules") or name not in _ST_ACTIVATIONS:
            raise BackendError(
                f"the checkpoint's cross-encoder activation {saved!r} is not one the backend applies "
                f"({', '.join('torch.nn.' + n for n in _ST_ACTIVATIONS)}); pass use_activation=False for raw logits.")
        importlib.import_module(module)  # the name must exist in this torch
        return _ST_ACTIVATIONS[name]
    return "sigmoid" if config.num_labels == 1 else "none"


def activation_for(config: Any, task: str, use_activation: Optional[bool] = None) -> str:
    """The activation a request's logits go through: by task (``classify``: HF's pipeline rule;
    ``score``: sentence-transformers' CrossEncoder rule; ``reward``: none), raw when ``use_activation``
    is False."""
    if use_activation is False or task == "reward":
        return "none"
    if task == "score":
        return _cross_encoder_activation(config)
    return _classify_activation(config)


class _BodyOutput(nn.Module):
    """Stands in for the body inside HF's sequence-classification model: returns the output the real body
    produced for this batch (set in :attr:`output` just before the head runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.output: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.output is None:
            raise BackendError("the sequence-classification head ran without the body's output")
        return self.output


class TransformersForSequenceClassification(Base):
    """A ``...ForSequenceClassification`` checkpoint on vLLM 0.6.2's pooling path (classify, score, reward)."""

    hf_auto_class = "AutoModelForSequenceClassification"
    supports_encoder = True
    #: Read by the model runners (token_types): this model splits token types off its input ids.
    accepts_token_types = True

    def _post_init(self, hf_model: nn.Module) -> None:
        if self.pipeline is not None:
            raise BackendError("sequence-classification models cannot be split over pipeline ranks (vLLM 0.6.2's "
                               "embedding runner has no pipeline parallelism); use pipeline_parallel_size=1.")
        if not self._checkpoint_prefix:
            raise BackendError(f"{type(hf_model).__name__}: could not find its body (base_model_prefix "
                               f"{getattr(hf_model, 'base_model_prefix', None)!r}), so its head cannot run apart.")
        self.num_labels = int(self.config.num_labels)
        self._body_output = _BodyOutput()
        setattr(hf_model, self._checkpoint_prefix, self._body_output)
        #: HF's sequence-classification model without its body: the head modules and HF's forward.
        self.head = hf_model
        self.task = pooling_task_of(self.bundle.model_config) or "classify"
        if self.task not in HEAD_TASKS:
            raise BackendError(f"task={self.task!r} does not use a sequence-classification head")
        self._type_vocab_size = int(getattr(self.text_config, "type_vocab_size", 0) or 0)
        if self._type_vocab_size >= 2:
            _require_token_type_runners()
        logger.info("Transformers backend sequence classification: %s, %d label(s), task %s (default activation "
                    "%s)", type(hf_model).__name__, self.num_labels, self.task,
                    activation_for(self.config, self.task))

    # --- forward: one row of HF logits per prompt ------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: List[torch.Tensor],
                attn_metadata: AttentionMetadata, intermediate_tensors: Any = None,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        input_ids, types = token_types.split_token_types(input_ids)
        if types is not None and int(types.max()) >= max(self._type_vocab_size, 1):
            raise BackendError(f"{type(self.model).__name__} has {self._type_vocab_size} token type(s); the step "
                               f"carries type {int(types.max())}")
        if self.is_encoder:
            return self._encoder_logits(input_ids, types, attn_metadata)
        if types is not None:
            raise BackendError(f"{type(self.model).__name__} takes no token types")
        hidden = super().forward(input_ids, positions, kv_caches, attn_metadata, intermediate_tensors, inputs_embeds)
        return self._decoder_logits(input_ids, hidden, attn_metadata)

    def _encoder_logits(self, input_ids: torch.Tensor, types: Optional[torch.Tensor],
                        attn_metadata: AttentionMetadata) -> torch.Tensor:
        rows: Dict[int, torch.Tensor] = {}
        for index, numbers in self._equal_length_batches(input_ids, attn_metadata):
            inputs = {"input_ids": input_ids[index]}
            if types is not None:
                inputs["token_type_ids"] = types[index]
            logits = self._run_head(self._run_encoder(**inputs), inputs)
            rows.update(zip(numbers, logits))
        return torch.stack([rows[n] for n in range(len(rows))])

    def _decoder_logits(self, input_ids: torch.Tensor, hidden: torch.Tensor,
                        attn_metadata: AttentionMetadata) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        seq_lens = getattr(attn_metadata, "seq_lens", None)
        if not seq_lens or getattr(attn_metadata, "num_decode_tokens", 0) or sum(seq_lens) != input_ids.shape[0]:
            raise BackendError("a sequence-classification model runs whole prompts only (vLLM's embedding runner)")
        rows = []
        offset = 0
        for length in seq_lens:
            # One prompt at a time: HF's head refuses batches without a pad token, and padding-free batches
            # of one give exactly HF's answer for that prompt.
            ids = input_ids[None, offset:offset + length]
            output = BaseModelOutputWithPast(last_hidden_state=hidden[None, offset:offset + length])
            rows.append(self._run_head(output, {"input_ids": ids})[0])
            offset += length
        return torch.stack(rows)

    def _run_head(self, body_output: Any, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """HF's sequence-classification forward over ``body_output`` (the body itself is not run again)."""
        self._body_output.output = body_output
        try:
            ids = inputs["input_ids"]
            attention_mask = torch.ones_like(ids)
            return self.head(**inputs, attention_mask=attention_mask, return_dict=True).logits
        finally:
            self._body_output.output = None

    # --- pooler: the request's output --------------------------------------------------------------

    def pooler(self, hidden_states: torch.Tensor, pooling_metadata: PoolingMetadata) -> PoolerOutput:
        logits = hidden_states
        if logits.shape[0] != len(pooling_metadata.seq_groups):
            raise BackendError(f"{logits.shape[0]} logit rows for {len(pooling_metadata.seq_groups)} prompts")
        outputs = []
        for row, (_, params) in zip(logits.float(), pooling_metadata.seq_groups):
            request = token_types.backend_data(params)
            task = request.get("task") if request.get("task") in HEAD_TASKS else self.task
            name = activation_for(self.config, task, request.get("use_activation"))
            outputs.append(EmbeddingSequenceGroupOutput(ACTIVATIONS[name](row).tolist()))
        return PoolerOutput(outputs=outputs)

    # --- weights ---------------------------------------------------------------------------------

    @classmethod
    def checkpoint_mapper(cls, hf_model: nn.Module, checkpoint_prefix: str, body: nn.Module) -> WeightsMapper:
        mapper = super().checkpoint_mapper(hf_model, checkpoint_prefix, body)
        add_head_prefixes(mapper, head_names(hf_model, checkpoint_prefix))
        return mapper

    @classmethod
    def checkpoint_target(cls, hf_model: nn.Module, body: nn.Module) -> nn.Module:
        """The body under ``model`` and HF's head modules under ``head`` (the names the wrapper loads)."""
        target = super().checkpoint_target(hf_model, body)
        target.head = nn.Module()
        for name in head_names(hf_model, next((n for n, child in hf_model.named_children() if child is body), "")):
            target.head.add_module(name, getattr(hf_model, name))
        return target


def _require_token_type_runners() -> None:
    """Pairs' token types reach the model only through the runner patches (see token_types); without them a
    cross-encoder would silently read every pair as one segment."""
    from .runtime import patch_applied

    missing = [(name, patch_applied(name)[1]) for name in ("embedding_runner", "cpu_embedding")
               if not patch_applied(name)[0]]
    if missing:
        raise BackendError("this model reads token types (BERT-style pairs), which reach it through the patches "
                           + ", ".join(f"{name} ({error or 'not applied'})" for name, error in missing)
                           + "; run `python -m vllm_transformers_backend doctor`.")


def head_names(hf_model: nn.Module, body_name: str) -> List[str]:
    """The head modules of HF's sequence-classification model: its children other than the body."""
    return [name for name, _ in hf_model.named_children() if name != body_name]


def add_head_prefixes(mapper: WeightsMapper, names: List[str]) -> None:
    """Checkpoint ``classifier.weight`` is the backend's ``head.classifier.weight`` (tried before the
    base-model fallbacks, which would send it into the body)."""
    mapper.prefixes[:0] = [(f"{name}.", f"head.{name}.") for name in names]
