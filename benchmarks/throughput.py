"""Throughput on one device: native vLLM 0.6.2 vs the Transformers backend vs HF ``generate``, same
random-weight checkpoint, same prompts, in one run.

    python benchmarks/throughput.py                                  # 1B and 8B shapes, both workloads
    python benchmarks/throughput.py --models 1b --repeats 2          # one model per command (time limits)
    python benchmarks/throughput.py --models 8b --impls vllm,transformers
    python benchmarks/throughput.py --report-only                    # table and chart from the JSON
    python benchmarks/throughput.py --device cpu --tiny              # smoke test, seconds, no GPU
    python benchmarks/throughput.py --models 1b --tp 1,2 --impls vllm,transformers   # TP scaling, 2 GPUs

Workloads: decode-heavy (256 prompts, 128 in / 128 out) and prefill-heavy (64 prompts, 1024 in / 32 out),
random token ids, greedy, ``ignore_eos``. Shapes: Llama-1B (hidden 2048, 16 layers) and Llama-8B (hidden
4096, 32 layers), bf16, random N(0, 0.02) weights written as safetensors once (``--checkpoint-dir``).

Each engine runs in its own child process (bench_engines.py), implementations alternating within a repeat;
every child's runs are merged into ``<out>/throughput.json`` as soon as it ends, so several invocations (one
per model, say) build one results file, and a command killed by a time limit keeps what finished.
``--budget-s`` stops starting children that would not end in time. At the end: the Markdown table over all
runs in the file (medians, each run, ratio to native), and a PNG chart when matplotlib is installed.
``--tp 1,2`` runs the vLLM engines at each tensor-parallel size (HF ``generate`` only at 1) into
``throughput-tp.json``; its table adds each row's ratio to the same implementation at TP=1.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_report  # noqa: E402
from bench_engines import RESULT_PREFIX  # noqa: E402
from bench_specs import ARCHITECTURES, MODELS, WORKLOADS, architecture, checkpoint_ready  # noqa: E402

IMPLS = ("vllm", "transformers", "hf")
#: Architectures vLLM 0.6.2 has no model of: no native row.
NO_NATIVE = {"gemma3", "qwen3_moe"}
#: First guesses of a child's wall time (s) for --budget-s; replaced by measured times as children end.
ESTIMATE_S = {"tiny": 40.0, "1b": 90.0, "8b": 180.0, "gemma3-tiny": 40.0, "gemma3-1b": 240.0, "tiny-moe": 40.0,
              "mixtral-moe": 150.0, "qwen2-moe": 150.0, "qwen3-moe": 150.0, "qwen2": 90.0, "tiny-qwen2": 40.0,
              "tiny-qwen3-moe": 40.0}
BUILD_ESTIMATE_S = {"tiny": 15.0, "1b": 40.0, "8b": 150.0, "gemma3-tiny": 15.0, "gemma3-1b": 60.0, "tiny-moe": 15.0,
                    "mixtral-moe": 120.0, "qwen2-moe": 90.0, "qwen3-moe": 90.0, "qwen2": 40.0, "tiny-qwen2": 15.0,
                    "tiny-qwen3-moe": 15.0}


def expected_class(model: str, impl: str) -> str:
    return "TransformersForCausalLM" if impl == "transformers" else ARCHITECTURES[architecture(model)][1]
_LOADED = re.compile(r"Loading model weights took ([0-9.]+) GB")
#: Child log lines not echoed: vLLM 0.6.2 warns once per prompt when the tokenizer is skipped.
_NOISE = ("Using None for EOS token id because tokenizer is not initialized",)


class Orchestrator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.estimates: Dict[str, float] = {}
        self.results_path = results_path(args)
        self.data = bench_report.empty() if args.fresh else bench_report.load(self.results_path)
        self.invocation = {"id": uuid.uuid4().hex[:8], "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "options": vars(args),
            "host": bench_report.host_info(), "env": None}
        self.data["invocations"].append(self.invocation)
        self.proc: Optional[subprocess.Popen] = None
        signal.signal(signal.SIGTERM, self._terminate)

    def _terminate(self, signum, frame) -> None:
        """SIGTERM (a time limit): stop the running child, keep the results so far."""
        if self.proc is not None:
            _kill_tree(self.proc)
        self.log("terminated: results so far are saved")
        self.save()
        sys.exit(128 + signum)

    # -- progress and budget --------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)

    def fail(self, what: str, model: str, impl: Optional[str], reason: str, tail: Optional[List[str]] = None) -> None:
        self.data["failures"].append({"invocation": self.invocation["id"], "what": what, "model": model,
                                      "impl": impl, "reason": reason, "tail": tail or []})

    def fits(self, what: str, estimate: float, model: str, impl: Optional[str]) -> bool:
        if self.args.budget_s is None or self.elapsed() + estimate <= self.args.budget_s:
            return True
        self.log(f"skipped {what}: about {estimate:.0f} s needed, {self.args.budget_s - self.elapsed():.0f} s of "
                 f"--budget-s left (run it in another invocation; results merge)")
        self.fail(what, model, impl, "budget")
        return False

    def child_timeout(self) -> float:
        if self.args.budget_s is None:
            return self.args.child_timeout
        return max(10.0, min(self.args.child_timeout, self.args.budget_s - self.elapsed()))

    # -- children -----------------------------------------------------------------------------------------
    def run_child(self, what: str, child_args: List[str], model: str, impl: Optional[str]) -> Optional[Dict[str, Any]]:
        """Runs bench_engines.py, streaming its output indented; returns its result (plus what was scraped
        from the log) or None after recording the failure."""
        cmd = [sys.executable, "-u", str(HERE / "bench_engines.py"), *child_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        if self.args.device == "cpu":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "all")
        self.log(f"{what}: starting")
        start = time.monotonic()
        # same process group as this one: whatever stops the parent's group (a command limit) stops the child
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
        self.proc = proc
        lines: List[str] = []
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines, self.args.quiet), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=self.child_timeout())
        except subprocess.TimeoutExpired:
            _kill_tree(proc)  # TP > 1: vLLM's worker processes are the child's children
        finally:
            self.proc = None
        reader.join(timeout=10)
        wall = time.monotonic() - start
        result = next((_parse(line) for line in reversed(lines) if line.startswith(RESULT_PREFIX)), None)
        if proc.returncode != 0 or result is None:
            reason = f"exit code {proc.returncode}" + (" (timeout)" if proc.returncode == -signal.SIGKILL else "")
            self.log(f"{what}: FAILED, {reason}; last lines:\n" + "".join("    " + l for l in lines[-15:]))
            self.fail(what, model, impl, reason, lines[-15:])
            return None
        logged = [float(m.group(1)) for line in lines for m in [_LOADED.search(line)] if m]
        result["logged_weights_gib"] = logged[-1] if logged else None
        result["child_wall_s"] = wall
        self.log(f"{what}: done in {wall:.1f} s")
        return result

    def checkpoint(self, model: str) -> Optional[Path]:
        given = self.args.checkpoint.get(model)
        if given is not None:
            self.data["checkpoints"][model] = {"path": str(given), "given": True}
            return given
        name = f"llama-{model}" if architecture(model) == "llama" else model
        path = self.args.checkpoint_dir / f"{name}-{self.args.dtype}"
        if checkpoint_ready(path, model, self.args.dtype):
            self.log(f"checkpoint {model}: reusing {path}")
            self.data["checkpoints"].setdefault(model, {"path": str(path)})
            return path
        if not self.fits(f"build {model}", BUILD_ESTIMATE_S[model], model, None):
            return None
        result = self.run_child(f"build {model} checkpoint at {path}",
                                ["build", "--model", model, "--checkpoint", str(path), "--device", self.args.device,
                                 "--dtype", self.args.dtype], model, None)
        if result is None:
            return None
        self.data["checkpoints"][model] = {"path": str(path), "shape": MODELS[model], **result["build"]}
        return path

    def bench(self, model: str, path: Path, impl: str, tp: int, repeat: int) -> None:
        what = f"{model} {impl}{f' TP={tp}' if tp > 1 else ''} (repeat {repeat + 1}/{self.args.repeats})"
        key = f"{model}/{impl}/{tp}"
        if impl == "vllm" and architecture(model) in NO_NATIVE:
            self.log(f"{what}: skipped, vLLM 0.6.2 has no {architecture(model)} model")
            return
        if not self.fits(what, self.estimates.get(key, ESTIMATE_S[model]), model, impl):
            return
        child_args = ["run", "--impl", impl, "--model", model, "--checkpoint", str(path), "--workloads",
                      ",".join(self.args.workloads), "--device", self.args.device, "--dtype", self.args.dtype,
                      "--gpu-memory-utilization", str(self.args.gpu_memory_utilization), "--max-model-len",
                      str(self.args.max_model_len), "--hf-batch-size", str(self.args.hf_batch_size), "--tp", str(tp)]
        if self.args.tiny:
            child_args.append("--tiny")
        if self.args.enforce_eager:
            child_args.append("--enforce-eager")
        result = self.run_child(what, child_args, model, impl)
        if result is None:
            return
        self.estimates[key] = result["child_wall_s"]
        if result["model_class"] != expected_class(model, impl):
            self.log(f"{what}: built {result['model_class']}, expected {expected_class(model, impl)}: not recorded")
            self.fail(what, model, impl, f"model class {result['model_class']}")
            return
        self.invocation["env"] = self.invocation["env"] or result["env"]
        for w in result["workloads"]:
            self.data["runs"].append({
                "invocation": self.invocation["id"], "model": model, "impl": impl, "workload": w["workload"],
                "enforce_eager": None if impl == "hf" else bool(result["engine"]["enforce_eager"]),
                "device": self.args.device, "dtype": self.args.dtype, "device_name": result["env"]["device_name"],
                "repeat": repeat, "tp": tp, "prompts": w["prompts"], "input_len": w["input_len"],
                "output_len": w["output_len"], "output_tokens": w["output_tokens"], "total_s": w["total_s"],
                "tok_s": w["tok_s"], "start_s": result["start_s"], "weight_gib": result["weight_bytes"] / 2 ** 30,
                "loaded_gib": None if result["loaded_bytes"] is None else result["loaded_bytes"] / 2 ** 30,
                "logged_weights_gib": result["logged_weights_gib"], "model_class": result["model_class"],
                "engine": result["engine"], "child_wall_s": result["child_wall_s"], "checkpoint": str(path)})

    def save(self) -> None:
        bench_report.save(self.results_path, self.data)

    def run(self) -> None:
        for model in self.args.models:
            path = self.checkpoint(model)
            self.save()
            if path is None:
                continue
            for repeat in range(self.args.repeats):
                for tp in self.args.tp:
                    for impl in self.args.impls:  # alternate: drift over time hits every implementation alike
                        if impl == "hf" and tp > 1:
                            continue  # HF generate runs on one device: its row is the TP=1 one
                        self.bench(model, path, impl, tp, repeat)
                        self.save()
        self.log(f"results: {self.results_path}")


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        import psutil  # a vLLM dependency

        children = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing or the child already gone
        children = []
    proc.kill()
    for child in children:
        try:
            child.kill()
        except Exception:
            pass
    proc.wait()


def results_path(args: argparse.Namespace) -> Path:
    """TP runs and the CPU smoke test get files of their own: never mixed into the one-GPU results."""
    name = "throughput" + (f"-{args.device}-tiny" if args.tiny else "") + ("-tp" if args.tp != [1] else "")
    return args.out / f"{name}.json"


def _pump(stream, lines: List[str], quiet: bool) -> None:
    for line in stream:
        lines.append(line)
        if line.startswith(RESULT_PREFIX) or any(n in line for n in _NOISE):
            continue  # the result is parsed by the parent
        if quiet and not any(k in line for k in ("took", "tok/s", "ready", "Error", "wrote")):
            continue
        sys.stdout.write("    | " + line)
        sys.stdout.flush()


def _parse(line: str) -> Optional[Dict[str, Any]]:
    import json

    try:
        return json.loads(line[len(RESULT_PREFIX):])
    except ValueError:
        return None


def report(results_path: Path, title: str) -> None:
    data = bench_report.load(results_path)
    rows = bench_report.summarize(data["runs"])
    if not rows:
        print(f"no runs in {results_path}", flush=True)
        return
    print("\n" + bench_report.markdown(rows), flush=True)
    pairs = bench_report.pair_markdown(bench_report.pairs(data["runs"]))
    if pairs:  # each interleaved round's ratios: the host's drift between rounds cancels out of them
        print(pairs, flush=True)
    png = results_path.with_suffix(".png")
    why_not = bench_report.chart(rows, png, title)
    print(why_not or f"chart: {png}", flush=True)
    measured = {(r["model"], r["impl"]) for r in data["runs"]} | {(r["model"], None) for r in data["runs"]}
    for f in data.get("failures", []):
        if (f.get("model"), f.get("impl")) not in measured:  # not made good by a later invocation (None: a build)
            print(f"note: {f['what']} did not complete ({f['reason']}, invocation {f['invocation']})", flush=True)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1b,8b", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--workloads", default="decode,prefill")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: vllm (native), transformers "
                   "(the backend), hf (HF generate)")
    p.add_argument("--repeats", type=int, default=1, help="runs per implementation, alternating; the table "
                   "shows each run and the median")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM engines without CUDA graphs")
    p.add_argument("--tp", default="1", help="comma-separated tensor-parallel sizes of the vLLM engines (e.g. 1,2); "
                   "HF generate runs at 1 only")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny Llama (or --models gemma3-tiny), float32, CPU-sized "
                   "workloads (smoke test)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM engines (default 2048; tiny: 256)")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--checkpoint", action="append", default=[], metavar="[MODEL=]PATH",
                   help="use this checkpoint instead of building one (MODEL= may be left out with one model)")
    p.add_argument("--checkpoint-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "vtb-bench")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--fresh", action="store_true", help="start a new results file instead of merging")
    p.add_argument("--budget-s", type=float, default=None, help="start no child that would end after this "
                   "many seconds from now (e.g. 540 under a 600 s command limit)")
    p.add_argument("--child-timeout", type=float, default=1800.0)
    p.add_argument("--quiet", action="store_true", help="show only the children's key log lines")
    p.add_argument("--report-only", action="store_true", help="print the table and draw the chart, run nothing")
    args = p.parse_args(argv)
    args.models = ["tiny"] if args.tiny and args.models == "1b,8b" else _split(args.models, MODELS)
    args.workloads = _split(args.workloads, WORKLOADS)
    args.impls = _split(args.impls, IMPLS)
    try:
        args.tp = sorted({int(v) for v in args.tp.split(",") if v.strip()})
    except ValueError:
        p.error(f"--tp {args.tp!r}: comma-separated integers, e.g. 1,2")
    if not args.tp or min(args.tp) < 1:
        p.error("--tp: sizes of at least 1")
    args.dtype = "float32" if args.tiny else "bfloat16"
    args.max_model_len = args.max_model_len or (256 if args.tiny else 4096 if "long" in args.workloads else 2048)
    if args.device == "cpu" and not args.tiny:
        p.error("--device cpu needs --tiny (the 1B/8B shapes are GPU workloads)")
    checkpoints: Dict[str, Path] = {}
    for item in args.checkpoint:
        model, sep, path = item.rpartition("=")
        if not sep:
            if len(args.models) != 1:
                p.error("--checkpoint PATH without MODEL= needs exactly one model in --models")
            model = args.models[0]
        if model not in args.models:
            p.error(f"--checkpoint {item}: {model} is not in --models")
        checkpoints[model] = Path(path)
    args.checkpoint = checkpoints
    return args


def _split(value: str, allowed) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"unknown value(s) {bad or value!r}; choose from {', '.join(allowed)}")
    return items


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    title = "Output throughput: native vLLM 0.6.2 vs Transformers backend vs HF generate"
    if args.report_only:
        report(results_path(args), title)
        return
    orchestrator = Orchestrator(args)
    orchestrator.run()
    report(orchestrator.results_path, title)


if __name__ == "__main__":
    main()
