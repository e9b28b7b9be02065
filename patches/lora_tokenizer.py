"""Patch of ``vllm.transformers_utils.tokenizer.get_lora_tokenizer`` (vLLM 0.6.2; also bound by name, with
its ``make_async`` twin, in ``vllm.transformers_utils.tokenizer_group.tokenizer_group``): an adapter folder
whose tokenizer cannot be loaded falls back to the base model's tokenizer, whatever the loader raised.

vLLM 0.6.2 falls back only on ``OSError``. A PEFT adapter without tokenizer files raises something else:
``ValueError`` ("Unrecognized model", no config.json), or, where transformers follows
``adapter_config.json`` to a Llama base, sentencepiece's "Either model_file or model_proto must be
specified" (seen on the GPU host); ``vllm serve --lora-modules`` then answered every request for the
adapter with HTTP 400, for native models as for the backend. Newer vLLM catches every exception here; so
does this patch, with the same warning.

Decode step: not on it (acts when a request names an adapter whose tokenizer is not cached yet).
"""
from __future__ import annotations

from ._base import FixPatch, require_parameters, wrap


class LoRATokenizerPatch(FixPatch):
    name = "lora_tokenizer"
    target = ("vllm.transformers_utils.tokenizer.get_lora_tokenizer: the base tokenizer for adapters "
              "without a loadable one")

    wraps = (("vllm.transformers_utils.tokenizer", "get_lora_tokenizer"),
             ("vllm.transformers_utils.tokenizer_group.tokenizer_group", "get_lora_tokenizer"))

    def _apply(self) -> None:
        tokenizer_module, group_module = self.owner(0), self.owner(1)
        require_parameters(tokenizer_module.get_lora_tokenizer, ["lora_request"], self.target)
        logger = tokenizer_module.logger

        def make(original):
            def get_lora_tokenizer(lora_request, *args, **kwargs):
                try:
                    return original(lora_request, *args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - vLLM >= 0.6.4 falls back on any error too
                    logger.warning("No tokenizer could be loaded from %s, using the base model's tokenizer "
                                   "instead. (Exception: %s)", lora_request.lora_path, exc)
                    return None

            return get_lora_tokenizer

        wrap(tokenizer_module, "get_lora_tokenizer", self.name, make)
        patched = tokenizer_module.get_lora_tokenizer
        tokenizer_module.get_lora_tokenizer_async = tokenizer_module.make_async(patched)
        group_module.get_lora_tokenizer = patched
        group_module.get_lora_tokenizer_async = tokenizer_module.get_lora_tokenizer_async
