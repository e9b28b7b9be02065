"""Where a step's device time goes: native vLLM 0.6.2 vs the Transformers backend, kernel by kernel.

CUDA graphs replay the kernels an eager step launches, so an eager profile of decode steps lists what a
graph replay costs (minus launch gaps). For each implementation: a random bf16 Llama-1B-shape checkpoint,
then either a batch of prompts prefilled and ``--steps`` decode steps (``--phase decode``), or the first
prefill step of ``--batch`` prompts of ``--prompt-len`` tokens (``--phase prefill``; vLLM 0.6.2 always runs
prefills eagerly), under ``torch.profiler``. Prints kernels by total device time with counts per step, the
step's kernel count and device time, and the host operators the step dispatched (the Python-side work).

    python benchmarks/profile_step.py [--impls vllm,transformers] [--phase decode] [--batch 256] [--steps 8]
    python benchmarks/profile_step.py --phase prefill --batch 8 --prompt-len 1024

``benchmarks/interleaved.py --profile`` takes the same tables inside its long-lived engines (CUDA graphs on).
"""
from __future__ import annotations

import argparse
import gc
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict

import torch


def build_checkpoint(path: str) -> str:
    """The throughput benchmark's random Llama-1B-shape checkpoint (``bench_specs``), built once at ``path``."""
    from bench_specs import build_checkpoint as build, checkpoint_ready

    if not checkpoint_ready(Path(path), "1b", "bfloat16"):
        build("1b", Path(path), "bfloat16", "cuda")
    return path


def kernel_table(prof: Any, steps: int, top: int = 30, device: str = "cuda") -> Dict[str, Any]:
    """Per step: device kernels (and memsets/copies) by total device time, and host operators (``aten::``
    calls, nested ones included) by self time, from a ``torch.profiler`` run over ``steps`` engine steps."""
    kernels: Dict[str, list] = defaultdict(lambda: [0, 0.0])
    ops: Dict[str, list] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels[event.name]
            entry[0] += 1
            entry[1] += getattr(event, "device_time_total", None) or event.cuda_time_total
        elif event.device_type == torch.autograd.DeviceType.CPU and event.name.startswith("aten::"):
            entry = ops[event.name]
            entry[0] += 1
            entry[1] += event.self_cpu_time_total
    out: Dict[str, Any] = {"device": device}
    if device == "cuda":
        out["kernels_per_step"] = sum(n for n, _ in kernels.values()) / steps
        out["device_ms_per_step"] = sum(us for _, us in kernels.values()) / steps / 1000
        out["kernels"] = [{"name": name, "per_step": n / steps, "us_per_step": us / steps}
                          for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]]
    out["host_ops_per_step"] = sum(n for n, _ in ops.values()) / steps
    out["host_op_self_ms_per_step"] = sum(us for _, us in ops.values()) / steps / 1000
    out["host_ops"] = [{"name": name, "per_step": n / steps, "self_us_per_step": us / steps}
                       for name, (n, us) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]]
    return out


def format_table(title: str, table: Dict[str, Any]) -> str:
    lines = [f"=== {title}: {table.get('kernels_per_step', 0):.0f} kernels/step, "
             f"{table.get('device_ms_per_step', 0):.2f} ms device/step; {table['host_ops_per_step']:.0f} host "
             f"aten ops/step ({table['host_op_self_ms_per_step']:.2f} ms self time)"]
    if table.get("kernels"):
        lines.append(f"{'us/step':>9} {'n/step':>7}  kernel")
        lines += [f"{k['us_per_step']:9.1f} {k['per_step']:7.1f}  {k['name'][:110]}" for k in table["kernels"]]
    lines.append(f"{'n/step':>9} {'self us':>9}  host op")
    lines += [f"{o['per_step']:9.1f} {o['self_us_per_step']:9.1f}  {o['name'][:100]}" for o in table["host_ops"]]
    return "\n".join(lines)


def profile(impl: str, path: str, phase: str, batch: int, prompt_len: int, steps: int, top: int) -> None:
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    max_len = max(2048, prompt_len + steps + 8)
    llm = LLM(model=path, model_impl=impl, skip_tokenizer_init=True, gpu_memory_utilization=0.5, seed=0,
              enforce_eager=True, max_model_len=max_len, max_num_batched_tokens=max(max_len, batch * prompt_len))
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 31000) for _ in range(prompt_len)]} for _ in range(batch)]
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate(prompts[:8], warm, use_tqdm=False)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    if phase == "prefill":
        steps = 1  # the one step that prefills the whole batch
    else:
        engine.step()  # prefill of all prompts (one step: max_num_batched_tokens permitting)
        while any(len(s.get_seqs()[0].data.output_token_ids) == 0 for s in engine.scheduler[0].running):
            engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    what = f"batch {batch}, {steps} decode steps" if phase == "decode" else f"prefill of {batch} x {prompt_len} tokens"
    print("\n" + format_table(f"{impl}: {what}", kernel_table(prof, steps, top)), flush=True)
    del llm
    destroy_model_parallel()
    destroy_distributed_environment()
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impls", default="vllm,transformers")
    parser.add_argument("--phase", choices=["decode", "prefill"], default="decode")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 (decode), 8 (prefill)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default: 128 (decode), 1024 (prefill)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--checkpoint", default="/tmp/llama1b-random")
    args = parser.parse_args()
    batch = args.batch or (256 if args.phase == "decode" else 8)
    prompt_len = args.prompt_len or (128 if args.phase == "decode" else 1024)
    path = build_checkpoint(args.checkpoint)
    impls = args.impls.split(",")
    if len(impls) == 1:
        profile(impls[0], path, args.phase, batch, prompt_len, args.steps, args.top)
        return
    # One process per engine: vLLM 0.6.2 keeps most of a deleted engine's GPU memory, and a second engine sizes
    # its KV cache from the whole GPU without counting it (on an H100 the second engine ran out of memory).
    for impl in impls:
        subprocess.run([sys.executable, __file__, "--impls", impl, "--phase", args.phase, "--batch", str(batch),
                        "--prompt-len", str(prompt_len), "--steps", str(args.steps), "--top", str(args.top),
                        "--checkpoint", path], check=True)


if __name__ == "__main__":
    main()
