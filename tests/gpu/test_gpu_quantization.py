"""On a CUDA GPU: quantized checkpoints through the backend match native vLLM 0.6.2 on the same checkpoint
(vLLM's ``check_logprobs_close`` rule, top-5, CUDA graphs on), with the same quantization methods in the
same layers and the same weight memory.

The checkpoints are written by the test (tests/quantized.py) from tiny random Llama (GQA, untied) and Qwen2
(q/k/v biases, one KV head, tied) models: GPTQ 4-bit (act order on the Llama), AWQ 4-bit, FP8 in vLLM's
format and in compressed-tensors' W8A8, and online FP8 (``quantization="fp8"`` on the float checkpoint).
vLLM picks the kernels: GPTQ/AWQ checkpoints run its Marlin kernels on Ampere and newer, unless the method
is forced (``quantization="gptq"``/``"awq"``: its exllama / AWQ GEMM kernels, float16 only); the Qwen2
cases force them, so both kernel families and both weight-loading paths run.

14 engines (7 cases x native/backend), each a few seconds on an H200.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import pytest

from tests.gpu.support import check_logprobs_close, kernel_sized_checkpoint, run_engine
from tests.quantized import quantize_checkpoint

MAX_TOKENS = 24
#: Mixed lengths, a one-token prompt among them (token ids below the tiny vocabulary's 4096).
PROMPTS = [[1, 15, 27, 300, 4000, 12, 7], [5], [900 + i for i in range(40)], [31] * 12, [2, 3]]

#: id -> (architecture, format written (None: the float checkpoint), act order, engine arguments,
#:        the method vLLM must resolve)
CASES: Dict[str, tuple] = {
    "llama-gptq-act-order": ("llama", "gptq", True, {}, "gptq_marlin"),
    "llama-awq": ("llama", "awq", False, {}, "awq_marlin"),
    "llama-fp8": ("llama", "fp8", False, {}, "fp8"),
    "llama-fp8-online": ("llama", None, False, {"quantization": "fp8"}, "fp8"),
    "qwen2-gptq-exllama": ("qwen2", "gptq", False, {"quantization": "gptq", "dtype": "float16"}, "gptq"),
    "qwen2-awq-gemm": ("qwen2", "awq", False, {"quantization": "awq", "dtype": "float16"}, "awq"),
    "qwen2-compressed-tensors-fp8": ("qwen2", "compressed-tensors", False, {}, "compressed-tensors"),
    "qwen2-fp8-online": ("qwen2", None, False, {"quantization": "fp8"}, "fp8"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-quantized")
    cache: Dict[tuple, Path] = {}

    def get(arch: str, method: Optional[str], desc_act: bool) -> Path:
        if (arch, None, False) not in cache:
            cache[arch, None, False] = kernel_sized_checkpoint(arch, root / arch)
        if (arch, method, desc_act) not in cache:
            dst = root / f"{arch}-{method}-{desc_act}"
            quantize_checkpoint(cache[arch, None, False], dst, method, desc_act=desc_act, prompts=PROMPTS)
            cache[arch, method, desc_act] = dst
        return cache[arch, method, desc_act]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_backend_matches_native(checkpoints, case):
    arch, method, desc_act, engine_args, resolved = CASES[case]
    path = checkpoints(arch, method, desc_act)
    args: Dict[str, Any] = {"max_model_len": 512, **engine_args}
    native = run_engine(path, "vllm", False, PROMPTS, MAX_TOKENS, **args)
    backend = run_engine(path, "transformers", False, PROMPTS, MAX_TOKENS, **args)
    assert backend.model_class == "TransformersForCausalLM" and native.model_class != backend.model_class
    assert native.quantization == backend.quantization == resolved
    # The same methods in the backend's layers (fused q/k/v and gate/up included) as in vLLM's model.
    assert backend.quant_methods == native.quant_methods, (backend.quant_methods, native.quant_methods)
    # Weight memory: the same parameters after vLLM's post-load processing (repacked, requantized), and the
    # loader's device-memory delta within 1 MiB (native also holds its rotary cos/sin cache, a buffer).
    assert backend.parameter_bytes == native.parameter_bytes
    assert abs(backend.loaded_bytes - native.loaded_bytes) <= 1 << 20, (backend.loaded_bytes, native.loaded_bytes)
    same = check_logprobs_close(native.outputs, backend.outputs, "native", "backend")
    print(f"{case}: {resolved}, {same}/{len(PROMPTS)} prompts token-identical over {MAX_TOKENS} tokens; "
          f"weights {backend.parameter_bytes} bytes; loaded {backend.loaded_bytes} vs native {native.loaded_bytes}")
