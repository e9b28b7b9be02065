"""Patch of ``vllm.config.ModelConfig.__init__`` (vLLM 0.6.2): ``model_impl``, ``runner``, task, pooler override.

``__init__`` takes the backend's options (or the ones ``EngineArgs.create_model_config`` is passing) and
stores them on the config, so that everything downstream, including worker processes that receive the
pickled config, can see them. ``runner="pooling"`` turns on vLLM 0.6.2's embedding mode, which vLLM
itself only sets for architectures in its ``_EMBEDDING_MODELS``: the scheduler then allocates no KV
blocks and the GPU worker picks ``EmbeddingModelRunner`` (the CPU one: the cpu_embedding patch).
A pooling engine also records its ``pooling_task`` (embed, classify, score or reward; see
``options.pooling_task``), which picks the backend's model class and the default of its outputs.
For models the backend windows per layer, vLLM's engine-wide sliding window is turned off after ``__init__``
(``vllm_transformers_backend.sliding_window.model_config_scope``).

Decode step: not on it (applied at ``import vllm``; acts when the engine is configured or loads the model).
"""
from __future__ import annotations

from vllm_transformers_backend.options import default_runner, pooling_task
from vllm_transformers_backend.sliding_window import model_config_scope

from ._base import Patch, wrap
from .engine_args import PENDING_OPTIONS, validated_options


class ModelConfigPatch(Patch):
    name = "model_config"
    target = "vllm.config.ModelConfig.__init__: model_impl, runner, override_pooler_config"

    wraps = (("vllm.config:ModelConfig", "__init__"),)

    def _apply(self) -> None:
        def make_init(original):
            def __init__(self, *args, model_impl=None, runner=None, task=None, override_pooler_config=None, **kwargs):
                pending = PENDING_OPTIONS.get()
                if pending is not None and model_impl is None and runner is None and task is None \
                        and override_pooler_config is None:
                    options = pending
                else:
                    options = validated_options(model_impl, runner, task, override_pooler_config)
                self.model_impl = options["model_impl"]
                self.override_pooler_config = options["override_pooler_config"]
                with model_config_scope(self, original, args, kwargs):  # per-layer windows: no global one
                    original(self, *args, **kwargs)
                runner_choice = options["runner"]
                architectures = list(getattr(self.hf_config, "architectures", None) or [])
                if runner_choice == "auto":
                    runner_choice = default_runner(architectures, bool(self.embedding_mode))
                self.runner = runner_choice
                self.embedding_mode = runner_choice == "pooling"
                self.pooling_task = pooling_task(options.get("task"), architectures) if self.embedding_mode else None
                if self.embedding_mode:
                    # vLLM decided this before embedding mode was known: nothing is generated.
                    self.use_async_output_proc = False

            return __init__

        wrap(self.owner(), "__init__", self.name, make_init)
