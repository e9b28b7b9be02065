"""Models built without the attention interface (``legacy_attention.py``): their SDPA classes with the
``scaled_dot_product_attention`` call routed to the ``"vllm"`` attention function.

Module level, every release: a toy SDPA class written as transformers 4.x wrote them (``repeat_kv`` before the
call, output transposed back) gives bit-identical outputs routed and unrouted outside the engine; inside an
attention context its call reaches the layer's instance with the original (un-repeated) key/value heads over a
sweep of head groupings, and the result equals the unrouted module; names of the modeling module are read
live. Engine level, where the installed release predates the interface for a model type (Qwen2-MoE and OLMoE
up to 4.57, GPT-NeoX before 4.49, OPT before 4.52): every layer's attention is routed and the engine gives HF
``generate``'s tokens (float32, CPU), over a sweep of head groupings for the MoE models, at TP=1 and (Qwen2-MoE,
which has a tp_plan on 4.x) TP=2; routed modules get a rank's head counts, and a plan gathering their heads is
refused; a BERT whose SDPA
class falls back to eager code (relative positions) is refused at the first forward with the layers named.
(The BERT-family and ESM encoders on 4.x run through test_embedding.py and test_classify.py.)
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from tests.helpers import (ARCHITECTURES, MOE_ARCHITECTURES, PROMPTS, Engine, build_moe_checkpoint,
                           hf_greedy, interface_supported, moe_config, require_architecture, routed_attention,
                           transformers_version, vllm_greedy, vllm_model)
from vllm_transformers_backend import compat, legacy_attention, tp_plan
from tests.test_tensor_parallel import spawned_workers  # noqa: F401  (a fixture, used by TP cases)
from vllm_transformers_backend.attention import AttentionContext, attention_context


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, heads, tokens, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, tokens, dim).reshape(batch, heads * groups, tokens, dim)


_expand = repeat_kv  # the reference's own binding (one test rebinds the module's name)


class ToySdpaAttention(nn.Module):
    """An attention class in the 4.x SDPA style."""

    def __init__(self, heads: int, kv_heads: int, dim: int, layer_idx: int = 0) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dim, self.layer_idx = heads, kv_heads, dim, layer_idx
        self.num_key_value_groups = heads // kv_heads
        self.q_proj = nn.Linear(32, heads * dim)
        self.k_proj = nn.Linear(32, kv_heads * dim)
        self.v_proj = nn.Linear(32, kv_heads * dim)
        self.o_proj = nn.Linear(heads * dim, 32)

    def forward(self, hidden: torch.Tensor, scale: float = None) -> torch.Tensor:
        batch, tokens, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, tokens, -1, self.dim).transpose(1, 2)
        k = self.k_proj(hidden).view(batch, tokens, -1, self.dim).transpose(1, 2)
        v = self.v_proj(hidden).view(batch, tokens, -1, self.dim).transpose(1, 2)
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=tokens > 1, scale=scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class ToyEagerAttention(ToySdpaAttention):
    def forward(self, hidden: torch.Tensor, scale: float = None) -> torch.Tensor:
        return self.o_proj(self.q_proj(hidden))


class _Recording:
    """Stands in for a layer's vLLM Attention: causal attention over token rows, inputs recorded."""

    def __init__(self, heads: int, kv_heads: int, dim: int) -> None:
        self.heads, self.kv_heads, self.dim = heads, kv_heads, dim
        self.impl = types.SimpleNamespace(num_kv_heads=kv_heads, scale=dim ** -0.5)  # what the routing reads
        self.seen = []

    def __call__(self, q, k, v, kv_cache, metadata):
        self.seen.append((q.clone(), k.clone(), v.clone()))
        tokens = q.shape[0]
        q4 = q.view(tokens, self.heads, self.dim).transpose(0, 1)[None]
        k4 = k.view(tokens, self.kv_heads, self.dim).transpose(0, 1)[None]
        v4 = v.view(tokens, self.kv_heads, self.dim).transpose(0, 1)[None]
        groups = self.heads // self.kv_heads
        out = torch.nn.functional.scaled_dot_product_attention(q4, _expand(k4, groups), _expand(v4, groups),
                                                               is_causal=True)
        return out[0].transpose(0, 1).reshape(tokens, -1)


HEADS = [(4, 4), (4, 2), (4, 1), (8, 2), (6, 3)]


@pytest.mark.parametrize("heads, kv_heads", HEADS, ids=[f"h{h}-kv{k}" for h, k in HEADS])
@pytest.mark.parametrize("tokens", [1, 7])
def test_routed_class_sends_sdpa_to_the_layer_with_original_kv_heads(heads, kv_heads, tokens):
    torch.manual_seed(0)
    module = ToySdpaAttention(heads, kv_heads, 16, layer_idx=3).eval()
    hidden = torch.randn(1, tokens, 32)
    with torch.no_grad():
        want = module(hidden)
        assert legacy_attention.route(nn.ModuleList([module])) == ["ToySdpaAttention"]
        assert legacy_attention.is_routed(module) and type(module).__name__ == "ToySdpaAttention"
        assert torch.equal(module(hidden), want)  # no context: torch's own SDPA with HF's arguments
        layer = _Recording(heads, kv_heads, 16)
        with attention_context(AttentionContext({3: layer}, [None] * 4, None)):
            got = module(hidden)
        k = module.k_proj(hidden).view(tokens, kv_heads * 16)
        v = module.v_proj(hidden).view(tokens, kv_heads * 16)
    assert len(layer.seen) == 1
    q_seen, k_seen, v_seen = layer.seen[0]
    assert q_seen.shape == (tokens, heads * 16) and torch.equal(k_seen, k) and torch.equal(v_seen, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_routed_forward_reads_the_modeling_module_live_and_keeps_the_scale(monkeypatch):
    module = ToySdpaAttention(4, 2, 16).eval()
    legacy_attention.route(nn.ModuleList([module]))
    calls = []
    original = repeat_kv
    monkeypatch.setattr(sys.modules[__name__], "repeat_kv", lambda x, g: calls.append(g) or original(x, g))
    layer = _Recording(4, 2, 16)
    ctx = AttentionContext({0: layer}, [None], None, record_calls=True)
    with torch.no_grad(), attention_context(ctx):
        module(torch.randn(1, 5, 32), scale=0.5)
    assert calls == [2, 2] and ctx.called == {0}


def test_only_classes_calling_sdpa_are_routed():
    eager = ToyEagerAttention(4, 4, 16)
    assert not legacy_attention.calls_sdpa(ToyEagerAttention) and legacy_attention.calls_sdpa(ToySdpaAttention)
    assert legacy_attention.route(nn.ModuleList([eager])) == [] and type(eager) is ToyEagerAttention
    first, second = ToySdpaAttention(4, 4, 16), ToySdpaAttention(4, 4, 16, layer_idx=1)
    legacy_attention.route(nn.ModuleList([first]))
    legacy_attention.route(nn.ModuleList([second, first]))  # routing twice changes nothing
    assert type(first) is type(second) and type(first).__mro__[1] is ToySdpaAttention


# --- engine level -------------------------------------------------------------------------------------------


LEGACY_DECODERS = [a for a in ("gpt_neox", "opt") if a in ARCHITECTURES]
#: MoE head groupings: (heads, kv heads, hidden size) with head size 64.
MOE_HEADS = [(2, 1, 128), (4, 4, 256), (4, 2, 256)]


def _assert_routed(llm, layers: int) -> None:
    model = vllm_model(llm)
    routed = [m for m in model.model.modules() if legacy_attention.is_routed(m)]
    assert len(routed) == layers, f"{len(routed)} routed attention modules, {layers} layers"


@pytest.mark.parametrize("arch", LEGACY_DECODERS)
def test_legacy_decoder_generates_hf_tokens(arch, checkpoints):
    if not routed_attention(arch):
        pytest.skip(f"transformers {transformers_version()} sends {arch}'s attention through the interface "
                    "(test_generation.py covers it there)")
    path = checkpoints(arch)
    if not interface_supported(arch):  # no SDPA class to route in this release: the interface error, with the fix
        with pytest.raises(ValueError, match=r"none of its modules calls scaled_dot_product_attention.*install "
                                             rf"transformers>={compat.INTERFACE_SINCE[arch]}"):
            with Engine(path, "transformers"):
                pass
        return
    expected = hf_greedy(path, PROMPTS, 10)
    with Engine(path, "transformers", max_num_seqs=3) as llm:
        _assert_routed(llm, 2)
        assert vllm_greedy(llm, PROMPTS, 10) == expected


#: TP=2 of OLMoE: 4.x declares no tp_plan for it; the backend shards it with 5.0's (gathered heads).
LEGACY_MOE = [(a, h, tp) for a in ("qwen2_moe", "olmoe") if a in MOE_ARCHITECTURES for h in MOE_HEADS for tp in (1, 2)]


@pytest.mark.parametrize("arch, heads, tp", LEGACY_MOE,
                         ids=[f"{a}-h{h}-kv{k}-tp{tp}" for a, (h, k, _), tp in LEGACY_MOE])
def test_legacy_moe_generates_hf_tokens(arch, heads, tp, tmp_path, request):
    """TP=2 over 2 heads / 1 KV head replicates the KV head on both ranks; 4/4 and 4/2 split them."""
    from tests.test_tensor_parallel import _greedy

    require_architecture(arch)
    if not routed_attention(arch):
        pytest.skip(f"transformers {transformers_version()} sends {arch}'s attention through the interface "
                    "(test_moe.py covers it there)")
    num_heads, kv_heads, hidden = heads
    path = build_moe_checkpoint(arch, tmp_path / arch, num_attention_heads=num_heads, num_key_value_heads=kv_heads,
                                hidden_size=hidden)
    prompts = PROMPTS + [[7]]
    expected = hf_greedy(path, prompts, 10)
    if tp > 1:
        if not tp_plan.config_plan(moe_config(arch), "base_model_tp_plan"):
            pytest.skip(f"transformers {transformers_version()} declares no tp_plan for {arch}")
        request.getfixturevalue("spawned_workers")
    assert _greedy(path, prompts=prompts, max_tokens=10, inspect=lambda llm: _assert_routed(llm, 2),
                   tensor_parallel_size=tp, max_num_seqs=3) == expected


def test_sdpa_class_falling_back_to_eager_is_refused_at_the_first_forward(tmp_path):
    """BERT's 4.x SDPA class runs its eager parent for relative position embeddings: no layer reaches vLLM."""
    if not routed_attention("bert"):
        pytest.skip(f"transformers {transformers_version()} sends BERT's attention through the interface")
    import transformers

    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64,
                                     position_embedding_type="relative_key")
    transformers.BertModel(config).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match=r"layers \[?0.*did not call the 'vllm' attention function"):
        with Engine(tmp_path, "transformers", runner="pooling", max_model_len=64) as llm:
            llm.encode([{"prompt_token_ids": [1, 2, 3]}])


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])
def test_check_says_the_attention_is_routed(arch, tmp_path, capsys):
    import json

    from vllm_transformers_backend import check

    require_architecture(arch)
    if not routed_attention(arch):
        pytest.skip(f"transformers {transformers_version()} sends {arch}'s attention through the interface")
    path = build_moe_checkpoint(arch, tmp_path / arch)
    code = check.main(str(path), as_json=True)
    report = json.loads(capsys.readouterr().out)
    attention = next(f for f in report["findings"] if f["check"] == "attention interface")
    assert code == 0, report
    # HF's expert loop is data-dependent: no forward on meta, so the dispatch is left to the first forward
    assert attention["status"] == "warn" and "dispatch not verified on meta" in attention["detail"], attention
    assert "predates the interface" in attention["detail"] and "routed" in attention["detail"], attention
    # Qwen2-MoE has a tp_plan on 4.x; OLMoE gets the one 5.0 declares
    assert check.main(str(path), tp=2, as_json=True) == 0
    tp = next(f for f in json.loads(capsys.readouterr().out)["findings"] if f["check"] == "tensor parallel")
    assert tp["status"] in ("ok", "warn") and "tp_plan covers" in tp["detail"], tp  # (4.57.6: experts replicated)
    assert ("the backend uses the one a later release declares" in tp["detail"]) == (arch == "olmoe"), tp


def test_check_names_the_routing_for_an_encoder(tmp_path, capsys):
    import json

    import transformers

    from vllm_transformers_backend import check

    if not routed_attention("bert"):
        pytest.skip(f"transformers {transformers_version()} sends BERT's attention through the interface")
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(tmp_path, safe_serialization=True)
    code = check.main(str(tmp_path), as_json=True)
    report = json.loads(capsys.readouterr().out)
    attention = next(f for f in report["findings"] if f["check"] == "attention interface")
    assert code == 0 and report["runner"] == "pooling", report
    # 4.x BERT's SDPA mask preparation reads the mask's values: on meta it cannot run, so "warn"
    assert attention["status"] in ("ok", "warn") and "routed" in attention["detail"], attention


def test_routed_forward_drops_keywords_it_does_not_take():
    """The fused decoder layers (residual.py) pass the layer's keywords on, as interface-era modules accept."""
    module = ToySdpaAttention(4, 2, 16).eval()
    hidden = torch.randn(1, 3, 32)
    with torch.no_grad():
        want = module(hidden)
        legacy_attention.route(nn.ModuleList([module]))
        assert torch.equal(module(hidden, output_router_logits=False, scale=None), want)


def test_key_heads_that_are_not_repeats_of_the_cached_ones_are_an_error():
    from vllm_transformers_backend.hf_model import BackendError

    module = ToySdpaAttention(4, 4, 16).eval()
    legacy_attention.route(nn.ModuleList([module]))
    layer = _Recording(4, 3, 16)  # vLLM would cache 3 KV heads: 4 key heads cannot be un-repeated to them
    with torch.no_grad(), attention_context(AttentionContext({0: layer}, [None], None)):
        with pytest.raises(BackendError, match="4 key heads, which are not repeats of the 3 KV heads"):
            module(torch.randn(1, 3, 32))
    assert not layer.seen  # nothing reached the cache writer


#: (heads, KV heads, TP) -> a rank's (heads, KV heads, groups): KV heads replicated where fewer than ranks.
TP_SHAPES = [((4, 2, 2), (2, 1, 2)), ((4, 4, 2), (2, 2, 1)), ((2, 1, 2), (1, 1, 1)), ((8, 2, 4), (2, 1, 2)),
             ((4, 1, 4), (1, 1, 1))]


@pytest.mark.parametrize("shape, local", TP_SHAPES, ids=[f"h{h}-kv{k}-tp{t}" for (h, k, t), _ in TP_SHAPES])
def test_tensor_parallel_gives_routed_modules_the_ranks_head_counts(shape, local):
    heads, kv_heads, tp = shape
    module = ToySdpaAttention(heads, kv_heads, 16)
    module.num_heads, module.num_key_value_heads, module.hidden_size = heads, kv_heads, heads * 16
    model = nn.ModuleList([module, ToyEagerAttention(heads, kv_heads, 16)])
    legacy_attention.route(model)
    eager = model[1]
    eager.num_heads = heads
    legacy_attention.shard_for_tensor_parallel(model, 1, heads, kv_heads, 16, lambda m: False)
    assert (module.num_heads, module.num_key_value_heads) == (heads, kv_heads)  # TP=1: untouched
    legacy_attention.shard_for_tensor_parallel(model, tp, heads, kv_heads, 16, lambda m: False)
    assert (module.num_heads, module.num_key_value_heads, module.num_key_value_groups) == local
    assert module.hidden_size == local[0] * 16 and eager.num_heads == heads  # only routed modules change


def test_a_routed_module_whose_plan_gathers_its_heads_keeps_the_models_values():
    """OLMoE's plan gathers q/k/v on every rank: its SDPA code sees all heads, keys repeated to all of them, so
    the module keeps the model's counts and the routed call un-repeats to the model's KV heads."""
    modules = []
    for _ in range(2):
        module = ToySdpaAttention(4, 2, 16)
        module.num_heads, module.num_key_value_heads, module.hidden_size = 4, 2, 64
        modules.append(module)
    model = nn.ModuleList(modules)
    legacy_attention.route(model)
    gathered, split = model
    legacy_attention.shard_for_tensor_parallel(model, 2, 4, 2, 16, lambda m: m is gathered)
    assert (gathered.num_heads, gathered.num_key_value_groups, gathered._vtb_kv_heads) == (4, 2, 2)
    assert (split.num_heads, split.num_key_value_heads) == (2, 1) and "_vtb_kv_heads" not in vars(split)
