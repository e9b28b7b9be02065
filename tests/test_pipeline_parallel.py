"""Pipeline parallelism by ``pp_plan``, without an engine: vLLM 0.6.2's CPU executor cannot run pipeline
ranks (it starts ``tensor_parallel_size`` workers only; the patched check says so instead of hanging), so
the stages are built here in one process with a stubbed pipeline group, loaded from the checkpoint, and
chained by hand: stage 0's ``IntermediateTensors`` feed stage 1, whose logits must equal HF's. The
engine-level PP=2 test runs on two GPUs (tests/gpu/test_gpu_parallel.py)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from tests.helpers import ARCHITECTURES, PROMPTS, Engine, require_architecture


def require_pp_plan(name: str) -> None:
    import transformers

    config = ARCHITECTURES[name][0]()
    if not getattr(transformers.CONFIG_MAPPING[config.model_type], "base_model_pp_plan", None):
        pytest.skip(f"transformers {transformers.__version__} declares no pp_plan for {config.model_type} "
                    "(pp plans exist from 4.49)")


def _model_config(path, model_impl="transformers"):
    from vllm.config import ModelConfig

    return ModelConfig(model=str(path), tokenizer=str(path), tokenizer_mode="auto", trust_remote_code=False,
                       dtype="float32", seed=0, max_model_len=256, skip_tokenizer_init=True, model_impl=model_impl)


def _stage(path, rank: int, size: int, monkeypatch):
    """The backend model of pipeline rank ``rank`` of ``size``, weights loaded from ``path``."""
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

    from vllm_transformers_backend import pipeline
    from vllm_transformers_backend.causal import TransformersForCausalLM
    from vllm_transformers_backend.config import BackendConfig, backend_config_scope

    model_config = _model_config(path)
    monkeypatch.setattr(pipeline, "pp_rank_and_size", lambda: (rank, size))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with backend_config_scope(BackendConfig(model_config=model_config)), torch.device("cpu"):
            model = TransformersForCausalLM(config=model_config.hf_config)
    finally:
        torch.set_default_dtype(previous)
    model.load_weights(safetensors_weights_iterator([str(path / "model.safetensors")]))  # strict: raises on a miss
    model._dispatch_verified = True
    return model


def _chain(stages, prompt):
    """Runs the stages in order (attention through the HF SDPA fallback: no KV cache outside an engine)."""
    from vllm.sequence import IntermediateTensors

    ids = torch.tensor(prompt)
    positions = torch.arange(len(prompt))
    carried = None
    with torch.no_grad():
        for stage in stages:
            kv_caches = [None] * (stage.end_layer - stage.start_layer)
            out = stage(ids if carried is None else None, positions, kv_caches, None, intermediate_tensors=carried)
            if stage is not stages[-1]:
                assert isinstance(out, IntermediateTensors) and set(out.tensors) == {"hidden_states"}
                assert out["hidden_states"].shape == (len(prompt), stage.text_config.hidden_size)
                carried = out
        last = stages[-1]
        logits = torch.nn.functional.linear(out, last.lm_head.weight)[:, :last.text_config.vocab_size]
        logits = logits * last.logits_processor.scale
        if last.logits_processor.soft_cap:
            logits = torch.tanh(logits / last.logits_processor.soft_cap) * last.logits_processor.soft_cap
    return logits


def _owners(model):
    return {".".join(n.split(".")[:3]) if n.startswith("model.layers.") else ".".join(n.split(".")[:2])
            for n, _ in model.named_parameters()}


#: llama: untied head; qwen2: tied head (the last rank keeps the embedding); gemma: the body scales
#: inputs_embeds (not applied twice on rank 1); gpt_neox: layers returning tuples, emb_dropout in the plan.
@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma", "gpt_neox"])
def test_two_stages_equal_hf(checkpoints, monkeypatch, one_process_group, name):
    import transformers

    from vllm_transformers_backend import base

    require_architecture(name)
    require_pp_plan(name)
    path = checkpoints(name)
    # Outside an engine there is no KV cache: attention goes through the HF SDPA fallback.
    monkeypatch.setattr(base, "attention_context", lambda ctx: contextlib.nullcontext())
    stages = [_stage(path, rank, 2, monkeypatch) for rank in range(2)]
    first, last = stages
    assert (first.start_layer, first.end_layer, last.start_layer, last.end_layer) == (0, 1, 1, 2)
    assert set(first.attention_instances) == {0} and set(last.attention_instances) == {1}
    tied = bool(first.tie_word_embeddings)
    layer_owners = {o for o in _owners(first) | _owners(last) if o.startswith("model.layers.")}
    assert len(layer_owners) == 2
    assert "model.layers.1" not in _owners(first) and "model.layers.0" not in _owners(last)
    assert not any(o.startswith("lm_head") for o in _owners(first))
    assert "model.embed_tokens" in _owners(first) or "model.embed_in" in _owners(first)
    # the last rank holds the input embedding only to share it with a tied LM head
    last_embedding = last.model.get_input_embeddings()
    assert (getattr(last_embedding, "weight", None) is not None) == tied
    if tied:
        assert last.lm_head.weight is last_embedding.weight

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    for prompt in PROMPTS[:3]:
        with torch.no_grad():
            reference = hf(input_ids=torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(_chain(stages, prompt), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("partition", [None, "3,1"])
def test_fused_layer_runs_per_rank_equal_hf(tmp_path, monkeypatch, one_process_group, partition):
    """Residual fusion under pipeline parallel: each rank's layers form their own fused run (the residual is
    carried inside a rank, the rank's last layer hands over the true sum), with vLLM's even split and an
    uneven ``VLLM_PP_LAYER_PARTITION``; the chained stages equal HF."""
    import transformers

    from vllm_transformers_backend import base
    from vllm_transformers_backend.pipeline import PPMissingLayer
    from vllm_transformers_backend.residual import is_fused

    require_pp_plan("llama")
    if partition:
        monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", partition)
    config = ARCHITECTURES["llama"][0]()
    config.num_hidden_layers, config.initializer_range = 4, 0.1
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    monkeypatch.setattr(base, "attention_context", lambda ctx: contextlib.nullcontext())
    stages = [_stage(tmp_path, rank, 2, monkeypatch) for rank in range(2)]
    split = [int(n) for n in (partition or "2,2").split(",")]
    assert [s.end_layer - s.start_layer for s in stages] == split
    for stage in stages:
        local = [layer for layer in stage.model.layers if not isinstance(layer, PPMissingLayer)]
        assert len(local) == stage.end_layer - stage.start_layer
        assert all(is_fused(layer) for layer in local), "every local Llama layer adds its residual in the fused norm"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    for prompt in PROMPTS[:3]:
        with torch.no_grad():
            reference = hf(input_ids=torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(_chain(stages, prompt), reference, atol=1e-4, rtol=1e-4)


def test_empty_intermediate_tensors(checkpoints, monkeypatch, one_process_group):
    require_pp_plan("llama")
    stage = _stage(checkpoints("llama"), 1, 2, monkeypatch)
    empty = stage.make_empty_intermediate_tensors(batch_size=5, dtype=torch.float32, device=torch.device("cpu"))
    assert set(empty.tensors) == {"hidden_states"} and empty["hidden_states"].shape == (5, 128)


def test_no_pp_plan_is_a_clear_error(checkpoints, monkeypatch, one_process_group):
    from vllm_transformers_backend.base import BackendError

    with pytest.raises(BackendError, match=r"GPT2LMHeadModel \(GPT2Model\) has no pp_plan.*base_model_pp_plan"
                                           r".*pipeline_parallel_size=1"):
        _stage(checkpoints("gpt2"), 0, 2, monkeypatch)


def test_vllm_pp_architecture_check_passes_for_backend_models(checkpoints, monkeypatch):
    """vLLM 0.6.2 allows PP only for its own PP-capable architectures; a model the backend runs passes.
    (The CPU build refuses PP before that check: it is switched off here to reach the GPU builds' logic.)"""
    import vllm.config
    from vllm.config import ParallelConfig

    from vllm_transformers_backend.patches import pipeline_parallel

    require_architecture("olmo2")
    monkeypatch.setattr(pipeline_parallel, "is_cpu_build", lambda: False)
    path = checkpoints("olmo2")  # Olmo2ForCausalLM: not in vLLM 0.6.2 at all
    parallel = ParallelConfig(pipeline_parallel_size=2, tensor_parallel_size=1, worker_use_ray=False)
    before = list(vllm.config._PP_SUPPORTED_MODELS)
    _model_config(path, "transformers").verify_with_parallel_config(parallel)
    assert vllm.config._PP_SUPPORTED_MODELS == before
    with pytest.raises(NotImplementedError, match="Pipeline parallelism is only supported for"):
        _model_config(path, "vllm").verify_with_parallel_config(parallel)


def test_cpu_engine_refuses_pipeline_parallel(checkpoints):
    """vLLM 0.6.2's CPU executor would wait forever for the ranks it never starts: a clear error instead."""
    with pytest.raises(NotImplementedError, match="CPU executor starts tensor_parallel_size workers only"):
        with Engine(checkpoints("llama"), "transformers", pipeline_parallel_size=2):
            pass
