"""Patch of ``vllm.engine.arg_utils.EngineArgs.add_cli_args`` (vLLM 0.6.2): the backend's flags.

``--model-impl``, ``--runner`` / ``--task`` and ``--override-pooler-config`` (JSON), as newer vLLM spells them.

``vllm serve`` and ``python -m vllm.entrypoints.openai.api_server`` build their parser through
``AsyncEngineArgs.add_cli_args``, which calls ``EngineArgs.add_cli_args`` by attribute, so one patch
covers every entry point. The parser is built before any vLLM plugin loads: this patch must be in
place at import time (the start-up hook sees to it).

Decode step: not on it (applied at ``import vllm``; acts when the engine is configured or loads the model).
"""
from __future__ import annotations

from ._base import Patch, require_parameters, wrap
from vllm_transformers_backend.options import DEFAULTS, MODEL_IMPLS, RUNNERS, TASKS


#: The backend's flags (each added unless the parser already has it): name -> add_argument keywords.
OPTIONS = {
    "--model-impl": dict(
        type=str.lower, choices=list(MODEL_IMPLS), default=DEFAULTS["model_impl"],
        help="Which implementation of the model to use. 'vllm': vLLM's own model; 'transformers': the Hugging Face "
        "implementation through vllm-transformers-backend; 'auto': vLLM's own if vLLM has the architecture, the "
        "Transformers backend otherwise."),
    "--runner": dict(
        type=str.lower, choices=list(RUNNERS), default=DEFAULTS["runner"],
        help="'generate' for text generation, 'pooling' for embeddings and classifiers (/v1/embeddings, "
        "/classify, /score, /rerank); 'auto' decides from the architecture name (...Model and "
        "...ForSequenceClassification pool, ...ForCausalLM generates)."),
    "--task": dict(
        type=str.lower, choices=list(TASKS), default=DEFAULTS["task"],
        help="What the model computes: 'generate', or with --runner pooling 'embed' (/v1/embeddings), "
        "'classify' (/classify), 'score' (/score, /rerank) or 'reward' (a ...ForSequenceClassification "
        "head); any of these implies --runner pooling."),
    "--override-pooler-config": dict(
        type=str, default=None,
        help='JSON overriding the pooling a checkpoint declares, e.g. '
        '\'{"pooling_type": "MEAN", "normalize": true}\' (CLS, MEAN or LAST).'),
}


class CliPatch(Patch):
    name = "cli"
    target = "vllm.engine.arg_utils.EngineArgs.add_cli_args: --model-impl, --runner, --task, --override-pooler-config"

    wraps = (("vllm.engine.arg_utils:EngineArgs", "add_cli_args"),)

    def _apply(self) -> None:
        owner = self.owner()
        require_parameters(owner.add_cli_args, ["parser"], self.target)

        def make(original):
            def add_cli_args(parser, *args, **kwargs):
                parser = original(parser, *args, **kwargs)
                known = getattr(parser, "_option_string_actions", {})
                for flag, options in OPTIONS.items():
                    if flag not in known:
                        parser.add_argument(flag, **options)
                return parser

            return add_cli_args

        wrap(owner, "add_cli_args", self.name, make, static=True)
