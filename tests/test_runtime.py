"""Run-time replacements and ``doctor``: a model built in this process (no engine) reports what its speed passes
replaced, ``doctor(llm)`` lists it, and the one process-wide binding (the rotary function of the modeling
module) acts only inside the model that installed it and is put back when that model is gone."""
from __future__ import annotations

import gc
import importlib
from types import SimpleNamespace

import torch

from tests.test_pipeline_parallel import _model_config

LLAMA = "transformers.models.llama.modeling_llama"


def _build(path):
    from vllm_transformers_backend.causal import TransformersForCausalLM
    from vllm_transformers_backend.config import BackendConfig, backend_config_scope

    model_config = _model_config(path)
    with backend_config_scope(BackendConfig(model_config=model_config)), torch.device("cpu"):
        return TransformersForCausalLM(config=model_config.hf_config)


def _rotate(fn, scope):
    """Calls ``fn`` (a modeling module's apply_rotary_pos_emb) inside an attention context whose model rotary
    state is ``scope``, on HF's layout (q/k as transposed views, cos/sin with equal halves)."""
    from vllm_transformers_backend.attention import AttentionContext, attention_context

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, 2, 64, generator=gen).transpose(1, 2)
    k = torch.randn(1, 3, 1, 64, generator=gen).transpose(1, 2)
    freqs = torch.randn(1, 3, 32, generator=gen)
    emb = torch.cat((freqs, freqs), dim=-1)
    with torch.no_grad(), attention_context(AttentionContext({}, [], None, rotary_modules=scope)):
        fn(q, k, emb.cos(), emb.sin())


def test_doctor_lists_the_models_replacements_and_the_binding_is_scoped(checkpoints, monkeypatch, one_process_group):
    from vllm import _custom_ops as ops

    from vllm_transformers_backend import doctor

    module = importlib.import_module(LLAMA)
    original = getattr(module.apply_rotary_pos_emb, "__wrapped__", module.apply_rotary_pos_emb)
    monkeypatch.setattr(module, "apply_rotary_pos_emb", original)  # put back whatever happens
    monkeypatch.setenv("VLLM_TRANSFORMERS_BACKEND_FUSED_ROTARY", "all")  # the kernel path on the CPU build
    model = _build(checkpoints("llama"))
    fused = module.apply_rotary_pos_emb
    assert fused is not original and fused.__wrapped__ is original

    llm = SimpleNamespace(llm_engine=SimpleNamespace(model_executor=SimpleNamespace(
        driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)))))
    result = doctor.report(llm)
    passes = {p["pass"]: p for p in result["model"]["speed_passes"]}
    assert list(passes) == ["moe", "rms_norm", "projections", "glu", "rotary", "rotary_table", "attention_forward",
                            "residual", "body_forward"]
    # a 2-layer Llama: no MoE block (and no fused MoE kernel on the CPU), 5 norms, 2 q/k/v + 2 gate/up groups,
    # 2 MLPs, 1 modeling module, 1 rotary module, 2 attention modules, 2 layers, 1 body
    assert {name: (p["status"], p["replaced"]) for name, p in passes.items()} == {
        "moe": ("n/a", 0), "rms_norm": ("on", 5), "projections": ("on", 4), "glu": ("on", 2), "rotary": ("on", 1),
        "rotary_table": ("on", 1), "attention_forward": ("on", 2), "residual": ("on", 2),
        "body_forward": ("on", 1)}
    assert passes["rotary"]["replacements"] == [{"target": f"{LLAMA}.apply_rotary_pos_emb",
                                                 "by": "vLLM rotary_embedding kernel", "count": 1, "scope": "process"}]
    [binding] = [r for r in result["process_replacements"] if r["target"] == f"{LLAMA}.apply_rotary_pos_emb"]
    assert binding["by"] == "rotary" and binding["used_by"].startswith("TransformersForCausalLM at ")
    # the vLLM modules it was built with (TP=1: o_proj/down_proj replicated; q/k/v, gate/up fused under vLLM's
    # names, their slices in HF's places)
    assert result["model"]["modules"] == {
        "VocabParallelEmbedding": 1, "QKVParallelLinear": 2, "MergedColumnParallelLinear": 2, "FusedSlice": 10,
        "HFReplicatedLinear": 4, "SiluAndMul": 2, "HFRMSNorm": 5, "ParallelLMHead": 1, "LogitsProcessor": 1,
        "Sampler": 1, "Attention(TorchSDPABackendImpl)": 2}
    assert result["model"]["quantization"] is None and result["model"]["lora"] is False
    text = doctor.format_report(result)
    assert "model TransformersForCausalLM (LlamaModel): its run-time replacements" in text
    assert "  vLLM modules: VocabParallelEmbedding x1, FusedSlice x10, " in text
    assert "speed pass rotary: 1 of 1 replaced" in text and text.endswith("OK")

    calls = []
    monkeypatch.setattr(ops, "rotary_embedding", lambda *args: calls.append(args))
    _rotate(fused, {})  # another model's forward (it did not install the binding): HF's function
    assert calls == []
    _rotate(fused, {LLAMA: None})  # this model's forward: vLLM's kernel
    assert len(calls) == 1

    del model, llm, result, passes
    gc.collect()
    assert module.apply_rotary_pos_emb is original  # put back with the last model using it
    assert not [r for r in doctor.report()["process_replacements"] if r["target"].endswith("apply_rotary_pos_emb")]


def test_switched_off_passes_are_reported_as_off(checkpoints, monkeypatch, one_process_group):
    monkeypatch.setenv("VLLM_TRANSFORMERS_BACKEND_FUSE", "0")
    monkeypatch.setenv("VLLM_TRANSFORMERS_BACKEND_RMS_NORM", "false")
    monkeypatch.setenv("VLLM_TRANSFORMERS_BACKEND_FUSED_ROTARY", "0")
    model = _build(checkpoints("llama"))
    status = {r.name: (r.status, r.reason) for r in model.speed_passes}
    assert status == {
        "moe": ("n/a", "vLLM's fused MoE kernel does not run on this device"),
        "rms_norm": ("off", "VLLM_TRANSFORMERS_BACKEND_RMS_NORM=0"),
        "projections": ("off", "VLLM_TRANSFORMERS_BACKEND_FUSE=0"),
        "glu": ("off", "VLLM_TRANSFORMERS_BACKEND_FUSE=0"),
        "rotary": ("off", "VLLM_TRANSFORMERS_BACKEND_FUSED_ROTARY=0"),
        "rotary_table": ("on", ""),
        "attention_forward": ("off", "VLLM_TRANSFORMERS_BACKEND_FUSE=0"),
        "residual": ("off", "VLLM_TRANSFORMERS_BACKEND_FUSE=0"),
        "body_forward": ("off", "VLLM_TRANSFORMERS_BACKEND_FUSE=0"),
    }
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"  # HF's own module kept
