"""On a CUDA GPU: LoRA adapters through the backend match native vLLM 0.6.2 with the same adapters
(``check_logprobs_close``, top-5, CUDA graphs on), two adapters and the base model in one batch
(a ``LoRARequest`` or None per prompt), through ``LLM`` and through ``vllm serve --enable-lora --lora-modules``.

Adapters are random PEFT files (tests/quantized.py). The Llama (untied) takes one adapter on all seven
projections and one on q/k/v, down_proj, the input embedding and the LM head (vLLM's Llama allows LoRA on
its vocabulary layers, and so does the backend for untied models); the Qwen2 (tied, q/k/v biases) takes
adapters on its projections. Weight memory (before the LoRA manager adds its buffers) equals native's.

Engines: 2 per architecture (shared by the tests), and one `vllm serve` of the Llama.
"""
from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from tests.gpu.support import EngineRun, Output, check_logprobs_close, kernel_sized_checkpoint, run_engine
from tests.helpers import vllm_server
from tests.quantized import write_lora_adapter, write_word_tokenizer

MAX_TOKENS = 16
BASE_PROMPTS = [[1, 15, 27, 300, 4000, 12, 7], [5], [900 + i for i in range(30)]]
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"llama": [LINEARS, ["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"]],
            "qwen2": [LINEARS, ["q_proj", "v_proj", "up_proj"]]}
LORA_ARGS = dict(enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=512)


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-lora")
    cache: Dict[str, Tuple[Path, List[Path]]] = {}

    def get(arch: str):
        if arch not in cache:
            base = kernel_sized_checkpoint(arch, root / arch)
            write_word_tokenizer(base, 4096)  # the adapters have none: the server falls back to it
            adapters = [write_lora_adapter(base, root / f"{arch}-{i}", targets, seed=i + 1, scale=0.1)
                        for i, targets in enumerate(ADAPTERS[arch])]
            cache[arch] = (base, adapters)
        return cache[arch]

    return get


def _batch(adapters: List[Path]):
    """Every base prompt with adapter 1, adapter 2 and none, interleaved in one batch."""
    from vllm.lora.request import LoRARequest

    requests = [LoRARequest(f"adapter{i + 1}", i + 1, str(path)) for i, path in enumerate(adapters)]
    prompts, lora_requests = [], []
    for prompt in BASE_PROMPTS:
        for request in (requests[0], requests[1], None):
            prompts.append(prompt)
            lora_requests.append(request)
    return prompts, lora_requests


@pytest.fixture(scope="module")
def lora_runs(lora_setup):
    """``lora_runs(arch, impl)`` -> the engine run of the interleaved batch (once per module)."""
    cache: Dict[Tuple[str, str], EngineRun] = {}

    def get(arch: str, impl: str) -> EngineRun:
        if (arch, impl) not in cache:
            base, adapters = lora_setup(arch)
            prompts, lora_requests = _batch(adapters)
            cache[arch, impl] = run_engine(base, impl, False, prompts, MAX_TOKENS, lora_requests=lora_requests,
                                           **LORA_ARGS)
        return cache[arch, impl]

    return get


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_adapters_and_base_in_one_batch_match_native(lora_runs, arch):
    native, backend = lora_runs(arch, "vllm"), lora_runs(arch, "transformers")
    assert backend.model_class == "TransformersForCausalLM"
    # o_proj/down_proj: at TP=1 the backend's linears are replicated (vLLM's replicated LoRA layer returning
    # the tensor); the fused groups get vLLM's own merged LoRA layers.
    expected_layers = {"MergedQKVParallelLinearWithLora", "MergedColumnParallelLinearWithLoRA",
                       "HFReplicatedLinearWithLoRA"}
    if arch == "llama":
        expected_layers |= {"VocabParallelEmbeddingWithLoRA", "LogitsProcessorWithLoRA"}
    assert backend.lora_layers == expected_layers, backend.lora_layers
    assert backend.parameter_bytes == native.parameter_bytes
    assert abs(backend.loaded_bytes - native.loaded_bytes) <= 1 << 20, (backend.loaded_bytes, native.loaded_bytes)
    same = check_logprobs_close(native.outputs, backend.outputs, "native", "backend")
    # The adapters change the generations (else matching native would prove little).
    for i in range(0, len(backend.outputs), 3):
        with_adapter = [backend.outputs[i][0], backend.outputs[i + 1][0]]
        assert all(tokens != backend.outputs[i + 2][0] for tokens in with_adapter), f"prompt {i // 3}"
    print(f"{arch}: {same}/{len(backend.outputs)} requests token-identical over {MAX_TOKENS} tokens")


def _complete(base_url: str, model: str, prompt: List[int]) -> Output:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 5,
            "ignore_eos": True}
    request = urllib.request.Request(f"{base_url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            logprobs = json.loads(response.read())["choices"][0]["logprobs"]
    except urllib.error.HTTPError as exc:  # the server's reason, not only its status
        raise AssertionError(f"{model} {prompt}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc

    def token_id(text: str) -> int:  # --return-tokens-as-token-ids: "token_id:123"
        return int(text.rpartition(":")[2])

    tokens = [token_id(t) for t in logprobs["tokens"]]
    tops = [{token_id(t): lp for t, lp in top.items()} for top in logprobs["top_logprobs"]]
    return tokens, tops


def test_vllm_serve_with_lora_modules(lora_setup, lora_runs, tmp_path):
    """`vllm serve --enable-lora --lora-modules` on the backend answers each adapter's requests (sent
    concurrently, so adapters share batches) as the backend's LLM does."""
    base, adapters = lora_setup("llama")
    prompts, lora_requests = _batch(adapters)
    reference = lora_runs("llama", "transformers")
    log_path = tmp_path / "server.log"
    args = ["--model-impl", "transformers", "--served-model-name", "base", "--dtype", "bfloat16",
            "--max-model-len", "512", "--gpu-memory-utilization", "0.3", "--num-gpu-blocks-override", "512",
            "--max-num-seqs", "8", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
            "--return-tokens-as-token-ids", "--lora-modules", f"adapter1={adapters[0]}", f"adapter2={adapters[1]}"]
    with vllm_server(base, args, log_path, ready_within=300) as url:
        models = {r.lora_name if r is not None else "base" for r in lora_requests}
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            jobs = [pool.submit(_complete, url, r.lora_name if r is not None else "base", p)
                    for p, r in zip(prompts, lora_requests)]
            served = [job.result() for job in jobs]
    assert "TransformersForCausalLM" in log_path.read_text() and models == {"base", "adapter1", "adapter2"}
    same = check_logprobs_close(reference.outputs, served, "LLM", "served")
    print(f"vllm serve: {same}/{len(prompts)} requests token-identical with the backend's LLM")
