"""Projection fusion (q/k/v -> QKVParallelLinear, gate/up -> MergedColumnParallelLinear): generations stay
exactly HF's, activations equal the unfused backend's, one fused GEMM runs per step, loading stays strict,
and modules that do not call their siblings on one input still compute the right thing."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from tests.helpers import PROMPTS, Engine, cleanup_engine, hf_greedy, require_architecture, vllm_greedy
from vllm_transformers_backend.fusion import FUSE_ENV, FusedSlice, fuse_projections, packed_modules_mapping, stacked_shards
from vllm_transformers_backend.live import get_hf_model

MAX_TOKENS = 12
FUSED_ARCHS = ["llama", "qwen2", "gemma", "qwen3", "olmo2"]


# --- end to end on the CPU engine -------------------------------------------------------------------


def _capture(llm, prompts, layer: int = 1):
    """Greedy tokens, and every output of ``layers[layer].mlp`` during the generation."""
    body = get_hf_model(llm)
    seen = []
    handle = body.layers[layer].mlp.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        tokens = vllm_greedy(llm, prompts, MAX_TOKENS)
    finally:
        handle.remove()
    return tokens, seen


@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_fused_model_matches_hf_and_unfused(arch, checkpoints, monkeypatch):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    require_architecture(arch)
    path = checkpoints(arch)
    expected = hf_greedy(path, PROMPTS, MAX_TOKENS)

    monkeypatch.setenv(FUSE_ENV, "1")
    with Engine(path, "transformers") as llm:
        body = get_hf_model(llm)
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            assert all(isinstance(getattr(attn, n), FusedSlice) for n in ("q_proj", "k_proj", "v_proj"))
            assert isinstance(attn.q_proj.fused_layer, QKVParallelLinear)
            assert attn.q_proj.fused_layer is attn.v_proj.fused_layer
            assert isinstance(mlp.gate_proj, FusedSlice) and isinstance(mlp.up_proj, FusedSlice)
            assert isinstance(mlp.gate_proj.fused_layer, MergedColumnParallelLinear)
            # standard gated MLPs (SiLU: llama, qwen; tanh-GELU: gemma) run act-and-mul as one step
            assert type(mlp.vllm_act_and_mul).__name__ in ("SiluAndMul", "GeluAndMul")
        # One fused GEMM per layer and step: as many calls as the layer's o_proj/down_proj get.
        calls = {"qkv": 0, "o": 0, "gate_up": 0, "down": 0}
        layer0 = body.layers[0]
        hooks = [module.register_forward_hook(lambda *a, key=key: calls.__setitem__(key, calls[key] + 1))
                 for key, module in (("qkv", layer0.self_attn.q_proj.fused_layer), ("o", layer0.self_attn.o_proj),
                                     ("gate_up", layer0.mlp.gate_proj.fused_layer), ("down", layer0.mlp.down_proj))]
        fused_tokens, fused_acts = _capture(llm, PROMPTS, layer=1)
        for hook in hooks:
            hook.remove()
        # No step's tensors are kept once every sibling has taken its part.
        assert all(s._group.input is None for s in body.modules() if isinstance(s, FusedSlice))
    assert calls["o"] > 0 and calls["qkv"] == calls["o"] and calls["gate_up"] == calls["down"], calls
    assert fused_tokens == expected

    monkeypatch.setenv(FUSE_ENV, "0")
    with Engine(path, "transformers") as llm:
        body = get_hf_model(llm)
        assert not any(isinstance(m, FusedSlice) for m in body.modules())
        plain_tokens, plain_acts = _capture(llm, PROMPTS, layer=1)
    assert plain_tokens == expected
    assert len(fused_acts) == len(plain_acts)
    for fused, plain in zip(fused_acts, plain_acts):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_unloaded_fused_shard_is_an_error(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    from vllm_transformers_backend.weights import WeightsLoadingError

    src = checkpoints("llama")
    dst = shutil.copytree(src, tmp_path / "missing_k")
    tensors = load_file(dst / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    try:
        with pytest.raises(WeightsLoadingError, match=r"got no weights.*model\.layers\.0\.self_attn\.k_proj\.weight"):
            with Engine(dst, "transformers"):
                pass
    finally:
        cleanup_engine()  # the engine failed inside LLM(): Engine.__exit__ never ran


# --- the mechanism, on hand-made modules (no engine) ------------------------------------------------


@pytest.fixture
def tp1_world():
    """vLLM's linears read the tensor-parallel group: a one-rank gloo world."""
    from vllm.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
    from vllm.utils import get_open_port

    cleanup_engine()  # an engine that failed to start leaves its groups behind
    init_distributed_environment(1, 0, f"tcp://127.0.0.1:{get_open_port()}", 0, backend="gloo")
    initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        cleanup_engine()


class _OddAttention(nn.Module):
    """q/k/v named like an attention's, but k and v see another input and q runs twice."""

    head_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(32, 32, bias=True)
        self.k_proj = nn.Linear(32, 16, bias=True)
        self.v_proj = nn.Linear(32, 16, bias=True)

    def forward(self, x: torch.Tensor, memory: torch.Tensor):
        q = self.q_proj(x)
        k = self.k_proj(memory)
        v = self.v_proj(x)
        return q, k, v, self.q_proj(x), self.v_proj(memory)


class _OddMLP(nn.Module):
    """gate/up called out of order, on a changed input, and one of them twice."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(32, 48, bias=False)
        self.up_proj = nn.Linear(32, 48, bias=False)

    def forward(self, x: torch.Tensor):
        up = self.up_proj(x)
        gate = self.gate_proj(x)
        return up, gate, self.gate_proj(x * 2), self.up_proj(x * 2), self.up_proj(x)


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _OddAttention()
        self.mlp = _OddMLP()


def _vllm_copy(reference: nn.Module, conv1d_names=()) -> nn.Module:
    """``reference``'s structure with each ``nn.Linear`` swapped for the backend's vLLM linear (as base.py
    does at TP=1); weights still to be loaded."""
    import copy

    from vllm_transformers_backend.layers import make_linear

    model = copy.deepcopy(reference)
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make_linear(child.in_features, child.out_features, child.bias is not None,
                                                  None, None, name, transposed_checkpoint=name in conv1d_names))
    return model


def _load(model: nn.Module, state: dict) -> None:
    from vllm_transformers_backend.weights import WeightsMapper, load_weights

    load_weights(model, list(state.items()), WeightsMapper(stacked=stacked_shards(model)))


def _fused_reference_pair():
    torch.manual_seed(0)
    reference = _Plain().eval()
    model = _vllm_copy(reference)
    counts = fuse_projections(model, quant_config=None, tp_size=1, head_size=8)
    _load(model, reference.state_dict())
    return reference, model, counts


def test_siblings_on_other_inputs_stay_correct(tp1_world, monkeypatch):
    monkeypatch.delenv(FUSE_ENV, raising=False)
    reference, model, counts = _fused_reference_pair()
    assert counts == {"qkv": 1, "gate_up": 1}
    assert isinstance(model.self_attn.k_proj, FusedSlice) and isinstance(model.mlp.up_proj, FusedSlice)
    x, memory = torch.randn(5, 32), torch.randn(5, 32)
    with torch.no_grad():
        for got, want in zip(model.self_attn(x, memory), reference.self_attn(x, memory)):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        for got, want in zip(model.mlp(x), reference.mlp(x)):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_fused_layers_are_named_like_vllms_and_load_hf_names(tp1_world, monkeypatch):
    monkeypatch.delenv(FUSE_ENV, raising=False)
    reference, model, _ = _fused_reference_pair()
    # The fused layers are modules of the tree under vLLM's names (what quantization and LoRA reach); the
    # slices hold no parameters of their own.
    assert set(dict(model.named_parameters())) == {"self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias",
                                                    "mlp.gate_up_proj.weight"}
    assert model.self_attn.q_proj.fused_layer is model.self_attn.qkv_proj
    assert packed_modules_mapping(model) == {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                             "gate_up_proj": ["gate_proj", "up_proj"]}
    # HF's tensors landed in their shards; a slice's weight/bias read them as views (no second copy).
    for name, param in reference.named_parameters():
        parent, _, attr = name.rpartition(".")
        assert torch.equal(getattr(model.get_submodule(parent), attr), param), name
    fused = model.self_attn.qkv_proj
    assert model.self_attn.k_proj.weight.data_ptr() == fused.weight[32:].data_ptr()
    # A fused layer replaced in its parent (vLLM's LoRA manager does this) is what the slices call.
    calls = []
    replacement = model.self_attn.qkv_proj
    model.self_attn.qkv_proj = _Recorder(replacement, calls)
    x = torch.randn(2, 32)
    with torch.no_grad():
        model.self_attn.v_proj(x)
    assert calls == [x.shape]


class _Recorder(nn.Module):
    def __init__(self, inner: nn.Module, calls: list) -> None:
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x):
        self.calls.append(x.shape)
        return self.inner(x)


def test_cache_is_released_after_the_last_sibling(tp1_world, monkeypatch):
    monkeypatch.delenv(FUSE_ENV, raising=False)
    _, model, _ = _fused_reference_pair()
    attn = model.self_attn
    group = attn.q_proj._group
    x = torch.randn(3, 32)
    with torch.no_grad():
        q = attn.q_proj(x)
        assert group.input is x
        k, v = attn.k_proj(x), attn.v_proj(x)
    assert group.input is None and group.outputs is None
    assert q.shape == (3, 32) and k.shape == v.shape == (3, 16)


def test_wrong_checkpoint_shape_is_refused(tp1_world, monkeypatch):
    from vllm_transformers_backend.weights import WeightsLoadingError

    monkeypatch.delenv(FUSE_ENV, raising=False)
    torch.manual_seed(0)
    reference = _Plain()
    model = _vllm_copy(reference)
    fuse_projections(model, quant_config=None, tp_size=1, head_size=8)
    state = reference.state_dict()
    state["self_attn.k_proj.weight"] = torch.zeros(32, 32)  # q-sized: the merged loader would narrow it
    with pytest.raises(WeightsLoadingError, match=r"self_attn\.k_proj\.weight.*shape mismatch"):
        _load(model, state)


def test_not_fused_when_unsafe_or_switched_off(tp1_world, monkeypatch):
    torch.manual_seed(0)
    reference = _Plain()

    monkeypatch.setenv(FUSE_ENV, "0")
    model = _vllm_copy(reference)
    assert fuse_projections(model, quant_config=None, tp_size=1, head_size=8) == {}
    assert not any(isinstance(m, FusedSlice) for m in model.modules())

    monkeypatch.delenv(FUSE_ENV)
    # A Conv1D-style (transposing) loader on one sibling, and a bias on only one of gate/up.
    reference.mlp.gate_proj = nn.Linear(32, 48, bias=True)
    model = _vllm_copy(reference, conv1d_names=("k_proj",))
    assert fuse_projections(model, quant_config=None, tp_size=1, head_size=8) == {"qkv": 0, "gate_up": 0}
    assert not any(isinstance(m, FusedSlice) for m in model.modules())


@pytest.mark.parametrize("kv_rows", [16, 8], ids=["kv_sharded", "kv_replicated"])
@pytest.mark.parametrize("rank", [0, 1])
def test_tensor_parallel_slices_are_the_rank_rows(tp1_world, monkeypatch, rank, kv_rows):
    """At TP=2 each rank's slices are its heads' rows of the HF weights: q and (2 kv heads) k/v by
    contiguous halves like column-parallel layers, one kv head replicated on both ranks. The rank is
    faked in vLLM's linear module (one process cannot hold two ranks)."""
    import vllm.model_executor.layers.linear as linear

    monkeypatch.delenv(FUSE_ENV, raising=False)
    monkeypatch.setattr(linear, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(linear, "get_tensor_model_parallel_rank", lambda: rank)
    from vllm_transformers_backend.layers import make_linear

    torch.manual_seed(0)
    reference = _Plain().eval()
    reference.self_attn.k_proj = nn.Linear(32, kv_rows, bias=True)
    reference.self_attn.v_proj = nn.Linear(32, kv_rows, bias=True)
    model = _vllm_copy(reference)
    for parent in (model.self_attn, model.mlp):  # column-parallel, as a "colwise" tp_plan asks
        for name, child in list(parent.named_children()):
            setattr(parent, name, make_linear(child.input_size, child.output_size, child.bias is not None,
                                              "colwise", None, name))
    assert fuse_projections(model, quant_config=None, tp_size=2, head_size=8) == {"qkv": 1, "gate_up": 1}
    _load(model, reference.state_dict())

    def rows(module: nn.Linear, per_rank: int, replicated: bool = False):
        start = 0 if replicated else rank * per_rank
        bias = module.bias[start:start + per_rank] if module.bias is not None else None
        return module.weight[start:start + per_rank], bias

    x = torch.randn(4, 32)
    attn = reference.self_attn
    expected = {"q_proj": rows(attn.q_proj, 16), "k_proj": rows(attn.k_proj, 8, replicated=kv_rows == 8),
                "v_proj": rows(attn.v_proj, 8, replicated=kv_rows == 8),
                "gate_proj": rows(reference.mlp.gate_proj, 24), "up_proj": rows(reference.mlp.up_proj, 24)}
    with torch.no_grad():
        for name, (weight, bias) in expected.items():
            parent = model.mlp if name in ("gate_proj", "up_proj") else model.self_attn
            got = getattr(parent, name)(x)
            torch.testing.assert_close(got, nn.functional.linear(x, weight, bias), atol=1e-6, rtol=1e-6)


def test_only_the_standard_gated_forward_is_replaced():
    from vllm_transformers_backend.fusion import _is_standard_glu_forward

    class Standard(torch.nn.Module):
        def forward(self, x):
            """docstring"""
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class Named(torch.nn.Module):
        def forward(self, hidden):
            out = self.down_proj(self.act_fn(self.gate_proj(hidden)) * self.up_proj(hidden))
            return out

    class Scaled(torch.nn.Module):  # one more step: must keep HF's forward
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * 0.5

    class Swapped(torch.nn.Module):  # the activation on up, not gate
        def forward(self, x):
            return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))

    assert _is_standard_glu_forward(Standard()) and _is_standard_glu_forward(Named())
    assert not _is_standard_glu_forward(Scaled()) and not _is_standard_glu_forward(Swapped())
