"""Per-layer sliding windows (sliding_window.py, windowed_attention.py) on the CPU engine, float32.

* which layers get which window, from every config form (``layer_types``, ``sliding_window_pattern``,
  Gemma 2's alternation, Qwen2's ``use_sliding_window``/``max_window_layers``, one window for all);
* what vLLM's ModelConfig is told: no engine-wide window and no Gemma 2 length cap for models the backend
  windows per layer; vLLM's own window, unchanged, for a uniform one (Mistral);
* the backend's attention over vLLM's paged cache against a plain reference, on both cache layouts
  (vLLM's PagedAttention one, which the CPU engine uses, and FlashAttention's) and with the FlashAttention
  path's kernel calls replayed by a reference of FlashAttention's documented semantics, in the cases the CPU
  engine never produces (cached prefix / chunked prefill, prefill and decode in one step, soft-capping);
* end to end: tiny Gemma 2, Gemma 3 and Ministral (``layer_types``) checkpoints with windows of 16-32 tokens,
  prompts up to ten windows long in one batch with 1- and 2-token prompts, decoding past the windows, with
  preemption, equal HF token for token and log-probability for log-probability.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from packaging.version import Version

from tests.helpers import Engine, require_architecture, transformers_version

MAX_TOKENS = 24
HEADS, KV_HEADS, HEAD = 4, 2, 64


# --- which layer has which window ------------------------------------------------------------------


def test_layer_windows_from_every_config_form():
    from vllm_transformers_backend.sliding_window import SlidingWindowError, layer_windows, needs_per_layer

    def cfg(**kw):
        return SimpleNamespace(num_hidden_layers=6, **kw)

    s, f = "sliding_attention", "full_attention"
    assert layer_windows(cfg(sliding_window=8, layer_types=[s, s, f, s, s, f])) == [8, 8, None, 8, 8, None]
    assert layer_windows(cfg(sliding_window=None, layer_types=[s] * 6)) == [None] * 6
    assert layer_windows(cfg(sliding_window=8, sliding_window_pattern=3)) == [8, 8, None, 8, 8, None]
    assert layer_windows(cfg(sliding_window=8, model_type="gemma2")) == [8, None, 8, None, 8, None]
    assert layer_windows(cfg(sliding_window=8, use_sliding_window=False, max_window_layers=2)) == [None] * 6
    assert layer_windows(cfg(sliding_window=8, use_sliding_window=True, max_window_layers=4)) == [None] * 4 + [8, 8]
    assert layer_windows(cfg(sliding_window=8)) == [8] * 6  # Mistral-style: one window for every layer
    assert layer_windows(cfg()) == [None] * 6
    with pytest.raises(SlidingWindowError, match="chunked_attention"):
        layer_windows(cfg(sliding_window=8, layer_types=["chunked_attention", f] * 3))
    # vLLM's one window describes the layers only when every layer has exactly it
    assert not needs_per_layer([8] * 6, 8) and not needs_per_layer([None] * 6, None)
    assert needs_per_layer([8, None] * 3, 8) and needs_per_layer([None] * 6, 8)


def test_layer_windows_of_transformers_configs():
    """The real config classes of the installed transformers (defaults and explicit layer types)."""
    import transformers

    from vllm_transformers_backend.sliding_window import layer_windows

    gemma2 = transformers.Gemma2Config(num_hidden_layers=4, sliding_window=16)
    assert layer_windows(gemma2) == [16, None, 16, None]
    qwen2 = transformers.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=16,
                                     max_window_layers=2)
    assert layer_windows(qwen2) == [None, None, 16, 16]
    assert layer_windows(transformers.Qwen2Config(num_hidden_layers=4, sliding_window=16)) == [None] * 4
    if hasattr(transformers, "Gemma3TextConfig"):
        gemma3 = transformers.Gemma3TextConfig(num_hidden_layers=7, sliding_window=16)  # default pattern 6
        assert layer_windows(gemma3) == [16] * 5 + [None, 16]
    if hasattr(transformers, "MinistralConfig"):
        ministral = transformers.MinistralConfig(num_hidden_layers=3, sliding_window=16,
                                                 layer_types=["full_attention", "sliding_attention", "full_attention"])
        assert layer_windows(ministral) == [None, 16, None]


# --- tiny checkpoints with small windows -------------------------------------------------------------

_COMMON = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
               num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
               # small weights: varied greedy tokens (0.1 makes these tiny models repeat one token)
               initializer_range=0.02)


def _gemma2(window: int):
    import transformers

    return transformers.Gemma2Config(**_COMMON, sliding_window=window, query_pre_attn_scalar=32,
                                     final_logit_softcapping=5.0, attn_logit_softcapping=None,
                                     hidden_activation="gelu_pytorch_tanh"), "Gemma2ForCausalLM"


def _gemma3(window: int):
    import transformers

    require_architecture("gemma3")
    return transformers.Gemma3TextConfig(**_COMMON, sliding_window=window, sliding_window_pattern=2,
                                         query_pre_attn_scalar=64, final_logit_softcapping=None,
                                         attn_logit_softcapping=None), "Gemma3ForCausalLM"


def _ministral(window: int):
    import transformers

    if not hasattr(transformers, "MinistralConfig"):
        pytest.skip(f"transformers {transformers_version()} has no Ministral")
    return transformers.MinistralConfig(**_COMMON, sliding_window=window,
                                        layer_types=["sliding_attention", "full_attention"] * 2), "MinistralForCausalLM"


def _mistral(window: int):
    import transformers

    return transformers.MistralConfig(**_COMMON, sliding_window=window), "MistralForCausalLM"


#: name -> (config factory, window): windows aligned and not aligned to vLLM's 16-token blocks
WINDOWED = {"gemma2": (_gemma2, 16), "gemma3": (_gemma3, 20), "ministral": (_ministral, 32)}


def _build(name: str, factory, window: int, root: Path) -> Path:
    import transformers

    config, cls_name = factory(window)
    path = root / f"{name}-w{window}"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        getattr(transformers, cls_name)(config).eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    root = tmp_path_factory.mktemp("windowed")

    def get(name: str) -> Tuple[Path, int]:
        factory, window = WINDOWED[name] if name in WINDOWED else (_mistral, 16)
        return _build(name, factory, window, root), window

    return get


# --- what vLLM's ModelConfig is told -----------------------------------------------------------------


def _engine_config(path: Path, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(path), device="cpu", dtype="float32", skip_tokenizer_init=True,
                      **kwargs).create_engine_config()


def test_model_config_turns_the_global_window_off_only_for_per_layer_models(windowed):
    gemma2, window = windowed("gemma2")
    config = _engine_config(gemma2, model_impl="transformers")
    # no engine-wide window (block manager, runner, backend choice) and no cap at the window: 512 positions
    assert config.cache_config.sliding_window is None and config.model_config.get_sliding_window() is None
    assert config.model_config.max_model_len == 512
    assert config.model_config.backend_layer_windows == [window, None, window, None]
    # vLLM's own Gemma 2 keeps vLLM's behaviour (window off, length capped to it), and so does a user's request
    assert _engine_config(gemma2, model_impl="vllm").model_config.max_model_len == window
    assert _engine_config(gemma2, model_impl="transformers", disable_sliding_window=True).model_config.max_model_len \
        == window
    mistral, window = windowed("mistral")  # one window for every layer: vLLM's own mechanism, unchanged
    for impl in ("transformers", "vllm"):
        config = _engine_config(mistral, model_impl=impl)
        assert config.cache_config.sliding_window == window and config.model_config.backend_layer_windows is None


def test_check_reports_the_windows_per_layer_type(windowed, capsys):
    import json

    from vllm_transformers_backend import check

    found = {}
    for name in ("gemma2", "mistral"):
        path, window = windowed(name)
        assert check.main(str(path), as_json=True) == 0
        report = json.loads(capsys.readouterr().out)
        found[name] = next(f for f in report["findings"] if f["check"] == "sliding window")
    assert found["gemma2"]["status"] == "ok" and "engine-wide window is off" in found["gemma2"]["detail"]
    assert found["gemma2"]["items"] == ["sliding_attention x2: window 16 (layers 0, 2)",
                                        "full_attention x2: full context (layers 1, 3)"]
    assert "vLLM's own sliding-window mechanism" in found["mistral"]["detail"]
    assert found["mistral"]["items"] == ["sliding_attention x4: window 16 (layers 0, 1, 2, 3)"]


# --- the backend's attention against a reference ----------------------------------------------------


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float,
               softcap: Optional[float]) -> torch.Tensor:
    """One sequence: queries ``[Lq, H, D]`` at its last positions over all its keys ``[L, KVH, D]``."""
    seq_len, queries = k.shape[0], q.shape[0]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(seq_len - queries, seq_len)[:, None]
    k_pos = torch.arange(seq_len)[None, :]
    scores = scores.masked_fill(~((k_pos <= q_pos) & (k_pos > q_pos - window)), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).float()


class _Cache:
    """A paged KV cache in one of the two layouts, with sequences' earlier keys/values written into it."""

    def __init__(self, layout: str, num_blocks: int = 96, block_size: int = 16) -> None:
        from vllm.attention.ops.paged_attn import PagedAttention

        from vllm_transformers_backend.windowed_attention import FlashLayout, PagedLayout

        self.block_size = block_size
        if layout == "paged":
            self.tensor = torch.zeros(PagedAttention.get_kv_cache_shape(num_blocks, block_size, KV_HEADS, HEAD))
            self.layout = PagedLayout(PagedAttention, KV_HEADS, HEAD, "auto")
        else:
            self.tensor = torch.zeros(2, num_blocks, block_size, KV_HEADS, HEAD)
            self.layout = FlashLayout("auto")
            self.layout.write = self.write_flash  # FlashAttention's cache op is CUDA-only: same write, by index
        self.free = list(torch.randperm(num_blocks).tolist())

    def write_flash(self, key, value, kv_cache, slot_mapping, *_):
        kv_cache[0].view(-1, KV_HEADS, HEAD)[slot_mapping] = key
        kv_cache[1].view(-1, KV_HEADS, HEAD)[slot_mapping] = value

    def table(self, seq_len: int) -> List[int]:
        return [self.free.pop() for _ in range(math.ceil(seq_len / self.block_size))]

    def slots(self, table: Sequence[int], positions: range) -> List[int]:
        return [table[p // self.block_size] * self.block_size + p % self.block_size for p in positions]


def _step(cache: _Cache, prefills: Sequence[Tuple[int, int]], decodes: Sequence[int], tables_for_prompts: bool):
    """One engine step over made-up sequences: ``prefills`` as (cached context, new tokens), ``decodes`` as
    sequence lengths (one new token each). Earlier tokens are written to the cache first. Returns the step's
    q/k/v, its metadata (vLLM's fields), and each sequence's full keys/values and queries for the reference."""
    torch.manual_seed(len(prefills) * 31 + len(decodes))
    seqs = [(c, n) for c, n in prefills] + [(length - 1, 1) for length in decodes]
    q_new, k_new, v_new, slots, refs, tables = [], [], [], [], [], []
    for context, new in seqs:
        k_all, v_all = torch.randn(context + new, KV_HEADS, HEAD), torch.randn(context + new, KV_HEADS, HEAD)
        q = torch.randn(new, HEADS, HEAD)
        table = cache.table(context + new)
        if context:
            cache.layout.write(k_all[:context], v_all[:context], cache.tensor,
                               torch.tensor(cache.slots(table, range(context))), 1.0, 1.0)
        q_new.append(q), k_new.append(k_all[context:]), v_new.append(v_all[context:]), tables.append(table)
        slots += cache.slots(table, range(context, context + new))
        refs.append((q, k_all, v_all))

    def block_tables(rows):
        width = max((len(r) for r in rows), default=0)
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)

    def cumsum(values):
        return torch.tensor([0] + list(torch.tensor(values).cumsum(0).tolist()), dtype=torch.int32)

    prefill = None
    if prefills:
        lens = [c + n for c, n in prefills]
        with_tables = tables_for_prompts or any(c for c, _ in prefills)
        prefill = SimpleNamespace(seq_lens=lens, seq_start_loc=cumsum(lens), max_prefill_seq_len=max(lens),
                                  query_start_loc=cumsum([n for _, n in prefills]),
                                  max_query_len=max(n for _, n in prefills),
                                  block_tables=block_tables(tables[:len(prefills)]) if with_tables else torch.tensor([]))
    decode = None
    if decodes:
        decode = SimpleNamespace(seq_lens_tensor=torch.tensor(list(decodes), dtype=torch.int32),
                                 block_tables=block_tables(tables[len(prefills):]))
    meta = SimpleNamespace(num_prefill_tokens=sum(n for _, n in prefills), slot_mapping=torch.tensor(slots),
                           prefill_metadata=prefill, decode_metadata=decode)
    flat = [torch.cat(x).reshape(sum(n for _, n in seqs), -1) for x in (q_new, k_new, v_new)]
    return flat, meta, refs


def _impl(softcap: Optional[float]):
    return SimpleNamespace(num_heads=HEADS, num_kv_heads=KV_HEADS, head_size=HEAD, scale=HEAD ** -0.5,
                           kv_cache_dtype="auto", logits_soft_cap=softcap or 0, alibi_slopes=None)


#: (prefills as (context, new), decodes as lengths, window, soft-cap): every step shape an engine makes
STEPS = {
    "prompts": ([(0, 1), (0, 7), (0, 33), (0, 70)], [], 16, None),
    "decodes": ([], [1, 5, 16, 17, 40, 100], 16, None),
    "cached-prefix": ([(10, 5), (40, 30), (0, 12), (97, 1)], [], 20, None),
    "mixed-chunked": ([(64, 17), (0, 9)], [3, 50, 81], 33, None),
    "window-1": ([(0, 20)], [30, 2], 1, None),
    "window-beyond-seqs": ([(0, 12)], [9, 30], 512, None),
    "softcap": ([(0, 40), (25, 8)], [60, 7], 16, 30.0),
}


def _check_against_reference(attention, step_case: str, layout: str, tables_for_prompts: bool = False,
                             cache_factory=None, atol: float = 2e-5) -> None:
    """One step of ``STEPS`` through ``attention(impl, window, cache)`` against :func:`_reference` (also used by
    the GPU test, with a CUDA cache and bf16 tensors)."""
    prefills, decodes, window, softcap = STEPS[step_case]
    cache = cache_factory() if cache_factory else _Cache(layout)
    (q, k, v), meta, refs = _step(cache, prefills, decodes, tables_for_prompts)
    out = attention(_impl(softcap), window, cache)(q, k, v, cache.tensor, meta, 1.0, 1.0)
    expected = torch.cat([_reference(*ref, window, HEAD ** -0.5, softcap) for ref in refs]).reshape(out.shape)
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=atol)


@pytest.mark.parametrize("layout", ["paged", "flash"])
@pytest.mark.parametrize("step_case", sorted(STEPS))
def test_gathered_attention_equals_reference(layout, step_case):
    from vllm_transformers_backend.windowed_attention import GatheredWindowAttention

    _check_against_reference(lambda impl, window, cache: GatheredWindowAttention(impl, window, cache.layout),
                             step_case, layout)


def _flash_reference_attend(q, k, v, causal, window_size, scale, softcap):
    """FlashAttention's documented semantics for one sequence: the query block is aligned to the end of the
    keys; a key is seen when ``q - left <= k <= q + right`` (a negative bound is unbounded; causal: right=0)."""
    queries, keys = q.shape[0], k.shape[0]
    left, right = window_size
    right = 0 if causal else right
    q_pos = torch.arange(queries)[:, None] + keys - queries
    k_pos = torch.arange(keys)[None, :]
    seen = torch.ones(queries, keys, dtype=torch.bool)
    if right >= 0:
        seen &= k_pos <= q_pos + right
    if left >= 0:
        seen &= k_pos >= q_pos - left
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~seen, float("-inf")).softmax(-1), v)


def _fake_flash_kernels(cache: _Cache):
    from vllm_transformers_backend.windowed_attention import FlashKernels

    def paged(tensor, table, length):
        pos = torch.arange(length)
        return tensor[table[pos // cache.block_size].long(), pos % cache.block_size]

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size,
               alibi_slopes=None, softcap=0.0, block_table=None):
        assert alibi_slopes is None and isinstance(window_size, list)
        out = []
        for i in range(len(cu_seqlens_q) - 1):
            qs, qe, ks, ke = cu_seqlens_q[i], cu_seqlens_q[i + 1], cu_seqlens_k[i], cu_seqlens_k[i + 1]
            assert qe - qs <= max_seqlen_q and ke - ks <= max_seqlen_k
            if block_table is None:
                keys, values = k[ks:ke], v[ks:ke]
            else:
                keys, values = paged(k, block_table[i], ke - ks), paged(v, block_table[i], ke - ks)
            out.append(_flash_reference_attend(q[qs:qe], keys, values, causal, window_size, softmax_scale, softcap))
        return torch.cat(out)

    def with_kvcache(q, k_cache, v_cache, block_table, cache_seqlens, softmax_scale, causal, window_size,
                     alibi_slopes=None, softcap=0.0):
        out = [_flash_reference_attend(q[i], paged(k_cache, block_table[i], int(length)),
                                       paged(v_cache, block_table[i], int(length)), causal, window_size,
                                       softmax_scale, softcap) for i, length in enumerate(cache_seqlens)]
        return torch.stack(out)

    return FlashKernels(cache.write_flash, varlen, with_kvcache)


@pytest.mark.parametrize("step_case", sorted(STEPS))
def test_flash_window_calls_mean_the_layer_window(step_case):
    """The FlashAttention path's calls (on the GPU: vLLM's kernels), replayed with FlashAttention's documented
    window semantics, give the layer's windowed attention: window (w - 1, 0), the block table for cached
    prefixes and chunked prefill, the decode kernel with the window."""
    from vllm_transformers_backend.windowed_attention import FlashWindowAttention

    _check_against_reference(lambda impl, window, cache: FlashWindowAttention(impl, window, _fake_flash_kernels(cache)),
                             step_case, "flash", tables_for_prompts=step_case == "mixed-chunked")


# --- end to end against HF -----------------------------------------------------------------------------


def _prompts(window: int) -> List[List[int]]:
    rng = random.Random(window)
    lengths = [1, 2, window - 1, 3 * window, 5 * window + 3, 10 * window, 7, 2 * window + 1]
    return [[rng.randrange(1, 500) for _ in range(n)] for n in lengths]


def _hf_model(path: Path, window: Optional[int] = None):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    if window is not None:  # the same weights attending without a window: does the window matter here?
        model = type(model)(_with_window(model.config, window)).eval()
        model.load_state_dict(transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
                              .state_dict())
    model.generation_config.eos_token_id = None
    return model


def _with_window(config, window: int):
    config = type(config).from_dict(config.to_dict())
    config.sliding_window = window
    return config


def _hf_forward_greedy(model, prompt: Sequence[int], steps: int) -> Tuple[List[int], List[float]]:
    """Greedy tokens and their log-probabilities from full forwards (no KV cache: nothing of HF's cache code)."""
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            scores = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            ids.append(int(scores.argmax()))
            logprobs.append(float(scores[ids[-1]]))
    return ids[len(prompt):], logprobs


def _hf_generate(model, prompt: Sequence[int], steps: int) -> List[int]:
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                             pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def _vllm_greedy(llm, prompts, steps: int) -> List[Tuple[List[int], List[float]]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    result = []
    for o in outs:
        tokens = list(o.outputs[0].token_ids)
        result.append((tokens, [step[t].logprob for t, step in zip(tokens, o.outputs[0].logprobs)]))
    return result


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_interleaved_windows_match_hf(name, windowed):
    path, window = windowed(name)
    prompts = _prompts(window)
    model = _hf_model(path)
    expected = [_hf_forward_greedy(model, p, MAX_TOKENS) for p in prompts]
    if transformers_version() >= Version("4.57"):
        # HF's generate (its own sliding-window cache) agrees with its full forwards; transformers 4.48's
        # HybridCache does not once a prompt shorter than the window grows past it (measured), so there the
        # full forwards are the reference.
        assert [_hf_generate(model, p, MAX_TOKENS) for p in prompts] == [tokens for tokens, _ in expected]
    # the reference applies the window: without it the same weights score the longest prompt differently
    _, unwindowed = _hf_forward_greedy(_hf_model(path, window=4096), prompts[5], MAX_TOKENS)
    assert max(abs(a - b) for a, b in zip(unwindowed, expected[5][1])) > 1e-3

    # A KV cache for the longest sequence and a block: the batch cannot all fit, so the scheduler preempts.
    max_len = 16 * math.ceil((max(map(len, prompts)) + MAX_TOKENS) / 16)
    with Engine(path, "transformers", max_model_len=max_len, num_gpu_blocks_override=max_len // 16 + 1,
                max_num_seqs=len(prompts)) as llm:
        assert llm.llm_engine.cache_config.sliding_window is None
        model_vllm = llm.llm_engine.model_executor.driver_worker.model_runner.model
        kinds = {idx: type(a).__name__ for idx, a in model_vllm.attention_instances.items()}
        assert kinds == {0: "WindowedAttention", 1: "Attention", 2: "WindowedAttention", 3: "Attention"}
        got = _vllm_greedy(llm, prompts, MAX_TOKENS)
        assert llm.llm_engine.scheduler[0].num_cumulative_preemption > 0, "the test did not exercise preemption"
        alone = _vllm_greedy(llm, [prompts[5]], 8)[0]  # the longest prompt alone in its batch
    for i, ((tokens, logprobs), (ref_tokens, ref_logprobs)) in enumerate(zip(got, expected)):
        assert tokens == ref_tokens, f"prompt {i} ({len(prompts[i])} tokens)"
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) < 1e-4, f"prompt {i}"
    assert alone[0] == expected[5][0][:8]
