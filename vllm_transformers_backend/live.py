"""Live-model access: the Hugging Face model running inside a ``vllm.LLM`` (interpretability hooks).

    from vllm_transformers_backend.live import get_hf_model
    body = get_hf_model(llm)                       # e.g. LlamaModel, with vLLM's layers swapped in
    handle = body.layers[5].mlp.register_forward_hook(lambda mod, args, out: seen.append(out))
    llm.generate(prompts, params)

Hooks fire on every eager forward. With CUDA graphs (vLLM's default on GPUs) decode steps replay a
recorded graph and run no Python, so hooks fire only on prefill (and during capture): build the LLM
with ``enforce_eager=True`` to see every step.

The body's lean forward (``body_forward.py``) calls no layer, attention or MLP module: ``get_hf_model`` always
puts HF's body forward back. Residual fusion (``residual.py``) makes every decoder layer but the last return only its MLP output and hand
the residual to the next layer, as vLLM's own models do, and the lean attention forward
(``attention_forward.py``) runs the fused ``qkv_proj`` without calling HF's ``q_proj``/``k_proj``/``v_proj``.
``get_hf_model`` puts HF's layer and attention forwards back by default, so a hook on a whole layer sees
HF's output and hooks on the q/k/v projections fire; ``hf_layer_outputs=False`` keeps both (faster; hooks
on norms, attention modules, MLPs and ``o_proj`` see HF's values either way).

Decode step: not on it; hooks registered through it fire inside the step's HF module calls.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ._logging import get_logger

logger = get_logger(__name__)


def backend_model(llm: Any) -> nn.Module:
    """The backend model (``TransformersForCausalLM``/``TransformersForEmbedding``) inside ``llm``, as built:
    its ``speed_passes`` say what was replaced (``doctor(llm)`` prints them). Single-process engines only."""
    from .base import Base

    runner = getattr(getattr(llm.llm_engine.model_executor, "driver_worker", None), "model_runner", None)
    model = getattr(runner, "model", None)
    if model is None:
        raise ValueError("this LLM's model is not reachable in this process (multi-process executor: use "
                         "tensor_parallel_size=1 and pipeline_parallel_size=1, or read the 'speed pass' lines its "
                         "workers log)")
    if not isinstance(model, Base):
        raise ValueError(f"this LLM runs vLLM's own {type(model).__name__}, not a Hugging Face model: build it "
                         "with model_impl='transformers'")
    return model


def get_hf_model(llm: Any, hf_layer_outputs: bool = True) -> nn.Module:
    """The HF model body (a ``PreTrainedModel``) the backend runs inside ``llm``.

    Its module names are HF's, relative to the body: a causal model's ``model.layers[5].mlp`` in HF is
    ``get_hf_model(llm).layers[5].mlp``. Only single-process engines are reachable (TP = PP = 1); its
    activations come flattened as one batch of all scheduled tokens (``[1, num_tokens, hidden]``).
    ``hf_layer_outputs``: decoder layers return HF's hidden states and attention modules run HF's forward
    (residual fusion and lean attention undone for this engine).
    """
    model = backend_model(llm)
    if not llm.llm_engine.model_config.enforce_eager:
        logger.warning("CUDA graphs are on: forward hooks will not fire on decode steps (graph replay runs no "
                       "Python). Build the LLM with enforce_eager=True to observe every step.")
    from .body_forward import restore_hf_body

    if restore_hf_body(model):  # hooks on layers, attention modules and MLPs fire only inside HF's body
        _mark_undone(model, "body_forward")
        logger.info("body_forward undone: HF's body forward runs, so hooks on its modules fire")
    if hf_layer_outputs:
        from .attention_forward import restore_hf_attention
        from .residual import unfuse_residual_norms

        for name, undo, what in (("residual", unfuse_residual_norms, "decoder layers"),
                                 ("attention_forward", restore_hf_attention, "attention modules")):
            undone = undo(model.model)
            if not undone:
                continue
            _mark_undone(model, name)
            logger.info("%s undone on %d %s: hooks see HF's modules run (get_hf_model(llm, "
                        "hf_layer_outputs=False) keeps it)", name, undone, what)
    return model.model


def _mark_undone(model: nn.Module, name: str) -> None:
    for speed_pass in model.speed_passes:  # what doctor(llm) lists is what runs
        if speed_pass.name == name:
            speed_pass.status, speed_pass.reason = "undone", "get_hf_model(llm) put HF's forwards back"
            speed_pass.replacements = []
