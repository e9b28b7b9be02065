"""HF's rotation through vLLM's CUDA rotary kernel equals HF's formula on tensors laid out as HF lays them
out (q and k as transposed views of projection outputs)."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vllm_rotary_kernel_equals_reference(dtype):
    from vllm_transformers_backend.attention import AttentionContext, attention_context
    from vllm_transformers_backend.rotary import make_fused, reference_rotary

    torch.manual_seed(0)
    tokens, heads, kv_heads, dim = 37, 8, 2, 128
    # HF after a fused q/k/v projection: one [1, T, (H + 2 KV) * D] output, q and k column slices of it
    qkv = torch.randn(1, tokens, (heads + 2 * kv_heads) * dim, device="cuda", dtype=dtype)
    q = qkv[..., :heads * dim].view(1, tokens, heads, dim).transpose(1, 2)
    k = qkv[..., heads * dim:(heads + kv_heads) * dim].view(1, tokens, kv_heads, dim).transpose(1, 2)
    positions = torch.arange(tokens, device="cuda").float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    emb = torch.cat((positions[:, None] * inv_freq[None, :],) * 2, dim=-1)[None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    want_q, want_k = reference_rotary(q.float(), k.float(), cos.float(), sin.float())
    v_before = qkv[..., (heads + kv_heads) * dim:].clone()
    fused = make_fused(reference_rotary, "test")
    with attention_context(AttentionContext({}, [], None)):
        got_q, got_k = fused(q, k, cos, sin)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got_q.float(), want_q, atol=tol) and torch.allclose(got_k.float(), want_k, atol=tol)
    assert torch.equal(qkv[..., (heads + kv_heads) * dim:], v_before)  # v untouched
    # outside the backend's forward the original function runs (no in-place rotation)
    q2 = torch.randn_like(q)
    out_q, _ = fused(q2, k, cos, sin)
    assert torch.equal(out_q, reference_rotary(q2, k, cos, sin)[0])
