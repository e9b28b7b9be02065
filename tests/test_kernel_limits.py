"""What vLLM 0.6.2's kernels accept (``vllm_transformers_backend.kernels``), checked against the kernels of
this CPU build, and the layout the attention function hands vLLM's attention."""
from __future__ import annotations

import pytest
import torch

from vllm_transformers_backend import kernels
from vllm_transformers_backend.attention import adopt_scaling, vllm_rows


def _cpu_build() -> None:
    from vllm.utils import is_cpu

    if not is_cpu():
        pytest.skip("these facts are about vLLM's CPU build (vllm._C CPU kernels); this vLLM is not one")


def _decode(head_size: int, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """vLLM's CPU path for one sequence: write its keys/values to a paged cache, decode its last query."""
    from vllm.attention.ops.paged_attn import PagedAttention

    tokens, kv_heads = keys.shape[0], keys.shape[1] // head_size
    cache = torch.zeros(PagedAttention.get_kv_cache_shape(4, 16, kv_heads, head_size))
    key_cache, value_cache = PagedAttention.split_kv_cache(cache, kv_heads, head_size)
    PagedAttention.write_to_paged_cache(keys.view(tokens, kv_heads, head_size), values.view(tokens, kv_heads, head_size),
                                        key_cache, value_cache, torch.arange(tokens), "auto", 1.0, 1.0)
    heads = query.shape[1] // head_size
    return PagedAttention.forward_decode(query[-1:].view(1, heads, head_size), key_cache, value_cache,
                                         torch.zeros(1, 1, dtype=torch.int32), torch.tensor([tokens], dtype=torch.int32),
                                         tokens, "auto", kv_heads, head_size ** -0.5, None, 1.0, 1.0)


def test_cpu_paged_attention_head_sizes_are_the_kernels():
    """The gate's list is exactly what the CPU kernel decodes with; vLLM's own list also has 120."""
    _cpu_build()
    from vllm.attention.ops.paged_attn import PagedAttention

    accepted = []
    for head_size in PagedAttention.get_supported_head_sizes():
        x = torch.randn(3, head_size)
        try:
            _decode(head_size, x, x, x)
        except RuntimeError as exc:
            assert "Unsupported head size" in str(exc)
            continue
        accepted.append(head_size)
    assert tuple(accepted) == kernels.CPU_PAGED_ATTENTION_HEAD_SIZES
    assert 120 in PagedAttention.get_supported_head_sizes() and 120 not in accepted
    with pytest.raises(kernels.UnsupportedShapeError, match="head size 120 .*CPU paged attention.*64, 80, 96"):
        kernels.check_paged_attention_head_size(torch.device("cpu"), 120)
    kernels.check_paged_attention_head_size(torch.device("cpu"), 128)


def test_cpu_norm_kernels_need_whole_vectors():
    _cpu_build()
    from vllm import _custom_ops as ops

    for hidden in (12, 16, 100, 200):
        x, weight = torch.randn(3, hidden), torch.randn(hidden)
        out = torch.empty_like(x)
        try:
            ops.rms_norm(out, x, weight, 1e-6)
            ran = True
        except RuntimeError:
            ran = False
        assert ran == kernels.norm_kernel_accepts(torch.device("cpu"), hidden), hidden
        if ran:
            torch.testing.assert_close(out, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight)


def test_norms_the_cpu_kernel_cannot_take_run_the_native_forward():
    """A width the kernel refuses (100) runs vLLM's PyTorch forward, with and without a residual."""
    _cpu_build()
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from vllm_transformers_backend.layers import make_rms_norm

    for hidden, native in ((100, True), (128, False)):
        norm = make_rms_norm(LlamaRMSNorm(hidden, eps=1e-6), "plain", torch.device("cpu"))
        assert (norm._forward_method == norm.forward_native) is native
        norm.weight.data.normal_()
        x, residual = torch.randn(3, hidden), torch.randn(3, hidden)
        reference = LlamaRMSNorm(hidden, eps=1e-6)
        reference.weight.data.copy_(norm.weight.data)
        torch.testing.assert_close(norm(x), reference(x))
        out, summed = norm(x.clone(), residual.clone())
        torch.testing.assert_close(summed, x + residual)
        torch.testing.assert_close(out, reference(x + residual))


def test_vllm_rows_keeps_row_strided_views_and_copies_other_layouts():
    tokens, heads, head = 5, 4, 64
    fused = torch.randn(1, tokens, 3 * heads * head)  # one qkv projection, as GPT-2's c_attn gives it
    q = fused[..., : heads * head].view(1, tokens, heads, head).transpose(1, 2)
    rows = vllm_rows(q)
    assert rows.shape == (tokens, heads * head) and rows.stride() == (3 * heads * head, 1)
    assert rows.data_ptr() == fused.data_ptr()  # no copy: what vLLM's own models pass
    head_major = torch.randn(1, heads, tokens, head)  # e.g. after a rotation: heads apart in memory
    every_other = _every_other(tokens, heads, head)
    assert every_other.transpose(1, 2).reshape(tokens, -1).stride(-1) == 2  # a view a kernel would misread
    for x in (head_major, every_other):
        rows = vllm_rows(x)
        assert rows.is_contiguous()
        torch.testing.assert_close(rows, x.transpose(1, 2).reshape(tokens, -1))
    single = vllm_rows(torch.randn(1, heads, 1, head))
    assert single.shape == (1, heads * head) and single.stride(-1) == 1


@pytest.mark.parametrize("layout", ["qkv slices", "strided last dim", "head-major"])
def test_attention_on_vllm_rows_equals_attention_on_contiguous(layout):
    """Cache writes and paged attention index by pointer: what vllm_rows hands them must give the same
    numbers as contiguous tensors, for every layout HF code can produce."""
    _cpu_build()
    tokens, heads, kv_heads, head = 7, 4, 2, 64
    torch.manual_seed(0)
    if layout == "qkv slices":
        fused = torch.randn(1, tokens, (heads + 2 * kv_heads) * head)
        q, k, v = fused.split([heads * head, kv_heads * head, kv_heads * head], dim=-1)
        q, k, v = (t.view(1, tokens, -1, head).transpose(1, 2) for t in (q, k, v))
    elif layout == "strided last dim":
        q, k, v = (_every_other(tokens, n, head) for n in (heads, kv_heads, kv_heads))
    else:
        q, k, v = (torch.randn(1, n, tokens, head) for n in (heads, kv_heads, kv_heads))
    got = _decode(head, vllm_rows(q), vllm_rows(k), vllm_rows(v))
    want = _decode(head, *(x.transpose(1, 2).reshape(tokens, -1).contiguous() for x in (q, k, v)))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if layout == "strided last dim":  # the hazard itself: the same views handed over as they are
        raw = _decode(head, *(x.transpose(1, 2).reshape(tokens, -1) for x in (q, k, v)))
        assert not torch.allclose(raw, want)


def _every_other(tokens: int, heads: int, head: int) -> torch.Tensor:
    """``[1, heads, tokens, head]`` whose values sit every other element of one buffer."""
    return torch.randn(1, tokens, 2 * heads * head)[..., ::2].view(1, tokens, heads, head).transpose(1, 2)


def test_the_scale_of_the_call_wins():
    """OPT scales q itself and calls with scaling=1.0: the vLLM impl, also inside the backend's wrappers,
    must use the call's value (None: HF's default, head_dim ** -0.5)."""

    class Impl:
        scale = 0.5

    class Attention:
        impl = Impl()

    class Wrapper:  # as GatheredHeadsAttention / WindowedAttention hold it
        attn = Attention()

    wrapped = Wrapper()
    adopt_scaling(wrapped, None, 64, 0)
    assert wrapped.attn.impl.scale == 0.125
    adopt_scaling(wrapped, 1.0, 64, 0)
    assert wrapped.attn.impl.scale == 1.0
    adopt_scaling(lambda *args: None, 1.0, 64, 0)  # stand-ins without an impl (the check command's) are left alone
