"""What vLLM 0.6.2's kernels accept, per device, and the gates the backend applies where it picks one.

Read in vLLM 0.6.2's sources (``csrc/cpu/*.cpp`` for the CPU build, ``csrc/*.cu`` for CUDA). A kernel
given a shape it was not built for either stops with a ``TORCH_CHECK`` error at the first step (after
the engine has started) or, where it indexes by pointer without checking, computes wrong numbers. The
backend therefore decides before the first step: a layer whose shape a kernel cannot take keeps the
PyTorch code (HF's, or vLLM's ``forward_native``), and what nothing else can run is refused at load.

=====================  ==========================================  ==========================================
kernel                 CPU build (``csrc/cpu``)                    CUDA (``csrc``)
=====================  ==========================================  ==========================================
paged attention        head sizes 64, 80, 96, 112, 128, 192, 256   64, 80, 96, 112, 120, 128, 192, 256
(decode)               (no 120, though vLLM's Python side lists    (checked by vLLM at load: the XFormers /
                       it: ``Unsupported head size`` at the first  Torch SDPA impls refuse other sizes);
                       decode step); block size 16; fp32, bf16     block sizes 8, 16, 32
rms_norm,              hidden % 8 == 0 (``TORCH_CHECK``), fp32,    any hidden size; fp32, fp16, bf16;
fused_add_rms_norm     bf16; input, residual contiguous            input, residual contiguous
rotary_embedding       q/k rows at any stride, heads contiguous    same; ``num_heads * rot_dim / 2`` threads
                       in a row; int64 positions; cache dtype ==   per token (capped at 512)
                       q/k dtype
act_and_mul            d % 8 == 0, contiguous (not used on CPU)    any d, contiguous input
reshape_and_cache      k/v rows at any stride, heads contiguous    same (``reshape_and_cache_flash`` too)
=====================  ==========================================  ==========================================

How the backend keeps to it: the attention function hands q/k/v in that row layout
(:func:`.attention.vllm_rows`); RMS norms are made contiguous (:class:`.layers.HFRMSNorm`) and run
``forward_native`` where the CPU kernel's width rule fails (:func:`norm_kernel_accepts`); the rotary
swap (:mod:`.rotary`) only calls the kernel on full-width rotations of row views it has checked;
gated activations use vLLM's kernel only on CUDA (contiguous GEMM output); a head size the CPU paged
attention lacks is refused at load (:func:`check_paged_attention_head_size`).
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import devices

#: Head sizes vLLM 0.6.2's CPU paged-attention kernel is instantiated for (``csrc/cpu/attention.cpp``).
CPU_PAGED_ATTENTION_HEAD_SIZES: Tuple[int, ...] = (64, 80, 96, 112, 128, 192, 256)
#: The CPU norm kernels (``csrc/cpu/layernorm.cpp``) step through a row in vectors of 8 values.
CPU_NORM_VECTOR = 8


class UnsupportedShapeError(ValueError):
    """A model shape no vLLM 0.6.2 kernel on this device can run (the message names the limit)."""


def check_paged_attention_head_size(device: torch.device, head_size: int) -> None:
    """Refuses, at load, a head size that vLLM's paged attention on this device cannot decode with.

    On CUDA vLLM's own attention backends refuse unsupported sizes when the layer is built; on the CPU
    build its Torch SDPA backend accepts 120, which the CPU kernel does not have."""
    if not devices.has_vllm_cpu_kernels(device) or head_size in CPU_PAGED_ATTENTION_HEAD_SIZES:
        return
    sizes = ", ".join(map(str, CPU_PAGED_ATTENTION_HEAD_SIZES))
    raise UnsupportedShapeError(
        f"head size {head_size} is not supported by vLLM 0.6.2's CPU paged attention (its kernel is built for "
        f"head sizes {sizes}; decoding would fail at the first step). Run on a GPU (CUDA paged attention also "
        "has 120), or use a model whose head_dim is one of those.")


def norm_kernel_accepts(device: torch.device, hidden_size: int) -> bool:
    """Whether vLLM's ``rms_norm``/``fused_add_rms_norm`` kernels can normalise rows of ``hidden_size`` on
    this device (the CPU build's need whole vectors of 8; CUDA's take any width)."""
    return not devices.has_vllm_cpu_kernels(device) or hidden_size % CPU_NORM_VECTOR == 0
