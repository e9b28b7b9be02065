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


def test_no_swap_on_the_cpu_unless_asked():
    from transformers.models.llama import modeling_llama

    from vllm_transformers_backend.rotary import fuse_rotary

    before = modeling_llama.apply_rotary_pos_emb
    assert fuse_rotary(torch.nn.Linear(2, 2), torch.device("cpu")) is None
    assert modeling_llama.apply_rotary_pos_emb is before


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_vllm_rotary_kernel_generates_like_hf(arch, checkpoints, monkeypatch):
    """The swap forced on the CPU engine (its vllm._C has the same op): greedy tokens equal HF's, and the
    kernel path really ran (every layer's rotation)."""
    import importlib

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
    assert got == expected
    assert calls and len(calls) % 2 == 0  # 2 layers per forward
