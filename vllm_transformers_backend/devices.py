"""Devices: CUDA, Cambricon MLU (through ``torch_mlu``) and the CPU.

The backend never names a device type itself: it allocates on the device vLLM's loader made the
default (``with torch.device(target)`` around model construction). This module is the one place that
knows device-type names.
"""
from __future__ import annotations

import importlib.util

import torch


def current_device() -> torch.device:
    """The default device in effect: the one vLLM's loader chose for the model."""
    getter = getattr(torch, "get_default_device", None)  # torch >= 2.3
    if getter is not None:
        return torch.device(getter())
    return torch.empty(0).device


def has_torch_mlu() -> bool:
    """Whether Cambricon's ``torch_mlu`` is importable (checked without importing it)."""
    return importlib.util.find_spec("torch_mlu") is not None


def prefers_native_layer_forward(device: torch.device) -> bool:
    """Whether vLLM CustomOps should run their portable PyTorch forward on this device.

    vLLM 0.6.2 dispatches CustomOps by platform; on a device it does not know (an MLU, or a CUDA wheel
    running on the CPU) it falls through to the CUDA kernels. Only CUDA and vLLM's own CPU build have
    kernels for the layers the backend swaps in.
    """
    from vllm.utils import is_cpu

    kind = torch.device(device).type
    if kind == "cuda":
        return False
    if kind == "cpu":
        return not is_cpu()
    return True
