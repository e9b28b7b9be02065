"""The main job: SmolLM2-135M-Instruct generating through the Transformers backend inside vLLM 0.6.2.

    python examples/generate.py [MODEL_PATH] [--device cpu|cuda] [--model-impl transformers|vllm|auto]

Nothing of this package is imported: installing it is what makes ``model_impl`` exist.
"""
import argparse
import os
import time
from pathlib import Path

DEFAULT = Path(os.environ.get("VTB_CACHE", Path.home() / ".cache/vllm-transformers-backend")) / "models/SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=str(DEFAULT))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model-impl", default="transformers")
    parser.add_argument("--dtype", default="auto", help="vLLM's 'auto' runs float32 checkpoints in float16 "
                        "(bfloat16 on the CPU); run_demo.sh asks for float32, the precision HF answers in")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams

    start = time.time()
    llm = LLM(model=args.model, model_impl=args.model_impl, device=args.device, dtype=args.dtype, max_model_len=1024)
    model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    print(f"\nengine ready in {time.time() - start:.1f} s; model class: {type(model).__name__} "
          f"(HF body: {type(model.model).__name__ if hasattr(model, 'model') else '-'})")

    tokenizer = llm.get_tokenizer()
    prompts = [
        "The capital of France is",
        "Here is a short poem about the sea:\n",
        tokenizer.apply_chat_template([{"role": "user", "content": "Give me three tips for learning Python."}],
                                      tokenize=False, add_generation_prompt=True),
    ]
    params = SamplingParams(temperature=0.0, max_tokens=64)
    start = time.time()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.time() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    for out in outputs:
        print("=" * 80)
        print(f"PROMPT: {out.prompt!r}")
        print(f"OUTPUT: {out.outputs[0].text!r}")
    print("=" * 80)
    print(f"{tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:.1f} tok/s)")


if __name__ == "__main__":
    main()
