"""Patch of ``vllm.entrypoints.openai.serving_engine.OpenAIServing._guided_decode_logits_processor``
(vLLM 0.6.2): a request that asks for no guided decoding no longer imports a guided-decoding backend, and
one that asks for it under a backend that cannot be imported gets HTTP 400 naming the backend and the fix.

vLLM 0.6.2's completion and chat routes import the configured guided-decoding backend on every request,
guided or not. With the transformers this package needs (4.48+), lm-format-enforcer 0.10's vLLM integration
fails to import (``LogitsWarper`` left transformers), and outlines 0.0.46 fails under numpy 2: the server
then answers every request, plain ones included, with HTTP 500. A request is guided when it sets one of
``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``, a ``response_format`` other
than ``text``, or a named tool; only those reach vLLM's code, as before.

Decode step: not on it (acts once per request, before the request reaches the engine).
"""
from __future__ import annotations

from typing import Any

from ._base import FixPatch, require_parameters, wrap

GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def asks_for_guidance(request: Any) -> bool:
    """Whether vLLM 0.6.2 would build a guided-decoding logits processor for this OpenAI request."""
    if any(getattr(request, field, None) is not None for field in GUIDED_FIELDS):
        return True
    response_format = getattr(request, "response_format", None)
    if response_format is not None and getattr(response_format, "type", "text") != "text":
        return True
    # "none" / "auto" are strings; a named tool (an object) becomes a JSON-schema guide
    tool_choice = getattr(request, "tool_choice", None)
    return tool_choice is not None and not isinstance(tool_choice, str)


class GuidedDecodingPatch(FixPatch):
    name = "guided_decoding"
    target = ("vllm.entrypoints.openai.serving_engine.OpenAIServing._guided_decode_logits_processor: "
              "guided-decoding backends imported only for guided requests")

    wraps = (("vllm.entrypoints.openai.serving_engine:OpenAIServing", "_guided_decode_logits_processor"),)

    def _apply(self) -> None:
        owner = self.owner()
        require_parameters(owner._guided_decode_logits_processor, ["request", "tokenizer"], self.target)

        def make(original):
            async def _guided_decode_logits_processor(self, request, tokenizer, *args, **kwargs):
                if not asks_for_guidance(request):
                    return None
                try:
                    return await original(self, request, tokenizer, *args, **kwargs)
                except ImportError as exc:
                    backend = (getattr(request, "guided_decoding_backend", None)
                               or (await self.engine_client.get_decoding_config()).guided_decoding_backend)
                    # ValueError: the routes answer it with HTTP 400 and this message
                    raise ValueError(
                        f"guided decoding backend {backend!r} cannot be imported with the installed packages "
                        f"({exc}); choose another with the request's 'guided_decoding_backend' or the server's "
                        "--guided-decoding-backend ('outlines' or 'lm-format-enforcer')") from exc

            return _guided_decode_logits_processor

        wrap(owner, "_guided_decode_logits_processor", self.name, make)
