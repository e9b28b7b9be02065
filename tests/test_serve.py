"""`vllm serve PATH --model-impl transformers` end to end on the CPU: the CLI flag exists, the spawned
engine process is patched (start-up hook), and the OpenAI-compatible server answers a completion, a chat
completion and 50 concurrent requests through the `openai` client. The server is always stopped."""
from __future__ import annotations

import concurrent.futures

import pytest

from tests import helpers


@pytest.fixture()
def server(smollm2_path, tmp_path):
    log_path = tmp_path / "server.log"
    args = ["--model-impl", "transformers", "--max-model-len", "512", "--served-model-name", "smollm2",
            "--dtype", "float32"]  # "auto" turns float32 checkpoints into float16 (bfloat16 on the CPU)
    with helpers.vllm_server(smollm2_path, args, log_path) as base:
        yield base, log_path


def test_vllm_serve_with_model_impl_transformers(server):
    import openai

    base, log_path = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=120, max_retries=0)
    completion = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                           temperature=0)
    assert completion.choices[0].text.startswith(" Paris"), completion
    chat = client.chat.completions.create(model="smollm2", max_tokens=16, temperature=0,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in chat.choices[0].message.content, chat

    # 50 concurrent requests, 10 distinct prompts: each answer must equal that prompt's sequential answer.
    prompts = [f"{n} plus {n} equals" for n in range(10)]
    expected = {p: client.completions.create(model="smollm2", prompt=p, max_tokens=6, temperature=0).choices[0].text
                for p in prompts}

    def ask(i: int) -> tuple:
        prompt = prompts[i % len(prompts)]
        reply = client.completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0)
        return prompt, reply.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, range(50)))
    assert len(answers) == 50
    mismatches = [(p, got, expected[p]) for p, got in answers if got != expected[p]]
    assert not mismatches, mismatches[:5]
    assert "the Transformers backend (TransformersForCausalLM)" in log_path.read_text()
