"""`vllm serve PATH --model-impl transformers` end to end on the CPU: the CLI flag exists, the spawned
engine process is patched (start-up hook), and the OpenAI-compatible server answers a completion, a chat
completion and 50 concurrent requests through the `openai` client. Bad requests get HTTP 400 with an
OpenAI-style error body and never reach the engine, also when mixed with good ones (issue #23); a burst
larger than the KV cache is queued and preempted, never fatal (issue #22). Plain requests need no
guided-decoding backend; guided ones get vLLM's (issue #21's LoRA server). One server for the module, with
a small KV cache so that bursts preempt; it is always stopped."""
from __future__ import annotations

import concurrent.futures
import random
import time
import urllib.request

import pytest

from tests import helpers

MAX_MODEL_LEN = 512
#: KV-cache blocks of 16 tokens: two full-length sequences, or about 30 of the short prompts below, so a
#: burst of 100 queues and preempts.
KV_BLOCKS = 64
PROMPTS = [f"{n} plus {n} equals" for n in range(10)]
TOKENS = 6
VOCAB = 49152  # SmolLM2's


def _healthy(base: str) -> bool:
    try:
        return urllib.request.urlopen(f"{base}/health", timeout=10).status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--model-impl", "transformers", "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", "smollm2",
            "--num-gpu-blocks-override", str(KV_BLOCKS),
            "--dtype", "float32"]  # "auto" turns float32 checkpoints into float16 (bfloat16 on the CPU)
    with helpers.vllm_server(smollm2_path, args, log_path) as base:
        yield base, log_path


@pytest.fixture(scope="module")
def client(server):
    import openai

    base, _ = server
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=300, max_retries=0)


def _complete(client, prompt, max_tokens: int = TOKENS) -> str:
    return client.completions.create(model="smollm2", prompt=prompt, max_tokens=max_tokens,
                                     temperature=0).choices[0].text


@pytest.fixture(scope="module")
def sequential(client):
    """Each prompt's answer asked alone, one after the other: what every concurrent answer must equal."""
    return {p: _complete(client, p) for p in PROMPTS}


def _assert_server_alive(server) -> None:
    base, log_path = server
    assert _healthy(base)
    log = log_path.read_text()
    for marker in ("Engine loop has died", "MQLLMEngine is already dead", "Traceback"):
        assert marker not in log, log[-3000:]


def test_vllm_serve_with_model_impl_transformers(server, client, sequential):
    completion = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                           temperature=0)
    assert completion.choices[0].text.startswith(" Paris"), completion
    chat = client.chat.completions.create(model="smollm2", max_tokens=16, temperature=0,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in chat.choices[0].message.content, chat

    # 50 concurrent requests, 10 distinct prompts: each answer must equal that prompt's sequential answer.
    def ask(i: int) -> tuple:
        prompt = PROMPTS[i % len(PROMPTS)]
        return prompt, _complete(client, prompt)

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, range(50)))
    assert len(answers) == 50
    mismatches = [(p, got, sequential[p]) for p, got in answers if got != sequential[p]]
    assert not mismatches, mismatches[:5]
    assert "the Transformers backend (TransformersForCausalLM)" in server[1].read_text()


#: (prompt, max_tokens, what the 400's message must say)
BAD_REQUESTS = [
    ([1, 504, VOCAB], TOKENS, rf"1 token id outside the model's vocabulary of {VOCAB} tokens .*: {VOCAB} \(position 2\)"),
    ([-1, 504], TOKENS, r"outside the model's vocabulary .*: -1 \(position 0\)"),
    ([5, 10**12], TOKENS, rf"{10**12} \(position 1\)"),
    ("", TOKENS, r"The prompt cannot be empty"),
    ([7] * (MAX_MODEL_LEN + 10), TOKENS, rf"maximum context length is {MAX_MODEL_LEN} tokens"),
    ("Hello", MAX_MODEL_LEN + 1, rf"maximum context length is {MAX_MODEL_LEN} tokens"),
]


def _assert_bad_request(exc, message: str) -> None:
    import re

    import openai

    assert isinstance(exc, openai.BadRequestError), repr(exc)
    assert exc.status_code == 400
    body = exc.body  # vLLM's ErrorResponse: {"object": "error", "message", "type", "code"}
    assert body["object"] == "error" and body["code"] == 400 and body["type"] == "BadRequestError", body
    assert re.search(message, body["message"]), body["message"]


@pytest.mark.parametrize("prompt,max_tokens,message", BAD_REQUESTS, ids=["vocab-size", "negative", "huge", "empty",
                                                                        "too-long", "max-tokens-too-many"])
def test_bad_request_is_a_400_and_the_server_goes_on(server, client, sequential, prompt, max_tokens, message):
    with pytest.raises(Exception) as info:
        _complete(client, prompt, max_tokens)
    _assert_bad_request(info.value, message)
    assert _complete(client, PROMPTS[3]) == sequential[PROMPTS[3]]
    _assert_server_alive(server)


def test_bad_requests_mixed_with_good_ones_concurrently(server, client, sequential):
    """20 bad requests among 50 good ones, all at once: every bad one a 400, every good one its answer."""
    jobs = [("good", PROMPTS[i % len(PROMPTS)], TOKENS, None) for i in range(50)]
    jobs += [("bad", *BAD_REQUESTS[i % len(BAD_REQUESTS)]) for i in range(20)]
    random.Random(0).shuffle(jobs)

    def run(job):
        try:
            return _complete(client, job[1], job[2])
        except Exception as exc:  # judged below
            return exc

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for (kind, prompt, _, message), result in zip(jobs, results):
        if kind == "good":
            assert result == sequential[prompt], (prompt, result)
        else:
            _assert_bad_request(result, message)
    _assert_server_alive(server)


#: vLLM 0.6.2's guided-decoding backends: the module each imports per guided request.
GUIDED_BACKENDS = {"outlines": "vllm.model_executor.guided_decoding.outlines_decoding",
                   "lm-format-enforcer": "vllm.model_executor.guided_decoding.lm_format_enforcer_decoding"}
CHOICES = ["yes", "no", "maybe"]


def _importable(module: str) -> bool:
    import importlib

    try:  # lm-format-enforcer 0.10 needs transformers' LogitsWarper (gone in 4.5x); outlines 0.0.46, numpy 1
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def test_plain_requests_never_import_a_guided_decoding_backend(server, client, sequential):
    """vLLM 0.6.2 imported the guided-decoding backend on every request; lm-format-enforcer 0.10 cannot import
    under transformers 4.5x and 5.x (outlines cannot under numpy 2), so there every plain request was an
    HTTP 500. Plain completions and chats naming that backend get their ordinary answers (where it imports,
    this holds without the patch too)."""
    backend = {"guided_decoding_backend": "lm-format-enforcer"}
    for prompt in PROMPTS[:3]:
        answer = client.completions.create(model="smollm2", prompt=prompt, max_tokens=TOKENS, temperature=0,
                                           extra_body=backend).choices[0].text
        assert answer == sequential[prompt], (prompt, answer)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model="smollm2", max_tokens=8, temperature=0, messages=messages)
    named = client.chat.completions.create(model="smollm2", max_tokens=8, temperature=0, messages=messages,
                                           extra_body=backend)
    assert named.choices[0].message.content == plain.choices[0].message.content
    _assert_server_alive(server)


def test_which_requests_count_as_guided():
    """What vLLM 0.6.2 builds a guided-decoding processor for: the four guided_* fields, a response_format
    other than text, a named tool; nothing else."""
    from vllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

    from vllm_transformers_backend.patches.guided_decoding import asks_for_guidance

    messages = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    plain = [CompletionRequest(model="m", prompt="hi"),
             CompletionRequest(model="m", prompt="hi", guided_decoding_backend="x"),
             ChatCompletionRequest(model="m", messages=messages),
             ChatCompletionRequest(model="m", messages=messages, response_format={"type": "text"}),
             ChatCompletionRequest(model="m", messages=messages, tools=[tool], tool_choice="auto")]
    guided = [CompletionRequest(model="m", prompt="hi", guided_json={"type": "object"}),
              CompletionRequest(model="m", prompt="hi", guided_regex="a+"),
              CompletionRequest(model="m", prompt="hi", guided_choice=["a"]),
              CompletionRequest(model="m", prompt="hi", guided_grammar="root ::= \"a\""),
              ChatCompletionRequest(model="m", messages=messages, response_format={"type": "json_object"}),
              ChatCompletionRequest(model="m", messages=messages, tools=[tool],
                                    tool_choice={"type": "function", "function": {"name": "f"}})]
    assert [asks_for_guidance(r) for r in plain] == [False] * len(plain)
    assert [asks_for_guidance(r) for r in guided] == [True] * len(guided)


@pytest.mark.parametrize("backend", sorted(GUIDED_BACKENDS))
def test_guided_requests_still_reach_vllms_guided_decoding(server, client, backend):
    """A guided request is vLLM's as before: a backend that imports here constrains the answer to the choices;
    one that cannot be imported is an HTTP 400 naming it and the fix (it was a 500)."""
    request = dict(model="smollm2", max_tokens=TOKENS, temperature=0,
                   extra_body={"guided_choice": CHOICES, "guided_decoding_backend": backend})
    if _importable(GUIDED_BACKENDS[backend]):
        for prompt in PROMPTS[:3]:
            answer = client.completions.create(prompt=prompt, **request).choices[0].text
            assert answer in CHOICES, (prompt, answer)
    else:
        with pytest.raises(Exception) as info:
            client.completions.create(prompt=PROMPTS[0], **request)
        _assert_bad_request(info.value, rf"guided decoding backend '{backend}' cannot be imported .*"
                                        r"--guided-decoding-backend")
    _assert_server_alive(server)


def _preemptions(base: str) -> float:
    """vLLM's cumulative preemption count, from the server's Prometheus metrics."""
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("vllm:num_preemptions_total"))


def test_burst_beyond_the_kv_cache_is_queued_never_fatal(server, client, sequential):
    """100 concurrent completions, about three times what the KV cache holds: the scheduler queues and
    preempts; all are answered, each equal to its sequential answer, and the engine lives on."""
    preempted_before = _preemptions(server[0])
    with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
        answers = list(pool.map(lambda i: _complete(client, PROMPTS[i % len(PROMPTS)]), range(100)))
    mismatches = [(i, got) for i, got in enumerate(answers) if got != sequential[PROMPTS[i % len(PROMPTS)]]]
    assert not mismatches, mismatches[:5]
    assert _preemptions(server[0]) > preempted_before, "the burst never outgrew the KV cache"
    _assert_server_alive(server)


def test_slow_engine_step_is_not_a_dead_engine_loop():
    """vLLM 0.6.2's heartbeat declared the engine dead once one step ran longer than 3 x VLLM_RPC_TIMEOUT;
    patched (as vLLM >= 0.6.4), a slow step reports healthy and a failed engine still reports its error."""
    from vllm.engine.multiprocessing.engine import MQLLMEngine

    class Engine:
        @staticmethod
        def check_health() -> None:
            pass

    class Heartbeat:
        _alive = MQLLMEngine._alive
        _set_errored = MQLLMEngine._set_errored

        def __init__(self, errored_with=None):
            self.engine = Engine()
            self._errored_with = errored_with
            self._last_alive_time = time.time() - 3600  # the loop has been inside one step for an hour
            self.last_alive_threshold = 30.0
            self.sent = []

        def _send_healthy(self):
            self.sent.append("healthy")

        def _send_unhealthy(self, error):
            self.sent.append(error)

    slow = Heartbeat()
    MQLLMEngine._heartbeat(slow)
    assert slow.sent == ["healthy"]
    error = RuntimeError("step failed")
    failed = Heartbeat(errored_with=error)
    MQLLMEngine._heartbeat(failed)
    assert failed.sent == [error]

