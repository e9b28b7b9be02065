"""Patch of ``vllm.transformers_utils.tokenizer.get_cached_tokenizer`` (vLLM 0.6.2; also bound by name in
``vllm.entrypoints.llm``).

vLLM 0.6.2 caches ``tokenizer.all_special_tokens_extended``, which transformers 5 removed: every engine
with a tokenizer fails with ``AttributeError`` there. Where the attribute is missing, the tokenizer gets
an equivalent (the special tokens as strings; vLLM only reads it for its cached property) first.

Decode step: not on it (applied at ``import vllm``; acts when the engine is configured or loads the model).
"""
from __future__ import annotations

from ._base import Patch, require_parameters, wrap


class TokenizerPatch(Patch):
    name = "tokenizer"
    target = "vllm.transformers_utils.tokenizer.get_cached_tokenizer: transformers-5 tokenizers"

    wraps = (("vllm.transformers_utils.tokenizer", "get_cached_tokenizer"), ("vllm.entrypoints.llm", "get_cached_tokenizer"))

    def _apply(self) -> None:
        tokenizer_module, llm_module = self.owner(0), self.owner(1)
        require_parameters(tokenizer_module.get_cached_tokenizer, ["tokenizer"], self.target)

        def make(original):
            def get_cached_tokenizer(tokenizer):
                if not hasattr(tokenizer, "all_special_tokens_extended"):
                    extended = list(tokenizer.all_special_tokens)
                    base = tokenizer.__class__
                    tokenizer.__class__ = type(base.__name__, (base,), {
                        "all_special_tokens_extended": property(lambda self: extended)})
                return original(tokenizer)

            return get_cached_tokenizer

        wrap(tokenizer_module, "get_cached_tokenizer", self.name, make)
        llm_module.get_cached_tokenizer = tokenizer_module.get_cached_tokenizer
