"""One long-lived vLLM engine driven step by step over a pipe (the child of ``interleaved.py``).

The parent starts one of these per implementation and keeps both alive for the whole comparison (vLLM
0.6.2 does not give device memory back in-process, and two ``LLM`` objects in one process share global
state). Commands arrive as JSON lines on ``--cmd-fd``; each gets one JSON line back on ``--result-fd``
(the engine's own log goes to stdout/stderr as usual). The worker first imports vLLM and says
``{"event": "imported"}``, then builds its engine on ``{"cmd": "start"}`` (replying with engine start time,
weight memory and settings): the parent lets both children import at once but starts the engines one after
the other (each sizes its KV cache from the device memory it sees in use).

* ``{"cmd": "warmup", "workload": {...}}``: a few prompts of the workload through ``LLM.generate``;
* ``{"cmd": "add", "workload": {...}}``: the workload's requests added (deterministic random prompts);
* ``{"cmd": "round", "steps": K}``: up to K engine steps, timed (``step_timer``), then a device sync;
  the reply holds the wall and process CPU time and every step's record (and, with ``--gc frozen``, the
  time of the untimed collection before the round);
* ``{"cmd": "abort"}``: drops the unfinished requests (a pass cut short by the time budget);
* ``{"cmd": "profile", "workload": {...}, "skip": S, "steps": N, "label": ...}``: the workload's
  requests added, S steps untimed, N steps under ``torch.profiler``, the rest aborted; replies with the
  kernel (CUDA) and operator (host) tables per step;
* ``{"cmd": "quit"}``.

Garbage collection (``--gc``): vLLM 0.6.2's block manager keeps one Python object per KV-cache block (hundreds
of thousands on a large GPU), so a full collection that falls inside a round stalls that engine for tenths of
a second. On the H200 (2026-12-04) decode rounds of identical CUDA-graph replays differed by up to 1.6x between
the engines, the excess all in vLLM's own schedule / sample / process phases. ``frozen`` (the default) moves
what is alive after the engine's start into the permanent generation (``gc.freeze``), collects before each
round outside the timing and holds collection off during it, so both engines are timed on their steps alone;
``python`` leaves Python's collector as it is (each engine's pauses wherever they fall).

CPU pinning (``--cpus``, set by the parent on CUDA): both engines on the same few cores. In the same GPU session
the host phases of one engine (vLLM's schedule / prepare / sample / process, code both run) came out 30%
slower than the other's in one invocation and 9-14% faster in the next, every phase alike: the two processes
ran on cores of different speed. The engines run one at a time, so sharing the cores costs neither.

Start phases (``start_phases`` in the ready reply): where ``LLM()``'s time went, by wrapping the worker's
``load_model`` (model build and weights), ``determine_num_available_blocks`` (the profile run) and
``initialize_cache`` (KV cache allocation and, on CUDA, graph capture, also timed alone as ``capture_model``),
so that a start-time difference between the engines can be placed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_specs import Workload, make_prompts  # noqa: E402


#: (module, class, method, phase name): the parts of ``LLM()`` timed on whichever classes this vLLM has.
START_PHASES = (
    ("vllm.worker.worker", "Worker", "load_model", "load_model"),
    ("vllm.worker.worker", "Worker", "determine_num_available_blocks", "profile_run"),
    ("vllm.worker.worker", "Worker", "initialize_cache", "initialize_cache"),
    ("vllm.worker.model_runner", "GPUModelRunnerBase", "capture_model", "capture_model"),
    ("vllm.worker.cpu_worker", "CPUWorker", "load_model", "load_model"),
    ("vllm.worker.cpu_worker", "CPUWorker", "determine_num_available_blocks", "profile_run"),
    ("vllm.worker.cpu_worker", "CPUWorker", "initialize_cache", "initialize_cache"),
)


def time_start_phases(phases: Dict[str, float], returned: Optional[Dict[str, Any]] = None) -> None:
    """Adds each start phase's wall time to ``phases`` as the engine builds (a class this vLLM lacks is skipped:
    the CPU build has no CUDA worker and the other way round); ``returned`` keeps each phase's return value
    (``profile_run``: the block counts the profile gave, before any ``num_gpu_blocks_override``)."""
    import functools
    import importlib

    for module_name, class_name, method, label in START_PHASES:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        inner = cls.__dict__.get(method)
        if inner is None or getattr(inner, "_timed_phase", None):
            continue

        def timed(*a, _inner=inner, _label=label, **k):
            t = time.perf_counter()
            try:
                value = _inner(*a, **k)
                if returned is not None:
                    returned[_label] = value
                return value
            finally:
                phases[_label] = phases.get(_label, 0.0) + time.perf_counter() - t

        functools.update_wrapper(timed, inner)
        timed._timed_phase = label
        setattr(cls, method, timed)


class EngineWorker:
    def __init__(self, args: argparse.Namespace) -> None:
        from vllm import LLM

        from bench_engines import environment, parameter_bytes
        from step_timer import StepTimer

        self.args = args
        self.device = args.device
        phases: Dict[str, float] = {}
        returned: Dict[str, Any] = {}
        time_start_phases(phases, returned)
        cpu_start = time.process_time()
        start = time.perf_counter()
        self.llm = LLM(model=str(args.checkpoint), model_impl=args.impl, dtype=args.dtype, device=args.device,
                       skip_tokenizer_init=True, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
                       max_seq_len_to_capture=args.max_model_len, max_num_seqs=args.max_num_seqs,
                       gpu_memory_utilization=args.gpu_memory_utilization, seed=0,
                       num_gpu_blocks_override=args.num_gpu_blocks,
                       **({"load_format": args.load_format} if args.load_format else {}))
        self.start_s = time.perf_counter() - start
        start_cpu_s = time.process_time() - cpu_start
        self.engine = self.llm.llm_engine
        runner = self.engine.model_executor.driver_worker.model_runner
        self.timer = StepTimer(self.engine, args.device)
        self.prompts: Dict[str, List[List[int]]] = {}
        self.next_id = 0
        self.ready = {
            "event": "ready", "impl": args.impl, "model_class": type(runner.model).__name__, "start_s": self.start_s,
            "start_cpu_s": start_cpu_s, "start_phases": phases,
            "weight_bytes": parameter_bytes(runner.model),
            "loaded_bytes": getattr(runner, "model_memory_usage", None),  # vLLM's "Loading model weights took"
            "engine": {"max_model_len": args.max_model_len, "load_format": args.load_format or "auto",
                       "enforce_eager": self.engine.model_config.enforce_eager,
                       "gpu_memory_utilization": args.gpu_memory_utilization,
                       "num_gpu_blocks": self.engine.cache_config.num_gpu_blocks,
                       # what the profile left room for; differs from the above under --num-gpu-blocks
                       "profiled_gpu_blocks": (returned.get("profile_run") or (None,))[0],
                       "block_size": self.engine.cache_config.block_size,
                       "max_num_seqs": self.engine.scheduler_config.max_num_seqs,
                       "max_num_batched_tokens": self.engine.scheduler_config.max_num_batched_tokens,
                       "async_output_proc": self.engine.model_config.use_async_output_proc,
                       "cuda_graph_batch_sizes": sorted(getattr(runner, "graph_runners", [{}])[0].keys())
                       if getattr(runner, "graph_runners", None) else []},
            "env": environment(args.device), "pid": os.getpid(),
        }
        if args.gc == "frozen":
            gc.collect()
            gc.freeze()
        if args.device == "cuda":
            import torch

            self.ready["device_memory"] = {"allocated_bytes": torch.cuda.memory_allocated(),
                                           "reserved_bytes": torch.cuda.memory_reserved(),
                                           "max_allocated_bytes": torch.cuda.max_memory_allocated()}

    # -- commands ---------------------------------------------------------------------------------------
    def _prompts(self, w: Workload) -> List[List[int]]:
        key = f"{w.name}/{w.prompts}/{w.input_len}"
        if key not in self.prompts:
            self.prompts[key] = make_prompts(w, self.args.vocab_size)
        return self.prompts[key]

    def _add(self, w: Workload) -> int:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=w.output_len, ignore_eos=True)
        for prompt in self._prompts(w):
            self.engine.add_request(f"r{self.next_id}", {"prompt_token_ids": prompt}, params)
            self.next_id += 1
        return w.prompts

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def warmup(self, w: Workload) -> Dict[str, Any]:
        from vllm import SamplingParams

        prompts = [{"prompt_token_ids": p} for p in self._prompts(w)[:min(16, w.prompts)]]
        start = time.perf_counter()
        self.llm.generate(prompts, SamplingParams(temperature=0, max_tokens=min(4, w.output_len), ignore_eos=True),
                          use_tqdm=False)
        self._sync()
        return {"warmup_s": time.perf_counter() - start}

    def add(self, w: Workload) -> Dict[str, Any]:
        if self.engine.has_unfinished_requests():
            raise RuntimeError("requests of an earlier pass are still running: abort them first")
        start = time.perf_counter()
        n = self._add(w)
        return {"add_s": time.perf_counter() - start, "requests": n}

    def round(self, steps: int) -> Dict[str, Any]:
        frozen = self.args.gc == "frozen"
        gc_s = None
        if frozen:
            start = time.perf_counter()
            gc.collect()
            gc_s = time.perf_counter() - start
            gc.disable()
        try:
            self._sync()
            cpu_start = time.process_time()
            start = time.perf_counter()
            for _ in range(steps):
                if not self.engine.has_unfinished_requests():
                    break
                self.timer.step()
            self._sync()
            wall = time.perf_counter() - start
        finally:
            if frozen:
                gc.enable()
        return {"wall_s": wall, "cpu_s": time.process_time() - cpu_start, "steps": self.timer.take(),
                "done": not self.engine.has_unfinished_requests(), "gc_s": gc_s}

    def abort(self) -> Dict[str, Any]:
        ids = [group.request_id for scheduler in self.engine.scheduler
               for queue in (scheduler.waiting, scheduler.running, scheduler.swapped) for group in queue]
        if ids:
            self.engine.abort_request(ids)
        while self.engine.has_unfinished_requests():
            self.engine.step()
        self.engine.step()  # nothing scheduled: processes what async output processing still holds
        self.timer.take()
        return {"aborted": len(ids)}

    def profile(self, w: Workload, skip: int, steps: int, label: str, top: int) -> Dict[str, Any]:
        import torch
        from torch.profiler import ProfilerActivity, profile

        from profile_step import kernel_table

        self.add(w)
        for _ in range(skip):
            self.engine.step()
        self._sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
        records = []
        with profile(activities=activities) as prof:
            for _ in range(steps):
                records.append(self.timer.step())
            self._sync()
        kinds = sorted({r["kind"] for r in records})
        self.timer.take()
        self.abort()
        return {"label": label, "workload": w.to_dict(), "skip": skip, "steps": steps, "kinds": kinds,
                "seqs": [r.get("seqs") for r in records], "tokens": [r.get("tokens") for r in records],
                **kernel_table(prof, steps, top, device=self.device)}

    def serve(self, commands, results) -> None:
        def reply(message: Dict[str, Any]) -> None:
            results.write(json.dumps(message, default=str) + "\n")
            results.flush()

        reply(self.ready)
        for line in commands:
            message = json.loads(line)
            cmd = message.get("cmd")
            try:
                if cmd == "quit":
                    reply({"ok": True})
                    return
                if cmd == "warmup":
                    out = self.warmup(Workload(**message["workload"]))
                elif cmd == "add":
                    out = self.add(Workload(**message["workload"]))
                elif cmd == "round":
                    out = self.round(int(message["steps"]))
                elif cmd == "abort":
                    out = self.abort()
                elif cmd == "profile":
                    out = self.profile(Workload(**message["workload"]), int(message["skip"]), int(message["steps"]),
                                       message.get("label", ""), int(message.get("top", 25)))
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                reply({"ok": True, **out})
            except Exception as exc:  # reported to the parent, which decides; the engine stays up
                reply({"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["vllm", "transformers"], required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--load-format", default=None)
    parser.add_argument("--num-gpu-blocks", type=int, default=None, help="vLLM's num_gpu_blocks_override")
    parser.add_argument("--gc", choices=["frozen", "python"], default="frozen", help="see the module docstring")
    parser.add_argument("--cpus", default=None, help="comma-separated CPU ids this process runs on (see above)")
    parser.add_argument("--cmd-fd", type=int, required=True)
    parser.add_argument("--result-fd", type=int, required=True)
    args = parser.parse_args(argv)
    if args.cpus:  # before vLLM and torch start their threads, which inherit it
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    results = os.fdopen(args.result_fd, "w", buffering=1)
    start = time.perf_counter()
    import vllm  # noqa: F401  (the slow part of a start, done while the other engine's child imports too)

    results.write(json.dumps({"event": "imported", "import_s": time.perf_counter() - start}) + "\n")
    results.flush()
    with os.fdopen(args.cmd_fd, "r") as commands:
        line = commands.readline()
        if not line or json.loads(line).get("cmd") != "start":
            return  # the parent gave up before this engine's turn
        try:
            worker = EngineWorker(args)
        except Exception as exc:
            results.write(json.dumps({"event": "failed", "error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()}) + "\n")
            results.flush()
            raise
        worker.serve(commands, results)


if __name__ == "__main__":
    main()
