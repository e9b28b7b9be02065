"""Patch of ``vllm.transformers_utils.tokenizer.get_cached_tokenizer`` (vLLM 0.6.2; also bound by name in
``vllm.entrypoints.llm``).

vLLM 0.6.2 caches ``tokenizer.all_special_tokens_extended``, which transformers 5 removed: every engine
with a tokenizer fails with ``AttributeError`` there. Where the attribute is missing, the tokenizer gets
an equivalent (the special tokens as strings; vLLM only reads it for its cached property) first.
"""
from __future__ import annotations

from ._base import Patch, is_wrapped, require_parameters, wrap


class TokenizerPatch(Patch):
    name = "tokenizer"
    target = "vllm.transformers_utils.tokenizer.get_cached_tokenizer: transformers-5 tokenizers"

    def _modules(self):
        import vllm.entrypoints.llm as llm
        from vllm.transformers_utils import tokenizer

        return tokenizer, llm

    def is_applied(self) -> bool:
        return all(is_wrapped(m.get_cached_tokenizer, self.name) for m in self._modules())

    def _apply(self) -> None:
        tokenizer_module, llm_module = self._modules()
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
