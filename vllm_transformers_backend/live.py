"""Live-model access: the Hugging Face model running inside a ``vllm.LLM`` (interpretability hooks).

    from vllm_transformers_backend.live import get_hf_model
    body = get_hf_model(llm)                       # e.g. LlamaModel, with vLLM's layers swapped in
    handle = body.layers[5].mlp.register_forward_hook(lambda mod, args, out: seen.append(out))
    llm.generate(prompts, params)

Hooks fire on every eager forward. With CUDA graphs (vLLM's default on GPUs) decode steps replay a
recorded graph and run no Python, so hooks fire only on prefill (and during capture): build the LLM
with ``enforce_eager=True`` to see every step.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ._logging import get_logger

logger = get_logger(__name__)


def get_hf_model(llm: Any) -> nn.Module:
    """The HF model body (a ``PreTrainedModel``) the backend runs inside ``llm``.

    Its module names are HF's, relative to the body: a causal model's ``model.layers[5].mlp`` in HF is
    ``get_hf_model(llm).layers[5].mlp``. Only single-process engines are reachable (TP = PP = 1); its
    activations come flattened as one batch of all scheduled tokens (``[1, num_tokens, hidden]``).
    """
    from .base import Base

    engine = llm.llm_engine
    runner = getattr(getattr(engine.model_executor, "driver_worker", None), "model_runner", None)
    model = getattr(runner, "model", None)
    if model is None:
        raise ValueError("this LLM's model is not reachable in this process (multi-process executor: use "
                         "tensor_parallel_size=1 and pipeline_parallel_size=1)")
    if not isinstance(model, Base):
        raise ValueError(f"this LLM runs vLLM's own {type(model).__name__}, not a Hugging Face model: build it "
                         "with model_impl='transformers'")
    if not engine.model_config.enforce_eager:
        logger.warning("CUDA graphs are on: forward hooks will not fire on decode steps (graph replay runs no "
                       "Python). Build the LLM with enforce_eager=True to observe every step.")
    return model.model
