"""Patch of ``vllm.engine.llm_engine.LLMEngine._add_processed_request`` (vLLM 0.6.2): prompts are checked
before they enter the engine, as newer vLLM's input processor does (``_validate_model_inputs``).

vLLM 0.6.2 only refuses empty prompts there. Everything else reached the model:

* a token id outside the vocabulary (``>= vocab_size`` or ``< 0``) failed inside the embedding lookup
  (``IndexError: index out of range in self``) in the middle of a step: the whole batch was lost, the
  failed request stayed in the scheduler (the next ``LLM.generate`` died on an ``AssertionError``) and
  the OpenAI server's engine was declared dead;
* a prompt longer than ``max_model_len`` was dropped by the scheduler with a log warning and came back
  as empty text with ``finish_reason='length'``.

Every way into the engine goes through ``_add_processed_request`` (``LLM``, ``LLMEngine.add_request``,
``AsyncLLMEngine`` and the OpenAI server's ``MQLLMEngine``), for vLLM's own models and the backend alike.
A refused prompt raises :class:`InvalidPromptError` (a ``ValueError``, which the OpenAI server answers with
HTTP 400) and never becomes a sequence: the engine and the other requests go on.

Decode step: not on it (acts once per request, before it enters the engine).
"""
from __future__ import annotations

import operator
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from ._base import FixPatch, require_parameters, wrap

#: How many bad ids an error names (a prompt of random ids could hold thousands).
NAMED_IDS = 5


class InvalidPromptError(ValueError):
    """A prompt the engine cannot run, refused before it enters the engine (HTTP 400 on the server)."""


def vocabulary_size(model_config: Any, tokenizer: Any = None) -> int:
    """How many token ids the model's input embedding takes. Multimodal models may use placeholder ids
    from their tokenizer beyond the language model's vocabulary (which the model replaces by features
    before any embedding lookup), so there the tokenizer's size counts too, as upstream vLLM does."""
    size = int(model_config.get_vocab_size())
    if tokenizer is not None and getattr(model_config, "is_multimodal_model", False):
        size = max(size, len(tokenizer))
    return size


def check_token_ids(token_ids: Iterable[Any], vocab_size: int, what: str = "prompt",
                    limit: Optional[str] = None) -> None:
    """Raises :class:`InvalidPromptError` naming the ids (and positions) that are not integers in
    ``[0, vocab_size)``; ``limit`` says what ``vocab_size`` is when it is not the model's vocabulary."""
    bad: List[Tuple[int, Any]] = []
    count = 0
    for position, token in enumerate(token_ids):
        try:
            valid = 0 <= operator.index(token) < vocab_size
        except TypeError:
            valid = False
        if not valid:
            count += 1
            if len(bad) < NAMED_IDS:
                bad.append((position, token))
    if not count:
        return
    named = ", ".join(f"{token!r} (position {position})" for position, token in bad)
    more = f" and {count - len(bad)} more" if count > len(bad) else ""
    limit = limit or f"the model's vocabulary of {vocab_size} tokens"
    raise InvalidPromptError(
        f"The {what} has {count} token id{'s' if count > 1 else ''} outside {limit} (valid ids are "
        f"integers 0 to {vocab_size - 1}): {named}{more}."
    )


def check_prompt_length(length: int, max_len: int, generating: bool, what: str = "prompt") -> None:
    """Raises :class:`InvalidPromptError` for an empty prompt, one longer than ``max_len``, and, when the
    engine generates, one that leaves no room for a single generated token (as upstream vLLM)."""
    if length == 0:
        raise InvalidPromptError(f"The {what} cannot be empty: give at least one token (a text prompt counts "
                                 "as empty when it tokenizes to no tokens).")
    fix = "shorten the prompt, or start the engine with a larger max_model_len (within what the model supports)."
    if length > max_len:
        raise InvalidPromptError(f"The {what} has {length} tokens, more than the maximum model length "
                                 f"(max_model_len) of {max_len}: {fix}")
    if generating and length == max_len:
        raise InvalidPromptError(f"The {what} has {length} tokens, as many as the maximum model length "
                                 f"(max_model_len) of {max_len}, which leaves no room for a generated token: {fix}")


def _prompts_of(inputs: Any, is_encoder_decoder: bool) -> Sequence[Tuple[str, Optional[List[int]], bool]]:
    """(name, token ids, whether it must not be empty) of each prompt in vLLM's processed inputs."""
    if is_encoder_decoder:
        return (("encoder prompt", inputs.get("encoder_prompt_token_ids"), True),
                ("decoder prompt", inputs.get("prompt_token_ids"), False))
    return (("prompt", inputs.get("prompt_token_ids"), True),)


def validate_inputs(engine: Any, inputs: Any, params: Any, lora_request: Any) -> None:
    """Every check of one request's processed inputs, against ``engine``'s model and limits."""
    from vllm import SamplingParams

    model_config = engine.model_config
    tokenizer = None
    if getattr(model_config, "is_multimodal_model", False) and engine.tokenizer is not None:
        tokenizer = engine.get_tokenizer(lora_request)
    vocab_size = vocabulary_size(model_config, tokenizer)
    lora_config = getattr(engine, "lora_config", None)
    if lora_request is not None and lora_config is not None:
        # an adapter may add tokens after the base vocabulary (vLLM's LoRA embedding holds them)
        vocab_size += int(getattr(lora_config, "lora_extra_vocab_size", 0) or 0)
    max_len = model_config.max_model_len
    long_context = getattr(lora_request, "long_lora_max_len", None) if lora_request is not None else None
    if long_context:  # the scheduler's own limit for long-context LoRA
        max_len = long_context
    generating = isinstance(params, SamplingParams)
    for what, token_ids, required in _prompts_of(inputs, engine.is_encoder_decoder_model()):
        if token_ids is None or (not required and not token_ids):
            continue
        check_prompt_length(len(token_ids), max_len, generating and what != "encoder prompt", what)
        check_token_ids(token_ids, vocab_size, what)


class PromptValidationPatch(FixPatch):
    name = "prompt_validation"
    target = ("vllm.engine.llm_engine.LLMEngine._add_processed_request: token ids, length and emptiness "
              "checked before a request enters the engine")

    wraps = (("vllm.engine.llm_engine:LLMEngine", "_add_processed_request"),)

    def _apply(self) -> None:
        owner = self.owner()
        require_parameters(owner._add_processed_request, ["request_id", "processed_inputs", "params",
                                                          "lora_request"], self.target)

        def make(original):
            def _add_processed_request(self, request_id, processed_inputs, params, *args, **kwargs):
                lora_request = kwargs.get("lora_request", args[1] if len(args) > 1 else None)
                validate_inputs(self, processed_inputs, params, lora_request)
                return original(self, request_id, processed_inputs, params, *args, **kwargs)

            return _add_processed_request

        wrap(owner, "_add_processed_request", self.name, make)
