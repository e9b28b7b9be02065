"""Load: native vLLM 0.6.2 vs the Transformers backend under a burst of server requests and under
preemption, answers compared token for token (greedy) and wall times side by side.

Two parts (issue #22, "a server must queue what it cannot run yet, never die"):

* ``serve``: ``vllm serve MODEL --model-impl IMPL`` per implementation. First each distinct prompt once,
  one after the other (its sequential answer), then ``--requests`` completions at once (``--distinct``
  prompts of mixed lengths, cycled), ``--max-tokens`` greedy tokens each. Counted: requests answered,
  answers equal to their sequential answer (token ids, through ``--return-tokens-as-token-ids``), the
  burst's wall time, whether the server is still healthy afterwards and whether its log says the engine
  died.
* ``offline``: ``LLM.generate`` over ``--prompts`` prompts of random token ids and random lengths
  (``--max-prompt-len``) and random output lengths (``--max-new-tokens``), with a KV cache of only
  ``--num-blocks`` blocks, so that the scheduler preempts (its count is reported). Each implementation
  runs in its own process; the backend's tokens are compared with native's.

Implementations (``--impls``): ``transformers`` (the backend), ``vllm`` (vLLM's own model, with this
package's patches) and ``vllm-as-shipped`` (vLLM's own model with none of this package's patches:
``VLLM_TRANSFORMERS_BACKEND_DISABLE=1``, no plugins), which shows what vLLM 0.6.2 itself does under the same
load. They alternate (A/B, then B/A, ``--rounds``), so that all see the same load on a shared machine; the
table gives every run and, per round, the backend / native wall-time ratio.

    python benchmarks/load.py                          # both parts, 2 rounds, the bundled SmolLM2 (float32)
    python benchmarks/load.py --parts serve --rounds 3 --requests 200
    python benchmarks/load.py --parts offline --prompts 500 --num-blocks 48
    python benchmarks/load.py --parts serve --impls vllm-as-shipped,vllm --rounds 1   # vLLM 0.6.2 as shipped

Exit status 0 when every goal holds for the backend and native (``vllm-as-shipped`` is a reference, not a
goal): nothing lost, every server answer equal to its sequential answer, the backend's offline tokens
equal native's, no engine died; the 1.2x wall-time goal is printed, not enforced (it depends on the
machine's load).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

MODELS_DIR = Path(os.environ.get("VTB_CACHE", Path.home() / ".cache/vllm-transformers-backend")) / "models"
DEFAULT_MODEL = MODELS_DIR / "SmolLM2-135M-Instruct"
RESULT_PREFIX = "LOAD_RESULT "
AS_SHIPPED = "vllm-as-shipped"
#: Environment of a process running vLLM without any of this package's patches.
UNPATCHED_ENV = {"VLLM_TRANSFORMERS_BACKEND_DISABLE": "1", "VLLM_PLUGINS": ""}
DEATH_MARKERS = ("Engine loop has died", "MQLLMEngine is already dead", "No heartbeat received")
#: Sentences the server prompts are cut from: prompt i takes the first 1 + (i * 7) % len words.
TEXT = ("The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the morning light "
        "and the river carries small boats past the old mill towards the sea where ships wait for the tide "
        "to turn before they leave for distant harbours full of spices silk and stories").split()


# --- serve --------------------------------------------------------------------------------------------

def server_prompts(distinct: int) -> List[str]:
    return [f"Note {i}: " + " ".join(TEXT[: 1 + (i * 7) % len(TEXT)]) for i in range(distinct)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def impl_env(args: argparse.Namespace, impl: str) -> Dict[str, str]:
    # vLLM's CPU engine reserves 4 GiB of KV cache by default: a few engines of other users plus these
    # outgrow a shared machine's memory, and the kernel's OOM killer takes the largest (an engine).
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, **dict(item.split("=", 1) for item in args.env)}
    return {**env, **UNPATCHED_ENV} if impl == AS_SHIPPED else env


def _healthy(base: str) -> bool:
    try:
        return urllib.request.urlopen(f"{base}/health", timeout=10).status == 200
    except OSError:
        return False


class Server:
    """``vllm serve`` in its own process group, stopped on exit."""

    def __init__(self, args: argparse.Namespace, impl: str, log_path: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        impl_args = [] if impl == AS_SHIPPED else ["--model-impl", impl]
        command = [str(Path(sys.executable).parent / "vllm"), "serve", str(args.model), *impl_args,
                   "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", "model",
                   "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
                   "--return-tokens-as-token-ids", "--disable-log-requests", *args.server_arg]
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**impl_env(args, impl), "VLLM_LOGGING_LEVEL": "INFO"})

    def wait_ready(self, timeout: float) -> float:
        start = time.time()
        while not _healthy(self.base):
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.log_path.read_text()[-3000:]}")
            if time.time() - start > timeout:
                raise RuntimeError(f"server not ready within {timeout} s")
            time.sleep(1)
        return time.time() - start

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by the live processes of a process group: less
    sensitive to other users' load than wall time (though not immune: contended caches, OpenMP spinning)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == pgid:  # pgrp; utime and stime follow at 11 and 12
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def oom_killed(server_log: str) -> bool:
    """Whether the kernel's OOM killer took the server's engine process (vLLM then reports only a missed
    heartbeat); False where dmesg cannot be read."""
    match = re.search(r"Started engine process with PID (\d+)", server_log)
    try:
        kernel_log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(match) and re.search(rf"Killed process {match.group(1)}\b", kernel_log) is not None


def _complete(client: Any, prompt: str, max_tokens: int) -> List[int]:
    reply = client.completions.create(model="model", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0)
    # "token_id:123" with --return-tokens-as-token-ids
    return [int(token.split(":", 1)[1]) for token in reply.choices[0].logprobs.tokens]


def run_serve(args: argparse.Namespace, impl: str, log_dir: Path, round_index: int) -> Dict[str, Any]:
    import openai

    prompts = server_prompts(args.distinct)
    server = Server(args, impl, log_dir / f"serve-{impl}-{round_index}.log")
    result: Dict[str, Any] = {"part": "serve", "impl": impl, "round": round_index, "requests": args.requests}
    try:
        result["start_s"] = round(server.wait_ready(args.start_timeout), 1)
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", timeout=args.request_timeout,
                               max_retries=0)
        start = time.time()
        sequential = [_complete(client, p, args.max_tokens) for p in prompts]
        result["sequential_s"] = round(time.time() - start, 1)

        def ask(i: int) -> Any:
            try:
                return _complete(client, prompts[i % len(prompts)], args.max_tokens)
            except Exception as exc:  # counted and reported: a lost request is the thing measured
                return f"{type(exc).__name__}: {exc}"[:300]

        start, cpu = time.time(), group_cpu_seconds(server.process.pid)
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.requests) as pool:
            answers = list(pool.map(ask, range(args.requests)))
        result["burst_s"] = round(time.time() - start, 2)
        result["burst_cpu_s"] = round(group_cpu_seconds(server.process.pid) - cpu, 1)
        result["answered"] = sum(isinstance(a, list) for a in answers)
        result["equal_to_sequential"] = sum(a == sequential[i % len(prompts)] for i, a in enumerate(answers))
        result["errors"] = sorted({a for a in answers if isinstance(a, str)})[:5]
        result["healthy_after"] = _healthy(server.base)
        result["sequential_answers"] = sequential
    except Exception as exc:
        result["failure"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    result["engine_died"] = [m for m in DEATH_MARKERS if m in log]
    if result["engine_died"] and oom_killed(log):
        result["engine_died"].append("engine OOM-killed (dmesg)")
    result["preemptions_logged"] = log.count("is preempted by PreemptionMode")
    return result


# --- offline ------------------------------------------------------------------------------------------

def offline_workload(args: argparse.Namespace, vocab_size: int):
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(1, args.max_prompt_len))]
               for _ in range(args.prompts)]
    new_tokens = [rng.randint(1, args.max_new_tokens) for _ in range(args.prompts)]
    return prompts, new_tokens


def offline_child(args: argparse.Namespace) -> None:
    """One implementation's offline run in this process; prints one RESULT_PREFIX line."""
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    vocab_size = AutoConfig.from_pretrained(args.model).vocab_size
    prompts, new_tokens = offline_workload(args, vocab_size)
    start = time.time()
    impl_kwargs = {} if args.impl == AS_SHIPPED else {"model_impl": args.impl}
    llm = LLM(model=str(args.model), **impl_kwargs, device="cpu", dtype=args.dtype,
              max_model_len=args.max_model_len, num_gpu_blocks_override=args.num_blocks, enforce_eager=True,
              skip_tokenizer_init=True, seed=0)
    start_s = time.time() - start
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in new_tokens]
    start, cpu = time.time(), time.process_time()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall, cpu = time.time() - start, time.process_time() - cpu
    scheduler = llm.llm_engine.scheduler[0]
    print(RESULT_PREFIX + json.dumps({
        "start_s": round(start_s, 1), "wall_s": round(wall, 2), "cpu_s": round(cpu, 1),
        "preemptions": scheduler.num_cumulative_preemption,
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "prompt_tokens": sum(map(len, prompts)), "new_tokens": sum(new_tokens),
    }), flush=True)


def run_offline(args: argparse.Namespace, impl: str, log_dir: Path, round_index: int) -> Dict[str, Any]:
    command = [sys.executable, __file__, "offline-child", "--impl", impl, "--model", str(args.model),
               "--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--num-blocks", str(args.num_blocks),
               "--prompts", str(args.prompts), "--max-prompt-len", str(args.max_prompt_len),
               "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed)]
    log_path = log_dir / f"offline-{impl}-{round_index}.log"
    result: Dict[str, Any] = {"part": "offline", "impl": impl, "round": round_index, "requests": args.prompts}
    with open(log_path, "w") as log:
        process = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                 timeout=args.offline_timeout, env={**impl_env(args, impl), "VLLM_LOGGING_LEVEL": "WARNING"})
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode != 0 or not lines:
        result["failure"] = f"exit {process.returncode}: {log_path.read_text(errors='replace')[-2000:]}"
        return result
    result.update(json.loads(lines[-1][len(RESULT_PREFIX):]))
    result["answered"] = sum(1 for t in result["tokens"] if t)
    return result


# --- report -------------------------------------------------------------------------------------------

def _ratio(runs: Sequence[Dict[str, Any]], key: str) -> Optional[float]:
    by_impl = {r["impl"]: r.get(key) for r in runs}
    if by_impl.get("transformers") and by_impl.get("vllm"):
        return by_impl["transformers"] / by_impl["vllm"]
    return None


def report(results: List[Dict[str, Any]]) -> bool:
    ok = True
    print("\n| part | round | impl | answered | equal | wall s | CPU s | load avg | start s | preemptions | engine died | notes |")
    print("|---|---:|---|---:|---|---:|---:|---|---:|---:|---|---|")
    offline_reference: Dict[int, List[List[int]]] = {r["round"]: r["tokens"] for r in results
                                                      if r["part"] == "offline" and r["impl"] == "vllm" and "tokens" in r}
    for r in results:
        notes = r.get("failure", "") or "; ".join(r.get("errors", []))
        goal = r["impl"] != AS_SHIPPED  # vLLM as shipped is the reference for what vLLM itself does
        if r["part"] == "serve":
            equal = f"{r.get('equal_to_sequential', 0)}/{r['requests']} to sequential"
            wall, cpu, preempt = r.get("burst_s"), r.get("burst_cpu_s"), r.get("preemptions_logged")
            lost = r.get("answered") != r["requests"] or r.get("equal_to_sequential") != r["requests"]
            ok &= not goal or (not lost and not r["engine_died"] and r.get("healthy_after", False))
            if not r.get("healthy_after", False):
                notes = ("unhealthy after the burst; " + notes).strip("; ")
        else:
            reference = offline_reference.get(r["round"])
            same = sum(a == b for a, b in zip(r.get("tokens", []), reference or []))
            equal = f"{same}/{r['requests']} to native" if reference is not None else "no native run"
            wall, cpu, preempt = r.get("wall_s"), r.get("cpu_s"), r.get("preemptions")
            ok &= not goal or (r.get("answered") == r["requests"] and (reference is None or same == r["requests"]))
        load = "-".join(str(x) for x in r.get("load_average", []))
        print(f"| {r['part']} | {r['round']} | {r['impl']} | {r.get('answered', 0)}/{r['requests']} | {equal} | "
              f"{wall if wall is not None else '-'} | {cpu if cpu is not None else '-'} | {load} | "
              f"{r.get('start_s', '-')} | {preempt if preempt is not None else '-'} | "
              f"{', '.join(r.get('engine_died', [])) or 'no'} | {notes[:160]} |")
    print("\nbackend / native, per round (goal: wall time <= 1.2x for the server burst):")
    for part, wall_key, cpu_key in (("serve", "burst_s", "burst_cpu_s"), ("offline", "wall_s", "cpu_s")):
        for round_index in sorted({r["round"] for r in results if r["part"] == part}):
            runs = [r for r in results if r["part"] == part and r["round"] == round_index]
            order = " then ".join(r["impl"] for r in runs)
            ratios = [(name, _ratio(runs, key)) for name, key in (("wall", wall_key), ("CPU", cpu_key))]
            print(f"  {part} round {round_index} ({order}): " +
                  ", ".join(f"{name} {ratio:.2f}x" if ratio else f"{name} n/a" for name, ratio in ratios))
    servers = [r for r in results if r["part"] == "serve" and r.get("sequential_answers")]
    by_impl = {}
    for r in servers:
        by_impl.setdefault(r["impl"], r["sequential_answers"])
    if len(by_impl) == 2:
        a, b = by_impl["transformers"], by_impl["vllm"]
        same = sum(x == y for x, y in zip(a, b))
        print(f"  server sequential answers, backend vs native: {same}/{len(a)} equal token for token")
    return ok


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "offline-child"])
    parser.add_argument("--parts", default="serve,offline", help="serve, offline or both (comma-separated)")
    parser.add_argument("--impls", default="transformers,vllm", help=f"transformers, vllm, {AS_SHIPPED}")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the engines (repeat), e.g. "
                        "VLLM_RPC_TIMEOUT=2000")
    parser.add_argument("--impl", default="transformers", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each alternates the implementations' order")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32", help="float32 for token-exact answers ('auto' is bf16 on the CPU)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--requests", type=int, default=200, help="serve: concurrent completions")
    parser.add_argument("--distinct", type=int, default=40, help="serve: distinct prompts among them")
    parser.add_argument("--max-tokens", type=int, default=16, help="serve: tokens per completion")
    parser.add_argument("--server-arg", action="append", default=[], help="serve: one more `vllm serve` argument "
                        "(repeat; e.g. --server-arg=--num-gpu-blocks-override=64)")
    parser.add_argument("--prompts", type=int, default=500, help="offline: prompts")
    parser.add_argument("--max-prompt-len", type=int, default=128, help="offline: prompt lengths 1..N")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="offline: output lengths 1..N")
    parser.add_argument("--num-blocks", type=int, default=48, help="offline: KV-cache blocks (16 tokens each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--request-timeout", type=float, default=1200)
    parser.add_argument("--offline-timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "load-cpu.json")
    args = parser.parse_args(argv)
    if args.mode == "offline-child":
        offline_child(args)
        return 0
    if not args.model.is_dir():
        parser.error(f"no model folder {args.model}: run scripts/setup_cpu_env.sh (it prepares SmolLM2) or pass --model")
    impls = args.impls.split(",")
    log_dir = Path(tempfile.mkdtemp(prefix="vtb-load-"))
    print(f"logs in {log_dir}; load average before: {os.getloadavg()}", flush=True)
    results: List[Dict[str, Any]] = []
    runners = {"serve": run_serve, "offline": run_offline}
    for part in args.parts.split(","):
        for round_index in range(args.rounds):
            for impl in (impls if round_index % 2 == 0 else impls[::-1]):
                load_before = os.getloadavg()[0]
                result = runners[part](args, impl, log_dir, round_index)
                result["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k not in ("tokens", "sequential_answers")}),
                      flush=True)
    ok = report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = [{k: v for k, v in r.items() if k != "tokens"} for r in results]
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:],
                                    "results": summary}, indent=1))
    print(f"\n{'all goals met' if ok else 'GOALS NOT MET'} (wall-time ratio printed above); results in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
