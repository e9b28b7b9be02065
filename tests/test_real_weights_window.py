"""Gemma 3 270M (real weights, float32, CPU engine) at 4096 tokens of context: prompts of ~2000, ~600 and 30
tokens of real text in one batch, greedy, equal HF ``generate`` token for token.

Not part of the CI set-up (preparing the model takes minutes): ``python scripts/prepare_models.py --gemma3``
first, then ``python -m pytest tests/test_real_weights_window.py``. Skipped, with that reason, where the
model has not been prepared.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.helpers import Engine, bundled_model, require_architecture

MAX_TOKENS = 32


@pytest.fixture(scope="module")
def gemma3_270m():
    require_architecture("gemma3")
    path = bundled_model("gemma-3-270m")
    if path is None:
        pytest.skip("Gemma 3 270M is not prepared: run `python scripts/prepare_models.py --gemma3` first")
    return path


def _hf(path: Path, prompt, window=None):
    """HF ``generate`` (eager attention): greedy tokens and their log-probabilities (optionally with another
    window)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    if window is not None:
        config.sliding_window = window
    # eager attention: HF's SDPA attention (torch 2.4, CPU, float32) returns NaN logits for this model at 2000
    # tokens (measured: all NaN from the first generated token; 600 tokens are fine), its eager one does not
    model = transformers.AutoModelForCausalLM.from_pretrained(path, config=config, torch_dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def test_gemma3_270m_long_context_equals_hf(gemma3_270m):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(gemma3_270m)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    ids = tokenizer(text).input_ids
    assert len(ids) > 2000, "the README is shorter than the prompt this test needs"
    prompts = [ids[:2000], ids[:600], ids[:30]]  # the first two reach past the 512-token window
    expected = [_hf(gemma3_270m, p) for p in prompts]
    assert all(math.isfinite(v) for _, logprobs in expected for v in logprobs)
    # the reference applies the window: with one that never applies, the long prompt is scored differently
    _, unwindowed = _hf(gemma3_270m, prompts[0], window=len(prompts[0]) + MAX_TOKENS)
    assert all(math.isfinite(v) for v in unwindowed)
    assert max(abs(a - b) for a, b in zip(unwindowed, expected[0][1])) > 1e-3

    with Engine(gemma3_270m, "transformers", max_model_len=4096, skip_tokenizer_init=False) as llm:
        assert llm.llm_engine.cache_config.sliding_window is None
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for i, (out, (tokens, logprobs)) in enumerate(zip(outs, expected)):
        got = list(out.outputs[0].token_ids)
        got_logprobs = [step[t].logprob for t, step in zip(got, out.outputs[0].logprobs)]
        assert got == tokens, f"prompt {i} ({len(prompts[i])} tokens): {tokenizer.decode(got)!r} vs " \
                              f"{tokenizer.decode(tokens)!r}"
        print(f"prompt {i} ({len(prompts[i])} tokens): {MAX_TOKENS} tokens equal HF, largest log-probability "
              f"difference {max(abs(a - b) for a, b in zip(got_logprobs, logprobs)):.2e}: {tokenizer.decode(got)!r}")
