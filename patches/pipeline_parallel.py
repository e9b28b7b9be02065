"""Patch of ``vllm.config.ModelConfig.verify_with_parallel_config`` (vLLM 0.6.2): pipeline parallelism.

Two checks of ``pipeline_parallel_size > 1``:

* vLLM 0.6.2 allows it only for the architectures of its own ``_PP_SUPPORTED_MODELS`` list (its own
  models that implement it) and raises NotImplementedError for any other, checked on the config's
  ``architectures``. When the backend runs the model (``model_impl="transformers"``, or ``"auto"``
  without a vLLM implementation), the architecture is pipeline-capable through its ``pp_plan`` (checked,
  with a clear error, when the backend builds the model), so the check runs with the config's
  architectures counted as supported. Models vLLM runs itself keep vLLM's check unchanged.
* On the CPU build (``vllm.utils.is_cpu()``) any pipeline parallelism is refused with an error naming the
  limit: the CPU executor starts ``tensor_parallel_size`` workers only, while each initialises
  ``torch.distributed`` for ``tensor_parallel_size * pipeline_parallel_size`` ranks, so rank 0 waits
  forever for ranks nobody starts (measured: native ``LlamaForCausalLM``, TP=1, PP=2, no progress after
  90 s), and the CPU model runner has no pipeline hand-over.

Decode step: not on it (applied at ``import vllm``; acts when the engine is configured or loads the model).
"""
from __future__ import annotations

from ._base import Patch, require_parameters, wrap
from ._cpu import is_cpu_build


class PipelineParallelPatch(Patch):
    name = "pipeline_parallel"
    target = ("vllm.config.ModelConfig.verify_with_parallel_config: pipeline parallelism for backend models; "
              "refused on the CPU build")

    wraps = (("vllm.config:ModelConfig", "verify_with_parallel_config"),)

    def _apply(self) -> None:
        import vllm.config as config_module

        from vllm_transformers_backend.registry import runs_on_backend

        owner = self.owner()
        require_parameters(owner.verify_with_parallel_config, ["parallel_config"], self.target)
        if not isinstance(getattr(config_module, "_PP_SUPPORTED_MODELS", None), list):
            raise RuntimeError("vllm.config._PP_SUPPORTED_MODELS is not a list: unknown vLLM build")

        def make(original):
            def verify_with_parallel_config(self, parallel_config):
                size = parallel_config.pipeline_parallel_size
                if size > 1 and is_cpu_build():
                    raise NotImplementedError(
                        f"pipeline_parallel_size={size}: vLLM 0.6.2's CPU executor starts tensor_parallel_size "
                        "workers only and has no pipeline hand-over, so pipeline parallelism cannot run on the CPU "
                        "(it would wait forever for the missing ranks). Use tensor_parallel_size on the CPU, or "
                        "pipeline parallelism on GPUs.")
                if size <= 1 or not runs_on_backend(self):
                    return original(self, parallel_config)
                supported = config_module._PP_SUPPORTED_MODELS
                added = [a for a in (getattr(self.hf_config, "architectures", None) or []) if a not in supported]
                supported.extend(added)
                try:
                    return original(self, parallel_config)
                finally:
                    for arch in added:
                        supported.remove(arch)

            return verify_with_parallel_config

        wrap(owner, "verify_with_parallel_config", self.name, make)
