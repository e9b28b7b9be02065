"""Where a decode step's GPU time goes: native vLLM 0.6.2 vs the Transformers backend, kernel by kernel.

CUDA graphs replay the kernels an eager step launches, so an eager profile of decode steps lists what a
graph replay costs (minus launch gaps). For each implementation: a random bf16 Llama-1B-shape checkpoint,
a batch of prompts prefilled, then ``--steps`` decode steps under ``torch.profiler``; prints kernels by
total GPU time with counts per step, and the step's kernel count and GPU time.

    python benchmarks/profile_step.py [--impls vllm,transformers] [--batch 256] [--steps 8]
"""
from __future__ import annotations

import argparse
import gc
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch


def build_checkpoint(path: str) -> str:
    """The throughput benchmark's random Llama-1B-shape checkpoint (``bench_specs``), built once at ``path``."""
    from bench_specs import build_checkpoint as build, checkpoint_ready

    if not checkpoint_ready(Path(path), "1b", "bfloat16"):
        build("1b", Path(path), "bfloat16", "cuda")
    return path


def profile(impl: str, path: str, batch: int, steps: int, top: int) -> None:
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    llm = LLM(model=path, model_impl=impl, skip_tokenizer_init=True, gpu_memory_utilization=0.5, seed=0,
              enforce_eager=True)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 31000) for _ in range(128)]} for _ in range(batch)]
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate(prompts[:8], warm, use_tqdm=False)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    engine.step()  # prefill of all prompts (one step: max_num_batched_tokens permitting)
    while any(len(s.get_seqs()[0].data.output_token_ids) == 0 for s in engine.scheduler[0].running):
        engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    totals = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += 1
            totals[event.name][1] += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
    all_us = sum(t for _, t in totals.values())
    count = sum(c for c, _ in totals.values())
    print(f"\n=== {impl}: batch {batch}, {steps} decode steps: {count / steps:.0f} kernels/step, "
          f"{all_us / steps / 1000:.2f} ms GPU/step", flush=True)
    print(f"{'us/step':>9} {'n/step':>7}  kernel")
    for name, (n, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{us / steps:9.1f} {n / steps:7.1f}  {name[:110]}")
    del llm
    destroy_model_parallel()
    destroy_distributed_environment()
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impls", default="vllm,transformers")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--checkpoint", default="/tmp/llama1b-random")
    args = parser.parse_args()
    path = build_checkpoint(args.checkpoint)
    impls = args.impls.split(",")
    if len(impls) == 1:
        profile(impls[0], path, args.batch, args.steps, args.top)
        return
    # One process per engine: vLLM 0.6.2 keeps most of a deleted engine's GPU memory, and a second engine sizes
    # its KV cache from the whole GPU without counting it (on an H100 the second engine ran out of memory).
    for impl in impls:
        subprocess.run([sys.executable, __file__, "--impls", impl, "--batch", str(args.batch), "--steps",
                        str(args.steps), "--top", str(args.top), "--checkpoint", path], check=True)


if __name__ == "__main__":
    main()
