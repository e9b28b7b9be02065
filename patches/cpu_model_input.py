"""Patch of ``vllm.worker.cpu_model_runner.CPUModelRunner.make_model_input_from_broadcasted_tensor_dict``
(vLLM 0.6.2, CPU build only).

With tensor parallelism the driver broadcasts each step's input to the other ranks as a tensor dict,
sampling fields included (``ModelInputForCPUWithSamplingMetadata.as_broadcastable_tensor_dict`` adds
``selected_token_indices``). The receiving side rebuilds it with the base ``ModelInputForCPU``, which
has no sampling field, so every worker but the driver fails with "unexpected keyword argument
'selected_token_indices'" on its first step. The patched method rebuilds with the runner's own
``_model_input_cls`` (the class the driver built the input with), as vLLM's GPU runner does.

Known from vLLM 0.6.2+cpu; does nothing on other builds.

Decode step: on the CPU build at TP > 1, each non-driver rank rebuilds the step's input through it.
"""
from __future__ import annotations

from ._base import require_parameters, wrap
from ._cpu import CpuBuildPatch


class CpuModelInputPatch(CpuBuildPatch):
    name = "cpu_model_input"
    target = ("vllm.worker.cpu_model_runner.CPUModelRunner.make_model_input_from_broadcasted_tensor_dict: "
              "the runner's own input class")

    wraps = (("vllm.worker.cpu_model_runner:CPUModelRunner", "make_model_input_from_broadcasted_tensor_dict"),)

    def _apply(self) -> None:
        owner = self.owner()
        require_parameters(owner.make_model_input_from_broadcasted_tensor_dict, ["tensor_dict"], self.target)

        def make(original):
            def make_model_input_from_broadcasted_tensor_dict(self, tensor_dict):
                return self._model_input_cls.from_broadcasted_tensor_dict(tensor_dict, attn_backend=self.attn_backend)

            return make_model_input_from_broadcasted_tensor_dict

        wrap(owner, "make_model_input_from_broadcasted_tensor_dict", self.name, make)
