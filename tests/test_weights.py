"""Weight mapping: each renaming rule, end-to-end checkpoint layouts, and the clear errors."""
from __future__ import annotations

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import PROMPTS, Engine, hf_greedy, vllm_greedy
from vllm_transformers_backend.weights import (WeightsLoadingError, WeightsMapper, computed_buffer_ignores,
                                               legacy_renames)

MAX_TOKENS = 8


def _mapper(prefix="model"):
    mapper = WeightsMapper()
    legacy_renames(mapper)
    mapper.prefixes += [(f"{prefix}.lm_head.", "lm_head."), (f"{prefix}.", "model."), (f"{prefix}.", ""),
                        ("", "model.")]
    computed_buffer_ignores(mapper)
    return mapper


TARGETS = {"model.embed.weight", "model.layers.0.norm.weight", "model.layers.0.norm.bias", "lm_head.weight"}


@pytest.mark.parametrize("key,expected", [
    ("model.embed.weight", "model.embed.weight"),                 # as saved by the causal model
    ("embed.weight", "model.embed.weight"),                       # saved by the base model (no prefix)
    ("model.model.embed.weight", "model.embed.weight"),           # doubled prefix
    ("model.lm_head.weight", "lm_head.weight"),                   # lm_head saved inside the base model
    ("model.layers.0.norm.gamma", "model.layers.0.norm.weight"),  # legacy LayerNorm names
    ("layers.0.norm.beta", "model.layers.0.norm.bias"),
    ("something.else", None),
])
def test_prefix_and_legacy_rules(key, expected):
    assert _mapper().map(key, TARGETS) == expected


def test_other_base_model_prefix():
    mapper = _mapper(prefix="transformer")
    assert mapper.map("transformer.embed.weight", TARGETS) == "model.embed.weight"
    assert mapper.map("transformer.lm_head.weight", TARGETS) == "lm_head.weight"


def test_checkpoint_conversion_mapping_and_ignores():
    mapper = WeightsMapper()
    mapper.add_rename(r"^language_model\.model", "model")  # a v4 `_checkpoint_conversion_mapping` entry
    computed_buffer_ignores(mapper)
    assert mapper.map("language_model.model.embed.weight", TARGETS) == "model.embed.weight"
    assert mapper.is_ignored("model.layers.3.self_attn.rotary_emb.inv_freq")
    assert not mapper.is_ignored("model.embed.weight")


def test_ignore_unexpected_applies_only_to_keys_that_map_nowhere(tmp_path):
    """GPT-2's `_keys_to_ignore_on_load_unexpected` has `attn.bias`, which also matches `c_attn.bias`."""
    from torch import nn

    from vllm_transformers_backend.weights import load_weights

    module = nn.Module()
    module.c_attn = nn.Linear(2, 2)
    mapper = WeightsMapper()
    mapper.add_ignore_unexpected(r"attn.bias")
    weights = [("c_attn.weight", torch.ones(2, 2)), ("c_attn.bias", torch.full((2,), 3.0)),
               ("h.0.attn.bias", torch.zeros(1, 1, 4, 4))]
    assert load_weights(module, weights, mapper) == {"c_attn.weight", "c_attn.bias"}
    assert torch.equal(module.c_attn.bias.data, torch.full((2,), 3.0))


def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file(edit(dict(tensors)), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_checkpoint_layouts_load(checkpoints, tmp_path):
    """lm_head nested in the base model, stale rotary buffers, and a base-model checkpoint (no prefix)."""
    src = checkpoints("llama")
    expected = hf_greedy(src, PROMPTS[:2], MAX_TOKENS)

    def nest_and_stale(t):
        t["model.lm_head.weight"] = t.pop("lm_head.weight")
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(32)
        return t

    def strip_prefix(t):
        return {re.sub(r"^model\.", "", k): v for k, v in t.items()}

    for name, edit in (("nested", nest_and_stale), ("noprefix", strip_prefix)):
        path = _rewrite(src, tmp_path / name, edit)
        with Engine(path, "transformers") as llm:
            assert vllm_greedy(llm, PROMPTS[:2], MAX_TOKENS) == expected, name


def test_pytorch_bin_checkpoint(checkpoints, tmp_path):
    src = checkpoints("qwen2")
    shutil.copytree(src, tmp_path / "bin", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(src / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    with Engine(tmp_path / "bin", "transformers") as llm:
        assert vllm_greedy(llm, PROMPTS[:2], MAX_TOKENS) == hf_greedy(src, PROMPTS[:2], MAX_TOKENS)


def test_unmapped_checkpoint_keys_are_an_error(checkpoints, tmp_path):
    def add(t):
        t["model.layers.0.mlp.surprise.weight"] = torch.zeros(4, 4)
        return t

    path = _rewrite(checkpoints("llama"), tmp_path / "extra", add)
    with pytest.raises(WeightsLoadingError, match=r"1 checkpoint tensor\(s\) map to no parameter.*surprise"):
        with Engine(path, "transformers"):
            pass


def test_parameters_left_unloaded_are_an_error(checkpoints, tmp_path):
    def drop(t):
        del t["model.layers.1.mlp.down_proj.weight"]
        return t

    path = _rewrite(checkpoints("llama"), tmp_path / "missing", drop)
    with pytest.raises(WeightsLoadingError, match=r"got no weights.*model\.layers\.1\.mlp\.down_proj\.weight"):
        with Engine(path, "transformers"):
            pass


def test_transformers5_transforms():
    """v5 ``WeightRenaming`` renames; a ``WeightConverter`` is refused by name for a key nothing places (MoE expert
    merges are placed by the backend's expert loader before the mapping: tests/test_moe.py)."""
    pytest.importorskip("transformers.core_model_loading", reason="transformers 4.x has no WeightRenaming")
    from transformers.core_model_loading import Concatenate, WeightConverter, WeightRenaming

    from vllm_transformers_backend.weights import add_checkpoint_transforms

    mapper = WeightsMapper()
    add_checkpoint_transforms(mapper, [
        WeightRenaming(source_patterns=r"\.old_norm\.", target_patterns=".norm."),
        WeightConverter(source_patterns=["experts.*.w1.weight", "experts.*.w3.weight"],
                        target_patterns="experts.gate_up_proj", operations=[Concatenate(dim=0)]),
    ])
    assert mapper.map("model.layers.0.old_norm.weight", TARGETS) == "model.layers.0.norm.weight"
    assert mapper.resolve("model.layers.0.old_norm.weight", TARGETS) == ("model.layers.0.norm.weight", None, False)
    with pytest.raises(WeightsLoadingError, match="WeightConverter"):
        mapper.resolve("model.layers.0.mlp.experts.3.w1.weight", TARGETS)