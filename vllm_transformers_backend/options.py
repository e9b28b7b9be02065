"""The engine options the backend adds to vLLM 0.6.2, and their validation.

``model_impl`` picks the implementation; ``runner`` (or its older spelling ``task``) picks generation
or pooling the way newer vLLM does, and ``task`` also picks what a pooling model computes (embeddings,
or a sequence-classification head's outputs for classify / score / reward); ``override_pooler_config``
overrides the pooling a checkpoint declares. vLLM 0.6.2 has none of them: the engine_args, cli and model_config patches carry them from
``LLM(...)``/``vllm serve`` to the ``ModelConfig`` that every worker receives.

Decode step: not on it (engine options, validated when the engine is configured).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

MODEL_IMPLS = ("auto", "vllm", "transformers")
RUNNERS = ("auto", "generate", "pooling")
#: ``task`` values of newer vLLM and the runner each means.
TASKS = {"auto": "auto", "generate": "generate", "embed": "pooling", "embedding": "pooling",
         "classify": "pooling", "score": "pooling", "reward": "pooling"}
#: Pooling tasks served by a ``...ForSequenceClassification`` head (the rest of the pooling tasks embed).
HEAD_TASKS = ("classify", "score", "reward")
POOLING_TYPES = ("CLS", "MEAN", "LAST")

DEFAULTS: Dict[str, Any] = {"model_impl": "auto", "runner": "auto", "task": "auto", "override_pooler_config": None}

#: Architecture name endings newer vLLM treats as generative or as pooling when ``runner="auto"``.
_GENERATE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ChatModel")
_POOLING_SUFFIXES = ("Model", "ForSequenceClassification", "ForTokenClassification")  # "Model": also "EmbeddingModel"
_SEQUENCE_HEAD_SUFFIX = "ForSequenceClassification"
_TOKEN_HEAD_SUFFIX = "ForTokenClassification"


@dataclass(frozen=True)
class PoolerOverride:
    pooling_type: Optional[str] = None
    normalize: Optional[bool] = None


def validate_model_impl(value: object) -> str:
    if value is None:
        return DEFAULTS["model_impl"]
    if not isinstance(value, str) or value.lower() not in MODEL_IMPLS:
        raise ValueError(
            f"Unknown model_impl {value!r}. Choose one of {', '.join(MODEL_IMPLS)}: 'vllm' uses vLLM's "
            "own model, 'transformers' the Hugging Face implementation through vllm-transformers-backend, "
            "'auto' vLLM's own when vLLM has the architecture and the Transformers backend otherwise."
        )
    return value.lower()


def validate_runner(runner: object, task: object = None) -> str:
    """``runner`` and ``task`` (``"embed"`` means ``runner="pooling"``) agree, and are known."""
    if runner is None:
        runner = "auto"
    if not isinstance(runner, str) or runner.lower() not in RUNNERS:
        raise ValueError(f"Unknown runner {runner!r}. Choose one of {', '.join(RUNNERS)} ('pooling' for "
                         "embedding models, LLM.embed and /v1/embeddings).")
    runner = runner.lower()
    if task is None:
        return runner
    if not isinstance(task, str) or task.lower() not in TASKS:
        raise ValueError(f"Unknown task {task!r}. Choose one of {', '.join(TASKS)}, or use runner= "
                         f"({', '.join(RUNNERS)}).")
    from_task = TASKS[task.lower()]
    if runner != "auto" and from_task != "auto" and runner != from_task:
        raise ValueError(f"runner={runner!r} and task={task!r} disagree; give one of them.")
    return runner if runner != "auto" else from_task


def validate_pooler_override(value: object) -> Optional[PoolerOverride]:
    """A dict (or its JSON text, as on the command line) with ``pooling_type`` and/or ``normalize``."""
    if value is None or isinstance(value, PoolerOverride):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"override_pooler_config is not JSON: {value!r} ({exc})") from exc
    if not isinstance(value, Mapping):
        fields = {k: getattr(value, k) for k in ("pooling_type", "normalize") if hasattr(value, k)}
        if not fields:
            raise ValueError(f"override_pooler_config must be a dict such as "
                             f"{{'pooling_type': 'MEAN', 'normalize': True}}, got {value!r}")
        value = fields
    unknown = set(value) - {"pooling_type", "normalize"}
    if unknown:
        raise ValueError(f"override_pooler_config keys {sorted(unknown)} are not supported on vLLM 0.6.2; "
                         "the backend reads 'pooling_type' and 'normalize'.")
    pooling_type = value.get("pooling_type")
    if pooling_type is not None:
        if not isinstance(pooling_type, str) or pooling_type.upper() not in POOLING_TYPES:
            raise ValueError(f"pooling_type {pooling_type!r} is not one of {', '.join(POOLING_TYPES)}.")
        pooling_type = pooling_type.upper()
    normalize = value.get("normalize")
    if normalize is not None and not isinstance(normalize, bool):
        raise ValueError(f"normalize must be true or false, got {normalize!r}.")
    return PoolerOverride(pooling_type=pooling_type, normalize=normalize)


def default_runner(architectures: list, vllm_embedding_mode: bool) -> str:
    """``runner="auto"``: vLLM's own embedding architectures pool; then decided by the name's ending."""
    if vllm_embedding_mode:
        return "pooling"
    for arch in architectures:
        if arch.endswith(_GENERATE_SUFFIXES):
            return "generate"
    for arch in architectures:
        if arch.endswith(_POOLING_SUFFIXES):
            return "pooling"
    return "generate"


def runner_of(model_config: Any) -> str:
    """The runner a ``ModelConfig`` (patched) was resolved to; plain configs follow vLLM."""
    runner = getattr(model_config, "runner", None)
    if runner in ("generate", "pooling"):
        return runner
    return "pooling" if getattr(model_config, "embedding_mode", False) else "generate"


def pooling_task(task: object, architectures: list) -> str:
    """What a pooling engine computes: ``"embed"`` (the body's pooled hidden states) or one of
    :data:`HEAD_TASKS` (the checkpoint's sequence-classification head). ``task="auto"`` follows the
    architecture name, as newer vLLM does: ``...ForSequenceClassification`` classifies, the rest embeds.
    Refuses what the backend cannot serve faithfully: token-classification heads, and head tasks for
    checkpoints that have no sequence-classification head."""
    task = "auto" if task is None else str(task).lower()
    task = "embed" if task == "embedding" else task
    names = ", ".join(architectures) or "none"
    if any(a.endswith(_TOKEN_HEAD_SUFFIX) for a in architectures) and task != "embed":
        raise ValueError(
            f"{names}: token-classification heads (one output per token) are not supported; the Transformers "
            "backend runs sequence-classification heads only, like newer vLLM's. Use a ...ForSequenceClassification "
            "checkpoint, or task='embed' for the body's embeddings without the head.")
    has_head = any(a.endswith(_SEQUENCE_HEAD_SUFFIX) for a in architectures)
    if task == "auto":
        return "classify" if has_head else "embed"
    if task in HEAD_TASKS and not has_head:
        raise ValueError(
            f"task={task!r} needs a sequence-classification head, but this checkpoint's architectures are {names}: "
            "it has none (classify / score / reward run a ...ForSequenceClassification checkpoint's own head). "
            "Use task='embed' for embeddings, or a checkpoint saved as ...ForSequenceClassification.")
    return task


def pooling_task_of(model_config: Any) -> Optional[str]:
    """The pooling task a patched ``ModelConfig`` was resolved to (None for generating engines)."""
    return getattr(model_config, "pooling_task", None) if runner_of(model_config) == "pooling" else None
