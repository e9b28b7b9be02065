"""Patch of ``vllm.entrypoints.llm.LLM._validate_and_add_requests`` and ``LLM._run_engine`` (vLLM 0.6.2):
one ``LLM.generate``/``encode`` call either runs all its prompts or leaves nothing behind in the engine.

``LLM.generate`` reports errors by raising. vLLM 0.6.2 added a batch's prompts to the engine one by one,
so a prompt refused in the middle (prompt_validation) raised with the prompts before it still queued:
the next call ran them and returned their outputs mixed into its own. And when a step failed, its
requests stayed in the scheduler half-run, so every later call failed too (``AssertionError`` in the
scheduler). With this patch:

* a batch with a bad prompt fails whole, before anything runs: the prompts already added are aborted
  and the error (an ``InvalidPromptError``, a ``ValueError``) names the bad prompt's index in the batch;
* a call whose engine steps raise (any exception, ``KeyboardInterrupt`` included) aborts its unfinished
  requests and drops the failed step's pending outputs before re-raising, so the same ``LLM`` serves
  the next call.

Upstream vLLM's ``LLM`` also aborts the requests it added when adding one fails.

Decode step: not on it (acts when ``LLM`` adds a call's prompts and when a call's engine loop raises).
"""
from __future__ import annotations

from typing import Any, Set

from ._base import FixPatch, require_parameters, wrap
from .prompt_validation import InvalidPromptError


def unfinished_request_ids(engine: Any) -> Set[str]:
    """Ids of the requests the engine's schedulers hold (waiting, running or swapped out)."""
    ids: Set[str] = set()
    for scheduler in engine.scheduler:
        for queue in (scheduler.waiting, scheduler.running, scheduler.swapped):
            ids.update(group.request_id for group in queue)
    return ids


def discard_failed_step(engine: Any) -> None:
    """Aborts every request left in the engine and drops outputs queued for them by a step that raised."""
    engine.abort_request(sorted(unfinished_request_ids(engine)))
    for context in getattr(engine, "scheduler_contexts", ()):
        context.output_queue.clear()
        context.request_outputs.clear()
    cached = getattr(engine, "cached_scheduler_outputs", None)
    if cached:  # multi-step scheduling keeps the last schedule for its remaining steps
        state_class = type(cached[0])
        for index in range(len(cached)):
            cached[index] = state_class()


def _batch_size(inputs: Any) -> int:
    return 1 if isinstance(inputs, (str, dict)) else len(inputs)


class LLMRequestsPatch(FixPatch):
    name = "llm_requests"
    target = ("vllm.entrypoints.llm.LLM._validate_and_add_requests / _run_engine: a call runs all its prompts "
              "or leaves nothing in the engine")

    wraps = (("vllm.entrypoints.llm:LLM", "_validate_and_add_requests"), ("vllm.entrypoints.llm:LLM", "_run_engine"))

    def _apply(self) -> None:
        owner = self.owner()
        require_parameters(owner._validate_and_add_requests, ["inputs", "params"], self.target)
        require_parameters(owner._run_engine, ["use_tqdm"], self.target)

        def make_add(original):
            def _validate_and_add_requests(self, inputs, params, *args, **kwargs):
                before = unfinished_request_ids(self.llm_engine)
                try:
                    return original(self, inputs, params, *args, **kwargs)
                except BaseException as exc:
                    added = unfinished_request_ids(self.llm_engine) - before
                    self.llm_engine.abort_request(sorted(added))
                    total = _batch_size(inputs)
                    if isinstance(exc, InvalidPromptError) and total > 1:
                        # prompts are added in order: the ones added before it are its index
                        raise InvalidPromptError(
                            f"Prompt {len(added)} of this batch of {total} (counting from 0) was refused, so none "
                            f"of the batch ran: {exc}") from exc
                    raise

            return _validate_and_add_requests

        def make_run(original):
            def _run_engine(self, *args, **kwargs):
                try:
                    return original(self, *args, **kwargs)
                except BaseException:
                    discard_failed_step(self.llm_engine)
                    raise

            return _run_engine

        wrap(owner, "_validate_and_add_requests", self.name, make_add)
        wrap(owner, "_run_engine", self.name, make_run)
