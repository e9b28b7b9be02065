"""Import-time patches of vLLM 0.6.2, one module per patched target, and their registry.

Installed as ``vllm_transformers_backend.patches``. :func:`apply_all` runs when vLLM is imported (the
start-up hook) and again from vLLM's plugin loader in every engine and worker process; applying twice
is harmless. vLLM's plugin loader swallows exceptions, so a patch that cannot apply is logged as an
error here and re-checked, loudly, before a backend model is built (:func:`ensure_applied`, called by the
model_loader patch) and by ``python -m vllm_transformers_backend doctor``.

Decode step: not on it (the patches act at ``import vllm`` and at engine start; the model they
route to runs the step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from vllm_transformers_backend import envs
from vllm_transformers_backend.runtime import record_patches

from ._base import Patch, PatchError
from .cli import CliPatch
from .config_dtype import ConfigDtypePatch
from .cpu_embedding import CpuEmbeddingPatch
from .cpu_group_coordinator import CpuGroupCoordinatorPatch
from .cpu_model_input import CpuModelInputPatch
from .embedding_runner import EmbeddingRunnerPatch
from .engine_args import EngineArgsPatch
from .guided_decoding import GuidedDecodingPatch
from .hf_config import HFConfigPatch
from .launcher import LauncherPatch
from .llm import LLMPatch
from .llm_requests import LLMRequestsPatch
from .lora_layers import LoRALayersPatch
from .lora_tokenizer import LoRATokenizerPatch
from .model_architecture import ModelArchitecturePatch
from .model_config import ModelConfigPatch
from .model_loader import ModelLoaderPatch
from .mq_engine_liveness import MQEngineLivenessPatch
from .openai_prompt_tokens import OpenAIPromptTokensPatch
from .pipeline_parallel import PipelineParallelPatch
from .prompt_validation import PromptValidationPatch
from .rope import RopePatch
from .tokenizer import TokenizerPatch

#: In application order: ModelConfig before EngineArgs (create_model_config hands model_impl over).
PATCHES: List[Patch] = [
    HFConfigPatch(),
    ConfigDtypePatch(),
    RopePatch(),
    ModelConfigPatch(),
    EngineArgsPatch(),
    CliPatch(),
    ModelArchitecturePatch(),
    ModelLoaderPatch(),
    TokenizerPatch(),
    LoRATokenizerPatch(),
    LLMPatch(),
    LauncherPatch(),
    LoRALayersPatch(),
    PromptValidationPatch(),
    LLMRequestsPatch(),
    OpenAIPromptTokensPatch(),
    GuidedDecodingPatch(),
    MQEngineLivenessPatch(),
    CpuEmbeddingPatch(),
    EmbeddingRunnerPatch(),
    PipelineParallelPatch(),
    CpuGroupCoordinatorPatch(),
    CpuModelInputPatch(),
]


@dataclass
class PatchStatus:
    name: str
    target: str
    required: bool
    applied: bool
    error: Optional[str] = None


_errors: Dict[str, str] = {}


def _logger():
    from vllm_transformers_backend._logging import get_logger

    return get_logger("vllm_transformers_backend.patches")


def apply_all(origin: str = "call") -> List[PatchStatus]:
    """Applies every patch; logs (and, with ``VLLM_TRANSFORMERS_BACKEND_STRICT=1``, raises) failures."""
    failures = []
    for patch in PATCHES:
        try:
            patch.apply()
            _errors.pop(patch.name, None)
        except Exception as exc:  # any failure must reach the user, never pass silently
            _errors[patch.name] = f"{type(exc).__name__}: {exc}"
            failures.append(patch)
    if failures:
        message = "vllm-transformers-backend could not patch vLLM (%s): %s. model_impl='transformers' " \
                  "will not work; run `python -m vllm_transformers_backend doctor` for details."
        details = "; ".join(f"{p.name}: {_errors[p.name]}" for p in failures)
        _logger().error(message, origin, details)
        if envs.VLLM_TRANSFORMERS_BACKEND_STRICT:
            raise PatchError(message % (origin, details))
    return status()


def status() -> List[PatchStatus]:
    result = []
    for patch in PATCHES:
        try:
            applied = patch.supports_installed_vllm() and patch.is_applied()
        except Exception as exc:
            applied = False
            _errors.setdefault(patch.name, f"{type(exc).__name__}: {exc}")
        result.append(PatchStatus(patch.name, patch.target, patch.required, applied, _errors.get(patch.name)))
    record_patches(result)  # what backend code that needs an optional patch reads (it never imports the patches)
    return result


def ensure_applied() -> None:
    """Raises, naming each missing patch and why, unless every required patch is in place."""
    missing = [s for s in status() if s.required and not s.applied]
    if missing:
        apply_all(origin="backend")
        missing = [s for s in status() if s.required and not s.applied]
    if missing:
        lines = "\n".join(f"  - {s.name} ({s.target}): {s.error or 'not applied'}" for s in missing)
        raise PatchError(
            "vllm-transformers-backend needs these patches of vLLM, which are not applied:\n" + lines +
            "\nCheck `python -m vllm_transformers_backend doctor`; the backend supports vLLM 0.6.2 and its forks."
        )


__all__ = ["PATCHES", "Patch", "PatchError", "PatchStatus", "apply_all", "ensure_applied", "status"]
