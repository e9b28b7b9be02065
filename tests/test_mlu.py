"""Cambricon MLU code paths, without MLU hardware.

A stand-in ``torch_mlu`` package (written by the tests, put on ``PYTHONPATH`` of a subprocess) does
what the real one does at import: renames torch's PrivateUse1 device to ``"mlu"`` and registers a
``torch.mlu`` module (device properties, capability). It logs its import and every call that would
initialise the MLU driver, so a test can tell whether anything initialised the MLU. (Importing it is
not initialising it: transformers and accelerate import ``torch_mlu`` whenever it is installed, with a
driver-free CNDEV check.) A stand-in ``torch_mlu_ops`` (Cambricon's kernels) logs its import too: the
backend must never need it. What this cannot show: anything running on a real MLU (kernels, memory,
the Cambricon vLLM fork's worker); see the README.

int32 positions (what MLU model runners pass) are checked on the CPU engine itself: the same engine
answers with int64 and with int32 positions, and the outputs must be identical.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import PROMPTS, Engine, vllm_greedy, vllm_model

ROOT = Path(__file__).resolve().parent.parent

_TORCH_MLU = '''
"""Test stand-in for Cambricon's torch_mlu: an "mlu" device and torch.mlu, no hardware.

Calls that would initialise the MLU driver in the real package are logged as "init:<name>"; the
CNDEV-based availability check (PYTORCH_CNDEV_BASED_MLU_CHECK=1, what transformers and accelerate use
when they import torch_mlu) does not initialise it.
"""
import os
import types

import torch

LOG = os.environ["FAKE_MLU_IMPORT_LOG"]


def _log(entry):
    with open(LOG, "a") as log:
        log.write(entry + "\\n")


def _initialising(name, value):
    def call(*args, **kwargs):
        _log("init:" + name)
        return value()
    return call


def _major():  # read per call: a test can switch the model between calls
    return int(os.environ["FAKE_MLU_MAJOR"])


def _name():
    return os.environ["FAKE_MLU_NAME"]


class _Properties:
    def __init__(self):
        self.name, self.major, self.minor, self.total_memory = _name(), _major(), 0, 48 << 30


def _is_available():
    if os.environ.get("PYTORCH_CNDEV_BASED_MLU_CHECK") != "1":
        _log("init:is_available")
    return True


_log("torch_mlu")
mlu = types.ModuleType("torch.mlu")
mlu.is_available = _is_available
mlu.device_count = _initialising("device_count", lambda: 1)
mlu.current_device = _initialising("current_device", lambda: 0)
mlu.set_device = _initialising("set_device", lambda: None)
mlu.synchronize = _initialising("synchronize", lambda: None)
mlu.get_device_properties = _initialising("get_device_properties", _Properties)
mlu.get_device_capability = _initialising("get_device_capability", lambda: (_major(), 0))
mlu.get_device_name = _initialising("get_device_name", _name)
mlu.is_bf16_supported = _initialising("is_bf16_supported", lambda: _major() >= 5)
torch.utils.rename_privateuse1_backend("mlu")
torch._register_device_module("mlu", mlu)
'''

_TORCH_MLU_OPS = '''
import os

with open(os.environ["FAKE_MLU_IMPORT_LOG"], "a") as log:
    log.write("torch_mlu_ops\\n")
'''


@pytest.fixture
def fake_mlu(tmp_path):
    """``run(code, major=..., name=...)`` runs ``code`` in a subprocess that can import the stand-ins;
    returns (stdout, list of stand-in modules imported)."""
    stubs = tmp_path / "stubs"
    (stubs / "torch_mlu").mkdir(parents=True)
    (stubs / "torch_mlu" / "__init__.py").write_text(_TORCH_MLU)
    (stubs / "torch_mlu_ops").mkdir()
    (stubs / "torch_mlu_ops" / "__init__.py").write_text(_TORCH_MLU_OPS)
    log = tmp_path / "imports.log"

    def run(code: str, major: int = 5, name: str = "MLU590", args=()):
        log.write_text("")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "FAKE_MLU_IMPORT_LOG": str(log), "FAKE_MLU_MAJOR": str(major), "FAKE_MLU_NAME": name}
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        return proc.stdout, log.read_text().split()

    return run


def test_parent_process_never_initialises_the_mlu(fake_mlu, checkpoints):
    """With torch_mlu installed, doctor and a whole CPU engine run (load, generate) never initialise the
    MLU (an initialised MLU makes forked workers fail) and never import torch_mlu_ops."""
    out, imported = fake_mlu("""
        import contextlib, io, json, sys
        import torch
        import vllm  # before the redirect below: vLLM's log handler binds to stdout at import
        from vllm_transformers_backend import devices
        from vllm_transformers_backend.__main__ import doctor
        from tests.helpers import Engine, vllm_greedy

        assert devices.has_torch_mlu()
        with contextlib.redirect_stdout(io.StringIO()) as buffer:
            doctor(as_json=True)
        devices.check_dtype_supported(torch.device("cpu"), torch.bfloat16)
        with Engine(sys.argv[1], "transformers") as llm:
            tokens = vllm_greedy(llm, [[1, 5, 7, 9]], 3)[0]
        print(json.dumps({"device": json.loads(buffer.getvalue())["device"], "tokens": tokens}))
    """, args=[checkpoints("llama")])
    result = json.loads(out.strip().splitlines()[-1])
    assert "torch_mlu installed" in result["device"]
    assert len(result["tokens"]) == 3
    assert [entry for entry in imported if entry != "torch_mlu"] == []


def test_the_log_sees_imports_and_initialisation(fake_mlu):
    """The stand-ins' log works (guards the test above against a log that never records)."""
    _, imported = fake_mlu("""
        import os
        import torch, torch_mlu, torch_mlu_ops
        os.environ["PYTORCH_CNDEV_BASED_MLU_CHECK"] = "1"
        assert torch.mlu.is_available()  # the driver-free check: not logged
        del os.environ["PYTORCH_CNDEV_BASED_MLU_CHECK"]
        torch.mlu.current_device()
    """)
    assert imported == ["torch_mlu", "torch_mlu_ops", "init:current_device"]


def test_device_selection_follows_the_loaders_device(fake_mlu):
    """vLLM's loader builds the model under ``with torch.device(target)``: the backend allocates there
    (on torch 2.4 ``torch.get_default_device()`` does not see that context)."""
    out, imported = fake_mlu("""
        import torch
        import torch_mlu  # registers "mlu", as the real one does
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        from vllm.model_executor.custom_op import CustomOp
        from vllm_transformers_backend import devices
        from vllm_transformers_backend.layers import make_rms_norm

        assert devices.current_device() == torch.device("cpu")
        with torch.device("mlu:0"):
            assert devices.current_device() == torch.device("mlu:0"), devices.current_device()
        with torch.device("meta"):
            assert devices.current_device() == torch.device("meta")
        assert devices.device_module(torch.device("mlu:0")) is torch.mlu
        assert devices.device_module(torch.device("cpu")) is None

        # vLLM 0.6.2 would run CUDA kernels for CustomOps on an MLU: the native forward is used there,
        # while on vLLM's CPU build the CPU kernel is kept.
        on_mlu = make_rms_norm(LlamaRMSNorm(8), "plain", torch.device("mlu:0"))
        on_cpu = make_rms_norm(LlamaRMSNorm(8), "plain", torch.device("cpu"))
        assert on_mlu._forward_method == on_mlu.forward_native
        assert on_cpu._forward_method != on_cpu.forward_native
        # a Cambricon vLLM tree has CustomOp.forward_mlu and dispatches MLU layers itself
        CustomOp.forward_mlu = lambda self, *a, **k: self.forward_native(*a, **k)
        assert not devices.prefers_native_layer_forward(torch.device("mlu:0"))
        print("ok")
    """)
    assert out.strip().endswith("ok")
    assert imported == ["torch_mlu"]


def test_bf16_gate_refuses_mlu370_naming_fp16_and_accepts_mlu590(fake_mlu):
    out, _ = fake_mlu("""
        import os
        import torch
        import torch_mlu
        from vllm_transformers_backend import devices

        for major, name in ((3, "MLU370-X8"), (5, "MLU590")):
            os.environ["FAKE_MLU_MAJOR"], os.environ["FAKE_MLU_NAME"] = str(major), name
            for dtype in (torch.float16, torch.float32):
                devices.check_dtype_supported(torch.device("mlu:0"), dtype)
            try:
                devices.check_dtype_supported(torch.device("mlu:0"), torch.bfloat16)
            except devices.UnsupportedDtypeError as exc:
                print(name, "refused:", exc)
            else:
                print(name, "accepted")
    """)
    mlu370, mlu590 = out.strip().splitlines()
    assert mlu370.startswith("MLU370-X8 refused: bfloat16 needs a Cambricon MLU5xx"), mlu370
    assert "MLU370-X8 (mlu:0, capability 3.0)" in mlu370
    assert "dtype='float16'" in mlu370 and "--dtype float16" in mlu370
    assert mlu590 == "MLU590 accepted"


def test_the_gate_runs_when_the_backend_is_built(fake_mlu, checkpoints):
    """``Base.__init__`` applies the gate to the device the loader chose: here the engine runs on the CPU
    while the backend is told its device is an MLU370, so loading in bfloat16 must stop with the gate's
    error (and nothing after it is reached)."""
    out, _ = fake_mlu("""
        import sys
        import torch
        import torch_mlu
        from vllm_transformers_backend import devices
        from tests.helpers import Engine

        devices.current_device = lambda: torch.device("mlu:0")
        try:
            with Engine(sys.argv[1], "transformers", dtype="bfloat16"):
                pass
        except Exception as exc:
            print(type(exc).__name__, exc)
    """, major=3, name="MLU370-X8", args=[checkpoints("llama")])
    assert "UnsupportedDtypeError bfloat16 needs a Cambricon MLU5xx" in out, out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # rotary positions; learned position embeddings
def test_int32_positions_give_the_int64_outputs(checkpoints, arch):
    """MLU model runners pass int32 positions; the backend's forward must give what int64 gives."""
    with Engine(checkpoints(arch), "transformers") as llm:
        model = vllm_model(llm)
        original = model.forward
        hidden, position_dtypes = [], []
        model.model.register_forward_pre_hook(
            lambda module, args, kwargs: position_dtypes.append(kwargs["position_ids"].dtype), with_kwargs=True)

        def forward(as_int32: bool):
            def run(*args, **kwargs):
                if as_int32:
                    kwargs["positions"] = kwargs["positions"].to(torch.int32)
                out = original(*args, **kwargs)
                hidden.append(out.clone())
                return out
            return run

        model.forward = forward(False)
        tokens64, hidden64 = vllm_greedy(llm, PROMPTS, 6), list(hidden)
        assert set(position_dtypes) == {torch.int64}
        hidden.clear(), position_dtypes.clear()
        model.forward = forward(True)
        tokens32, hidden32 = vllm_greedy(llm, PROMPTS, 6), list(hidden)
        assert set(position_dtypes) == {torch.int32}  # the HF model really saw int32 positions
    assert tokens32 == tokens64
    assert len(hidden32) == len(hidden64) > 1
    for a, b in zip(hidden32, hidden64):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
