"""Patch of ``vllm.entrypoints.llm.LLM`` (vLLM 0.6.2): ``LLM.embed``.

Newer vLLM spells embedding ``llm.embed(prompts)``; 0.6.2 has only ``llm.encode`` (kept as it is). The
added method runs ``encode`` and returns its ``EmbeddingRequestOutput`` list (one vector per prompt in
``.outputs.embedding``), with an error that names ``runner="pooling"`` when the engine generates.
"""
from __future__ import annotations

from typing import Any, List

from ._base import Patch, mark, require_parameters


def embed(self, prompts: Any, pooling_params: Any = None, *, use_tqdm: bool = True, lora_request: Any = None,
          prompt_adapter_request: Any = None) -> List[Any]:
    """One embedding per prompt (``output.outputs.embedding``) from a ``runner="pooling"`` engine."""
    if not self.llm_engine.model_config.embedding_mode:
        raise ValueError("LLM.embed() needs an embedding engine: create it with runner='pooling' "
                         "(LLM(model=..., runner='pooling')).")
    return self.encode(prompts, pooling_params=pooling_params, use_tqdm=use_tqdm, lora_request=lora_request,
                       prompt_adapter_request=prompt_adapter_request)


mark(embed, "llm")


class LLMPatch(Patch):
    name = "llm"
    target = "vllm.entrypoints.llm.LLM.embed (newer vLLM's name for encode)"

    wraps = (("vllm.entrypoints.llm:LLM", "embed"),)

    def _apply(self) -> None:
        owner = self.owner()
        require_parameters(owner.encode, ["prompts", "pooling_params", "use_tqdm", "lora_request",
                                          "prompt_adapter_request"], self.target)
        if "embed" in owner.__dict__:
            raise RuntimeError(f"{self.target}: this LLM already has an embed method; unknown vLLM build")
        owner.embed = embed
