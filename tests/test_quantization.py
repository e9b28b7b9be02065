"""Quantized checkpoints on the CPU: the loading and mapping paths, without kernels (vLLM 0.6.2's quantized
GEMMs are CUDA kernels; tests/gpu/test_gpu_quantization.py runs them against native vLLM).

The backend and vLLM's native model are built with the same ``quant_config`` from the same tiny checkpoint
(GPTQ with and without act order, AWQ, FP8 in vLLM's and compressed-tensors' formats, online FP8): every
layer gets the same quantization method, the parameters have the same names, shapes and dtypes, and the
checkpoint's tensors land in them identically (per-shard packing and scales of the fused q/k/v and gate/up
included). Ignore lists are read with the checkpoint's module names, and the CPU engine refuses a quantized
model with an error naming the GPU requirement."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import build_checkpoint
from tests.quantized import build_model, quantize_checkpoint

#: (method in the checkpoint, act order, model dtype): what vLLM would run each with.
CASES = {
    "gptq": ("gptq", False, torch.float16),
    "gptq-act-order": ("gptq", True, torch.float16),
    "awq": ("awq", False, torch.float16),
    "fp8": ("fp8", False, torch.bfloat16),
    "compressed-tensors": ("compressed-tensors", False, torch.bfloat16),
}
NATIVE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """``quantized(arch, case)`` -> a quantized checkpoint (``case=None``: the float one), built once."""
    root = tmp_path_factory.mktemp("quantized")
    cache = {}

    def get(arch: str, case):
        if (arch, case) not in cache:
            if case is None:
                cache[arch, case] = build_checkpoint(arch, root / arch)
            else:
                method, desc_act, _ = CASES[case]
                quantize_checkpoint(get(arch, None), root / f"{arch}-{case}", method, desc_act=desc_act)
                cache[arch, case] = root / f"{arch}-{case}"
        return cache[arch, case]

    return get


@pytest.fixture
def no_fp8_kernels(monkeypatch):
    """vLLM's FP8 method asks its CUDA ops whether CUTLASS FP8 runs, which the CPU build lacks; the answer
    only picks the GEMM kernel, not the parameters."""
    import vllm.model_executor.layers.quantization.fp8 as fp8

    monkeypatch.setattr(fp8, "cutlass_fp8_supported", lambda: False)


def _methods(model):
    return {name: type(m.quant_method).__name__ for name, m in model.named_modules()
            if getattr(m, "quant_method", None) is not None and ".attn" not in name}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8) if tensor.element_size() == 1 and tensor.is_floating_point() else tensor


def _parameters(model):
    return {name: p for name, p in model.named_parameters() if ".attn." not in name}


#: Llama: every format; Qwen2 (q/k/v biases beside quantized weights, tied embeddings): one of each kind.
PAIRS = [("llama", case) for case in [*CASES, "fp8-online"]] + \
        [("qwen2", case) for case in ("gptq-act-order", "awq", "compressed-tensors")]


@pytest.mark.parametrize("arch,case", PAIRS)
def test_quantized_checkpoint_loads_like_native(quantized, module_process_group, no_fp8_kernels, arch, case):
    if case == "fp8-online":
        path, dtype, quantization = quantized(arch, None), torch.bfloat16, "fp8"
    else:
        path, dtype, quantization = quantized(arch, case), CASES[case][2], None
    backend = build_model(path, dtype, quantization=quantization)
    native = build_model(path, dtype, native=NATIVE[arch], quantization=quantization)

    # Same layers, same methods: the fused q/k/v and gate/up of vLLM's model are the backend's too.
    assert _methods(backend) == _methods(native)
    assert any("qkv_proj" in n for n in _methods(backend)) and any("gate_up_proj" in n for n in _methods(backend))
    # Same parameters, and the checkpoint's tensors in them bit for bit.
    ours, theirs = _parameters(backend), _parameters(native)
    assert sorted(ours) == sorted(theirs)
    for name, param in theirs.items():
        assert (ours[name].shape, ours[name].dtype) == (param.shape, param.dtype), name
        assert torch.equal(_bits(ours[name]), _bits(param)), name
    # The attention layers got the method's KV-cache scales, settled and freed after loading as in vLLM.
    for attn in backend.attention_instances.values():
        expected = case.startswith("fp8") or case == "compressed-tensors"
        assert (getattr(attn, "quant_method", None) is not None) == expected
        assert not hasattr(attn, "k_scale") and attn._k_scale == 1.0


def test_linears_get_checkpoint_names_as_prefixes(quantized, module_process_group, no_fp8_kernels, monkeypatch):
    """The prefix each layer hands its quantization method is its checkpoint name, as in vLLM's Llama."""
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    seen = {"backend": [], "native": []}
    original = Fp8Config.get_quant_method
    side = {"now": "backend"}

    def record(self, layer, prefix):
        seen[side["now"]].append((type(layer).__name__, prefix))
        return original(self, layer, prefix)

    monkeypatch.setattr(Fp8Config, "get_quant_method", record)
    path = quantized("llama", "fp8")
    build_model(path, torch.bfloat16)
    side["now"] = "native"
    build_model(path, torch.bfloat16, native="LlamaForCausalLM")

    def linear_prefixes(calls):
        return sorted(prefix for kind, prefix in calls if kind.endswith("Linear"))

    ours = linear_prefixes(seen["backend"])
    # The backend also builds each sibling before fusing it (q_proj, ...): those prefixes are HF's names.
    fused = [p for p in ours if p.endswith(("qkv_proj", "gate_up_proj", "o_proj", "down_proj"))]
    assert fused == linear_prefixes(seen["native"])
    assert "model.layers.1.self_attn.k_proj" in ours and "model.layers.0.mlp.up_proj" in ours
    assert {p for kind, p in seen["backend"] if kind == "Attention"} == \
           {f"model.layers.{i}.self_attn.attn" for i in range(2)}


def _with_quantization_config(src: Path, dst: Path, update: dict) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"].update(update)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_ignore_lists_apply_by_checkpoint_name(quantized, module_process_group, no_fp8_kernels, tmp_path):
    """FP8 ``ignored_layers`` name HF modules: a whole fused group ignored stays unquantized and fused; a
    group the checkpoint quantizes only partly stays unfused (vLLM's own model refuses it)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from vllm_transformers_backend.fusion import FusedSlice

    ignored = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
               "model.layers.1.self_attn.v_proj", "model.layers.0.self_attn.k_proj"]
    dst = _with_quantization_config(quantized("llama", "fp8"), tmp_path / "ignore", {"ignored_layers": ignored})
    model = build_model(dst, torch.bfloat16, load=False)
    layers = model.model.layers
    assert isinstance(layers[0].mlp.down_proj.quant_method, UnquantizedLinearMethod)
    assert isinstance(layers[1].self_attn.qkv_proj.quant_method, UnquantizedLinearMethod)
    assert type(layers[1].mlp.gate_up_proj.quant_method).__name__ == "Fp8LinearMethod"
    attn0 = layers[0].self_attn
    assert not isinstance(attn0.q_proj, FusedSlice) and not hasattr(attn0, "qkv_proj")
    assert isinstance(attn0.k_proj.quant_method, UnquantizedLinearMethod)
    assert type(attn0.q_proj.quant_method).__name__ == "Fp8LinearMethod"
    with pytest.raises(ValueError, match="some but not all shards"):
        build_model(dst, torch.bfloat16, native="LlamaForCausalLM", load=False)


def test_gptq_zero_biases_are_skipped_real_ones_load(quantized, module_process_group):
    """AutoGPTQ writes a zero bias for every linear; vLLM's models skip those the model has no bias for.
    Qwen2's q/k/v biases are real and must still load."""
    backend = build_model(quantized("qwen2", "gptq"), torch.float16)
    from safetensors.torch import load_file

    state = load_file(str(quantized("qwen2", "gptq") / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.bias" in state  # the zero bias is in the checkpoint
    bias = backend.model.layers[0].self_attn.qkv_proj.bias
    expected = torch.cat([state[f"model.layers.0.self_attn.{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(bias, expected.to(bias.dtype))


def test_refused_methods_name_the_fix():
    from vllm_transformers_backend.quantization import refusal

    class GGUF:
        def get_name(self):
            return "gguf"

    assert "gguf_file" in refusal(GGUF()) and refusal(None) is None


@pytest.mark.parametrize("case", ["gptq", "fp8-online"])
def test_cpu_engine_refuses_quantized_models_naming_the_gpu(quantized, case):
    """Refused where LLM(...) and `vllm serve` build the engine configuration, before any worker starts
    (vLLM itself would stop later at a dtype check whose message points at the wrong fix); vLLM's own model
    keeps vLLM's behaviour."""
    from vllm.engine.arg_utils import EngineArgs

    kwargs = {"quantization": "fp8"} if case == "fp8-online" else {}
    path = quantized("llama", None if case == "fp8-online" else case)
    args = dict(model=str(path), device="cpu", dtype="bfloat16", skip_tokenizer_init=True, **kwargs)
    with pytest.raises(ValueError, match=r"asks for quantization .*needs a CUDA GPU, and this is vLLM's CPU engine"):
        EngineArgs(model_impl="transformers", **args).create_engine_config()
    EngineArgs(model_impl="vllm", **args).create_engine_config()


def test_quantization_methods_get_rows_of_tokens(checkpoints, monkeypatch):
    """vLLM's quantized GEMMs take ``[tokens, hidden]`` (FP8's ``scaled_fp8_quant`` asserts ``ndim == 2``, the
    CUTLASS GEMMs too) while HF keeps a batch dimension of 1. A stand-in method that asserts 2-D input as
    they do, under every vLLM linear of the CPU engine (plain, fused q/k/v and gate/up, the gated MLP's own
    call of gate/up), still gives HF's tokens: each call hands the method rows and HF gets its shape back.
    (Unquantized layers take HF's 3-D input as it is, ``layers.ANY_RANK_METHODS``: the stand-in is not.)"""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from vllm_transformers_backend import layers

    from tests.helpers import PROMPTS, Engine, hf_greedy, vllm_greedy

    original = UnquantizedLinearMethod.apply
    called = set()

    def apply_rows_only(self, layer, x, bias=None):
        assert x.dim() == 2, f"{type(layer).__name__} got input of shape {tuple(x.shape)}"
        called.add(type(layer).__name__)
        return original(self, layer, x, bias)

    monkeypatch.setattr(UnquantizedLinearMethod, "apply", apply_rows_only)
    monkeypatch.setattr(layers, "ANY_RANK_METHODS", ())
    path = checkpoints("llama")
    prompts = PROMPTS + [[7]]
    with Engine(path, "transformers") as llm:
        tokens = vllm_greedy(llm, prompts, 4)
    # the fused layers, and o_proj/down_proj as the backend's own linears (HFReplicatedLinear at TP=1)
    assert {"QKVParallelLinear", "MergedColumnParallelLinear"} < called and any(n.startswith("HF") for n in called)
    assert tokens == hf_greedy(path, prompts, 4)


def test_unquantized_linears_take_hfs_input_unflattened(checkpoints, monkeypatch):
    """The complement: unquantized linears without LoRA get HF's ``[1, tokens, hidden]`` as it is (``F.linear``
    folds it in C++: no Python-level reshape and view per linear, host time per layer), every one of them,
    and the tokens still equal HF's."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from tests.helpers import PROMPTS, Engine, hf_greedy, vllm_greedy

    original = UnquantizedLinearMethod.apply
    ranks = {}

    def apply_recording(self, layer, x, bias=None):
        ranks.setdefault(type(layer).__name__, set()).add(x.dim())
        return original(self, layer, x, bias)

    monkeypatch.setattr(UnquantizedLinearMethod, "apply", apply_recording)
    # HF's own attention forward: the lean one (attention_forward.py) hands qkv_proj and o_proj token rows itself
    monkeypatch.setenv("VLLM_TRANSFORMERS_BACKEND_FUSE_ATTENTION", "0")
    path = checkpoints("llama")
    with Engine(path, "transformers") as llm:
        tokens = vllm_greedy(llm, PROMPTS, 4)
    linears = {name: dims for name, dims in ranks.items() if "Embedding" not in name and "Head" not in name}
    assert {"QKVParallelLinear", "MergedColumnParallelLinear"} < set(linears), ranks
    assert all(dims == {3} for dims in linears.values()), ranks
    assert tokens == hf_greedy(path, PROMPTS, 4)


def test_any_rank_input_only_for_stock_unquantized_linears():
    """The gate itself: an unquantized linear on the CPU (or CUDA) takes any rank; one on another device
    (an MLU fork's own GEMM), one with a quantization method, and a LoRA-wrapped one get rows."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from vllm_transformers_backend.layers import takes_any_rank

    class QuantizedMethod(UnquantizedLinearMethod):  # a method that may do more than F.linear
        pass

    def layer(method, device="cpu", lora=False):
        module = torch.nn.Module()
        module.quant_method = method
        module.weight = torch.nn.Parameter(torch.empty(4, 4, device=device), requires_grad=False)
        if lora:
            module.base_layer = torch.nn.Module()
        return module

    assert takes_any_rank(layer(UnquantizedLinearMethod()))
    assert not takes_any_rank(layer(UnquantizedLinearMethod(), device="meta"))
    assert not takes_any_rank(layer(QuantizedMethod()))
    assert not takes_any_rank(layer(UnquantizedLinearMethod(), lora=True))


def test_packers_agree_with_vllms_and_dequantize_to_the_weight():
    """The test checkpoints' GPTQ/AWQ packing equals vLLM's reference packers (quant_utils); unpacked with
    vLLM's unpacker and dequantized by the format's rule, the stored tensors give the returned weights, which
    are within half a quantization step (GPTQ; AWQ's whole-step zero points: one step) of the float ones."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (awq_pack, gptq_pack, pack_cols,
                                                                           unpack_cols)

    from tests.quantized import AWQ_ORDER, _pack_int4, awq_quantize, gptq_quantize

    torch.manual_seed(0)
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32)
    assert torch.equal(_pack_int4(q, dim=0), gptq_pack(q, 4, 128, 64))
    assert torch.equal(_pack_int4(q, dim=1), pack_cols(q, 4, 128, 64))  # GPTQ qzeros
    assert torch.equal(_pack_int4(q, dim=1, order=AWQ_ORDER), awq_pack(q, 4, 128, 64))

    weight = torch.randn(64, 128) * 0.05  # [out, in]
    perm = torch.randperm(128)
    for act_order in (None, perm):
        tensors, dequant = gptq_quantize(weight, 32, act_order)
        values = unpack_cols(tensors["qweight"].t().contiguous(), 4, 64, 128).t()  # [in, out]
        zeros = unpack_cols(tensors["qzeros"], 4, 4, 64) + 1  # AutoGPTQ stores zero - 1
        g = tensors["g_idx"].long()
        rebuilt = (tensors["scales"].float()[g] * (values - zeros[g]).float()).t()
        assert torch.equal(rebuilt, dequant)
        step = tensors["scales"].float()[g].t()
        assert ((dequant - weight).abs() <= step / 2 + 1e-6).all()
    tensors, dequant = awq_quantize(weight, 32)
    inverse = [AWQ_ORDER.index(k) for k in range(8)]
    unpack = lambda packed, rows: unpack_cols(packed, 4, rows, 64).reshape(rows, 8, 8)[:, :, inverse].reshape(rows, 64)
    values, zeros = unpack(tensors["qweight"], 128), unpack(tensors["qzeros"], 4)
    groups = torch.arange(128) // 32
    rebuilt = ((values - zeros[groups]).float() * tensors["scales"].float()[groups]).t()
    assert torch.equal(rebuilt, dequant)
    # zero points are whole steps: a group's extremes may be off by up to one step
    assert ((dequant - weight).abs() <= tensors["scales"].float()[groups].t() + 1e-6).all()
