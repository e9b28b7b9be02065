"""Patch of ``vllm.entrypoints.openai.serving_engine.OpenAIServing._normalize_prompt_tokens_to_input``
(vLLM 0.6.2): token-id prompts sent to the OpenAI server are checked against the vocabulary before the
server decodes them.

The server decodes a token-id prompt (for logging and echo) before anything else looks at it; a negative
or huge id made the tokenizer raise ``OverflowError``, which the server answered with HTTP 500. The ids
now go through the same check as in the engine (prompt_validation), whose ``ValueError`` the
completion, embedding and tokenization endpoints answer with HTTP 400 and an OpenAI-style error body.

Decode step: not on it (acts once per request, when the server reads its prompt).
"""
from __future__ import annotations

from ._base import FixPatch, require_parameters, wrap
from .prompt_validation import check_token_ids, vocabulary_size

#: Token ids are unsigned 32-bit integers to Hugging Face tokenizers; larger ones fail to decode.
DECODABLE_IDS = 2**32


class OpenAIPromptTokensPatch(FixPatch):
    name = "openai_prompt_tokens"
    target = ("vllm.entrypoints.openai.serving_engine.OpenAIServing._normalize_prompt_tokens_to_input: "
              "token ids checked before they are decoded")

    wraps = (("vllm.entrypoints.openai.serving_engine:OpenAIServing", "_normalize_prompt_tokens_to_input"),)

    def _apply(self) -> None:
        owner = self.owner()
        require_parameters(owner._normalize_prompt_tokens_to_input,
                           ["request", "tokenizer", "prompt_ids", "truncate_prompt_tokens"], self.target)

        def make(original):
            def _normalize_prompt_tokens_to_input(self, request, tokenizer, prompt_ids, *args, **kwargs):
                if getattr(self, "lora_requests", None):
                    # adapters may add tokens after the base vocabulary: the engine, which knows its LoRA
                    # config, checks those; here only what the tokenizer cannot decode is refused
                    check_token_ids(prompt_ids, DECODABLE_IDS, limit="the ids a tokenizer can decode")
                else:
                    check_token_ids(prompt_ids, vocabulary_size(self.model_config, tokenizer))
                return original(self, request, tokenizer, prompt_ids, *args, **kwargs)

            return _normalize_prompt_tokens_to_input

        wrap(owner, "_normalize_prompt_tokens_to_input", self.name, make)
