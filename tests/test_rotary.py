"""HF's rotary embedding through vLLM's rotary kernel: when the swap is allowed, and that it is exact."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import PROMPTS, Engine, hf_greedy, require_architecture, vllm_greedy


def test_hf_rotary_functions_are_recognised():
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    from vllm_transformers_backend.rotary import is_standard_rotary

    assert is_standard_rotary(getattr(modeling_llama.apply_rotary_pos_emb, "__wrapped__",
                                      modeling_llama.apply_rotary_pos_emb))
    assert is_standard_rotary(getattr(modeling_qwen2.apply_rotary_pos_emb, "__wrapped__",
                                      modeling_qwen2.apply_rotary_pos_emb))


def test_other_rotations_are_not():
    from vllm_transformers_backend.rotary import is_standard_rotary

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J style pairs (x0, x1), (x2, x3), ...
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    assert not is_standard_rotary(interleaved)
    assert not is_standard_rotary(lambda q, k: (q, k))


def test_swap_only_where_vllm_kernels_run(monkeypatch):
    """The CPU build's vllm._C has the kernel (exact in float32, below); a device without vLLM's ops keeps HF's
    function unless forced; ``=0`` turns the swap off."""
    from vllm_transformers_backend import devices
    from vllm_transformers_backend.rotary import fuse_rotary

    assert devices.has_vllm_cpu_kernels(torch.device("cpu")) and devices.has_vllm_gpu_kernels(torch.device("cuda"))
    meta = torch.device("meta")
    assert not (devices.has_vllm_cpu_kernels(meta) or devices.has_vllm_gpu_kernels(meta))
    assert fuse_rotary(torch.nn.Linear(2, 2), torch.device("cpu")) is None  # no attention module: nothing to swap
    monkeypatch.setenv("VLLM_TRANSFORMERS_BACKEND_FUSED_ROTARY", "0")
    assert fuse_rotary(torch.nn.Linear(2, 2), torch.device("cpu")) is None


@pytest.mark.parametrize("dims", [(5, 4, 2, 64), (130, 6, 2, 64), (9, 8, 8, 128)])
def test_cpu_kernel_is_exact_in_float32(dims):
    """Why the swap is on for the CPU engine: in float32 vLLM's CPU kernel equals HF's formula bit for bit."""
    from vllm import _custom_ops as ops

    from vllm_transformers_backend.rotary import reference_rotary

    tokens, heads, kv_heads, dim = dims
    gen = torch.Generator().manual_seed(tokens)
    q, k = torch.randn(1, heads, tokens, dim, generator=gen), torch.randn(1, kv_heads, tokens, dim, generator=gen)
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    freqs = positions[:, None].float() / (10000 ** (torch.arange(0, dim, 2).float() / dim))[None]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos()[None], emb.sin()[None]
    want_q, want_k = reference_rotary(q, k, cos, sin)
    q_rows, k_rows = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    table = torch.cat((cos[0, :, :dim // 2], sin[0, :, :dim // 2]), -1)
    ops.rotary_embedding(torch.arange(tokens), q_rows.view(tokens, -1), k_rows.view(tokens, -1), dim, table, True)
    assert torch.equal(q_rows.transpose(1, 2), want_q) and torch.equal(k_rows.transpose(1, 2), want_k)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_vllm_rotary_kernel_generates_like_hf(arch, checkpoints, monkeypatch):
    """The swap on the CPU engine (its vllm._C has the same op; on by default there, forced here) with cos/sin
    from the table computed once: greedy tokens equal HF's, and the kernel path really ran (every layer's
    rotation; the generation tests check the other architectures' tokens with the same paths on)."""
    import importlib

    from tests.helpers import vllm_model
    from vllm_transformers_backend.rotary import rotary_table

    require_architecture(arch)
    path = checkpoints(arch)
    expected = hf_greedy(path, PROMPTS, 12)
    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    monkeypatch.setattr(module, "apply_rotary_pos_emb", module.apply_rotary_pos_emb)  # restored afterwards
    monkeypatch.setenv("VLLM_TRANSFORMERS_BACKEND_FUSED_ROTARY", "all")
    from vllm import _custom_ops as ops

    calls = []
    original_kernel = ops.rotary_embedding
    monkeypatch.setattr(ops, "rotary_embedding", lambda *a: (calls.append(1), original_kernel(*a))[1])
    with Engine(path) as llm:
        assert getattr(module.apply_rotary_pos_emb, "__wrapped__", None) is not None
        got = vllm_greedy(llm, PROMPTS, 12)
        # cos/sin came from the rotary module's table, and the kernel read the table built once with it
        table = rotary_table(vllm_model(llm).model.rotary_emb)
        assert table is not None and table.kernel is not None
    assert got == expected
    assert calls and len(calls) % 2 == 0  # 2 layers per forward


def _rotary_module(arch: str, **config):
    import importlib

    import transformers

    cfg_name, prefix = {"llama": ("LlamaConfig", "Llama"), "qwen2": ("Qwen2Config", "Qwen2")}[arch]
    cfg = getattr(transformers, cfg_name)(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                          max_position_embeddings=512, **config)
    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    return getattr(module, f"{prefix}RotaryEmbedding")(cfg)


@pytest.mark.parametrize("arch,config", [
    ("llama", {}),
    ("qwen2", {"rope_theta": 1000000.0}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 128}}),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_table_answers_as_the_module(arch, config, dtype):
    """Inside the backend's forward a static rotary module answers from its table: exactly its own values for
    any positions (all below the table's length), and the table vLLM's kernel reads, with the real positions."""
    from vllm_transformers_backend.attention import AttentionContext, attention_context
    from vllm_transformers_backend.rotary import cache_rotary_tables, rotary_table

    rotary = _rotary_module(arch, **config)
    holder = torch.nn.Module()
    holder.rotary_emb = rotary
    original = type(rotary).forward.__get__(rotary)
    assert cache_rotary_tables(holder, torch.device("cpu"), 300) == 1
    x = torch.zeros(1, 3, 8, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    for length in (1, 4, 37, 300):
        positions = torch.randint(0, 300, (1, length), generator=gen)
        ctx = AttentionContext({}, [], None)
        with attention_context(ctx):
            cos, sin = rotary(x, positions)
        want_cos, want_sin = original(x, positions)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
        (step,) = ctx.rotary.values()
        assert step.cos is cos and torch.equal(step.positions, positions[0])
        half = cos.shape[-1] // 2
        assert torch.equal(step.table[positions[0]], torch.cat((cos[0, :, :half], sin[0, :, :half]), -1))
    assert rotary_table(rotary) is not None and rotary_table(rotary).full.shape == (300, 2 * cos.shape[-1])
    # outside the backend's forward (no attention context): HF's own computation, any position
    far = torch.tensor([[400, 511]])
    assert all(torch.equal(a, b) for a, b in zip(rotary(x, far), original(x, far)))


def test_no_kernel_table_where_the_model_keeps_hf_rotation():
    """A model whose rotation does not run through vLLM's kernel (its rotary state is empty: the rotary pass off
    or not applicable) gets the cos/sin lookup but no kernel table and no per-step entry."""
    from vllm_transformers_backend.attention import AttentionContext, attention_context
    from vllm_transformers_backend.rotary import cache_rotary_tables, rotary_table

    holder = torch.nn.Module()
    holder.rotary_emb = rotary = _rotary_module("llama")
    original = type(rotary).forward.__get__(rotary)
    assert cache_rotary_tables(holder, torch.device("cpu"), 64) == 1
    x, positions = torch.zeros(1, 3, 8), torch.tensor([[0, 5, 63]])
    ctx = AttentionContext({}, [], None, rotary_modules={})
    with attention_context(ctx):
        got = rotary(x, positions)
    assert all(torch.equal(a, b) for a, b in zip(got, original(x, positions)))
    assert rotary_table(rotary).kernel is None and ctx.rotary == {}


def test_dynamic_rope_keeps_the_module_forward():
    from vllm_transformers_backend.rotary import cache_rotary_tables

    holder = torch.nn.Module()
    holder.rotary_emb = _rotary_module("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert cache_rotary_tables(holder, torch.device("cpu"), 300) == 0
    assert "forward" not in holder.rotary_emb.__dict__
