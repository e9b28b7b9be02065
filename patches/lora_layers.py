"""Patch of ``vllm.lora.utils.from_layer`` (vLLM 0.6.2): LoRA layers for the backend's linears.

vLLM's LoRA manager wraps each layer it targets with ``from_layer``, which picks a LoRA class by the exact
type of the layer (``type(layer) is RowParallelLinear``) and leaves any other layer unwrapped (the manager
then fails an assertion). The backend's linears are subclasses of vLLM's (returning the tensor HF
expects); the patch gives them vLLM's LoRA layers with the same tensor output
(:func:`vllm_transformers_backend.lora.lora_layer_for`) and hands every other layer to vLLM's function.
``vllm.lora.models`` imports ``from_layer`` by name, so that binding is replaced too.

Decode step: with LoRA enabled, the LoRA layers it picks run in place of the backend's linears (the patch
itself acts when vLLM's LoRA manager wraps the model, at load).
"""
from __future__ import annotations

from ._base import Patch, require_parameters, wrap


class LoRALayersPatch(Patch):
    name = "lora_layers"
    target = "vllm.lora.utils.from_layer (+ vllm.lora.models binding): LoRA layers for the backend's linears"
    #: Only LoRA needs it (the backend checks it is applied when a model gets a LoRA config).
    required = False

    wraps = (("vllm.lora.utils", "from_layer"), ("vllm.lora.models", "from_layer"))

    def _apply(self) -> None:
        from vllm_transformers_backend.lora import lora_layer_for

        utils, models = self.owner(0), self.owner(1)
        require_parameters(utils.from_layer, ["layer", "max_loras", "lora_config", "packed_modules_list"],
                           self.target)

        def make(original):
            def from_layer(layer, max_loras, lora_config, packed_modules_list, model_config=None):
                lora_cls = lora_layer_for(layer, lora_config)
                if lora_cls is None:
                    return original(layer, max_loras, lora_config, packed_modules_list, model_config)
                wrapped = lora_cls(layer)
                wrapped.create_lora_weights(max_loras, lora_config, model_config)
                return wrapped

            return from_layer

        wrap(utils, "from_layer", self.name, make)
        models.from_layer = utils.from_layer
