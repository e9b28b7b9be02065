"""On a CUDA GPU (bf16, CUDA graphs on): mixture-of-experts models through the backend's FusedMoE path.

* Every MoE architecture the installed transformers runs through the backend (Mixtral and Qwen3-MoE from 4.x;
  Qwen2-MoE and OLMoE need transformers 5, where their attention goes through the interface): the backend's
  greedy tokens and top-5 log-probabilities stay close to HF ``generate``'s (vLLM's ``check_logprobs_close``
  rule, 32 tokens), and every block's experts are one vLLM ``FusedMoE`` running vLLM's Triton kernel.
* The backend against native vLLM 0.6.2 (its own ``MixtralForCausalLM`` / ``Qwen2MoeForCausalLM``, both
  FusedMoE) on a Mixtral-shape and a Qwen2-MoE-shape random checkpoint: log-probabilities close.

Each (architecture, implementation) engine runs once per module. Throughput: ``benchmarks/throughput.py``
(``--models mixtral-moe,qwen2-moe,qwen3-moe``; see benchmarks/README.md).
"""
from __future__ import annotations

from typing import Dict

import pytest
import torch

from tests.gpu.support import EngineRun, check_logprobs_close, hf_top_logprobs, run_engine
from tests.helpers import INTERFACE_SINCE, build_moe_checkpoint, interface_supported, require_architecture

MAX_TOKENS = 32
PROMPTS = [[1, 15, 27, 300, 4000, 12, 7], [5, 6], [900 + i for i in range(40)], [31] * 12, [7]]
#: GPU-sized random checkpoints (head size 64; vocabulary 4096). Mixtral and Qwen2-MoE also run natively.
SHAPES = {
    "mixtral": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, inter=1024, experts=8, top_k=2,
                    layers=4, vocab_size=4096),
    "qwen2_moe": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, inter=256, experts=16, top_k=4,
                      layers=4, vocab_size=4096, shared_expert_intermediate_size=1024, intermediate_size=1024),
    "qwen3_moe": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, inter=256, experts=32, top_k=8,
                      norm=True, layers=4, vocab_size=4096),
    "olmoe": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, inter=512, experts=16, top_k=4,
                  layers=4, vocab_size=4096),
}
NATIVE = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def _require(arch: str) -> None:
    require_architecture(arch)
    if not interface_supported(arch):
        import transformers

        pytest.skip(f"transformers {transformers.__version__} gives {arch} no attention interface (from "
                    f"{INTERFACE_SINCE[arch]}): stage the GPU runtime with GPU_TRANSFORMERS=5.13.1")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-moe")
    cache: Dict[str, object] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = build_moe_checkpoint(arch, root / arch, **SHAPES[arch])
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def engines(checkpoints):
    cache: Dict[tuple, EngineRun] = {}

    def get(arch: str, impl: str) -> EngineRun:
        if (arch, impl) not in cache:
            cache[(arch, impl)] = run_engine(checkpoints(arch), impl, False, PROMPTS, MAX_TOKENS, max_model_len=512)
        return cache[(arch, impl)]

    return get


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_fused_moe_logprobs_close_to_hf(arch, checkpoints, engines):
    _require(arch)
    backend = engines(arch, "transformers")
    assert backend.model_class == "TransformersForCausalLM"
    assert "fused_moe" in backend.speed_paths, backend.speed_paths  # every block on vLLM's kernel
    reference, _ = hf_top_logprobs(checkpoints(arch), PROMPTS, MAX_TOKENS, torch.bfloat16, "cuda")
    same = check_logprobs_close(reference, backend.outputs, "HF", "backend")
    print(f"{arch}: {same}/{len(PROMPTS)} prompts token-identical to HF over {MAX_TOKENS} tokens")


@pytest.mark.parametrize("arch", sorted(NATIVE))
def test_fused_moe_logprobs_close_to_native(arch, engines):
    _require(arch)
    native, backend = engines(arch, "vllm"), engines(arch, "transformers")
    assert (native.model_class, backend.model_class) == (NATIVE[arch], "TransformersForCausalLM")
    same = check_logprobs_close(native.outputs, backend.outputs, "native", "backend")
    mib = 2 ** 20
    print(f"{arch}: {same}/{len(PROMPTS)} prompts token-identical to native vLLM over {MAX_TOKENS} tokens; weights "
          f"{backend.parameter_bytes / mib:.0f} MiB (backend) vs {native.parameter_bytes / mib:.0f} MiB (native)")
    assert backend.parameter_bytes == native.parameter_bytes
