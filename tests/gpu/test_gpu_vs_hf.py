"""On a CUDA GPU (bf16): the backend's greedy tokens and log-probabilities stay close to HF transformers'
(vLLM's ``check_logprobs_close`` rule, 32 tokens, top-5) for several architectures and the real SmolLM2,
with CUDA graphs off and on; its weight memory equals native vLLM's.

Engines are expensive (seconds each), so every (model, impl, enforce_eager) engine runs once per module and
its results are shared by the tests. Which engines run:
  * backend, eager: every model below (7 engines);
  * backend, CUDA graphs: llama and SmolLM2 (graph capture does not depend on the architecture's HF
    modules beyond what these two exercise; 2 engines);
  * native vLLM, eager: llama (untied) and SmolLM2 (tied embeddings), for the memory comparison and as a
    check that the HF reference itself agrees with vLLM (2 engines).
Tiny models come from tests/helpers.py (head size 64, which FlashAttention takes).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch

from tests.gpu.support import EngineRun, Output, check_logprobs_close, hf_top_logprobs, run_engine, smollm2_path
from tests.helpers import PROMPTS, build_checkpoint, require_architecture

MAX_TOKENS = 32
TINY = ["llama", "qwen2", "gemma2", "gpt2", "qwen3", "mistral"]
SMOLLM2_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
                   "Once upon a time, in a small village,"]

BACKEND_CASES = ([(m, True) for m in TINY + ["smollm2"]] + [("llama", False), ("smollm2", False)])


def _case_id(case) -> str:
    return f"{case[0]}-{'eager' if case[1] else 'cuda-graphs'}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``models(name)`` -> (checkpoint path, prompts as token ids); built or looked up once."""
    root = tmp_path_factory.mktemp("gpu-checkpoints")
    cache: Dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            if name == "smollm2":
                path, looked = smollm2_path()
                if path is None:
                    pytest.skip(f"converted SmolLM2-135M-Instruct not found ({looked}); set VTB_SMOLLM2 to the "
                                "folder scripts/prepare_models.py writes")
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(path))
                cache[name] = (path, [tokenizer.encode(p) for p in SMOLLM2_PROMPTS])
            else:
                require_architecture(name)
                cache[name] = (build_checkpoint(name, root / name), PROMPTS)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def hf_reference(models):
    cache: Dict[str, Tuple[List[Output], int]] = {}

    def get(name: str):
        if name not in cache:
            path, prompts = models(name)
            cache[name] = hf_top_logprobs(path, prompts, MAX_TOKENS, torch.bfloat16, "cuda")
        return cache[name]

    return get


@pytest.fixture(scope="module")
def engine_runs(models):
    cache: Dict[tuple, EngineRun] = {}

    def get(name: str, impl: str, enforce_eager: bool) -> EngineRun:
        key = (name, impl, enforce_eager)
        if key not in cache:
            path, prompts = models(name)
            cache[key] = run_engine(path, impl, enforce_eager, prompts, MAX_TOKENS)
        return cache[key]

    return get


@pytest.mark.parametrize("case", BACKEND_CASES, ids=_case_id)
def test_backend_logprobs_close_to_hf(case, engine_runs, hf_reference):
    name, enforce_eager = case
    reference, _ = hf_reference(name)
    run = engine_runs(name, "transformers", enforce_eager)
    assert run.model_class == "TransformersForCausalLM"
    assert all(len(tokens) == MAX_TOKENS for tokens, _ in run.outputs)
    same = check_logprobs_close(reference, run.outputs, "HF", "backend")
    print(f"{_case_id(case)}: {same}/{len(reference)} prompts token-identical to HF over {MAX_TOKENS} tokens")


@pytest.mark.parametrize("name", ["llama", "smollm2"])
def test_native_logprobs_close_to_hf(name, engine_runs, hf_reference):
    """The reference itself: vLLM's own implementation agrees with HF by the same rule."""
    reference, _ = hf_reference(name)
    run = engine_runs(name, "vllm", True)
    assert run.model_class == "LlamaForCausalLM"
    check_logprobs_close(reference, run.outputs, "HF", "native")


@pytest.mark.parametrize("name", ["llama", "smollm2"])
def test_weight_memory_equals_native(name, engine_runs, hf_reference):
    native = engine_runs(name, "vllm", True)
    backend = engine_runs(name, "transformers", True)
    _, hf_bytes = hf_reference(name)
    print(f"{name}: parameter bytes native {native.parameter_bytes} backend {backend.parameter_bytes} "
          f"HF {hf_bytes}; vLLM's 'Loading model weights took' native {_gib(native.loaded_bytes)} "
          f"backend {_gib(backend.loaded_bytes)}")
    assert backend.parameter_devices == native.parameter_devices == {"cuda"}, (
        backend.parameter_devices, native.parameter_devices)
    assert backend.parameter_bytes == pytest.approx(native.parameter_bytes, rel=0.01)


def _gib(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2.0 ** 30:.4f} GiB"


def test_check_logprobs_close_rejects_a_far_token():
    """The comparison rule can fail: a token outside the other side's top-k at the first difference."""
    a = [([1, 2, 3], [{1: -0.1}, {2: -0.1, 7: -2.0}, {3: -0.1}])]
    near = [([1, 7, 9], [{1: -0.1}, {7: -0.2, 2: -0.3}, {9: -0.1}])]
    far = [([1, 8, 3], [{1: -0.1}, {8: -0.2, 2: -0.3}, {3: -0.1}])]
    assert check_logprobs_close(a, a) == 1
    assert check_logprobs_close(a, near) == 0
    with pytest.raises(AssertionError, match="step 1"):
        check_logprobs_close(a, far)
