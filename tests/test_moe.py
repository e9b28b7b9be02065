"""Mixture-of-experts models on the CPU (``moe.py`` and its helpers), against HF's own code.

Block level, no engine (milliseconds per case), a sweep of shapes for every MoE architecture the installed
transformers has (4.x per-expert modules, 5.x packed experts; Qwen2-MoE and OLMoE built with eager attention
here on 4.x, where the release gives them no attention interface): the block with its experts as vLLM's ``FusedMoE``
(the GPU path, its kernel replaced by the same arithmetic in PyTorch) and HF's block with the other checkpoint
layout equal HF's block; the tensor-parallel split of both paths sums back to HF's experts; the probes refuse
what the kernel cannot compute; the expert loader names missing, doubled and misshapen tensors.

Engine level (vLLM's CPU engine, float32, greedy, mixed prompt lengths with a one-token prompt): the four
architectures equal HF ``generate`` token for token through HF's expert code (per-expert checkpoint) and
through the FusedMoE layout (packed checkpoint); TP=2 for both paths (Qwen2-MoE and OLMoE on 4.x through their
routed SDPA classes, legacy_attention.py). ``VTB_MOE_FULL=1`` adds the whole matrix (every architecture x path x
checkpoint layout x TP=1/2 and more shapes), which the default run samples to stay within its time budget.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from tests.helpers import (MOE_ARCHITECTURES, PROMPTS, Engine, build_moe_checkpoint, hf_greedy, interface_supported,
                           moe_config, packed_experts, per_expert_tensors, require_architecture, transformers_version,
                           vllm_model)
from tests.test_tensor_parallel import _greedy, spawned_workers  # noqa: F401  (a fixture, used by TP cases)
from vllm_transformers_backend import moe, moe_layers, tp_plan
from vllm_transformers_backend.moe_weights import ExpertSlots, ExpertsShape, ExpertTensors
from vllm_transformers_backend.weights import WeightsLoadingError

MAX_TOKENS = 10
MOE_PROMPTS = PROMPTS + [[7]]  # mixed lengths, a one-token prompt among them
FULL = os.environ.get("VTB_MOE_FULL") == "1"
HIDDEN = 32


def _v5() -> bool:
    return transformers_version().major >= 5


# --- block level ---------------------------------------------------------------------------------------

#: (architecture, shape): experts count, top-k, norm_topk_prob, intermediate size; Qwen2-MoE has its gated
#: shared expert in every case, the others none; Mixtral always renormalises (no flag).
BLOCK_SWEEP = [(arch, dict(experts=e, top_k=k, norm=n, inter=i)) for arch in MOE_ARCHITECTURES
               for e, k, n, i in ((4, 2, False, 16), (8, 1, True, 24), (8, 3, False, 8), (3, 3, True, 16))]


def _hf_model(arch: str, seed: int = 0, **shape):
    import transformers

    require_architecture(arch)
    config = moe_config(arch, layers=1, hidden_size=HIDDEN, head_dim=HIDDEN // 2, **shape)
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _block_output(module, x):
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


def _load(consumer: ExpertTensors, tensors) -> int:
    taken = sum(consumer.take(key, [key], value) for key, value in tensors.items())
    assert consumer.unfilled() == []
    return taken


def _expert_names(block) -> tuple:
    return block.layout.names if block.layout.kind == "per-expert" else ("gate_proj", "up_proj", "down_proj")


def _layouts(model, block):
    """Both checkpoint layouts of the model's expert tensors (built test-side from its state dict)."""
    own = {k: v.clone() for k, v in model.state_dict().items() if ".experts." in k}
    if block.layout.kind == "per-expert":
        return {"per-expert": own, "packed": packed_experts(own)}
    return {"per-expert": per_expert_tensors(own, _expert_names(block)), "packed": own}


def _prepare(model, mode: str, tp_size: int = 1, monkeypatch=None, **build) -> "moe.MoEPlan":
    """The backend's MoE step on ``model``'s body with ``VLLM_TRANSFORMERS_BACKEND_MOE=mode`` on the CPU (``fused``:
    the FusedMoE pass with the kernel's arithmetic in PyTorch)."""
    from vllm_transformers_backend.passes import Build

    monkeypatch.setenv(moe.MOE_ENV, mode)
    plan, report = moe.prepare_moe(Build(model.model, torch.device("cpu"), tp_size=tp_size, dtype=torch.float32,
                                         **build), enforce_eager=True)
    assert report.name == "moe"
    return plan


def _ids(cases) -> list:
    return [f"{a}-{'-'.join(map(str, s.values()))}" for a, s in cases]


@pytest.mark.parametrize("arch, shape", BLOCK_SWEEP, ids=_ids(BLOCK_SWEEP))
def test_block_paths_equal_hf(arch, shape, monkeypatch):
    """The FusedMoE path (both checkpoint layouts) and HF's code loading the other layout give HF's output."""
    model = _hf_model(arch, **shape)
    [block] = moe.find_moe_blocks(model.model)
    assert block.layout.kind == ("packed" if _v5() else "per-expert")
    assert (block.shared_attr is not None) == (arch == "qwen2_moe")
    x = torch.randn(1, 13, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _block_output(block.module, x)
        for layout, tensors in _layouts(model, block).items():
            for mode in ("fused", "hf"):
                if mode == "hf" and layout == block.layout.kind:
                    continue  # HF's code with its own layout: what `expected` is
                copy_ = copy.deepcopy(model)
                plan = _prepare(copy_, mode, monkeypatch=monkeypatch)
                assert [p.path for p in plan.plans] == [mode], plan.plans[0].reason
                assert _load(plan.weight_consumer(copy_), tensors) == len(tensors)
                got = _block_output(plan.plans[0].block.module, x)
                assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (layout, mode)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_tensor_parallel_split_sums_to_hf(arch, monkeypatch):
    """Each rank's slice of the intermediate size (FusedMoE's, and HF's packed experts split for its own code)
    computes a partial sum; the ranks' partial sums add up to HF's experts (the all-reduce made a plain sum)."""
    import vllm.distributed

    model = _hf_model(arch, experts=4, top_k=2, inter=16)
    [block] = moe.find_moe_blocks(model.model)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, HIDDEN, generator=gen)
    weights, ids = torch.softmax(torch.randn(9, 4, generator=gen), dim=-1).topk(2, dim=-1)
    experts = block.module._modules[block.experts_attr]
    with torch.no_grad():
        if block.layout.kind == "packed":
            expected = experts(x, ids, weights)
        else:  # HF's per-expert modules, weighted and summed as HF's loop does
            expected = sum(weights[:, k, None] * torch.stack([experts[int(e)](x[t]) for t, e in enumerate(ids[:, k])])
                           for k in range(2))
    monkeypatch.setattr(moe_layers, "tensor_model_parallel_all_reduce", lambda t: t)
    modes = ["fused"] + (["hf"] if block.layout.kind == "packed" else [])  # 4.x per-expert linears: the tp_plan
    for mode in modes:
        total = 0
        for rank in range(2):
            monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_rank", lambda rank=rank: rank)
            copy_ = copy.deepcopy(model)
            plan = _prepare(copy_, mode, tp_size=2, monkeypatch=monkeypatch)
            sharded = plan.plans[0].block.module._modules[block.experts_attr]
            for name, param in sharded.named_parameters():
                if param.is_meta:
                    sharded._parameters[name] = torch.nn.Parameter(torch.empty_like(param, device="cpu"),
                                                                   requires_grad=False)
            _load(plan.weight_consumer(copy_), _layouts(model, block)["per-expert"])
            with torch.no_grad():
                total = total + sharded(x, ids, weights)
        assert torch.allclose(total, expected, atol=1e-5, rtol=1e-4), mode


def test_blocks_are_found_by_structure_not_name():
    """A custom block (own class names, Mixtral's w1/w3/w2 experts, a router called ``router``) is an MoE block;
    a list of MLPs without a router is not."""
    from torch import nn

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w3 = nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False)
            self.w2 = nn.Linear(4, 8, bias=False)

    class Block(nn.Module):
        def __init__(self, router=True):
            super().__init__()
            self.experts = nn.ModuleList([Expert() for _ in range(3)])
            if router:
                self.router = nn.Linear(8, 3, bias=False)

    body = nn.Module()
    body.layers = nn.ModuleList([Block(), Block(router=False)])
    [found] = moe.find_moe_blocks(body)
    assert (found.qualname, found.experts_attr, found.router_attr) == ("layers.0", "experts", "router")
    assert found.layout.kind == "per-expert" and found.layout.names == ("w1", "w3", "w2")
    assert found.layout.shape == ExpertsShape(3, 8, 4)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_probe_refuses_what_the_kernel_cannot_compute(arch, monkeypatch):
    """vLLM's kernel multiplies by SiLU: experts with another activation keep HF's code, with the reason (the
    pass's report counts the block as kept, with the same reason)."""
    from vllm_transformers_backend.passes import Build

    model = _hf_model(arch, hidden_act="gelu")
    monkeypatch.setenv(moe.MOE_ENV, "fused")
    moe_plan, report = moe.prepare_moe(Build(model.model, torch.device("cpu")), enforce_eager=True)
    [plan] = moe_plan.plans
    assert plan.path == "hf" and "silu" in plan.reason, plan.reason
    assert (report.status, report.sites, report.replaced, list(report.kept)) == ("on", 1, 0, [plan.reason])


def test_probe_refuses_an_unknown_routing(monkeypatch):
    """A 4.x block whose forward routes in a way the backend does not write out (sigmoid scores) keeps HF's code."""
    if _v5():
        pytest.skip("transformers 5 blocks hand their router's own choices to the experts: nothing is written out")
    model = _hf_model("qwen3_moe")
    [block] = moe.find_moe_blocks(model.model)
    monkeypatch.setattr(torch.nn.functional, "softmax", lambda t, dim=-1, dtype=None: torch.sigmoid(t.to(dtype)))
    spec, problem = moe.qualify_for_fused(block)
    assert spec is None and "none of the routings" in problem, problem


def test_hf_expert_loop_under_cuda_graphs_is_refused(monkeypatch):
    """HF's expert loop asks the device which experts were chosen: where vLLM captures CUDA graphs it needs
    enforce_eager, and the load says so."""
    from vllm_transformers_backend import devices

    model = _hf_model("mixtral")
    monkeypatch.setattr(devices, "captures_graphs", lambda device: True)
    monkeypatch.setenv(moe.MOE_ENV, "hf")
    from vllm_transformers_backend.passes import Build

    with pytest.raises(moe.MoEError, match="enforce_eager=True"):
        moe.prepare_moe(Build(model.model, torch.device("cpu")), enforce_eager=False)
    monkeypatch.setenv(moe.MOE_ENV, "sometimes")
    with pytest.raises(moe.MoEError, match="expected one of auto, hf, fused"):
        moe.moe_mode()


def test_the_fused_moe_pass_is_a_speed_pass(monkeypatch):
    """doctor lists the pass with its switch; it runs before the linear swap; each setting of its switch gives
    its report line (off, n/a where the kernel does not run, on with what it replaced)."""
    from vllm_transformers_backend import envs
    from vllm_transformers_backend.passes import Build, speed_passes

    [moe_pass] = [p for p in speed_passes() if p.name == "moe"]
    assert moe_pass.switches == (moe.MOE_ENV,) and moe_pass.before_linears and "FusedMoE" in moe_pass.summary
    assert speed_passes()[0].name == "moe"  # first: before the linears are swapped
    for value, mode in (("", "auto"), ("0", "hf"), ("off", "hf"), ("fused", "fused")):
        monkeypatch.setenv(moe.MOE_ENV, value)
        assert envs.VLLM_TRANSFORMERS_BACKEND_MOE == mode
    reports = {}
    for mode in ("hf", "auto", "fused"):
        monkeypatch.setenv(moe.MOE_ENV, mode)
        reports[mode] = moe.prepare_moe(Build(_hf_model("mixtral").model, torch.device("cpu")), enforce_eager=True)[1]
    assert reports["hf"].line() == f"speed pass moe: off ({moe.MOE_ENV}=hf)"
    assert reports["auto"].line() == "speed pass moe: n/a (vLLM's fused MoE kernel does not run on this device)"
    assert reports["fused"].line().startswith("speed pass moe: 1 of 1 replaced: MixtralBlockSparseTop2MLP experts "
                                              "and routing -> vLLM FusedMoE") or _v5(), reports["fused"].line()
    assert (reports["fused"].sites, reports["fused"].replaced) == (1, 1)


def test_expert_loader_names_missing_doubled_and_misshapen_tensors():
    shape = ExpertsShape(num_experts=2, hidden_size=4, intermediate_size=3)
    consumer = ExpertTensors([ExpertSlots("model.layers.0.mlp.experts", shape)])
    key = "model.layers.0.mlp.experts.{}.{}.weight"
    assert consumer.take(key.format(0, "gate_proj"), [key.format(0, "gate_proj")], (3, 4))
    assert not consumer.take("model.layers.0.mlp.gate.weight", ["model.layers.0.mlp.gate.weight"], (2, 4))
    assert consumer.unfilled() == ["model.layers.0.mlp.experts: expert 0 up/down",
                                   "model.layers.0.mlp.experts: expert 1 gate/up/down"]
    with pytest.raises(WeightsLoadingError, match=r"expert 0's gate projection .* comes twice .* both the per-expert "
                                                  "and the packed layout"):
        consumer.take("model.layers.0.mlp.experts.gate_up_proj", ["model.layers.0.mlp.experts.gate_up_proj"], (2, 6, 4))
    with pytest.raises(WeightsLoadingError, match=r"\(4, 4\) does not fit expert 1's up projection .* \(3, 4\)"):
        consumer.take(key.format(1, "w3"), [key.format(1, "w3")], (4, 4))
    with pytest.raises(WeightsLoadingError, match="is for expert 5, but .* has 2 experts"):
        consumer.take(key.format(5, "w2"), [key.format(5, "w2")], (4, 3))


# --- check ------------------------------------------------------------------------------------------------


def _report(capsys, path, tp=1):
    import json

    from vllm_transformers_backend import check

    code = check.main(str(path), tp=tp, as_json=True)
    return code, json.loads(capsys.readouterr().out)


def _finding(report, name):
    return next(f for f in report["findings"] if f["check"] == name)


def test_check_names_the_moe_path_and_the_checkpoint_layout(tmp_path, capsys):
    arch = "qwen2_moe" if _v5() else "mixtral"
    require_architecture(arch)
    path = build_moe_checkpoint(arch, tmp_path / "packed", packed=True)
    tp = 2 if tp_plan.config_plan(moe_config(arch), "base_model_tp_plan") else 1  # 4.48's Mixtral has none
    code, report = _report(capsys, path, tp=tp)
    assert code == 0, report["findings"]
    moe_finding = _finding(report, "mixture of experts")
    assert moe_finding["status"] == "ok"
    assert "on CUDA one vLLM FusedMoE per block fed with HF's routing" in moe_finding["detail"]
    assert ("at TP=2 each rank holds 1/2 of every expert's intermediate size" in moe_finding["detail"]) == (tp == 2)
    [row] = report["moe_blocks"]
    assert row["fused"] and row["num_experts"] == 4 and row["layout"] == ("packed" if _v5() else "per-expert")
    assert ("hands the experts its top-2" if _v5() else "softmax -> top-2 -> renormalised") in row["routing"]
    assert "packed in the checkpoint" in _finding(report, "checkpoint keys")["detail"]
    code, report = _report(capsys, path, tp=3)  # 64 % 3
    assert code == 1
    assert "intermediate size 64 is not divisible by TP=3" in _finding(report, "mixture of experts")["detail"]


def test_check_reports_missing_and_misshapen_expert_tensors(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    require_architecture("qwen3_moe")
    path = build_moe_checkpoint("qwen3_moe", tmp_path / "q3")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    tensors["model.layers.0.mlp.experts.0.down_proj.weight"] = torch.zeros(128, 63)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    code, report = _report(capsys, path)
    assert code == 1
    assert "model.layers.1.mlp.experts: expert 2 up" in report["checkpoint"]["missing"]
    assert any("(128, 63) does not fit expert 0's down projection" in m for m in report["checkpoint"]["shape_mismatch"])


# --- engine level -------------------------------------------------------------------------------------------


def _require_engine(arch: str, path) -> bool:
    """False (after asserting the clear error) where the release gives the architecture no attention interface."""
    require_architecture(arch)
    if interface_supported(arch):
        return True
    with pytest.raises(Exception, match="does not support the Transformers attention interface"):
        with Engine(path, "transformers"):
            pass
    return False


def _engine_tokens(path, mode, monkeypatch, tp: int = 1):
    monkeypatch.setenv(moe.MOE_ENV, mode)  # read at model construction (spawned workers inherit it)
    expected = {"fused" if mode == "fused" else "hf"}

    def paths_taken(llm):  # the driver worker (rank 0) runs in this process
        assert {p.path for p in vllm_model(llm).moe.plans} == expected

    return _greedy(path, prompts=MOE_PROMPTS, max_tokens=MAX_TOKENS, inspect=paths_taken, tensor_parallel_size=tp)


#: (architecture, path, checkpoint layout, TP) of the default run; VTB_MOE_FULL=1 runs every combination.
#: TP=2 of HF's code: 5.x packed experts split per rank (Qwen2-MoE, with its shared expert), 4.x per-expert
#: linears sharded by the tp_plan (Mixtral).
ENGINE_CASES = [(arch, "hf", "per-expert", 1) for arch in MOE_ARCHITECTURES] + \
               [(arch, "fused", "packed", 1) for arch in MOE_ARCHITECTURES] + \
               [("qwen2_moe" if _v5() else "mixtral", "hf", "per-expert", 2), ("qwen3_moe", "fused", "packed", 2)]
if FULL:
    ENGINE_CASES = [(a, m, c, tp) for a in MOE_ARCHITECTURES for m in ("hf", "fused") for c in ("per-expert", "packed")
                    for tp in (1, 2)]


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-checkpoints")
    cache = {}

    def get(arch: str, layout: str = "per-expert", **shape):
        key = (arch, layout, tuple(sorted(shape.items())))
        if key not in cache:
            name = f"{arch}-{layout}-" + "-".join(f"{k}{v}" for k, v in sorted(shape.items()))
            cache[key] = build_moe_checkpoint(arch, root / name, packed=layout == "packed", **shape)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def hf_tokens():
    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = hf_greedy(path, MOE_PROMPTS, MAX_TOKENS)
        return cache[path]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("arch, mode, layout, tp", ENGINE_CASES, ids=["-".join(map(str, c)) for c in ENGINE_CASES])
def test_engine_matches_hf_generate(arch, mode, layout, tp, moe_checkpoints, hf_tokens, monkeypatch, request):
    require_architecture(arch)
    reference = moe_checkpoints(arch)  # HF generates from the per-expert checkpoint of the same weights
    path = moe_checkpoints(arch, layout)
    if not _require_engine(arch, path):
        return
    if tp > 1:
        if not tp_plan.config_plan(moe_config(arch), "base_model_tp_plan"):
            pytest.skip(f"transformers {transformers_version()} declares no tp_plan for {arch}")
        request.getfixturevalue("spawned_workers")
    assert _engine_tokens(path, mode, monkeypatch, tp) == hf_tokens(reference)


#: Engine-level shape sweep (VTB_MOE_FULL=1): experts count, top-k, norm_topk_prob, both paths.
SHAPE_SWEEP = [(arch, dict(experts=e, top_k=k, norm=n)) for arch in MOE_ARCHITECTURES
               for e, k, n in ((8, 1, True), (8, 4, False), (3, 3, True))]


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="engine-level shape sweep: set VTB_MOE_FULL=1 (the block-level sweep runs always)")
@pytest.mark.parametrize("arch, shape", SHAPE_SWEEP, ids=_ids(SHAPE_SWEEP))
@pytest.mark.parametrize("mode", ["hf", "fused"])
def test_engine_shape_sweep(arch, shape, mode, moe_checkpoints, hf_tokens, monkeypatch):
    path = moe_checkpoints(arch, **shape)
    if not _require_engine(arch, path):
        return
    assert _engine_tokens(path, mode, monkeypatch) == hf_tokens(path)
