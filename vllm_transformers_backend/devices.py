"""Devices: CUDA, Cambricon MLU (through ``torch_mlu``) and the CPU.

The backend never names a device type itself: it allocates on the device vLLM's loader made the
default (``with torch.device(target)`` around model construction). This module is the one place that
knows device-type names.

Cambricon MLU: ``torch_mlu`` registers the ``"mlu"`` device and ``torch.mlu`` (an API mirroring
``torch.cuda``). It is imported only when the model already sits on an MLU, i.e. inside the worker
that vLLM put on it; the parent process only asks whether it is installed (``find_spec``), because
initialising the MLU before vLLM forks its workers makes them fail ("Cannot re-initialize MLU in
forked subprocess").

Decode step: not on it (decides at build time which forward each vLLM layer runs on the device).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from typing import Any, Iterator, Optional

import torch

#: The first MLU generation with bfloat16 (MLU5xx); the MLU370 (capability 3) has float16 only.
MLU_BF16_MIN_CAPABILITY = 5


class UnsupportedDtypeError(ValueError):
    """The model's dtype cannot run on this device (the message names the dtype to use instead)."""


@contextlib.contextmanager
def cpu_probe() -> Iterator[None]:
    """For the checks that run an HF function on small made-up tensors (norm form, rotary function, decoder
    layer shape): they run while vLLM's loader has made the target device and the model dtype torch's
    defaults, and must compare exactly, so they run on the CPU in float32 whatever those defaults are."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"), torch.no_grad():
            yield
    finally:
        torch.set_default_dtype(previous)


def current_device() -> torch.device:
    """The default device in effect: the one vLLM's loader chose for the model.

    vLLM's loader uses ``with torch.device(target)``, which pushes a ``DeviceContext`` function mode.
    On torch 2.4 ``torch.get_default_device()`` does not see it (it reports the CPU), so the innermost
    such mode is read from the mode stack first. Nothing is allocated: asking initialises no device.
    """
    try:
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._device import DeviceContext
    except ImportError:  # private torch API: fall back to the public getter
        modes: list = []
    else:
        modes = [m for m in _get_current_function_mode_stack() if isinstance(m, DeviceContext)]
    if modes:
        return torch.device(modes[-1].device)
    getter = getattr(torch, "get_default_device", None)  # torch >= 2.3 (set_default_device)
    if getter is not None:
        return torch.device(getter())
    return torch.empty(0).device


def has_torch_mlu() -> bool:
    """Whether Cambricon's ``torch_mlu`` is importable (checked without importing it)."""
    return importlib.util.find_spec("torch_mlu") is not None


def is_mlu(device: torch.device) -> bool:
    return torch.device(device).type == "mlu"


def device_module(device: torch.device) -> Optional[Any]:
    """``torch.cuda`` / ``torch.mlu`` for an accelerator, None for the CPU and other devices.

    For an MLU, ``torch_mlu`` is imported here if nobody did yet (a model on an MLU means vLLM has
    already initialised it in this process).
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda
    if kind == "mlu":
        if getattr(torch, "mlu", None) is None:
            try:
                importlib.import_module("torch_mlu")
            except ImportError as exc:
                raise RuntimeError("the model is on an MLU device but torch_mlu cannot be imported: "
                                   f"{exc}") from exc
        return torch.mlu  # type: ignore[attr-defined]
    return None


def check_dtype_supported(device: torch.device, dtype: torch.dtype) -> None:
    """Refuses bfloat16 on an MLU without it (MLU3xx such as the MLU370), naming float16.

    CUDA GPUs without bfloat16 are refused by vLLM's own worker; Cambricon's vLLM 0.6.x worker has
    the same check, but a fork that skips it would otherwise fail deep inside a kernel.
    """
    device = torch.device(device)
    if dtype != torch.bfloat16 or not is_mlu(device):
        return
    mlu = device_module(device)
    index = device.index if device.index is not None else mlu.current_device()
    props = mlu.get_device_properties(index)
    major, minor = int(getattr(props, "major", 0)), int(getattr(props, "minor", 0))
    if major >= MLU_BF16_MIN_CAPABILITY:
        return
    name = getattr(props, "name", None) or "this MLU"
    raise UnsupportedDtypeError(
        f"bfloat16 needs a Cambricon MLU5xx (capability >= {MLU_BF16_MIN_CAPABILITY}.0); {name} "
        f"(mlu:{index}, capability {major}.{minor}) supports float16. Rerun with dtype='float16' "
        "(--dtype float16 on the command line), or on an MLU5xx."
    )


def prefers_native_layer_forward(device: torch.device) -> bool:
    """Whether vLLM CustomOps should run their portable PyTorch forward on this device.

    vLLM 0.6.2 dispatches CustomOps by platform; on a device it does not know (an MLU, or a CUDA wheel
    running on the CPU) it falls through to the CUDA kernels. Only CUDA and vLLM's own CPU build have
    kernels for the layers the backend swaps in. A Cambricon tree whose ``CustomOp`` has
    ``forward_mlu`` dispatches MLU layers itself (to its kernels or the native forward): left alone.
    """
    from vllm.model_executor.custom_op import CustomOp
    from vllm.utils import is_cpu

    kind = torch.device(device).type
    if kind == "cuda":
        return False
    if kind == "cpu":
        return not is_cpu()
    if kind == "mlu" and hasattr(CustomOp, "forward_mlu"):
        return False
    return True


def use_native_forward(op: torch.nn.Module) -> None:
    """Makes a vLLM CustomOp run its portable PyTorch forward (``forward_native``) from now on, whatever kernel
    it dispatched to for its platform when it was built."""
    op._forward_method = op.forward_native


def runs_vllm_activation_kernels(device: torch.device) -> bool:
    """Whether vLLM's activation CustomOps (``act_and_mul``) should run their kernels here: not on the CPU,
    whose engine keeps HF's exact PyTorch math (tests compare with HF), nor where the native forward is
    preferred (:func:`prefers_native_layer_forward`)."""
    return torch.device(device).type != "cpu" and not prefers_native_layer_forward(device)


def stock_linear_takes_any_rank(device: torch.device) -> bool:
    """Whether vLLM's unquantized linear on this device is stock vLLM's ``F.linear`` (CUDA, vLLM's CPU
    build), which takes input of any rank. MLU forks run their own GEMM ops there, which may assume rows."""
    return torch.device(device).type in ("cuda", "cpu")


def has_vllm_gpu_kernels(device: torch.device) -> bool:
    """Whether vLLM's CUDA kernels (``vllm._C``) serve this device: the backend then calls them directly
    for speed (rotary embedding) where HF would run many small PyTorch kernels (also on vLLM's CPU build,
    :func:`has_vllm_cpu_kernels`, whose ``vllm._C`` has the same rotary op)."""
    return torch.device(device).type == "cuda"


def has_vllm_cpu_kernels(device: torch.device) -> bool:
    """Whether vLLM's CPU build (its ``vllm._C`` CPU kernels, with their own shape limits: :mod:`.kernels`)
    serves this device."""
    from vllm.utils import is_cpu

    return torch.device(device).type == "cpu" and is_cpu()


def has_fused_moe_kernel(device: torch.device) -> bool:
    """Whether vLLM 0.6.2's fused mixture-of-experts kernel (Triton, CUDA only; its CPU path raises) runs on
    this device."""
    if torch.device(device).type != "cuda":
        return False
    from vllm.triton_utils import HAS_TRITON

    return bool(HAS_TRITON)


def captures_graphs(device: torch.device) -> bool:
    """Whether vLLM captures CUDA graphs on this device unless ``enforce_eager`` (its CPU and other
    executors always run eagerly)."""
    return torch.device(device).type == "cuda"


def is_capturing_graph(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is recording a graph (CUDA graphs): no synchronising then."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_current_stream_capturing()
    return False
