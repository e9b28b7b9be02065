"""A first throughput comparison on one GPU: native vLLM 0.6.2 vs the Transformers backend.

Random bf16 weights of a Llama-1B shape, 256 prompts x 128 tokens in / 128 out, CUDA graphs on, each
implementation started in turn in one process (repeat the list to see the run-to-run spread):

    python benchmarks/quick_throughput.py vllm transformers vllm transformers

This is the measurement behind the first numbers in the GPU issue; the full benchmark the issue asks
for (both workloads, 1B and 8B shapes, HF generate, memory, JSON and chart) is still to be written.
"""
import gc
import os
import random
import sys
import time

import torch


def main(impls):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = os.environ.get("VTB_BENCH_CHECKPOINT", "/tmp/llama1b-random")
    if not os.path.exists(path):
        config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                             torch_dtype="bfloat16")
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()

    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 31000) for _ in range(128)]} for _ in range(256)]
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    for impl in impls:
        start = time.time()
        llm = LLM(model=path, model_impl=impl, skip_tokenizer_init=True, gpu_memory_utilization=0.5, seed=0)
        ready = time.time()
        llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
        t0 = time.time()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.time() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        print(f"RESULT impl={impl} start={ready - start:.1f}s gen={elapsed:.2f}s out_tok/s={tokens / elapsed:.0f}",
              flush=True)
        del llm
        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:] or ["vllm", "transformers"])
