"""The backend's settings: every ``VLLM_TRANSFORMERS_BACKEND_*`` environment variable, in the style of vLLM's
``envs.py``.

``envs.VLLM_TRANSFORMERS_BACKEND_FUSE`` reads the variable when it is asked for (not at import), so a
value set later in the process, or inherited by a worker, counts. This module imports nothing but the
standard library: the start-up hook reads it in every Python process.

Switches (all on by default; ``0``/``false``/``no``/``off`` turn one off, any other value turns it on):

* ``VLLM_TRANSFORMERS_BACKEND_DISABLE``: leave vLLM untouched (no patches; off by default);
* ``VLLM_TRANSFORMERS_BACKEND_STRICT``: a patch that cannot apply raises at ``import vllm`` instead of
  being logged (off by default);
* one per speed pass (:mod:`.passes`; each pass names its switches): ``..._RMS_NORM`` (HF RMS norms as
  vLLM's), ``..._FUSE`` (q/k/v and gate/up as one GEMM each; ``0`` also turns off the passes built on
  fused layers and the residual fusion, as it always did), ``..._FUSE_GLU`` (gated MLP activation as one
  kernel), ``..._FUSE_ATTENTION`` (a standard attention forward as vLLM's attention layers run it),
  ``..._FUSE_RESIDUAL`` (residual adds in vLLM's add-and-norm kernel), ``..._FUSE_BODY`` (a body of such
  layers as vLLM's model loop), ``..._FUSED_ROTARY``
  (HF's rotation through vLLM's kernel: ``1`` where ``vllm._C`` serves the device, CUDA and vLLM's CPU
  build, ``all`` also elsewhere, ``0`` never), ``..._ROTARY_TABLE`` (static rotary modules' cos/sin from
  a table computed once), ``..._MOE`` (mixture-of-experts blocks' experts as vLLM's
  ``FusedMoE``: ``auto`` where vLLM's fused MoE kernel runs, ``fused`` also elsewhere, its arithmetic in
  PyTorch, as the CPU tests run it, ``hf`` or ``0`` never: HF's expert code);
* ``VLLM_TRANSFORMERS_BACKEND_FLASH_WINDOW``: sliding-window layers on FlashAttention run vLLM's flash
  kernel with the layer's window (``0``: the backend's gathered window attention; :mod:`.windowed_attention`).

Decode step: not on it (read while a model is built).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Tuple

_OFF = ("0", "false", "no", "off")


def _switch(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in _OFF


def _choice(name: str, choices: Tuple[str, ...], off: str) -> str:
    """One of ``choices`` (the first is the default; an off value means ``off``); anything else is refused."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return choices[0]
    if value in _OFF:
        return off
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)} (or 0)")
    return value


def _rotary(name: str) -> str:
    value = os.environ.get(name, "").strip().lower()
    if value == "all":
        return "all"
    return "1" if _switch(name, True) else "0"


environment_variables: Dict[str, Callable[[], Any]] = {
    # Start-up hook: patch nothing (vLLM as installed).
    "VLLM_TRANSFORMERS_BACKEND_DISABLE": lambda: _switch("VLLM_TRANSFORMERS_BACKEND_DISABLE", False),
    # Patches: raise at import when one cannot apply (CI, GPU hosts) instead of logging it.
    "VLLM_TRANSFORMERS_BACKEND_STRICT": lambda: _switch("VLLM_TRANSFORMERS_BACKEND_STRICT", False),
    # Speed pass rms_norm: HF RMS norms (found by their numerics) become vLLM's RMSNorm / GemmaRMSNorm.
    "VLLM_TRANSFORMERS_BACKEND_RMS_NORM": lambda: _switch("VLLM_TRANSFORMERS_BACKEND_RMS_NORM", True),
    # Speed pass projections (and, when 0, also glu and residual): sibling linears as one vLLM GEMM.
    "VLLM_TRANSFORMERS_BACKEND_FUSE": lambda: _switch("VLLM_TRANSFORMERS_BACKEND_FUSE", True),
    # Speed pass glu: a standard gated MLP's activation and product as vLLM's act_and_mul.
    "VLLM_TRANSFORMERS_BACKEND_FUSE_GLU": lambda: _switch("VLLM_TRANSFORMERS_BACKEND_FUSE_GLU", True),
    # Speed pass attention_forward: a standard attention forward as qkv GEMM, rotary kernel, Attention, o_proj.
    "VLLM_TRANSFORMERS_BACKEND_FUSE_ATTENTION": lambda: _switch("VLLM_TRANSFORMERS_BACKEND_FUSE_ATTENTION", True),
    # Speed pass residual: pre-norm layers' residual adds inside vLLM's fused add-and-norm.
    "VLLM_TRANSFORMERS_BACKEND_FUSE_RESIDUAL": lambda: _switch("VLLM_TRANSFORMERS_BACKEND_FUSE_RESIDUAL", True),
    # Speed pass body_forward: a body of such layers run as vLLM's model loop (checked at the first forward).
    "VLLM_TRANSFORMERS_BACKEND_FUSE_BODY": lambda: _switch("VLLM_TRANSFORMERS_BACKEND_FUSE_BODY", True),
    # Speed pass rotary: "1" where vllm._C serves the device (CUDA, vLLM's CPU build), "all" on any device, "0" never.
    "VLLM_TRANSFORMERS_BACKEND_FUSED_ROTARY": lambda: _rotary("VLLM_TRANSFORMERS_BACKEND_FUSED_ROTARY"),
    # Speed pass moe: "auto" where vLLM's fused MoE kernel runs, "fused" everywhere (its arithmetic in PyTorch
    # where the kernel does not run), "hf" (or 0) never: each block keeps HF's expert code.
    "VLLM_TRANSFORMERS_BACKEND_MOE": lambda: _choice("VLLM_TRANSFORMERS_BACKEND_MOE", ("auto", "hf", "fused"), "hf"),
    # Speed pass rotary_table: position-only rotary modules answer cos/sin from a table computed once.
    "VLLM_TRANSFORMERS_BACKEND_ROTARY_TABLE": lambda: _switch("VLLM_TRANSFORMERS_BACKEND_ROTARY_TABLE", True),
    # Sliding-window layers on FlashAttention: vLLM's flash kernel with the layer's window (0: the backend's
    # gathered window attention instead; windowed_attention.py).
    "VLLM_TRANSFORMERS_BACKEND_FLASH_WINDOW": lambda: _switch("VLLM_TRANSFORMERS_BACKEND_FLASH_WINDOW", True),
}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return list(environment_variables)


def is_set(name: str) -> bool:
    """Whether the user set ``name`` (doctor shows set values apart from defaults)."""
    return bool(os.environ.get(name, "").strip())
