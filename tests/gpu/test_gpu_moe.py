"""On a CUDA GPU (bf16, CUDA graphs on): mixture-of-experts models through the backend's FusedMoE path.

Random bf16 MoE models flip an expert wherever two router logits lie closer than bf16 resolves (measured on
the tiny Mixtral: 2nd/3rd margins of 0.002-0.007), and a flipped expert moves a token's log-probabilities by
more than top-5 rules allow; HF's own bf16 model flips as often. So every implementation is measured against
HF in float32 (the same checkpoint, exact routing), and the backend must be as close to it as HF's bf16 model
(or native vLLM's) is:

* teacher-forced (prefill): each token of the float32 greedy sequences scored by both; the backend's median
  and 90th-percentile |log-probability - float32's| at most 2x the bf16 reference's, plus 0.01;
* generation (decode steps with CUDA graphs): the prompts on which ``check_logprobs_close``'s rule against
  float32 fails, at most one more than for the bf16 reference;
* every block's experts are one vLLM ``FusedMoE`` running vLLM's Triton kernel;
* a checkpoint of the same weights in transformers 5's packed layout gives the per-expert one's tokens and
  log-probabilities (its logic checked on the CPU engine with ``VLLM_TRANSFORMERS_BACKEND_MOE=fused``, four
  architectures on 4.57.6 and 5.13.1, and that a packed checkpoint of other weights fails it).

The bf16 reference is HF ``generate`` for every MoE architecture (Mixtral, Qwen3-MoE, and Qwen2-MoE and OLMoE,
whose attention on 4.x runs the routed SDPA classes of legacy_attention.py and on 5.x the interface), and native vLLM 0.6.2 (its own ``MixtralForCausalLM`` / ``Qwen2MoeForCausalLM``,
both FusedMoE) on a Mixtral-shape and a Qwen2-MoE-shape checkpoint, whose weight memory must equal the backend's.

Each (architecture, implementation) engine runs once per module. Throughput: ``benchmarks/throughput.py``
(``--models mixtral-moe,qwen2-moe,qwen3-moe``; see benchmarks/README.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import pytest
import torch

from tests.gpu.support import (EngineRun, Output, forced_gap, hf_forced_logprobs, hf_top_logprobs, logprobs_departures,
                               run_engine)
from tests.helpers import build_moe_checkpoint, interface_supported, require_architecture

MAX_TOKENS = 32
PROMPTS = [[1, 15, 27, 300, 4000, 12, 7], [5, 6], [900 + i for i in range(40)], [31] * 12, [7],
           [2000 + 37 * i for i in range(25)], [3, 1, 4, 1, 5, 9, 2, 6], [4095, 17, 256, 1024]]
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

        pytest.skip(f"transformers {transformers.__version__} has no attention the backend can reach for {arch}")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-moe")
    cache: Dict[str, object] = {}

    def get(arch: str, packed: bool = False):
        key = f"{arch}-packed" if packed else arch
        if key not in cache:  # the same seed: the packed checkpoint holds the per-expert one's weights
            cache[key] = build_moe_checkpoint(arch, root / key, packed=packed, **SHAPES[arch])
        return cache[key]

    return get


@dataclass
class Reference:
    """HF on the GPU: float32 (the truth) and bf16 (how close a correct bf16 implementation gets)."""
    fp32_outputs: List[Output]
    forced: List[List[int]]  # the prompts followed by float32's greedy tokens
    fp32_forced: List[List[float]]
    bf16_outputs: List[Output]
    bf16_forced: List[List[float]]


@pytest.fixture(scope="module")
def references(checkpoints):
    cache: Dict[str, Reference] = {}

    def get(arch: str) -> Reference:
        if arch not in cache:
            path = checkpoints(arch)
            fp32, _ = hf_top_logprobs(path, PROMPTS, MAX_TOKENS, torch.float32, "cuda")
            forced = [list(p) + tokens for p, (tokens, _) in zip(PROMPTS, fp32)]
            bf16, _ = hf_top_logprobs(path, PROMPTS, MAX_TOKENS, torch.bfloat16, "cuda")
            cache[arch] = Reference(fp32, forced, hf_forced_logprobs(path, forced, torch.float32, "cuda"),
                                    bf16, hf_forced_logprobs(path, forced, torch.bfloat16, "cuda"))
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def engines(checkpoints, references):
    cache: Dict[tuple, EngineRun] = {}

    def get(arch: str, impl: str) -> EngineRun:
        if (arch, impl) not in cache:
            cache[(arch, impl)] = run_engine(checkpoints(arch), impl, False, PROMPTS, MAX_TOKENS, max_model_len=512,
                                             forced=references(arch).forced)
        return cache[(arch, impl)]

    return get


def assert_as_close_to_fp32(reference: Reference, name: str, outputs: List[Output], forced: List[List[float]],
                            backend: EngineRun) -> None:
    """The backend is as close to float32 HF as ``name`` (a correct bf16 implementation) is; prints both."""
    ref_gap, gap = forced_gap(forced, reference.fp32_forced), forced_gap(backend.forced_logprobs,
                                                                         reference.fp32_forced)
    ref_departures = logprobs_departures(reference.fp32_outputs, outputs)
    departures = logprobs_departures(reference.fp32_outputs, backend.outputs)
    print(f"|logprob - float32 HF|, teacher-forced: backend {_fmt(gap)}; {name} {_fmt(ref_gap)}. Prompts departing "
          f"from float32 greedy beyond top-5: backend {len(departures)}/{len(PROMPTS)}, {name} "
          f"{len(ref_departures)}/{len(PROMPTS)}")
    for line in departures:
        print("  backend", line)
    for key in ("median", "p90"):
        assert gap[key] <= 2 * ref_gap[key] + 0.01, f"backend {key} {gap[key]:.4f} vs {name} {ref_gap[key]:.4f}"
    assert len(departures) <= len(ref_departures) + 1, "\n".join(departures)


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_fused_moe_loads_packed_experts_as_per_expert(arch, checkpoints, engines):
    """transformers 5's packed experts (``experts.gate_up_proj``/``down_proj``) and the per-expert tensors of
    the same weights fill the same ``FusedMoE`` weights: the same greedy tokens and log-probabilities."""
    _require(arch)
    per_expert = engines(arch, "transformers")
    packed = run_engine(checkpoints(arch, packed=True), "transformers", False, PROMPTS, MAX_TOKENS, max_model_len=512)
    assert "fused_moe" in packed.speed_paths, packed.speed_paths
    assert packed.parameter_bytes == per_expert.parameter_bytes
    for i, ((tokens_a, lps_a), (tokens_b, lps_b)) in enumerate(zip(per_expert.outputs, packed.outputs)):
        assert tokens_a == tokens_b, f"prompt {i}: per-expert {tokens_a} vs packed {tokens_b}"
        for step, (a, b) in enumerate(zip(lps_a, lps_b)):
            token = tokens_a[step]
            assert abs(a[token].logprob - b[token].logprob) <= 1e-3, f"prompt {i} step {step}"


def _fmt(gap: Dict[str, float]) -> str:
    return " / ".join(f"{k} {v:.4f}" for k, v in gap.items())


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_fused_moe_as_close_to_hf_fp32_as_hf_bf16(arch, references, engines):
    _require(arch)
    backend = engines(arch, "transformers")
    assert backend.model_class == "TransformersForCausalLM"
    assert "fused_moe" in backend.speed_paths, backend.speed_paths  # every block on vLLM's kernel
    reference = references(arch)
    assert_as_close_to_fp32(reference, "HF bf16", reference.bf16_outputs, reference.bf16_forced, backend)


@pytest.mark.parametrize("arch", sorted(NATIVE))
def test_fused_moe_as_close_to_hf_fp32_as_native(arch, references, engines):
    _require(arch)
    native, backend = engines(arch, "vllm"), engines(arch, "transformers")
    assert (native.model_class, backend.model_class) == (NATIVE[arch], "TransformersForCausalLM")
    assert_as_close_to_fp32(references(arch), "native", native.outputs, native.forced_logprobs, backend)
    mib = 2 ** 20
    print(f"{arch}: weights {backend.parameter_bytes / mib:.0f} MiB (backend) vs "
          f"{native.parameter_bytes / mib:.0f} MiB (native)")
    assert backend.parameter_bytes == native.parameter_bytes
