"""Backend vs native vLLM 0.6.2, both engines alive at once, the work cut into short rounds in alternating order.

Separate engine runs a minute apart differ on a shared host by more than the effect in question (the same
engine gave 2.5k and 4.0k tok/s within ten minutes on an H200). This comparison cancels that drift:

* both engines run at the same time, each in its own long-lived child process (``engine_worker.py``; vLLM
  0.6.2 neither frees device memory in-process nor keeps two ``LLM`` objects in one process apart), each with
  its share of device memory (``--gpu-memory-utilization``, started one after the other so that each sizes
  its KV cache from its own peak), driven in lockstep over pipes: only one engine computes at any moment;
* a workload is added to both engines and then advanced in rounds of K engine steps: round r runs the
  same K steps of the same schedule in each engine (same prompts, greedy, ``ignore_eos``, same scheduler
  settings: identical batches; checked per round from the scheduled tokens), first native then backend or
  the other way round, alternating, so slow and fast moments of the host fall on both orders alike;
* K follows ``--round-s`` (a round lasts about that long per engine), passes over the workload repeat
  until at least ``--min-rounds`` rounds ran and the 95% interval of the median ratio is within
  ``--target`` (3%), or the workload's share of ``--budget-s`` is used; the output says when the interval
  stayed wider than the target;
* per round, ratio = native time / backend time (backend throughput relative to native: above 1 the
  backend is faster); reported: the median over rounds with a 95% bootstrap interval (rounds resampled),
  the ratio of total times with its interval, and the median of each order;
* every step is timed by phase (``step_timer.py``: schedule / prepare / forward / logits / sample /
  process, host times, and device spans of the forward and the sampling on CUDA); time to first token and
  time per output token come from the same step records; ``--profile`` adds kernel (CUDA) and host-operator
  tables of a prefill step and of decode steps taken inside the same engines (CUDA graphs on).

Results: ``<out>/interleaved-<model>-<device>.json`` (every round, step summaries, engine start, weight
memory, profiles, the command, git commit, device, versions); each invocation appends to the file.

    python benchmarks/interleaved.py --model 1b --budget-s 540 --profile            # on the GPU host
    python benchmarks/interleaved.py --device cpu --checkpoint ~/.cache/vllm-transformers-backend/models/SmolLM2-135M-Instruct
    python benchmarks/interleaved.py --device cpu --model tiny --smoke               # the CI smoke test (seconds)
    python benchmarks/interleaved.py --report-only [--model 1b]                      # tables from the JSON
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import random
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_report  # noqa: E402
from bench_specs import DEFAULT_ROUND_WORKLOADS, MODELS, ROUND_WORKLOADS, Workload, checkpoint_ready  # noqa: E402

IMPLS = ("vllm", "transformers")  # native, backend
LABEL = {"vllm": "native", "transformers": "backend"}
_NOISE = ("Using None for EOS token id because tokenizer is not initialized",)


# --- statistics ------------------------------------------------------------------------------------------


def bootstrap_interval(values: Sequence[float], statistic=statistics.median, resamples: int = 2000,
                       seed: int = 0) -> Tuple[float, float]:
    """95% percentile interval of ``statistic`` over resamples (with replacement) of ``values``."""
    return stratified_interval([values], lambda groups: statistic(groups[0]), resamples, seed)


def order_balanced(groups: Sequence[Sequence[float]]) -> Optional[float]:
    """Geometric mean of the groups' medians: each order weighted alike. On the GPU the engine that runs first
    in a round is often faster by a few percent whichever it is (the per-order medians of most invocations in
    results/); with rounds split evenly the pooled median then falls anywhere between the two orders' medians,
    while this estimate cancels an effect of the position that multiplies both engines' times alike."""
    if not all(groups):
        return None
    product = 1.0
    for group in groups:
        product *= statistics.median(group)
    return product ** (1.0 / len(groups))


def stratified_interval(groups: Sequence[Sequence[float]], statistic=order_balanced, resamples: int = 2000,
                        seed: int = 0) -> Tuple[float, float]:
    """95% percentile interval of ``statistic`` over resamples that redraw each group within itself (so each
    resample keeps the groups' sizes)."""
    rng = random.Random(seed)
    stats = sorted(statistic([[g[rng.randrange(len(g))] for _ in g] for g in groups]) for _ in range(resamples))
    return stats[int(0.025 * resamples)], stats[min(resamples - 1, int(0.975 * resamples))]


def ratio_stats(rounds: List[Dict[str, Any]], target: float, metric: str = "wall") -> Dict[str, Any]:
    """Median per-round ratio (native time / backend time, by ``metric``: wall or cpu) with its interval, the
    ratio of total times with its interval, the median of each order, and the order-balanced estimate
    (:func:`order_balanced`) with its interval."""
    key = f"{metric}_s"
    rounds = [r for r in rounds if r["backend"].get(key, 0) > 0 and r["native"].get(key, 0) > 0]
    ratios = [r["native"][key] / r["backend"][key] for r in rounds]
    if not ratios:
        return {"rounds": 0, "metric": metric}
    out: Dict[str, Any] = {"rounds": len(ratios), "metric": metric, "median": statistics.median(ratios)}
    by_order = {order: [r["native"][key] / r["backend"][key] for r in rounds if r["order"] == order]
                for order in ("native first", "backend first")}
    out["per_order"] = {order: {"rounds": len(v), "median": statistics.median(v) if v else None}
                        for order, v in by_order.items()}
    groups = list(by_order.values())
    out["order_balanced"] = order_balanced(groups)
    out["order_balanced_interval"] = stratified_interval(groups) if all(len(g) >= 2 for g in groups) else None
    pairs = [(r["native"][key], r["backend"][key]) for r in rounds]
    out["total_ratio"] = sum(a for a, _ in pairs) / sum(b for _, b in pairs)
    kinds: Dict[str, List[float]] = {}
    for r in rounds:
        kind = r["native"].get("kinds", ["?"])
        kinds.setdefault(kind[0] if len(kind) == 1 else "mixed", []).append(r["native"][key] / r["backend"][key])
    out["per_kind"] = {k: {"rounds": len(v), "median": statistics.median(v)} for k, v in kinds.items()}
    if len(ratios) >= 4:
        out["interval"] = bootstrap_interval(ratios)
        out["total_interval"] = bootstrap_interval(pairs, lambda sample: sum(a for a, _ in sample) / sum(b for _, b in sample))
        low, high = out["interval"]
        out["half_width"] = max(high - out["median"], out["median"] - low) / out["median"]
        out["resolved"] = out["half_width"] <= target
    else:
        out["interval"] = out["total_interval"] = None
        out["half_width"] = None
        out["resolved"] = False
    return out


ROUND_PHASES = ("schedule", "prepare", "forward", "logits", "sample", "process", "other", "host",
                "device_forward", "device_sample")


def decode_host_stats(rounds: List[Dict[str, Any]], target: float) -> Dict[str, Any]:
    """Host time of decode steps, paired by round: the ratio of the engines' host time (wall - device wait;
    native / backend as for throughput), the same ratio of each round's median step (``host_step_ratio``: what a
    typical step costs, robust to a round's one slow step) and, per phase, the median of backend - native in ms
    per step with its 95% interval. Rounds pair identical batches run back to back, so these resolve host differences that the
    medians of each engine's steps (taken over different moments) cannot."""
    decode = [r for r in rounds if r["native"].get("kinds") == ["decode"] and r["backend"].get("kinds") == ["decode"]]
    out: Dict[str, Any] = {"host_ratio": ratio_stats(decode, target, "host"),
                           "host_step_ratio": ratio_stats(decode, target, "host_step"), "phase_ms_per_step": {}}
    for phase in ROUND_PHASES:
        key = f"{phase}_s"
        deltas = [1e3 * (r["backend"][key] - r["native"][key]) / r["native"]["steps"]
                  for r in decode if key in r["backend"] and key in r["native"] and r["native"]["steps"]]
        if len(deltas) >= 4:
            natives = [1e3 * r["native"][key] / r["native"]["steps"] for r in decode if key in r["native"]]
            out["phase_ms_per_step"][phase] = {"native": statistics.median(natives),
                                               "delta": statistics.median(deltas),
                                               "interval": bootstrap_interval(deltas)}
    return out


# --- the children ----------------------------------------------------------------------------------------


def engine_cpus(count: Optional[int], device: str) -> List[int]:
    """The cores both engines are pinned to (engine_worker.py says why): the first ``count`` of this process's
    (default 4 on CUDA; none on the CPU engine, whose kernels use every core)."""
    if count is None:
        count = 4 if device == "cuda" else 0
    available = sorted(os.sched_getaffinity(0))
    return available[:count] if 0 < count < len(available) else []


class ChildError(RuntimeError):
    pass


class Child:
    """One engine_worker.py process: commands in, one JSON reply per command out, its log echoed."""

    def __init__(self, impl: str, argv: List[str], env: Dict[str, str], quiet: bool) -> None:
        self.impl = impl
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        argv = [*argv, "--cmd-fd", str(cmd_r), "--result-fd", str(res_w)]
        # same process group as this one: whatever stops the parent's group (a command limit) stops the child
        self.proc = subprocess.Popen([sys.executable, "-u", str(HERE / "engine_worker.py"), *argv], env=env,
                                     pass_fds=(cmd_r, res_w), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        os.close(cmd_r)
        os.close(res_w)
        self._commands = os.fdopen(self._cmd_w, "w", buffering=1)
        self._replies: "queue.Queue[Optional[Dict[str, Any]]]" = queue.Queue()
        self.log_tail: List[str] = []
        threading.Thread(target=self._read_replies, daemon=True).start()
        threading.Thread(target=self._pump_log, args=(quiet,), daemon=True).start()

    def _read_replies(self) -> None:
        with os.fdopen(self._res_r, "r") as replies:
            for line in replies:
                self._replies.put(json.loads(line))
        self._replies.put(None)  # the child closed its end: it exited

    def _pump_log(self, quiet: bool) -> None:
        prefix = f"    {LABEL[self.impl]:>7} | "
        for line in self.proc.stdout:
            self.log_tail = (self.log_tail + [line])[-20:]
            if any(n in line for n in _NOISE):
                continue
            if quiet and not any(k in line for k in ("Error", "error", "Traceback", "took", "WARNING")):
                continue
            sys.stdout.write(prefix + line)
            sys.stdout.flush()

    def receive(self, timeout: Optional[float]) -> Dict[str, Any]:
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise ChildError(f"{LABEL[self.impl]} engine: no reply within {timeout:.0f} s") from None
        if reply is None:
            self.proc.wait()
            raise ChildError(f"{LABEL[self.impl]} engine exited (code {self.proc.returncode}); last lines:\n"
                             + "".join("      " + line for line in self.log_tail[-12:]))
        if reply.get("ok") is False or reply.get("event") == "failed":
            raise ChildError(f"{LABEL[self.impl]} engine: {reply.get('error')}\n{reply.get('traceback', '')}")
        return reply

    def request(self, message: Dict[str, Any], timeout: Optional[float]) -> Dict[str, Any]:
        self._commands.write(json.dumps(message) + "\n")
        self._commands.flush()
        return self.receive(timeout)

    def close(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            try:
                self.request({"cmd": "quit"}, timeout)
                self.proc.wait(timeout=timeout)
            except Exception:
                pass
        if self.proc.poll() is None:
            self.kill()

    def kill(self) -> None:
        try:
            import psutil  # a vLLM dependency

            children = psutil.Process(self.proc.pid).children(recursive=True)
        except Exception:
            children = []
        self.proc.kill()
        for child in children:
            try:
                child.kill()
            except Exception:
                pass
        self.proc.wait()


def _start_entry(ready: Dict[str, Any]) -> Dict[str, Any]:
    return {k: ready.get(k) for k in ("start_s", "start_cpu_s", "start_phases", "import_s", "child_start_s")}


def start_stats(entries: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Backend start / native start over the pairs: the median and its interval, the median of each order,
    and their geometric mean (each order weighted alike however many pairs each has), and per start phase the
    median backend - native difference in seconds."""
    ratios = {order: [e["transformers"]["start_s"] / e["vllm"]["start_s"] for e in entries if e["first"] == order]
              for order in IMPLS}
    every = [r for v in ratios.values() for r in v]
    if not every:
        return {"pairs": 0}
    out: Dict[str, Any] = {"pairs": len(every), "median": statistics.median(every),
                           "interval": bootstrap_interval(every) if len(every) >= 4 else None,
                           "per_first": {f"{LABEL[o]} first": {"pairs": len(v), "median": statistics.median(v) if v
                                                               else None} for o, v in ratios.items()}}
    if all(ratios.values()):
        out["order_balanced"] = order_balanced(list(ratios.values()))
    phases = sorted({k for e in entries for i in IMPLS for k in (e[i].get("start_phases") or {})})
    out["phase_delta_s"] = {k: statistics.median(e["transformers"]["start_phases"].get(k, 0.0)
                                                 - e["vllm"]["start_phases"].get(k, 0.0) for e in entries)
                            for k in phases}
    return out


# --- one comparison --------------------------------------------------------------------------------------


def kv_blocks(engine: Dict[str, Any]) -> str:
    """The engine's KV blocks, and what its profile gave where they differ (--num-gpu-blocks set them)."""
    profiled = engine.get("profiled_gpu_blocks")
    if profiled is None or profiled == engine["num_gpu_blocks"]:
        return str(engine["num_gpu_blocks"])
    return f"{engine['num_gpu_blocks']} (profile: {profiled})"


def kv_overflow(w: Workload, engines: Dict[str, Dict[str, Any]]) -> Optional[str]:
    """Why this workload's rounds will not pair, or None: when its sequences need more KV cache than the smaller
    engine holds, both engines preempt, and with different block counts they do it at different steps, so their
    rounds do different work and are left out as mismatched."""
    blocks = {impl: e["num_gpu_blocks"] for impl, e in engines.items()}
    some = next(iter(engines.values()))
    running = min(w.prompts, some.get("max_num_seqs") or w.prompts)  # the scheduler runs at most this many
    need = running * -(-(w.input_len + w.output_len) // (some.get("block_size") or 16))
    if need <= min(blocks.values()) or len(set(blocks.values())) == 1:
        return None
    return (f"workload {w.name} needs {need} KV blocks ({running} x {w.input_len + w.output_len} tokens), more "
            f"than the engines hold (native {blocks['vllm']}, backend {blocks['transformers']}): they preempt at "
            f"different steps and most rounds will not pair; --num-gpu-blocks {min(blocks.values())} gives both "
            "the same cache (or raise --gpu-memory-utilization)")


def _round_entry(reply: Dict[str, Any]) -> Dict[str, Any]:
    """What the JSON keeps of one engine's round: totals and phase sums (the step summaries keep medians)."""
    steps = reply["steps"]
    entry: Dict[str, Any] = {"wall_s": reply["wall_s"], "cpu_s": reply["cpu_s"], "steps": len(steps),
                             "tokens": sum(s.get("tokens", 0) for s in steps),
                             "generated": sum(s.get("generated", 0) for s in steps),
                             "kinds": sorted({s["kind"] for s in steps}),
                             "preempted": sum(s.get("preempted", 0) for s in steps),
                             "gc_s": reply.get("gc_s")}
    for key in ("schedule", "prepare", "forward", "logits", "wait", "sample", "process", "other", "host",
                "device_forward", "device_logits", "device_sample"):
        values = [s[key] for s in steps if s.get(key) is not None]
        if values:
            entry[f"{key}_s"] = sum(values)
            if key == "host":  # one slow step (a stray thread, a page fault) moves the sum, not the median
                entry["host_step_s"] = statistics.median(values)
    return entry


class Comparison:
    def __init__(self, args: argparse.Namespace, t0: float) -> None:
        self.args = args
        self.t0 = t0  # the invocation's start: --budget-s counts the checkpoint build too
        self.children: Dict[str, Child] = {}
        suffix = "-control" if args.control else ""  # A/A controls never mix with comparisons
        self.results_path = args.out / f"interleaved-{args.model_name}-{args.device}{suffix}.json"
        self.invocation: Dict[str, Any] = {
            "id": uuid.uuid4().hex[:8],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "host": bench_report.host_info(), "model": args.model_name, "device": args.device,
            "engines": {}, "workloads": {}, "profiles": [], "failures": []}
        signal.signal(signal.SIGTERM, self._terminate)

    # -- bookkeeping ----------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return float("inf") if self.args.budget_s is None else self.args.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)

    def _terminate(self, signum, frame) -> None:
        self.log("terminated: saving what finished")
        for child in self.children.values():
            child.kill()
        self.save()
        sys.exit(128 + signum)

    def save(self) -> None:
        data = load(self.results_path)
        data["invocations"] = [i for i in data["invocations"] if i["id"] != self.invocation["id"]]
        data["invocations"].append(self.invocation)
        bench_report.save(self.results_path, data)

    # -- engines --------------------------------------------------------------------------------------------
    def spawn(self, impl: str) -> None:
        """The child process: it imports vLLM at once, and builds its engine when :meth:`start` says so."""
        a = self.args
        # --control: the backend's slot runs native vLLM too (an A/A control of the method and the host)
        argv = ["--impl", "vllm" if a.control else impl, "--checkpoint", str(a.checkpoint), "--vocab-size", str(a.vocab_size),
                "--device", a.device, "--dtype", a.dtype, "--max-model-len", str(a.max_model_len),
                "--max-num-seqs", str(a.max_num_seqs), "--gpu-memory-utilization", str(a.gpu_memory_utilization)]
        if a.enforce_eager:
            argv.append("--enforce-eager")
        if a.load_format:
            argv += ["--load-format", a.load_format]
        if a.num_gpu_blocks:
            argv += ["--num-gpu-blocks", str(a.num_gpu_blocks)]
        argv += ["--gc", a.gc]
        cpus = engine_cpus(a.pin_cpus, a.device)
        if cpus:
            argv += ["--cpus", ",".join(map(str, cpus))]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        if a.device == "cpu":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "all")
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the idle engine's threads must not spin
        self.children[impl] = Child(impl, argv, env, a.quiet)
        self.spawned = time.monotonic()

    def start(self, impl: str, record: bool = True) -> Dict[str, Any]:
        child = self.children[impl]
        imported = child.receive(timeout=max(30.0, min(self.args.start_timeout, self.left())))
        self.log(f"starting the {LABEL[impl]} engine ({impl}; its vLLM import took {imported['import_s']:.1f} s)")
        started = time.monotonic()
        ready = child.request({"cmd": "start"}, timeout=max(30.0, min(self.args.start_timeout, self.left())))
        ready["child_start_s"] = time.monotonic() - started
        ready["import_s"] = imported["import_s"]
        expected = "TransformersForCausalLM" if impl == "transformers" and not self.args.control else None
        if expected and ready["model_class"] != expected:
            raise ChildError(f"the backend engine built {ready['model_class']}, expected {expected}")
        if (impl == "vllm" or self.args.control) and ready["model_class"] == "TransformersForCausalLM":
            raise ChildError("the native engine built the Transformers backend (no native class for this model?)")
        profiled = ready["engine"].get("profiled_gpu_blocks")
        if self.args.num_gpu_blocks and profiled is not None and profiled < self.args.num_gpu_blocks:
            raise ChildError(f"--num-gpu-blocks {self.args.num_gpu_blocks} is more than the {LABEL[impl]} engine's "
                             f"profile left room for ({profiled} blocks): give at most {profiled}")
        if record:
            self.invocation["engines"][impl] = ready
        self.log(f"{LABEL[impl]} engine ready: LLM() {ready['start_s']:.1f} s, {ready['model_class']}, weights "
                 f"{ready['weight_bytes'] / 2 ** 30:.3f} GiB, {kv_blocks(ready['engine'])} KV blocks")
        return ready

    def pair_seconds(self) -> float:
        """What one more start pair takes: the longest pair run so far, else an estimate from the main pair (both
        imports at once, both starts, shut-down). The estimate's margin was x1.2 + 10 s until 8B pairs on an H100
        took 53-84 s against its 68-92 s: the pairs then left a workload no time."""
        ran = [e["pair_s"] for e in self.invocation.get("start_pairs", ()) if "pair_s" in e]
        if ran:
            return max(ran) * 1.05
        engines = self.invocation["engines"]
        if not all(i in engines for i in IMPLS):
            return 0.0
        return (max(engines[i]["import_s"] for i in IMPLS) + sum(engines[i]["child_start_s"] for i in IMPLS)) * 1.05 + 5

    def start_pairs(self) -> None:
        """``--start-pairs N``: N more pairs of engine starts in fresh processes, alternating which engine starts
        first (the main pair started ``--first``), so that the start ratio is not one order's.

        Started second, an engine shares the device and the pinned cores with an idle first one; in the A/A
        control (identical code) the second start took 1.14x the first. One start per engine per invocation
        cannot tell that from the engines."""
        a = self.args
        entries = self.invocation["start_pairs"] = []
        main = self.invocation["engines"]
        if all(i in main for i in IMPLS):
            entries.append({"first": a.first, "main": True, **{i: _start_entry(main[i]) for i in IMPLS}})
        for n in range(a.start_pairs):
            if self.left() < self.pair_seconds() + a.reserve_s / 2:
                self.log(f"start pairs: {n} of {a.start_pairs} run, budget used")
                break
            first = IMPLS[::-1][IMPLS.index(a.first)] if n % 2 == 0 else a.first  # the other order first
            order = (first, *[i for i in IMPLS if i != first])
            self.children = {}
            began = time.monotonic()
            try:
                for impl in order:
                    self.spawn(impl)
                entry: Dict[str, Any] = {"first": first, "main": False}
                for impl in order:
                    entry[impl] = _start_entry(self.start(impl, record=False))
            finally:
                for child in self.children.values():
                    child.close()
            entry["pair_s"] = time.monotonic() - began
            entries.append(entry)
            self.save()
        self.invocation["start_stats"] = start_stats(entries)

    def both(self, message: Dict[str, Any], order: Sequence[str] = IMPLS) -> Dict[str, Dict[str, Any]]:
        timeout = max(60.0, self.left() + 30.0) if self.args.budget_s else None
        return {impl: self.children[impl].request(message, timeout) for impl in order}

    # -- one workload ---------------------------------------------------------------------------------------
    def run_workload(self, w: Workload, share_s: float, offset: int) -> Dict[str, Any]:
        a = self.args
        deadline = time.monotonic() + share_s
        self.log(f"workload {w.name} ({w.prompts} x {w.input_len} in / {w.output_len} out): up to {share_s:.0f} s")
        overflow = kv_overflow(w, {impl: self.invocation["engines"][impl]["engine"] for impl in IMPLS})
        if overflow:
            self.log(f"WARNING: {overflow}")
        warm = self.both({"cmd": "warmup", "workload": w.to_dict()})
        rounds: List[Dict[str, Any]] = []
        steps: Dict[str, List[Dict[str, Any]]] = {impl: [] for impl in IMPLS}
        passes: List[Dict[str, Any]] = []
        mismatches = 0
        k = 1
        stop_reason = None
        pass_index = 0
        while stop_reason is None:
            added = self.both({"cmd": "add", "workload": w.to_dict()})
            first_token = {impl: 0.0 for impl in IMPLS}
            first_token_done = {impl: False for impl in IMPLS}
            pass_steps = {impl: 0 for impl in IMPLS}
            index = 0
            done = False
            while not done:
                order = IMPLS if (index + pass_index + offset) % 2 == 0 else IMPLS[::-1]
                replies = self.both({"cmd": "round", "steps": k}, order)
                entry = {"pass": pass_index, "index": index, "k": k,
                         "order": "native first" if order[0] == "vllm" else "backend first",
                         "native": _round_entry(replies["vllm"]), "backend": _round_entry(replies["transformers"])}
                same = all(entry["native"][key] == entry["backend"][key] for key in ("steps", "tokens", "generated"))
                entry["matched"] = same and replies["vllm"]["done"] == replies["transformers"]["done"]
                if entry["matched"] and entry["native"]["wall_s"] > 0 and entry["backend"]["wall_s"] > 0:
                    entry["ratio"] = entry["native"][f"{a.metric}_s"] / max(entry["backend"][f"{a.metric}_s"], 1e-9)
                    rounds.append(entry)
                else:
                    mismatches += 1
                    self.log(f"round {index} of pass {pass_index}: the engines did different work "
                             f"({entry['native']} vs {entry['backend']}); left out")
                for impl in IMPLS:
                    for record in replies[impl]["steps"]:
                        steps[impl].append(record)
                        if not first_token_done[impl]:
                            first_token[impl] += record[a.metric]
                            pass_steps[impl] += record.get("generated", 0)
                            first_token_done[impl] = pass_steps[impl] >= w.prompts
                done = replies["vllm"]["done"] and replies["transformers"]["done"]
                if replies["vllm"]["done"] != replies["transformers"]["done"]:
                    self.log("one engine finished the pass before the other: the rest of the pass is aborted")
                    done = True
                # the next round's K: about --round-s per engine at the recent step time
                recent = [r["wall"] for impl in IMPLS for r in replies[impl]["steps"]]
                if recent:
                    k = max(1, min(a.max_k, round(a.round_s / max(statistics.median(recent), 1e-6))))
                index += 1
                if time.monotonic() >= deadline or self.left() <= a.reserve_s:
                    stop_reason = "time share used"
                elif len(rounds) >= a.max_rounds:
                    stop_reason = "max rounds"
                elif (pass_index > 0 or done) and len(rounds) >= a.min_rounds and (done or index % 4 == 0) \
                        and ratio_stats(rounds, a.target, a.metric)["resolved"]:  # at least one whole pass first
                    stop_reason = "interval within target"
                if stop_reason:
                    break
            complete = replies["vllm"]["done"] and replies["transformers"]["done"]
            if not complete:
                # cut short by the budget, or one engine finished first (their schedules diverged, e.g. on
                # different KV block counts: kv_overflow): the next pass's add needs both engines idle
                self.both({"cmd": "abort"})
            passes.append({"pass": pass_index, "complete": complete, "add_s": {i: added[i]["add_s"] for i in IMPLS},
                           "ttft_s": first_token if all(first_token_done.values()) else None})
            pass_index += 1
        stats = ratio_stats(rounds, a.target, a.metric)
        other = "wall" if a.metric == "cpu" else "cpu"
        from step_timer import summarize

        result = {"workload": w.to_dict(), "stop": stop_reason, "passes": passes, "mismatched_rounds": mismatches,
                  "kv_overflow": overflow,
                  "warmup": warm, "stats": stats, f"stats_{other}": ratio_stats(rounds, a.target, other),
                  "rounds": rounds,
                  "steps": {impl: summarize(steps[impl]) for impl in IMPLS},
                  "output_tokens": {LABEL[impl]: sum(r[LABEL[impl]]["generated"] for r in rounds) for impl in IMPLS},
                  "seconds": {LABEL[impl]: sum(r[LABEL[impl]][f"{a.metric}_s"] for r in rounds) for impl in IMPLS}}
        result["tok_s"] = {k2: result["output_tokens"][k2] / v if v else None for k2, v in result["seconds"].items()}
        result["decode_host"] = decode_host_stats(rounds, a.target)
        ttfts = {LABEL[impl]: [p["ttft_s"][impl] for p in passes if p["ttft_s"]] for impl in IMPLS}
        result["ttft_s"] = {k2: statistics.median(v) if v else None for k2, v in ttfts.items()}
        self.log(describe_workload(w.name, result, a.target))
        return result

    def profile(self, workloads: Dict[str, Workload]) -> None:
        """Kernel and host-operator tables of a prefill step and of decode steps, in the running engines."""
        plans = []
        if "prefill" in workloads:
            plans.append(("prefill step", workloads["prefill"], 0, 1))
        if "decode" in workloads:
            w = workloads["decode"]
            plans.append((f"decode steps (batch {w.prompts})", w, -1, self.args.profile_steps))
        if "small" in workloads:
            plans.append((f"decode steps (batch {workloads['small'].prompts})", workloads["small"], -1,
                          self.args.profile_steps))
        if "long" in workloads:
            plans.append(("long-prompt prefill step", workloads["long"], 0, 1))
        from profile_step import format_table

        # Each plan in both orders (the device's clocks drift too: one profile per engine would compare moments);
        # the smoke run checks the code path once.
        for repeat, order in enumerate((IMPLS, IMPLS[::-1])[:1 if self.args.smoke else 2]):
            for label, w, skip, n in plans:
                if self.left() <= self.args.reserve_s / 2:
                    self.log(f"profile of {label} skipped: budget")
                    return
                if skip < 0:  # past the prefill steps: as many steps as prefills need (max_num_batched_tokens)
                    engine = self.invocation["engines"]["vllm"]["engine"]
                    per_step = max(1, engine["max_num_batched_tokens"] // max(1, w.input_len))
                    skip = -(-w.prompts // min(per_step, engine["max_num_seqs"])) + 2
                replies = self.both({"cmd": "profile", "workload": w.to_dict(), "skip": skip, "steps": n,
                                     "label": label, "top": self.args.profile_top}, order)
                for impl in IMPLS:
                    table = {k: v for k, v in replies[impl].items() if k != "ok"}
                    self.invocation["profiles"].append({"impl": impl, "repeat": repeat, **table})
                    if repeat == 0:
                        print(format_table(f"{LABEL[impl]}: {label} ({', '.join(table['kinds'])})", table), flush=True)

    # -- the whole run --------------------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        workloads = {name: ROUND_WORKLOADS[a.table][name] for name in a.workloads}
        status = 0
        try:
            order = (a.first, *[i for i in IMPLS if i != a.first])
            for impl in order:
                self.spawn(impl)
            for impl in order:
                self.start(impl)
            self.save()
            names = list(workloads)
            pairs_s = a.start_pairs * self.pair_seconds()  # kept for the start pairs, which run last
            for i, name in enumerate(names):
                share = (self.left() - a.reserve_s - pairs_s) / (len(names) - i)
                if share <= 0:
                    self.log(f"workload {name} skipped: no budget left")
                    self.invocation["failures"].append({"workload": name, "reason": "budget"})
                    continue
                self.invocation["workloads"][name] = self.run_workload(workloads[name], share, offset=i)
                self.save()
        except ChildError as exc:
            self.log(f"FAILED: {exc}")
            self.invocation["failures"].append({"reason": str(exc)})
            status = 1
        try:
            if a.profile and status == 0:
                self.profile(workloads)  # after the comparison: a profiler failure must not cost its results
        except ChildError as exc:
            self.log(f"profile FAILED: {exc}")
            self.invocation["failures"].append({"reason": f"profile: {exc}"})
        finally:
            for child in self.children.values():
                child.close()
        if a.start_pairs and status == 0:
            try:
                self.start_pairs()
            except ChildError as exc:
                self.log(f"start pairs FAILED: {exc}")
                self.invocation["failures"].append({"reason": f"start pairs: {exc}"})
        self.save()
        print("\n" + report(self.invocation, a.target), flush=True)
        self.log(f"results: {self.results_path}")
        return status


# --- reporting -------------------------------------------------------------------------------------------


def load(path: Path) -> Dict[str, Any]:
    return bench_report.load(path, fresh=lambda: {"schema": bench_report.SCHEMA, "invocations": []})


def _fmt_ratio(value: Optional[float], interval: Optional[Sequence[float]] = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.3f}"
    return text + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def describe_workload(name: str, result: Dict[str, Any], target: float) -> str:
    s = result["stats"]
    if not s.get("rounds"):
        return f"{name}: no rounds"
    orders = s["per_order"]
    text = (f"{name}: backend/native by {s.get('metric', 'wall')} time {_fmt_ratio(s['median'], s['interval'])} (median of "
            f"{s['rounds']} rounds, "
            f"{orders['native first']['rounds']} native first / {orders['backend first']['rounds']} backend first), "
            f"total-time ratio {_fmt_ratio(s['total_ratio'], s['total_interval'])}, order-balanced "
            f"{_fmt_ratio(s.get('order_balanced'), s.get('order_balanced_interval'))} (native first "
            f"{_fmt_ratio(orders['native first']['median'])}, backend first {_fmt_ratio(orders['backend first']['median'])}); "
            "rounds of one kind: "
            + ", ".join(f"{k} {v['median']:.3f} ({v['rounds']})" for k, v in s.get("per_kind", {}).items())
            + f"; stopped: {result['stop']}")
    if not s["resolved"]:
        width = "unknown" if s["half_width"] is None else f"+/-{100 * s['half_width']:.1f}%"
        text += (f"\n  NOTE: the 95% interval ({width}) is wider than +/-{100 * target:.0f}%: this run cannot tell "
                 f"a {100 * target:.0f}% difference from noise; run more rounds (--budget-s, --workloads {name})")
    return text


def report(inv: Dict[str, Any], target: float) -> str:
    host = inv.get("host") or {}
    lines = [f"## {inv['model']} on {host.get('gpus') or inv['device']}, {inv['date']}, commit "
             f"{(host.get('git_commit') or '?')[:10]}{' (with uncommitted changes)' if host.get('git_dirty') else ''}",
             ""]
    if inv.get("note"):
        lines += [f"Note: {inv['note']}", ""]
    if (inv.get("options") or {}).get("control"):
        lines += ["A/A control (--control): the 'backend' slot ran native vLLM too; its ratios are what two identical "
                  "engines differ by here.", ""]
    engines = inv["engines"]
    if engines:
        lines += ["| engine | LLM() start s (CPU s) | weights GiB | loaded GiB | KV blocks | CUDA graphs |",
                  "|---|---:|---:|---:|---:|---|"]
        for impl in IMPLS:
            e = engines.get(impl)
            if e:
                loaded = "-" if e.get("loaded_bytes") is None else f"{e['loaded_bytes'] / 2 ** 30:.3f}"
                lines.append(f"| {LABEL[impl]} | {e['start_s']:.1f} ({e.get('start_cpu_s', 0):.1f}) | "
                             f"{e['weight_bytes'] / 2 ** 30:.3f} | {loaded} | "
                             f"{kv_blocks(e['engine'])} | {'off' if e['engine']['enforce_eager'] else 'on'} |")
        if all(i in engines for i in IMPLS):
            n, b = engines["vllm"], engines["transformers"]
            lines.append(f"\nbackend/native: start {b['start_s'] / n['start_s']:.2f}x (CPU time "
                         f"{b.get('start_cpu_s', 0) / max(n.get('start_cpu_s', 0), 1e-9):.2f}x), weights "
                         f"{b['weight_bytes'] / n['weight_bytes']:.3f}x" + (
                             f", loaded {b['loaded_bytes'] / n['loaded_bytes']:.3f}x" if b.get("loaded_bytes") and
                             n.get("loaded_bytes") else ""))
            phases = sorted(set(n.get("start_phases", {})) | set(b.get("start_phases", {})))
            if phases:
                lines.append("start phases, s (native / backend): " + ", ".join(
                    f"{k} {n.get('start_phases', {}).get(k, 0):.1f} / {b.get('start_phases', {}).get(k, 0):.1f}"
                    for k in phases) + f"; started first: {LABEL[inv['options'].get('first', 'vllm')]}")
        lines.append("")
    metric = next((r["stats"].get("metric") for r in inv["workloads"].values()), None) or "wall"
    lines += [f"Backend throughput relative to native, per round by {metric} time (native time / backend time):", "",
              "| workload | rounds (native first / backend first) | backend/native, median [95% CI] | "
              f"total-time ratio [95% CI] | order-balanced [95% CI] (native first / backend first) | native tok/s | "
              f"backend tok/s | resolved to +/-{100 * target:.0f}% |",
              "|---|---|---|---|---|---:|---:|---|"]
    for name, r in inv["workloads"].items():
        s, w = r["stats"], r["workload"]
        if not s.get("rounds"):
            continue
        if "order_balanced" not in s:  # invocations recorded before the estimate existed: only it is added
            fresh = ratio_stats(r["rounds"], target, s["metric"])
            s = {**s, "order_balanced": fresh["order_balanced"],
                 "order_balanced_interval": fresh["order_balanced_interval"]}
        o = s["per_order"]
        lines.append(f"| {name} ({w['prompts']} x {w['input_len']}/{w['output_len']}) | {s['rounds']} "
                     f"({o['native first']['rounds']}/{o['backend first']['rounds']}) | "
                     f"{_fmt_ratio(s['median'], s['interval'])} | {_fmt_ratio(s['total_ratio'], s['total_interval'])} | "
                     f"{_fmt_ratio(s['order_balanced'], s['order_balanced_interval'])} "
                     f"({_fmt_ratio(o['native first']['median'])} / {_fmt_ratio(o['backend first']['median'])}) | "
                     f"{r['tok_s']['native'] or 0:.1f} | {r['tok_s']['backend'] or 0:.1f} | "
                     f"{'yes' if s['resolved'] else 'NO'} |")
    collected = {impl: [r[impl]["gc_s"] for w in inv["workloads"].values() for r in w.get("rounds", [])
                        if r.get(impl) and r[impl].get("gc_s") is not None] for impl in ("native", "backend")}
    if all(collected.values()):
        lines += ["", "Collection before each round (untimed; --gc frozen), median ms: " + ", ".join(
            f"{impl} {1e3 * statistics.median(v):.2f} (max {1e3 * max(v):.1f})" for impl, v in collected.items())]
    suffix = "_cpu" if metric == "cpu" else ""
    lines += ["", f"Per step (medians, ms; phases by {metric} time, exclusive; host = wall - wait, the host's own "
              "time; dev = device span):", "",
              "| workload | kind | engine | steps | seqs | wall | host | cpu | schedule | prepare | forward | logits | "
              "wait | sample | process | other | dev fwd | dev sample |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.2f}"

    for name, r in inv["workloads"].items():
        for kind in ("prefill", "decode", "mixed"):
            for impl in IMPLS:
                row = r["steps"][impl].get(kind)
                if row:
                    lines.append(f"| {name} | {kind} | {LABEL[impl]} | {row['steps']} | {row['seqs']:.0f} | "
                                 + " | ".join(ms(row.get(f"{p}_ms")) for p in (
                                     "wall", "host", "cpu", *(f"{phase}{suffix}" for phase in (
                                         "schedule", "prepare", "forward", "logits", "wait", "sample", "process",
                                         "other")),
                                     "device_forward", "device_sample")) + " |")
    hosts = [(name, r["decode_host"]) for name, r in inv["workloads"].items()
             if (r.get("decode_host") or {}).get("host_ratio", {}).get("rounds")]
    if hosts:
        shown = ("schedule", "prepare", "forward", "logits", "sample", "process", "other", "device_forward")
        lines += ["", "Decode steps paired by round: host time (wall - device wait) native / backend (above 1: the "
                  "backend's host is faster), and per phase backend - native, ms per step, median [95% CI]:", "",
                  "| workload | rounds | host ratio [95% CI] | median step's [95% CI] | " + " | ".join(shown) + " |",
                  "|---|---:|---|---|" + "---|" * len(shown)]
        for name, h in hosts:
            hr, deltas = h["host_ratio"], h["phase_ms_per_step"]
            step = h.get("host_step_ratio") or {}
            cells = [f"{deltas[k]['delta']:+.3f} [{deltas[k]['interval'][0]:+.2f}, {deltas[k]['interval'][1]:+.2f}]"
                     if k in deltas else "-" for k in shown]
            step_cell = _fmt_ratio(step["median"], step.get("interval")) if step.get("rounds") else "-"
            lines.append(f"| {name} | {hr['rounds']} | {_fmt_ratio(hr['median'], hr['interval'])} | {step_cell} | "
                         + " | ".join(cells) + " |")
    starts = inv.get("start_stats") or {}
    if starts.get("pairs"):
        per = starts["per_first"]
        lines += ["", f"Engine start over {starts['pairs']} pairs in fresh processes (backend LLM() / native; which "
                  f"engine started first alternates): median {_fmt_ratio(starts['median'], starts['interval'])}; "
                  + "; ".join(f"{k}: {_fmt_ratio(v['median'])} ({v['pairs']})" for k, v in per.items())
                  + (f"; both orders weighted alike: {starts['order_balanced']:.3f}" if "order_balanced" in starts
                     else "") + ". Phases, backend - native, median s: "
                  + ", ".join(f"{k} {v:+.2f}" for k, v in starts["phase_delta_s"].items())]
    latency = [(name, r) for name, r in inv["workloads"].items() if r.get("ttft_s")]
    if latency:
        lines += ["", f"Latency by {metric} time: time to first token (the steps up to the one that sampled the last "
                  "prompt's first token) and time per output token (median decode step):", "",
                  "| workload | native TTFT ms | backend TTFT ms | native TPOT ms | backend TPOT ms |",
                  "|---|---:|---:|---:|---:|"]
        for name, r in latency:
            tpot = {impl: (r["steps"][impl].get("decode") or {}).get(f"{metric}_ms") for impl in IMPLS}
            ttft = r["ttft_s"]
            lines.append(f"| {name} | {ms(ttft['native'] and ttft['native'] * 1000)} | "
                         f"{ms(ttft['backend'] and ttft['backend'] * 1000)} | {ms(tpot['vllm'])} | "
                         f"{ms(tpot['transformers'])} |")
    if inv.get("profiles"):
        lines += ["", "Profiles (torch.profiler inside the running engines; each in both orders):", "",
                  "| profile | engine | kernels/step | device ms/step (each profile) | host aten ops/step |",
                  "|---|---|---:|---|---:|"]
        grouped: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
        for p in inv["profiles"]:
            grouped.setdefault((p["label"], p["impl"]), []).append(p)
        for (label, impl), group in grouped.items():
            kernels = group[0].get("kernels_per_step")
            device = ", ".join(ms(p.get("device_ms_per_step")) for p in group)
            lines.append(f"| {label} | {LABEL[impl]} | {'-' if kernels is None else f'{kernels:.0f}'} | {device} | "
                         f"{group[0]['host_ops_per_step']:.0f} |")
    for f in inv.get("failures", []):
        lines.append(f"\nnot completed: {f}")
    return "\n".join(lines)


# --- set-up ----------------------------------------------------------------------------------------------


def _checkpoint(args: argparse.Namespace) -> Path:
    """A given checkpoint, or the shape's random one (built by bench_engines.py in a child process, so this
    process never initialises the device)."""
    if args.checkpoint is not None:
        return args.checkpoint
    if args.load_format == "dummy":  # vLLM draws the weights itself: the config is all it reads
        from bench_specs import config_checkpoint

        return config_checkpoint(args.model, args.dtype, args.checkpoint_dir)
    path = args.checkpoint_dir / f"{args.model}-{args.dtype}"
    if not checkpoint_ready(path, args.model, args.dtype):
        print(f"building the {args.model} checkpoint at {path}", flush=True)
        subprocess.run([sys.executable, str(HERE / "bench_engines.py"), "build", "--model", args.model,
                        "--checkpoint", str(path), "--device", args.device, "--dtype", args.dtype], check=True)
    return path


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="random-weight shape: " + ", ".join(MODELS) + " (default 1b; tiny "
                   "with --smoke)")
    p.add_argument("--checkpoint", type=Path, default=None, help="an existing checkpoint instead of a random shape")
    p.add_argument("--checkpoint-dir", type=Path, default=Path("/tmp/vtb-bench"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--table", default=None, choices=sorted(ROUND_WORKLOADS),
                   help="workload sizes (default: the device's; smoke with --smoke)")
    p.add_argument("--workloads", default=None,
                   help="comma-separated names from the table (default: all but decode1024)")
    p.add_argument("--smoke", action="store_true", help="every code path in seconds: smoke table, 4+ rounds")
    p.add_argument("--budget-s", type=float, default=None, help="end (with results saved) within this many seconds")
    p.add_argument("--reserve-s", type=float, default=None, help="kept for profiles and shut-down (default: 45 s on "
                   "cuda with --profile, 15 s otherwise)")
    p.add_argument("--round-s", type=float, default=None, help="round length per engine (default 0.3 s cuda, 1 s cpu)")
    p.add_argument("--min-rounds", type=int, default=40, help="at least this many rounds (half in each order)")
    p.add_argument("--max-rounds", type=int, default=400)
    p.add_argument("--max-k", type=int, default=64, help="most engine steps in one round")
    p.add_argument("--target", type=float, default=0.03, help="stop once the 95%% interval is within +/- this")
    p.add_argument("--metric", choices=["wall", "cpu"], default=None, help="what a round's ratio compares: wall "
                   "time (default on cuda) or the engine process's CPU time (default on cpu: the CPU engine computes "
                   "synchronously, and CPU time leaves out the time other tenants of a shared host held the cores)")
    p.add_argument("--control", action="store_true", help="A/A control: the backend's slot runs native vLLM too, "
                   "so the ratios show what two identical engines differ by on this host (results in "
                   "interleaved-MODEL-DEVICE-control.json)")
    p.add_argument("--first", choices=IMPLS, default="vllm", help="which engine starts first")
    p.add_argument("--start-pairs", type=int, default=0, help="after the workloads, this many more pairs of engine "
                   "starts in fresh processes, alternating which engine starts first (the order alone moved the "
                   "start by 1.14x in the A/A control)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.42, help="each engine's share")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the longest workload, rounded up")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--num-gpu-blocks", type=int, default=None, help="both engines' KV cache in blocks (vLLM's "
                   "num_gpu_blocks_override; at most the smaller count the engines' profiles give, which the "
                   "results keep as profiled_gpu_blocks): for a workload that overflows the cache, whose rounds "
                   "pair only when both engines preempt alike")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--load-format", default=None, choices=["dummy"], help="dummy: vLLM's own random weights "
                   "(uniform +/-1e-3, no checkpoint to write and read: saves minutes for the 8B shape); start times "
                   "then leave out weight loading")
    p.add_argument("--gc", choices=["frozen", "python"], default="frozen",
                   help="frozen: each engine's heap frozen after start, collected before each round (untimed) and "
                        "not during it; python: Python's collector as it is (engine_worker.py says why)")
    p.add_argument("--pin-cpus", type=int, default=None, help="pin both engines to the same first N cores "
                   "(default 4 on cuda, 0 = no pinning; engine_worker.py says why)")
    p.add_argument("--profile", action="store_true", help="kernel/op tables of a prefill and decode steps at the end")
    p.add_argument("--profile-steps", type=int, default=4)
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--quiet", action="store_true", help="echo only the engines' warnings and errors")
    p.add_argument("--report-only", action="store_true", help="print the tables of the JSON's invocations")
    args = p.parse_args(argv)
    args.model_filter = args.model
    if args.smoke:
        args.table = args.table or "smoke"
        args.model = args.model or "tiny"
        args.min_rounds = min(args.min_rounds, 4)
        args.max_rounds = min(args.max_rounds, 8)
        args.round_s = 0.0 if args.round_s is None else args.round_s
    args.table = args.table or ("gpu" if args.device == "cuda" else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.metric = args.metric or ("wall" if args.device == "cuda" else "cpu")
    if args.round_s is None:
        args.round_s = 0.3 if args.device == "cuda" else 1.0
    if args.reserve_s is None:
        args.reserve_s = 45.0 if (args.profile and args.device == "cuda") else 15.0
    names = args.workloads.split(",") if args.workloads else list(DEFAULT_ROUND_WORKLOADS[args.table])
    unknown = [n for n in names if n not in ROUND_WORKLOADS[args.table]]
    if unknown:
        p.error(f"unknown workloads {unknown} for table {args.table} ({', '.join(ROUND_WORKLOADS[args.table])})")
    args.workloads = names
    if args.checkpoint is not None:
        args.checkpoint = args.checkpoint.expanduser()
        config = json.loads((args.checkpoint / "config.json").read_text())
        args.vocab_size = config["vocab_size"]
        args.model_name = args.model or args.checkpoint.name
    else:
        args.model = args.model or "1b"
        if args.model not in MODELS:
            p.error(f"unknown model {args.model} ({', '.join(MODELS)})")
        args.vocab_size = MODELS[args.model]["vocab_size"]
        args.model_name = args.model
    longest = max(w.input_len + w.output_len for w in (ROUND_WORKLOADS[args.table][n] for n in names))
    args.max_model_len = args.max_model_len or max(512, -(-(longest + 16) // 128) * 128)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    t0 = time.monotonic()
    args = parse_args(argv)
    if args.report_only:
        found = False
        for path in sorted(args.out.glob("interleaved-*.json")):
            data = load(path)
            for inv in data["invocations"]:
                if args.model_filter in (None, inv["model"]) and inv["device"] == args.device:
                    print(report(inv, args.target) + "\n", flush=True)
                    found = True
        if not found:
            print(f"no {args.device} invocations in {args.out}/interleaved-*.json", flush=True)
        return 0
    args.checkpoint = _checkpoint(args)
    return Comparison(args, t0).run()


if __name__ == "__main__":
    sys.exit(main())
