"""The interleaved speed comparison (benchmarks/interleaved.py) on the CPU engine: its statistics, and one
smoke run end to end (two long-lived engines, rounds in both orders, step phases, operator profiles).

What it measures is not asserted (CPU timings of a tiny model on a shared host say nothing about speed);
that every part of the instrument runs and records what it claims to, is.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import interleaved  # noqa: E402


def _round(order: str, native: float, backend: float) -> dict:
    return {"order": order, "native": {"wall_s": native, "cpu_s": native}, "backend": {"wall_s": backend, "cpu_s": backend}}


def test_ratio_statistics():
    rounds = [_round("native first" if i % 2 else "backend first", 1.0 + 0.01 * (i % 5), 1.0) for i in range(40)]
    stats = interleaved.ratio_stats(rounds, target=0.03)
    assert stats["rounds"] == 40 and stats["median"] == pytest.approx(1.02)
    low, high = stats["interval"]
    assert 1.0 <= low <= stats["median"] <= high <= 1.04
    assert stats["resolved"]  # a spread of +/-2% resolves a 3% target
    assert stats["per_order"]["native first"]["rounds"] == stats["per_order"]["backend first"]["rounds"] == 20
    assert stats["total_ratio"] == pytest.approx(sum(1.0 + 0.01 * (i % 5) for i in range(40)) / 40)
    noisy = [_round("native first", 1.0 + (0.5 if i % 2 else -0.4), 1.0) for i in range(40)]
    assert not interleaved.ratio_stats(noisy, target=0.03)["resolved"]
    assert interleaved.ratio_stats(rounds[:3], 0.03)["interval"] is None  # too few rounds for an interval


def test_order_balanced_estimate_cancels_the_position_in_the_round():
    """Whichever engine runs first in a round is 4% faster; the backend itself 1.02x native. With three times as
    many rounds in one order the pooled median is that order's; the order-balanced estimate is the engine's, and
    its stratified interval covers it."""
    rng = random.Random(1)
    rounds = []
    for i in range(80):
        noise = 1.0 + rng.uniform(-0.005, 0.005)
        if i % 4:  # native first: native 4% faster, so the ratio native/backend time drops by 1.04
            rounds.append(_round("native first", 1.0 / 1.04 * 1.02 * noise, 1.0))
        else:
            rounds.append(_round("backend first", 1.0 * 1.02 * noise, 1.0 / 1.04))
    stats = interleaved.ratio_stats(rounds, target=0.03)
    assert abs(stats["median"] - 1.02 / 1.04) < 0.006
    assert abs(stats["order_balanced"] - 1.02) < 0.004
    low, high = stats["order_balanced_interval"]
    assert low <= 1.02 <= high and high - low < 0.01
    one_order = [r for r in rounds if r["order"] == "native first"]
    assert interleaved.ratio_stats(one_order, 0.03)["order_balanced"] is None  # needs rounds in both orders


def test_bootstrap_interval_covers_the_median():
    values = [float(v) for v in range(1, 102)]
    low, high = interleaved.bootstrap_interval(values)
    assert low < 51 < high and high - low < 30


def test_decode_host_stats_pair_rounds_and_place_the_difference_in_a_phase():
    """Backend host time 5% longer than native's, all of it in ``prepare``, under round-to-round drift that both
    engines share: the paired ratio and the phase deltas find it; prefill rounds are left out."""
    rng = random.Random(1)
    rounds = []
    for i in range(40):
        drift = rng.uniform(0.7, 1.4)  # the host's speed this round, the same for both engines
        native = {"kinds": ["decode"], "steps": 10, "prepare_s": 0.01 * drift, "sample_s": 0.01 * drift}
        backend = {"kinds": ["decode"], "steps": 10, "prepare_s": 0.011 * drift, "sample_s": 0.01 * drift}
        for side in (native, backend):
            side["host_s"] = side["prepare_s"] + side["sample_s"]
        rounds.append({"order": "native first" if i % 2 else "backend first", "native": native, "backend": backend})
    rounds.append({"order": "native first", "native": {"kinds": ["prefill"], "steps": 1, "host_s": 1.0},
                   "backend": {"kinds": ["prefill"], "steps": 1, "host_s": 9.0}})
    stats = interleaved.decode_host_stats(rounds, target=0.03)
    assert stats["host_ratio"]["rounds"] == 40
    assert abs(stats["host_ratio"]["median"] - 1 / 1.05) < 0.01 and stats["host_ratio"]["resolved"]
    prepare, sample = stats["phase_ms_per_step"]["prepare"], stats["phase_ms_per_step"]["sample"]
    assert prepare["interval"][0] > 0 and 0.05 < prepare["delta"] < 0.15
    assert sample["interval"][0] <= 0 <= sample["interval"][1]


def test_median_step_host_ratio_keeps_a_rounds_slow_step_out():
    """Equal engines; in most rounds one of the backend's ten steps stalls for up to 20 steps' time (a stray
    thread): the ratio of round sums reads a slower backend, the ratio of each round's median step still says 1
    and resolves. The round entry keeps that median."""
    rng = random.Random(2)
    rounds = []
    for i in range(60):
        drift = rng.uniform(0.8, 1.25)
        native_steps = [0.002 * drift * rng.uniform(0.99, 1.01) for _ in range(10)]
        backend_steps = [0.002 * drift * rng.uniform(0.99, 1.01) for _ in range(10)]
        if i % 4:
            backend_steps[rng.randrange(10)] += rng.uniform(0.002, 0.04) * drift
        entries = [interleaved._round_entry({"wall_s": sum(st), "cpu_s": sum(st), "steps": [
            {"kind": "decode", "host": h, "prepare": h} for h in st]}) for st in (native_steps, backend_steps)]
        rounds.append({"order": "native first" if i % 2 else "backend first", "native": entries[0],
                       "backend": entries[1]})
    assert rounds[1]["backend"]["host_step_s"] < rounds[1]["backend"]["host_s"] / 9
    stats = interleaved.decode_host_stats(rounds, target=0.03)
    summed, step = stats["host_ratio"], stats["host_step_ratio"]
    assert step["rounds"] == 60 and abs(step["median"] - 1) < 0.01 and step["resolved"]
    assert summed["median"] < 0.9 and summed["interval"][1] < 0.95


def test_start_stats_weigh_both_orders_alike():
    """Whichever engine starts second takes 1.2x longer; the backend itself 1.05x. Three pairs with the backend
    second and one with it first: the plain median is the order's, the order-balanced estimate the engine's."""
    def pair(first: str, native: float, backend: float) -> dict:
        return {"first": first, "vllm": {"start_s": native, "start_phases": {"load_model": 1.0}},
                "transformers": {"start_s": backend, "start_phases": {"load_model": 1.5}}}

    entries = [pair("vllm", 20.0, 20.0 * 1.05 * 1.2)] * 3 + [pair("transformers", 20.0 * 1.2, 20.0 * 1.05)]
    stats = interleaved.start_stats(entries)
    assert stats["pairs"] == 4 and stats["per_first"]["native first"]["pairs"] == 3
    assert abs(stats["median"] - 1.26) < 1e-6
    assert abs(stats["order_balanced"] - 1.05) < 1e-6
    assert stats["phase_delta_s"] == {"load_model": 0.5}


class _PassEngine:
    """Stands in for one engine_worker child: each pass takes ``steps`` decode steps; like the real worker, ``add``
    refuses while requests of an earlier pass are unfinished."""

    def __init__(self, steps: int, seed: int) -> None:
        self.steps, self.left, self.adds, self.aborted = steps, 0, 0, 0
        self.rng = random.Random(seed)  # step times that vary, so no interval resolves and rounds run to the cap

    def request(self, message: dict, timeout=None) -> dict:
        cmd = message["cmd"]
        if cmd == "warmup":
            return {"warmup_s": 0.0}
        if cmd == "add":
            if self.left:
                raise interleaved.ChildError("requests of an earlier pass are still running: abort them first")
            self.left, self.adds = self.steps, self.adds + 1
            return {"add_s": 0.0, "requests": 2}
        if cmd == "round":
            k = min(message["steps"], self.left)
            self.left -= k
            t = self.rng.uniform(0.5e-3, 1.5e-3)
            step = {"kind": "decode", "seqs": 2, "tokens": 2, "generated": 2, "wall": t, "cpu": t, "host": t / 2}
            return {"wall_s": t * k, "cpu_s": t * k, "steps": [dict(step) for _ in range(k)],
                    "done": self.left == 0, "gc_s": 0.0}
        assert cmd == "abort", cmd
        aborted, self.left = self.left, 0
        self.aborted += aborted
        return {"aborted": aborted}


def test_a_pass_one_engine_finishes_first_is_aborted_before_the_next(tmp_path):
    """Engines whose passes end at different steps (on GPUs: different KV block counts with a workload that
    overflows the cache, so they preempt at different steps): the pass ends when one is done, the other's rest
    is aborted, and the next pass starts on both. Before the fix the second pass's add failed."""
    args = interleaved.parse_args(["--device", "cpu", "--smoke", "--model", "tiny", "--workloads", "small",
                                   "--out", str(tmp_path), "--round-s", "0", "--min-rounds", "4", "--max-rounds", "8",
                                   "--target", "0.0001"])
    comparison = interleaved.Comparison(args, interleaved.time.monotonic())
    native, backend = _PassEngine(steps=3, seed=1), _PassEngine(steps=5, seed=2)
    comparison.children = {"vllm": native, "transformers": backend}
    comparison.invocation["engines"] = {"vllm": {"engine": {"num_gpu_blocks": 100, "block_size": 16}},
                                        "transformers": {"engine": {"num_gpu_blocks": 99, "block_size": 16}}}
    workload = interleaved.ROUND_WORKLOADS["smoke"]["small"]
    result = comparison.run_workload(workload, share_s=60.0, offset=0)
    # one step a round (--round-s 0): each pass pairs two rounds, then native's third finishes it while the
    # backend has two steps left (that round is left out: the engines' "done" differ); 8 paired rounds take
    # four passes, the last cut at the cap after its second round (both engines' rest aborted)
    assert result["stop"] == "max rounds" and len(result["rounds"]) == 8
    assert native.adds == backend.adds == len(result["passes"]) == 4
    assert result["mismatched_rounds"] == 3 and not any(p["complete"] for p in result["passes"])
    assert backend.aborted == 3 * 2 + 3 and native.aborted == 1
    assert native.left == backend.left == 0 and result["kv_overflow"] is None  # one block each: no overflow


def test_kv_overflow_names_the_workload_and_the_common_block_count():
    w = interleaved.Workload("prefill", 256, 1024, 32)
    engines = {"vllm": {"num_gpu_blocks": 8424, "block_size": 16}, "transformers": {"num_gpu_blocks": 8310, "block_size": 16}}
    text = interleaved.kv_overflow(w, engines)
    assert "256 x 1056" in text and "16896 KV blocks" in text and "--num-gpu-blocks 8310" in text
    assert interleaved.kv_overflow(interleaved.Workload("long", 4, 8192, 64), engines) is None  # 2064 blocks fit
    same = {impl: {"num_gpu_blocks": 8310, "block_size": 16} for impl in engines}
    assert interleaved.kv_overflow(w, same) is None  # equal caches preempt alike
    # 1,024 prompts of 256 tokens with at most 256 running: 4,096 blocks, not 16,384
    many = interleaved.Workload("decode1024", 1024, 128, 128)
    assert interleaved.kv_overflow(many, {i: {**e, "max_num_seqs": 256} for i, e in engines.items()}) is None
    assert "256 x 256 tokens" in interleaved.kv_overflow(many, {"vllm": {"num_gpu_blocks": 4100, "max_num_seqs": 256},
                                                                "transformers": {"num_gpu_blocks": 4000}})


def test_profile_segments_at_the_reserved_peak_name_the_code_that_made_them():
    """forward_peak.py --segments reads the allocator's trace (torch.cuda.memory._snapshot's device_traces, whose
    events are only recorded on CUDA): the segments held when reservation peaked, each with the innermost frames
    outside torch that allocated it. Here: a free of a segment from before the window is ignored, a segment made
    after the reserved peak fell is not listed, and torch's own frames are skipped ("?" where only they made it)."""
    import forward_peak

    mib = 2 ** 20

    def frames(*names):
        return [{"filename": f"/site/{n.split(':')[0]}", "line": int(n.split(':')[1]), "name": "f"} for n in names]

    trace = [
        {"action": "segment_free", "addr": 9, "size": 64 * mib},  # from before the window: ignored
        {"action": "segment_alloc", "addr": 1, "size": 20 * mib, "frames": frames("torch/nn/functional.py:1", "fusion.py:406")},
        {"action": "alloc", "addr": 1, "size": 12 * mib, "frames": []},
        {"action": "segment_alloc", "addr": 2, "size": 228 * mib, "frames": frames("base.py:411", "worker.py:9", "llm.py:3", "x.py:1")},
        {"action": "segment_alloc", "addr": 3, "size": 2 * mib, "frames": frames("torch/cuda/x.py:4")},
        {"action": "segment_free", "addr": 3, "size": 2 * mib},
        {"action": "segment_free", "addr": 2, "size": 228 * mib},
        {"action": "segment_alloc", "addr": 4, "size": 100 * mib, "frames": frames("body_forward.py:122")},
    ]
    out = forward_peak.new_segments(trace)
    assert out["reserved_peak_mib"] == 250
    assert [(s["mib"], s["where"]) for s in out["segments"]] == [
        (228, "base.py:411 f < worker.py:9 f < llm.py:3 f"), (20, "fusion.py:406 f"), (2, "?")]
    assert forward_peak.new_segments([]) == {"reserved_peak_mib": 0.0, "segments": []}


def test_a_new_segment_beside_a_held_one_as_large_names_what_sat_in_it():
    """forward_peak.py --segments: where the allocator made a segment although it held a partly free one at least
    as large, the blocks that occupied that one (and its largest free gap) are listed with the code that made
    them; a segment made when none held was large enough, or when those were full, is no miss (synthetic trace,
    as above)."""
    import forward_peak

    mib = 2 ** 20

    def frames(name):
        return [{"filename": f"/site/{name.split(':')[0]}", "line": int(name.split(':')[1]), "name": "f"}]

    act, qkv = frames("body_forward.py:122"), frames("layers.py:42")
    trace = [
        {"action": "segment_alloc", "addr": 0, "size": 228 * mib, "frames": act},  # none held: no miss
        {"action": "alloc", "addr": 0, "size": 228 * mib, "frames": act},
        {"action": "segment_alloc", "addr": 1000 * mib, "size": 98 * mib, "frames": qkv},  # the 228 is full
        {"action": "alloc", "addr": 1000 * mib, "size": 98 * mib, "frames": qkv},
        {"action": "free_requested", "addr": 0, "size": 228 * mib},
        {"action": "free_completed", "addr": 0, "size": 228 * mib},
        {"action": "free_requested", "addr": 1000 * mib, "size": 98 * mib},
        {"action": "free_completed", "addr": 1000 * mib, "size": 98 * mib},
        {"action": "alloc", "addr": 20 * mib, "size": 66 * mib, "frames": qkv},  # best fit put it in the 228
        {"action": "segment_alloc", "addr": 2000 * mib, "size": 228 * mib, "frames": act},
        {"action": "alloc", "addr": 2000 * mib, "size": 228 * mib, "frames": act},
    ]
    (miss,) = forward_peak.segment_misses(trace)
    assert (miss["segment_mib"], miss["request_mib"], miss["where"]) == (228, 228, "body_forward.py:122 f")
    (held,) = miss["blocked"]  # the 98 MiB segment is smaller than the request: not listed
    assert held == {"segment_mib": 228, "largest_gap_mib": 228 - 86,
                    "live": [{"mib": 66, "where": "layers.py:42 f"}]}
    assert forward_peak.segment_misses(trace[:4]) == []


def test_smoke_run_end_to_end(checkpoints, tmp_path):
    """Both engines on a tiny Qwen2 (q/k/v biases, tied head), the smoke workloads, profiles at the end."""
    path = checkpoints("qwen2")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "interleaved.py"), "--device", "cpu", "--smoke", "--checkpoint",
           str(path), "--model", "tiny-qwen2", "--workloads", "decode,prefill", "--profile", "--profile-steps", "1",
           "--out", str(tmp_path), "--quiet", "--budget-s", "240"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "interleaved-tiny-qwen2-cpu.json").read_text())
    (inv,) = data["invocations"]
    assert inv["engines"]["vllm"]["model_class"] == "Qwen2ForCausalLM"
    assert inv["engines"]["transformers"]["model_class"] == "TransformersForCausalLM"
    assert inv["engines"]["vllm"]["weight_bytes"] == inv["engines"]["transformers"]["weight_bytes"]
    assert inv["host"]["git_commit"] and inv["command"].endswith("--budget-s 240")
    for impl in ("vllm", "transformers"):  # where LLM()'s time went: each phase inside the whole start
        phases = inv["engines"][impl]["start_phases"]
        assert {"load_model", "profile_run", "initialize_cache"} <= set(phases)
        assert 0 < sum(phases.values()) <= inv["engines"][impl]["start_s"]
    for name in ("decode", "prefill"):
        result = inv["workloads"][name]
        rounds = result["rounds"]
        assert len(rounds) >= 4 and result["mismatched_rounds"] == 0
        assert {r["order"] for r in rounds} == {"native first", "backend first"}
        for r in rounds:
            for side in ("native", "backend"):
                assert r[side]["cpu_s"] > 0 and r[side]["wall_s"] > 0 and 1 <= r[side]["steps"] <= r["k"]
                assert r[side]["gc_s"] >= 0  # --gc frozen (the default): collected before the round, untimed
            assert r["native"]["tokens"] == r["backend"]["tokens"] and r["ratio"] > 0
        assert result["stats"]["metric"] == "cpu" and result["stats"]["median"] > 0
        for impl in ("vllm", "transformers"):
            steps = result["steps"][impl]
            assert {"prefill", "decode"} <= set(steps)
            decode = steps["decode"]
            assert decode["forward_ms"] > 0 and decode["schedule_ms"] > 0 and decode["sample_ms"] > 0
            assert decode["device_forward_ms"] is None  # the CPU engine: host timers only
        assert all(v > 0 for v in result["ttft_s"].values())
        host = result["decode_host"]  # decode rounds paired: host ratio and per-phase differences
        assert host["host_ratio"]["rounds"] >= 1 and host["host_ratio"]["median"] > 0
        assert host["host_step_ratio"]["rounds"] == host["host_ratio"]["rounds"]
        assert all(0 < r[side]["host_step_s"] <= r[side]["host_s"] for r in result["rounds"]
                   for side in ("native", "backend") if r[side].get("kinds") == ["decode"])
        if host["host_ratio"]["rounds"] >= 4:
            assert {"prepare", "forward", "sample", "host"} <= set(host["phase_ms_per_step"])
    profiles = {(p["impl"], p["label"]): p for p in inv["profiles"]}
    assert {impl for impl, _ in profiles} == {"vllm", "transformers"} and len(profiles) >= 4
    assert all(p["host_ops_per_step"] > 0 and p["host_ops"] for p in profiles.values())
    assert "backend/native" in proc.stdout and "| decode |" in proc.stdout
    assert "Collection before each round (untimed; --gc frozen)" in proc.stdout


def test_interleaved_control_runs_native_in_both_slots(tmp_path, checkpoints):
    """--control (an A/A run): both children build native vLLM's class; results go to their own file."""
    path = checkpoints("qwen2")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "interleaved.py"), "--device", "cpu", "--smoke", "--checkpoint",
           str(path), "--model", "tiny-qwen2", "--workloads", "small", "--control", "--out", str(tmp_path), "--quiet",
           "--budget-s", "180", "--start-pairs", "1", "--num-gpu-blocks", "40"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "interleaved-tiny-qwen2-cpu.json").exists()
    (inv,) = json.loads((tmp_path / "interleaved-tiny-qwen2-cpu-control.json").read_text())["invocations"]
    assert {e["model_class"] for e in inv["engines"].values()} == {"Qwen2ForCausalLM"}
    assert inv["options"]["control"] and len(inv["workloads"]["small"]["rounds"]) >= 4
    assert "A/A control" in proc.stdout
    # --num-gpu-blocks: both caches set to it; what each profile gave is kept beside it
    for e in inv["engines"].values():
        assert e["engine"]["num_gpu_blocks"] == 40 and e["engine"]["profiled_gpu_blocks"] > 40
    assert "40 (profile: " in proc.stdout
    # --start-pairs 1: one more pair of starts in fresh processes, the other engine first
    pairs = inv["start_pairs"]
    assert [p["first"] for p in pairs] == ["vllm", "transformers"] and [p["main"] for p in pairs] == [True, False]
    assert all(p[i]["start_s"] > 0 and "load_model" in p[i]["start_phases"] for p in pairs for i in ("vllm", "transformers"))
    assert inv["start_stats"]["pairs"] == 2 and "order_balanced" in inv["start_stats"]
    assert pairs[1]["pair_s"] > max(pairs[1][i]["start_s"] for i in ("vllm", "transformers"))  # sizes later pairs
    assert "Engine start over 2 pairs" in proc.stdout


def test_step_timer_cuda_path_with_stand_in_events(checkpoints, monkeypatch):
    """The CUDA branch of the step timer (device events around forward/logits/sample, the explicit wait before
    sampling, host = wall - wait), wired on a CPU engine with stand-in events: it must run the first time on
    the GPU host."""
    import time

    import torch
    from vllm import SamplingParams

    from step_timer import PHASES, StepTimer, summarize
    from tests.helpers import Engine

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.t = None

        def record(self) -> None:
            self.t = time.perf_counter()

        def elapsed_time(self, end: "Event") -> float:
            return (end.t - self.t) * 1000.0  # milliseconds, as CUDA events

    syncs = []
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1))
    with Engine(checkpoints("llama")) as llm:
        engine = llm.llm_engine
        timer = StepTimer(engine, "cuda")
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        for i, prompt in enumerate([[1, 2, 3], [4, 5, 6, 7]]):
            engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
        while engine.has_unfinished_requests():
            timer.step()
        records = timer.take()
    assert [r["kind"] for r in records] == ["prefill", "decode", "decode", "decode"]
    for r in records:
        assert r["device_forward"] > 0 and r["device_logits"] > 0 and r["device_sample"] > 0
        assert r["wait"] >= 0 and r["host"] == pytest.approx(r["wall"] - r["wait"])
        assert sum(r.get(p, 0.0) for p in PHASES) == pytest.approx(r["wall"])  # exclusive phases add up
    assert len(syncs) >= len(records)  # one wait per step, plus the resolve
    summary = summarize(records)
    assert summary["decode"]["steps"] == 3 and summary["decode"]["device_forward_ms"] > 0


def test_engines_are_pinned_to_the_same_cores_on_cuda_only():
    cores = sorted(os.sched_getaffinity(0))
    assert interleaved.engine_cpus(0, "cuda") == [] and interleaved.engine_cpus(None, "cpu") == []
    assert interleaved.engine_cpus(None, "cuda") == (cores[:4] if len(cores) > 4 else [])
    assert interleaved.engine_cpus(1, "cuda") == (cores[:1] if len(cores) > 1 else [])


def test_forward_peak_the_lean_body_holds_no_more_than_hf_body(checkpoints, tmp_path):
    """benchmarks/forward_peak.py end to end on the CPU engine, and what it found: the lean body forward's
    prefill peak is no higher than HF's body forward's (it held each layer's q/k/v, views of the whole qkv
    output, through the MLP: +30% on a 32-layer narrow Llama, 15.16 against 12.24 MiB at 1000 tokens)."""
    out = tmp_path / "peak.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "forward_peak.py"), "--checkpoint", str(checkpoints("llama")),
           "--tokens", "160", "--seqs", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = json.loads(out.read_text())
    peaks = {row["variant"]: row["peak_mib"] for row in run["rows"]}
    assert set(peaks) == {"native", "backend", "backend, body_forward off"} and all(v > 0 for v in peaks.values())
    assert peaks["backend"] <= peaks["backend, body_forward off"] * 1.001, peaks
    assert "| native |" in proc.stdout


def test_forward_peak_runs_each_baseline_folder_as_its_own_variant(checkpoints, tmp_path):
    """``--baseline-path`` repeated: one more backend row per folder, each running the package under its folder
    (the row records which package ran), after native's and the backend's own."""
    import shutil

    folders = []
    for name in ("first", "second"):
        package = tmp_path / name / "vllm_transformers_backend"
        shutil.copytree(ROOT / "vllm_transformers_backend", package, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "patches", package / "patches", ignore=shutil.ignore_patterns("__pycache__"))
        folders.append(tmp_path / name)
    out = tmp_path / "peak.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "forward_peak.py"), "--checkpoint", str(checkpoints("llama")),
           "--tokens", "64", "--no-body-off", "--out", str(out)]
    for folder in folders:
        cmd += ["--baseline-path", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = json.loads(out.read_text())
    ran = {row["variant"]: Path(row["package"]) for row in run["rows"]}
    assert list(ran) == ["native", "backend", f"backend at {folders[0]}", f"backend at {folders[1]}"], list(ran)
    for folder in folders:
        assert ran[f"backend at {folder}"] == (folder / "vllm_transformers_backend").resolve()
    assert ran["backend"] not in {(f / "vllm_transformers_backend").resolve() for f in folders}
    assert all(row["peak_mib"] > 0 for row in run["rows"])
