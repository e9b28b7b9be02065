"""A/B of the backend's speed features inside one engine (no restart between variants): rotary through
vLLM's kernel, one-kernel gated MLP activation, residual adds in vLLM's add-and-norm kernel. Eager engine,
prefill-only and short decode batches, wall time per variant (best over interleaved rounds).

    python benchmarks/ab_kernels.py [--checkpoint /tmp/llama1b-random]
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from profile_step import build_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="/tmp/llama1b-random")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    path = build_checkpoint(args.checkpoint)
    from vllm import LLM, SamplingParams

    from vllm_transformers_backend.fusion import _glu_forward
    from vllm_transformers_backend.residual import is_fused

    llm = LLM(model=path, model_impl="transformers", skip_tokenizer_init=True, gpu_memory_utilization=0.5,
              enforce_eager=True, seed=0)
    model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    llama = sys.modules[type(model.model.layers[0].self_attn).__module__]
    fused_rotary = llama.apply_rotary_pos_emb
    plain_rotary = getattr(fused_rotary, "__wrapped__", fused_rotary)
    mlps = [m for m in model.modules() if hasattr(m, "vllm_act_and_mul")]
    fused_layers = {layer: layer.forward for layer in model.model.layers if is_fused(layer)}
    print(f"fused rotary: {fused_rotary is not plain_rotary}; GLU MLPs: {len(mlps)}; residual-fused layers: "
          f"{len(fused_layers)}", flush=True)

    def setup(rotary: bool, glu: bool, residual: bool) -> None:
        for layer, forward in fused_layers.items():
            if residual:
                layer.forward = forward
            else:
                layer.__dict__.pop("forward", None)
        llama.apply_rotary_pos_emb = fused_rotary if rotary else plain_rotary
        for mlp in mlps:
            if glu:
                mlp.forward = _glu_forward.__get__(mlp)
            else:
                mlp.__dict__.pop("forward", None)

    rng = random.Random(0)
    prefill = [{"prompt_token_ids": [rng.randrange(100, 31000) for _ in range(1024)]} for _ in range(16)]
    decode = [{"prompt_token_ids": [rng.randrange(100, 31000) for _ in range(16)]} for _ in range(128)]
    variants = [("all on", True, True, True), ("residual off", True, True, False), ("rotary off", False, True, True),
                ("glu off", True, False, True), ("all off", False, False, False)]
    workloads = [(prefill, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)),
                 (decode, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))]
    for prompts, params in workloads:  # warm-up: allocator, kernels' first launches
        llm.generate(prompts, params, use_tqdm=False)
    # Rounds over all variants, best per variant: the host drifts over a run (on the H100 one variant measured
    # 0.48 s first and 0.96 s last when the variants ran one after another), so no variant gets all early slots.
    best = {name: [float("inf")] * len(workloads) for name, *_ in variants}
    for round_index in range(args.rounds):
        for name, rotary, glu, residual in variants if round_index % 2 == 0 else variants[::-1]:
            setup(rotary, glu, residual)
            for slot, (prompts, params) in enumerate(workloads):
                torch.cuda.synchronize()
                start = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                torch.cuda.synchronize()
                best[name][slot] = min(best[name][slot], time.perf_counter() - start)
    print(f"{'variant':<12} {'prefill 16x1024 (s)':>20} {'decode 128x32 eager (s)':>24}  (best of {args.rounds} rounds)")
    for name, (prefill_s, decode_s) in best.items():
        print(f"{name:<12} {prefill_s:>20.3f} {decode_s:>24.3f}", flush=True)

if __name__ == "__main__":
    main()
