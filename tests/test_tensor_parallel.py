"""Tensor parallelism on vLLM's CPU engine (gloo, patched CPU executor): TP=2 generation token-exact with
TP=1 and HF, the tp_plan styles of the installed transformers, plan sources, KV heads replicated over
ranks, the clear error without a plan, and the patches reaching worker processes through the plugin."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import PROMPTS, Engine, hf_greedy, require_architecture, vllm_greedy

MAX_TOKENS = 12
REPO = Path(__file__).resolve().parents[1]


def require_tp_plan(name: str) -> None:
    """Skips (with the reason) where the installed transformers declares no tp_plan for the architecture."""
    import transformers

    from tests.helpers import ARCHITECTURES

    config = ARCHITECTURES[name][0]()
    if not transformers.CONFIG_MAPPING[config.model_type].base_model_tp_plan:
        pytest.skip(f"transformers {transformers.__version__} declares no tp_plan for {config.model_type}")


#: (architecture, environment of the engine, what it covers)
TP_CASES = [
    # one KV head, two ranks: fused q/k/v (vLLM's QKVParallelLinear replicates the head); untied head
    ("llama", {}),
    # separate k/v projections (fusion off) with one KV head: the backend's head-replicating layer, biases;
    # tied embeddings (vocab-parallel embedding and head share the shard)
    ("qwen2", {"VLLM_TRANSFORMERS_BACKEND_FUSE": "0"}),
    # (1 + w) norms, hidden-size normaliser, GeGLU, tied
    ("gemma", {}),
    # q/k/v gathered by the plan (colwise_rep, full-width q/k norms): each rank attends with its own heads
    ("olmo2", {}),
]


@pytest.fixture
def spawned_workers(monkeypatch):
    """The CPU executor's workers start with ``spawn``: vLLM forks them by default, and a forked worker of a
    process that already ran PyTorch CPU kernels (HF, earlier engines) hangs in OpenMP (GNU libgomp is not
    fork-safe). vLLM reads VLLM_WORKER_MULTIPROC_METHOD once, when this module is imported."""
    import multiprocessing

    import vllm.executor.multiproc_worker_utils as worker_utils

    monkeypatch.setattr(worker_utils, "mp", multiprocessing.get_context("spawn"))


@pytest.mark.parametrize("name, env", TP_CASES, ids=[c[0] for c in TP_CASES])
def test_tp2_matches_tp1_and_hf(checkpoints, monkeypatch, spawned_workers, name, env):
    require_architecture(name)
    require_tp_plan(name)
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # read at model construction, here and in the worker (inherited)
    path = checkpoints(name)
    hf = hf_greedy(path, PROMPTS, MAX_TOKENS)
    tp2 = _greedy(path, tensor_parallel_size=2)
    tp1 = _greedy(path)
    assert tp1 == hf
    assert tp2 == tp1


def _greedy(path, prompts=PROMPTS, max_tokens=MAX_TOKENS, inspect=None, **engine_args):
    """Greedy tokens of one engine (``inspect(llm)`` first, if given); vLLM's process-global state and worker
    processes are gone afterwards, also when the engine fails to start (a failed start must not break the tests
    after it)."""
    import multiprocessing

    from tests.helpers import cleanup_engine

    before = set(multiprocessing.active_children())
    started = False
    try:
        with Engine(path, "transformers", **engine_args) as llm:
            started = True
            if inspect is not None:
                inspect(llm)
            tokens = vllm_greedy(llm, prompts, max_tokens)
            del llm  # Engine.__exit__ then drops the last reference: the executor stops its workers
        return tokens
    finally:
        if not started:  # LLM() raised: Engine.__exit__ never ran
            cleanup_engine()
        for worker in set(multiprocessing.active_children()) - before:
            worker.join(timeout=30)  # the executor has told them to stop: let them exit before the next engine


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO), **env})


def test_no_tp_plan_is_a_clear_error(checkpoints):
    """GPT-2 declares no tp_plan in any transformers release: TP=2 names the class and the fix."""
    path = checkpoints("gpt2")
    result = _run_python(f"""
        from tests.helpers import Engine
        try:
            with Engine({str(path)!r}, "transformers", tensor_parallel_size=2):
                pass
        except Exception as exc:
            print("ERROR:", exc)
    """)
    assert "ERROR: GPT2LMHeadModel (GPT2Model) has no tp_plan" in result.stdout, result.stdout + result.stderr[-3000:]
    assert "Add `base_model_tp_plan` to its config (or `_tp_plan` to the model class)" in result.stdout
    assert "tensor_parallel_size=1" in result.stdout


def test_workers_get_the_patches_through_the_plugin(checkpoints):
    """A spawned worker with the start-up hook disabled is patched by vLLM's plugin loader alone (the
    ``vllm.general_plugins`` entry point; Ray workers load plugins the same way, through
    ``WorkerWrapperBase.init_worker``). (Measured by hand: with plugins off as well, ``VLLM_PLUGINS=none``,
    the same worker fails with vLLM's "Expected a cuda device, but got: cpu".)"""
    path = checkpoints("llama")
    code = f"""
        import vllm
        from vllm_transformers_backend.patches import apply_all
        from tests.helpers import Engine, PROMPTS, vllm_greedy
        if __name__ == "__main__":
            apply_all(origin="test main")  # this process only: the workers' start-up hook is off
            with Engine({str(path)!r}, "transformers", tensor_parallel_size=2) as llm:
                print("TOKENS", vllm_greedy(llm, PROMPTS[:2], 4))
    """
    env = dict(VLLM_TRANSFORMERS_BACKEND_DISABLE="1", VLLM_WORKER_MULTIPROC_METHOD="spawn")
    result = _run_python(code, **env)
    expected = [tokens[:4] for tokens in hf_greedy(path, PROMPTS[:2], 4)]
    assert f"TOKENS {expected}" in result.stdout, result.stdout + result.stderr[-3000:]


def test_gpu_parallel_runner_on_the_cpu_engine(checkpoints, tmp_path):
    """The two-GPU test's own engine runner (tests/gpu/test_gpu_parallel.py), on the CPU engine in float32:
    TP=2 through ``LLM`` and through ``AsyncLLMEngine`` (the path its PP=2 runs take) gives HF's greedy
    tokens, so a failure on the GPU host points at the GPU, not at the runner."""
    from tests.gpu.test_gpu_parallel import _run

    path = checkpoints("llama")
    prompts = [list(p) for p in PROMPTS[:2]]
    expected = hf_greedy(path, prompts, 6)
    for use_async in (False, True):
        outputs, _ = _run(path, tmp_path / f"tp2-async{use_async}.json", tp=2, pp=1, prompts=prompts, max_tokens=6,
                          engine={"device": "cpu", "dtype": "float32", "max_model_len": 256}, **{"async": use_async})
        assert [tokens for tokens, _ in outputs] == expected, f"async={use_async}"
        assert all(len(steps) == 6 for _, steps in outputs)  # top-5 logprobs recorded per token


# --- plans and styles, without an engine -----------------------------------------------------------------


def test_every_style_in_transformers_plans_is_handled():
    """Every style the installed transformers' configs use is a vLLM linear, kept whole, or refused."""
    from transformers import CONFIG_MAPPING

    from vllm_transformers_backend.layers import _STYLE_TO_LINEAR
    from vllm_transformers_backend.tp_plan import REPLICABLE_STYLES

    handled = set(_STYLE_TO_LINEAR) | REPLICABLE_STYLES | {"all_reduce"}
    used = {}
    for model_type in CONFIG_MAPPING.keys():
        try:
            cls = CONFIG_MAPPING[model_type]
        except Exception:  # a config class whose module does not import with this torch
            continue
        for style in (getattr(cls, "base_model_tp_plan", None) or {}).values():
            used.setdefault(style, model_type)
    assert used, "no tp_plan found in the installed transformers"
    assert {s: m for s, m in used.items() if s not in handled} == {}
    assert {"colwise", "rowwise"} <= set(used)


class _Scaled(nn.Module):
    """A custom module with its own weight (not an nn.Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))


class _Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.custom = _Scaled()
        self.norm = _Scaled()
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.ones(2, 4, 8))

    def get_input_embeddings(self):
        return None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def test_plan_refuses_sharding_styles_it_cannot_honour():
    from vllm_transformers_backend.layers import UnsupportedTPStyleError
    from vllm_transformers_backend.tp_plan import TPPlan

    plan = TPPlan({"proj": "colwise", "norm": "sequence_parallel", "experts.gate_up_proj": "grouped_gemm"})
    kept = plan.check_unreplaced(_Body(), _is_linear, None)
    assert kept == ["norm", "experts.gate_up_proj"]  # kept whole on every rank: same result
    with pytest.raises(UnsupportedTPStyleError, match=r"custom: 'colwise' on _Scaled, which is not an nn.Linear"):
        TPPlan({"custom": "colwise"}).check_unreplaced(_Body(), _is_linear, None)
    with pytest.raises(UnsupportedTPStyleError, match=r"'all_reduce'"):
        TPPlan({"experts": "all_reduce"}).check_unreplaced(_Body(), _is_linear, None)
    with pytest.raises(UnsupportedTPStyleError, match=r"unknown tp_plan style 'diagonal'"):
        TPPlan({"custom": "diagonal"}).check_unreplaced(_Body(), _is_linear, None)


def test_plan_lookup_tensor_entry_first():
    from vllm_transformers_backend.tp_plan import TPPlan

    plan = TPPlan({"layers.*.q_proj": "colwise", "layers.*.o_proj.weight": "rowwise", "layers.*.o_proj": "colwise"})
    assert plan.style_of("layers.3.q_proj") == "colwise"
    assert plan.style_of("layers.3.o_proj") == "rowwise"
    assert plan.style_of("layers.3.q_proj.extra") is None
    assert plan.style_of("other") is None


def test_plan_sources(monkeypatch):
    """Config plan, the body class's own _tp_plan, the top class's own (re-rooted on the body), and the
    plan of transformers' config class when vLLM loaded the config with a class of its own."""
    from vllm_transformers_backend.tp_plan import collect_tp_plan

    class Body(nn.Module):
        _tp_plan = {"layers.*.mlp.up": "colwise"}

    class Top(nn.Module):
        _tp_plan = {"model.layers.*.mlp.down": "rowwise", "lm_head": "colwise_rep"}

        def __init__(self) -> None:
            super().__init__()
            self.model = Body()

    class Config:
        model_type = "llama"
        base_model_tp_plan = {"layers.*.self_attn.q_proj": "colwise"}

    top = Top()
    plan = collect_tp_plan(top, top.model, "model", Config())
    assert plan == {"layers.*.self_attn.q_proj": "colwise", "layers.*.mlp.up": "colwise",
                    "layers.*.mlp.down": "rowwise"}

    class VllmOwnConfig:  # vLLM 0.6.2's own config classes (Granite, ...) carry no plan
        model_type = "granite"
        base_model_tp_plan = None

    plan = collect_tp_plan(top, top.model, "model", VllmOwnConfig())
    assert plan["layers.*.self_attn.o_proj"] == "rowwise" and plan["layers.*.mlp.down"] == "rowwise"


@pytest.mark.parametrize("kv_heads, tp, expected", [(1, 2, [0, 0]), (2, 4, [0, 0, 1, 1]), (1, 4, [0, 0, 0, 0])])
def test_kv_heads_replicated_when_fewer_than_ranks(monkeypatch, kv_heads, tp, expected):
    """Rank r keeps KV head r * kv_heads // tp, whole, as vLLM's QKVParallelLinear does."""
    import vllm.model_executor.layers.linear as linear

    from vllm_transformers_backend import layers

    head = 4
    weight = torch.arange(kv_heads * head, dtype=torch.float32)[:, None].repeat(1, 3)  # row i = i
    bias = torch.arange(kv_heads * head, dtype=torch.float32)
    for rank in range(tp):
        for module in (linear, layers):
            monkeypatch.setattr(module, "get_tensor_model_parallel_world_size", lambda: tp)
            monkeypatch.setattr(module, "get_tensor_model_parallel_rank", lambda rank=rank: rank)
        layer = layers.make_linear(3, kv_heads * head, True, "colwise", None, "k_proj", kv_head_size=head)
        assert isinstance(layer, layers.HFKVHeadColumnParallelLinear) and layer.output_size == kv_heads * head
        layer.weight.weight_loader(layer.weight, weight)
        layer.bias.weight_loader(layer.bias, bias)
        rows = list(range(expected[rank] * head, (expected[rank] + 1) * head))
        assert layer.weight[:, 0].tolist() == rows and layer.bias.tolist() == rows
