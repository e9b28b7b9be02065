"""Bad requests never reach the engine (issue #23): out-of-vocabulary ids, prompts too long or empty are
refused with an error naming the problem, before anything runs, for vLLM's own model and the backend; the
same engine then answers good prompts exactly as HF does. A batch with one bad prompt fails whole; a
failed engine step leaves nothing behind; a missing model folder is named; no transformers deprecation
warning at engine start."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from tests.helpers import Engine, hf_greedy, transformers_version, vllm_greedy, vllm_model

MAX_LEN = 32
#: Good prompts (token ids) and how many tokens each generates; mixed lengths incl. a one-token prompt.
GOOD = [[1, 5, 7, 9, 11], [300, 12], [42] * 10, [7]]
TOKENS = 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, smollm2_path):
    """A tiny random Llama with SmolLM2's tokenizer (and so its vocabulary of 49152)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("validation-llama")
    vocab = len(AutoTokenizer.from_pretrained(smollm2_path))
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_path / name, path / name)
    return path


@pytest.fixture(scope="module")
def vocab_size(model_path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path).vocab_size


@pytest.fixture(scope="module")
def reference(model_path):
    return hf_greedy(model_path, GOOD, TOKENS)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def engine(request, model_path):
    """(LLM, transformers warnings logged while it started) for the backend and vLLM's own Llama."""
    # transformers logs each deprecation once per process: forget earlier ones, then listen while starting
    warning_once = getattr(logging.Logger, "warning_once", None)
    if hasattr(warning_once, "cache_clear"):
        warning_once.cache_clear()
    records = _Records()
    logging.getLogger("transformers").addHandler(records)
    try:
        context = Engine(model_path, request.param, skip_tokenizer_init=False, max_model_len=MAX_LEN)
        llm = context.__enter__()
    finally:
        logging.getLogger("transformers").removeHandler(records)
    try:
        yield llm, records.messages
    finally:
        context.__exit__(None, None, None)


def _assert_clean_and_correct(llm, reference) -> None:
    """Nothing left in the engine, and good prompts still give HF's tokens."""
    assert not llm.llm_engine.has_unfinished_requests()
    assert vllm_greedy(llm, GOOD, TOKENS) == reference


def _generate(llm, prompts, max_tokens: int = TOKENS):
    from vllm import SamplingParams

    return llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)


def test_out_of_vocabulary_ids_are_refused(engine, vocab_size, reference):
    from vllm_transformers_backend.patches.prompt_validation import InvalidPromptError

    llm, _ = engine
    v = vocab_size
    cases = [
        ([1, 504, v], rf"1 token id outside the model's vocabulary of {v} tokens .*0 to {v - 1}\): {v} \(position 2\)"),
        ([-1, 3], r"-1 \(position 0\)"),
        ([5, 10**12, -7], rf"2 token ids .*: {10**12} \(position 1\), -7 \(position 2\)\."),
        ([v + 1] * 8, rf"8 token ids .*\(position 4\) and 3 more\."),
    ]
    for ids, message in cases:
        with pytest.raises(InvalidPromptError, match=message):
            _generate(llm, {"prompt_token_ids": ids})
        assert not llm.llm_engine.has_unfinished_requests()
    _assert_clean_and_correct(llm, reference)


def test_too_long_prompts_are_refused(engine, reference):
    from vllm_transformers_backend.patches.prompt_validation import InvalidPromptError

    llm, _ = engine
    with pytest.raises(InvalidPromptError, match=rf"has {MAX_LEN + 1} tokens, more than the maximum model length "
                                                 rf"\(max_model_len\) of {MAX_LEN}: shorten the prompt"):
        _generate(llm, {"prompt_token_ids": [5] * (MAX_LEN + 1)})
    with pytest.raises(InvalidPromptError, match=rf"has {MAX_LEN} tokens, as many as .* no room for a generated token"):
        _generate(llm, {"prompt_token_ids": [5] * MAX_LEN})
    # one token short of the limit still runs, cut by max_model_len (vLLM 0.6.2 stops once the sequence is
    # longer than max_model_len: the last sampled token is never fed back)
    (output,) = _generate(llm, {"prompt_token_ids": [5] * (MAX_LEN - 1)})
    assert len(output.outputs[0].token_ids) == 2 and output.outputs[0].finish_reason == "length"
    _assert_clean_and_correct(llm, reference)


def test_empty_prompts_are_refused(engine, reference):
    from vllm_transformers_backend.patches.prompt_validation import InvalidPromptError

    llm, _ = engine
    for prompt in ("", {"prompt_token_ids": []}):
        with pytest.raises(InvalidPromptError, match="The prompt cannot be empty"):
            _generate(llm, prompt)
    _assert_clean_and_correct(llm, reference)


def test_batch_with_a_bad_prompt_fails_whole_before_running(engine, vocab_size, reference):
    from vllm_transformers_backend.patches.prompt_validation import InvalidPromptError

    llm, _ = engine
    batch = [{"prompt_token_ids": GOOD[0]}, {"prompt_token_ids": GOOD[1]}, {"prompt_token_ids": [3, vocab_size]},
             {"prompt_token_ids": GOOD[2]}]
    steps = []
    original_step = llm.llm_engine.step
    llm.llm_engine.step = lambda: steps.append(1) or original_step()
    try:
        with pytest.raises(InvalidPromptError, match=rf"Prompt 2 of this batch of 4 .* none of the batch ran: .*"
                                                     rf"{vocab_size} \(position 1\)"):
            _generate(llm, batch)
    finally:
        del llm.llm_engine.step
    assert steps == []  # refused before the engine ran a step
    _assert_clean_and_correct(llm, reference)  # and the next call returns only its own outputs


def test_failed_step_leaves_nothing_behind(engine, reference):
    llm, _ = engine
    model = vllm_model(llm)

    def fail(*_):
        raise RuntimeError("injected failure")

    handle = model.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            _generate(llm, [{"prompt_token_ids": p} for p in GOOD])
    finally:
        handle.remove()
    _assert_clean_and_correct(llm, reference)


def test_no_torch_dtype_deprecation_warning_at_start(engine):
    from packaging.version import Version

    if transformers_version() < Version("4.56.0"):
        pytest.skip(f"transformers {transformers_version()} has no `dtype` (the rename is from 4.56): nothing to warn")
    _, warnings = engine
    assert not [m for m in warnings if "torch_dtype" in m], warnings


def test_missing_local_model_folder_is_named(tmp_path, monkeypatch):
    from vllm_transformers_backend.patches.hf_config import check_model_path

    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=f"No such folder: '{missing}': the model path does not exist"):
        with Engine(missing, "transformers"):
            pass
    (tmp_path / "model").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"'~' is not expanded; '.*/model' exists"):
        check_model_path("~/model")
    check_model_path("org/name")  # a possible hub repo id: left to the hub


def test_lora_extra_vocabulary_and_long_context_limits():
    """With a LoRA request the adapter's extra tokens (after the base vocabulary) are valid ids, and a
    long-context adapter's length limit replaces max_model_len, as vLLM's LoRA embedding and scheduler
    take them; without one the base limits hold."""
    import types

    from vllm import SamplingParams

    from vllm_transformers_backend.patches.prompt_validation import InvalidPromptError, validate_inputs

    model_config = types.SimpleNamespace(get_vocab_size=lambda: 100, max_model_len=16, is_multimodal_model=False)
    engine = types.SimpleNamespace(model_config=model_config, tokenizer=None, is_encoder_decoder_model=lambda: False,
                                   lora_config=types.SimpleNamespace(lora_extra_vocab_size=8))
    params = SamplingParams(max_tokens=1)
    adapter = types.SimpleNamespace(long_lora_max_len=64)
    validate_inputs(engine, {"prompt_token_ids": [1, 107]}, params, adapter)
    validate_inputs(engine, {"prompt_token_ids": [1] * 40}, params, adapter)
    with pytest.raises(InvalidPromptError, match=r"vocabulary of 108 tokens .*: 108 \(position 0\)"):
        validate_inputs(engine, {"prompt_token_ids": [108]}, params, adapter)
    with pytest.raises(InvalidPromptError, match=r"vocabulary of 100 tokens .*: 107 \(position 1\)"):
        validate_inputs(engine, {"prompt_token_ids": [1, 107]}, params, None)
    with pytest.raises(InvalidPromptError, match="more than the maximum model length"):
        validate_inputs(engine, {"prompt_token_ids": [1] * 40}, params, None)
