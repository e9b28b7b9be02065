"""On two CUDA GPUs (bf16): tensor parallel (TP=2) and pipeline parallel (PP=2) through the backend stay
close to TP=1 (vLLM's ``check_logprobs_close`` rule: at the first differing token each side's token is in
the other's top-5), for a GQA Llama (KV heads = ranks) and a Qwen2 with one KV head (replicated over the
ranks), tied embeddings and q/k/v biases, and a Mixtral whose experts run as vLLM's FusedMoE split over the
ranks.

Each engine runs in its own Python process: a TP=2 engine makes this process its rank-0 worker (NCCL
communicator, CUDA context), and vLLM 0.6.2 runs pipeline parallelism only through ``AsyncLLMEngine``
(``LLM`` refuses it), so a fresh process per configuration keeps the runs independent. Each run also
prints its output tokens/s (one small batch: indicative, not a benchmark). One TP=2 run goes through vLLM's Ray
executor instead of multiprocessing (its workers are Ray actors, patched by the same start-up hook / plugin).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch

from tests.gpu.support import check_logprobs_close

MAX_TOKENS = 32
PROMPTS = [[1, 15, 27, 300, 4000, 12, 7], [5, 6], [900 + i for i in range(40)], [31] * 12]
REPO = Path(__file__).resolve().parents[2]

_RUNNER = textwrap.dedent('''
    import asyncio, json, sys, time
    spec = json.loads(sys.argv[1])
    from vllm import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], logprobs=5, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    args = dict(model=spec["path"], model_impl="transformers", dtype="bfloat16", skip_tokenizer_init=True,
                enforce_eager=spec["enforce_eager"], gpu_memory_utilization=0.3, max_model_len=1024, seed=0,
                tensor_parallel_size=spec["tp"], pipeline_parallel_size=spec["pp"])
    args.update(spec.get("engine", {}))  # overrides (the runner's own check on the CPU engine: float32, device)

    def dump(outs, seconds, model_class, executor):
        result = {"model_class": model_class, "executor": executor, "seconds": seconds, "outputs": [
            [list(o.outputs[0].token_ids),
             [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]] for o in outs]}
        with open(spec["out"], "w") as f:
            json.dump(result, f)

    if spec["pp"] == 1 and not spec.get("async"):
        from vllm import LLM
        llm = LLM(**args)
        model_class = type(llm.llm_engine.model_executor.driver_worker.model_runner.model).__name__
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dump(outs, time.perf_counter() - start, model_class, type(llm.llm_engine.model_executor).__name__)
    else:  # vLLM 0.6.2 runs pipeline parallelism only through the async engine
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.engine.async_llm_engine import AsyncLLMEngine

        async def main():
            engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**args))

            async def one(i, prompt):
                final = None
                async for out in engine.generate(prompt, params, request_id=str(i)):
                    final = out
                return final

            start = time.perf_counter()
            outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            dump(outs, time.perf_counter() - start, "TransformersForCausalLM (pipeline ranks)",
                 type(engine.engine.model_executor).__name__)
            engine.shutdown_background_loop()

        asyncio.run(main())
''')


@pytest.fixture(scope="module", autouse=True)
def two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs for TP=2 / PP=2, {torch.cuda.device_count()} visible")


def _build(name: str, path: Path) -> Path:
    import transformers

    common = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=8, max_position_embeddings=2048, initializer_range=0.05)
    if name == "llama":  # GQA: 2 KV heads, one per rank at TP=2; untied
        config = transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    elif name == "mixtral":  # mixture of experts: FusedMoE splits every expert's intermediate size over the ranks
        config = transformers.MixtralConfig(num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                                            sliding_window=None, **common)
    else:  # one KV head replicated over both ranks; q/k/v biases; tied embeddings
        config = transformers.Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **common)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    return path


def _run(path: Path, out: Path, tp: int, pp: int, enforce_eager: bool = True,
         **spec_overrides: Any) -> Tuple[List[Any], Dict[str, Any]]:
    """One engine in a fresh process; ``spec_overrides`` (prompts, max_tokens, engine, async) let the CPU
    tests run this same runner."""
    spec = {"path": str(path), "out": str(out), "tp": tp, "pp": pp, "enforce_eager": enforce_eager,
            "prompts": PROMPTS, "max_tokens": MAX_TOKENS, **spec_overrides}
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(spec)], capture_output=True, text=True,
                            timeout=900, env=env, cwd=str(REPO))
    assert result.returncode == 0, f"TP={tp} PP={pp} engine failed:\n{result.stderr[-6000:]}"
    data = json.loads(out.read_text())
    outputs = [(tokens, [{int(t): lp for t, lp in step.items()} for step in steps]) for tokens, steps in data["outputs"]]
    return outputs, data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(name, tp, pp, enforce_eager, executor)`` -> (outputs, raw result); each configuration runs once per
    module."""
    root = tmp_path_factory.mktemp("gpu-parallel")
    cache: Dict[tuple, tuple] = {}
    paths: Dict[str, Path] = {}

    def get(name: str, tp: int, pp: int, enforce_eager: bool = True, executor: str = "mp"):
        if name not in paths:
            paths[name] = _build(name, root / name)
        key = (name, tp, pp, enforce_eager, executor)
        if key not in cache:
            out = root / f"{name}-tp{tp}-pp{pp}-{'eager' if enforce_eager else 'graphs'}-{executor}.json"
            engine = {"distributed_executor_backend": executor} if tp * pp > 1 else {}
            cache[key] = _run(paths[name], out, tp, pp, enforce_eager, engine=engine)
            tokens = sum(len(t) for t, _ in cache[key][0])
            print(f"{name} TP={tp} PP={pp} enforce_eager={enforce_eager} {cache[key][1]['executor']}: "
                  f"{tokens / cache[key][1]['seconds']:.0f} "
                  f"output tokens/s ({len(PROMPTS)} prompts x {MAX_TOKENS} tokens)")
        return cache[key]

    return get


#: (model, TP, PP, enforce_eager, executor); the reference is the same model at TP=1, PP=1, eager.
CASES = [("llama", 2, 1, True, "mp"), ("llama", 1, 2, True, "mp"), ("qwen2", 2, 1, True, "mp"),
         ("qwen2", 1, 2, True, "mp"),
         # CUDA graphs capture the pipeline hand-over (hooks, intermediate-tensor buffers) once per batch size
         ("llama", 2, 1, False, "mp"), ("llama", 1, 2, False, "mp"),
         # rank 1 as a Ray actor
         ("llama", 2, 1, True, "ray"),
         # FusedMoE sharded over the ranks (one all-reduce per block), CUDA graphs on
         ("mixtral", 2, 1, False, "mp")]


@pytest.mark.parametrize("name, tp, pp, enforce_eager, executor", CASES,
                         ids=[f"{n}-tp{t}-pp{p}-{'eager' if e else 'cuda-graphs'}{'-ray' if x == 'ray' else ''}"
                              for n, t, p, e, x in CASES])
def test_parallel_logprobs_close_to_tp1(runs, name, tp, pp, enforce_eager, executor):
    if executor == "ray":
        pytest.importorskip("ray", reason="Ray is not installed here (vLLM's Ray executor needs it)")
    reference, raw_reference = runs(name, 1, 1)
    parallel, raw = runs(name, tp, pp, enforce_eager, executor)
    assert raw_reference["model_class"] == "TransformersForCausalLM"
    if executor == "ray":
        assert raw["executor"] == "RayGPUExecutor", raw["executor"]
    same = check_logprobs_close(reference, parallel, "TP=1", f"TP={tp} PP={pp} {executor}")
    print(f"{name} TP={tp} PP={pp} enforce_eager={enforce_eager} {executor}: {same}/{len(PROMPTS)} prompts "
          f"token-identical to TP=1 over {MAX_TOKENS} tokens")

