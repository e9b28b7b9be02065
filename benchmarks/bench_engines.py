"""One benchmark child process: builds a checkpoint, or runs one implementation (native vLLM, the backend,
or HF ``generate``) over the workloads and prints one ``BENCH_RESULT {json}`` line.

Started by throughput.py, one process per engine: vLLM 0.6.2 does not give all device memory back when an
engine is deleted, so engines never share a process.

    python benchmarks/bench_engines.py build --model 1b --checkpoint /tmp/ckpt --device cuda --dtype bfloat16
    python benchmarks/bench_engines.py run --impl vllm --model 1b --checkpoint /tmp/ckpt --workloads decode
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from bench_specs import MODELS, TINY_WORKLOADS, WORKLOADS, Workload, build_checkpoint, make_prompts

RESULT_PREFIX = "BENCH_RESULT "
#: Warm-up before each timed workload: this many of its prompts, a few output tokens.
WARMUP_PROMPTS, WARMUP_TOKENS = 16, 4


def parameter_bytes(model) -> int:
    """Bytes of a model's parameters, each storage once (tied weights are not counted twice)."""
    seen, total = set(), 0
    for p in model.parameters():
        key = (p.device.type, p.data_ptr())
        if key not in seen:
            seen.add(key)
            total += p.numel() * p.element_size()
    return total


def _synchronize(device: str) -> None:
    import torch

    if device != "cpu":
        getattr(torch, device).synchronize()


def environment(device: str) -> Dict[str, Any]:
    import platform

    import torch
    import transformers

    env: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-transformers-backend"):  # installed versions (vllm.__version__ of a source
        try:                                             # build can name the commit it was cut from instead)
            env[dist.replace("-", "_")] = version(dist)
        except PackageNotFoundError:
            env[dist.replace("-", "_")] = None
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    else:
        env["device_name"] = _cpu_name()
    return env


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.machine()}"


def run_vllm(args, workloads: List[Workload], vocab_size: int) -> Dict[str, Any]:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=str(args.checkpoint), model_impl=args.impl, dtype=args.dtype, device=args.device,
              skip_tokenizer_init=True, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
              gpu_memory_utilization=args.gpu_memory_utilization, seed=0, tensor_parallel_size=args.tp)
    start_s = time.perf_counter() - start
    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    out: Dict[str, Any] = {"model_class": type(runner.model).__name__, "start_s": start_s,
                           "weight_bytes": parameter_bytes(runner.model),  # rank 0's share at TP > 1
                           "loaded_bytes": getattr(runner, "model_memory_usage", None),
                           # enforce_eager as the engine ran it (the CPU executor forces it on)
                           "engine": {"max_model_len": args.max_model_len, "tensor_parallel_size": args.tp,
                                      "enforce_eager": llm.llm_engine.model_config.enforce_eager,
                                      "gpu_memory_utilization": args.gpu_memory_utilization,
                                      "num_gpu_blocks": llm.llm_engine.cache_config.num_gpu_blocks,
                                      "max_num_seqs": llm.llm_engine.scheduler_config.max_num_seqs,
                                      "max_num_batched_tokens":
                                          llm.llm_engine.scheduler_config.max_num_batched_tokens},
                           "workloads": []}
    print(f"engine ready in {start_s:.1f} s ({out['model_class']})", flush=True)
    for w in workloads:
        prompts = [{"prompt_token_ids": p} for p in make_prompts(w, vocab_size)]
        llm.generate(prompts[:WARMUP_PROMPTS], SamplingParams(temperature=0, max_tokens=WARMUP_TOKENS,
                                                              ignore_eos=True), use_tqdm=False)
        params = SamplingParams(temperature=0, max_tokens=w.output_len, ignore_eos=True)
        t0 = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        total_s = time.perf_counter() - t0
        tokens = sum(len(r.outputs[0].token_ids) for r in results)
        out["workloads"].append(_workload_result(w, tokens, total_s))
    return out


def run_hf(args, workloads: List[Workload], vocab_size: int) -> Dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    try:  # with accelerate, weights go straight to the device (an 8B shape skips a 16 GB host copy)
        import accelerate  # noqa: F401

        placement: Dict[str, Any] = {"device_map": args.device}
    except ImportError:
        placement = {"low_cpu_mem_usage": True}
    model = AutoModelForCausalLM.from_pretrained(str(args.checkpoint), torch_dtype=dtype, **placement)
    model = model.to(args.device).eval()
    _synchronize(args.device)
    start_s = time.perf_counter() - start
    out: Dict[str, Any] = {"model_class": type(model).__name__, "start_s": start_s,
                           "weight_bytes": parameter_bytes(model), "loaded_bytes": None,
                           "engine": {"batch_size": args.hf_batch_size, "attn_implementation":
                                      getattr(model.config, "_attn_implementation", None)},
                           "workloads": []}
    print(f"model ready in {start_s:.1f} s ({out['model_class']})", flush=True)
    pad = 0
    for w in workloads:
        prompts = make_prompts(w, vocab_size)
        _hf_generate(model, prompts[:min(WARMUP_PROMPTS, args.hf_batch_size)], WARMUP_TOKENS, pad, args.device)
        _synchronize(args.device)
        t0 = time.perf_counter()
        tokens = 0
        for i in range(0, len(prompts), args.hf_batch_size):
            tokens += _hf_generate(model, prompts[i:i + args.hf_batch_size], w.output_len, pad, args.device)
        _synchronize(args.device)
        out["workloads"].append(_workload_result(w, tokens, time.perf_counter() - t0))
    return out


def _hf_generate(model, prompts: List[List[int]], new_tokens: int, pad: int, device: str) -> int:
    """One left-padded batch through ``generate``; ``min_new_tokens`` keeps every row at ``new_tokens``
    (random weights may emit EOS). Returns the number of generated tokens."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    generated = gen.shape[1] - width
    assert generated == new_tokens, f"HF generate made {generated} tokens per row, expected {new_tokens}"
    return generated * len(prompts)


def _workload_result(w: Workload, tokens: int, total_s: float) -> Dict[str, Any]:
    expected = w.prompts * w.output_len
    assert tokens == expected, f"{w.name}: {tokens} output tokens, expected {expected}"
    print(f"{w.name}: {tokens} output tokens in {total_s:.2f} s = {tokens / total_s:.0f} tok/s", flush=True)
    return {**w.to_dict(), "workload": w.name, "output_tokens": tokens, "total_s": total_s,
            "tok_s": tokens / total_s}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["build", "run"])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--impl", choices=["vllm", "transformers", "hf"])
    parser.add_argument("--workloads", default="decode,prefill")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized workloads")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size of the vLLM engines")
    args = parser.parse_args(argv)

    if args.action == "build":
        result: Dict[str, Any] = {"build": build_checkpoint(args.model, args.checkpoint, args.dtype, args.device)}
    else:
        table = TINY_WORKLOADS if args.tiny else WORKLOADS
        workloads = [table[name] for name in args.workloads.split(",")]
        vocab_size = MODELS[args.model]["vocab_size"]
        run = run_hf if args.impl == "hf" else run_vllm
        result = {"impl": args.impl, **run(args, workloads, vocab_size)}
        result["env"] = environment(args.device)  # after the run: the engine initialises the device itself
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
