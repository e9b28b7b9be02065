"""Peak memory of one prefill forward, native vLLM vs the backend: what vLLM's memory profile sizes the KV cache
from (on GPUs the backend's engines got 0.25-1.3% fewer KV blocks than native's until construction stopped
allocating what it dropped; README, Performance).

Each engine runs in its own process; the torch profiler's memory timeline over one ``generate`` of one prompt
(one prefill step) gives the live bytes of the tensors that step creates, their peak, and the largest tensors
alive at that peak, which names what the backend holds that native does not. ``--seqs N`` splits the
tokens over N prompts in the one step (vLLM's profiling run: ``max_num_seqs`` prompts). ``--first`` profiles
the engine's first forward (on the CPU engine the backend's one-time checks run in it); otherwise a warm-up
forward runs first. On GPUs the step's peak is the caching allocator's (the profiler's memory timeline fails
on exit with CUDA on torch 2.4), and the first forward is vLLM's profiling run inside ``LLM()``: the second
table gives, per engine, the memory allocated after loading, the free space the allocator then still holds in
part-used segments (vLLM's profile counts it as used), that run's peak allocated and reserved memory, and the
KV blocks it gave; ``--segments`` adds the allocator's trace of that run: the segments it held at its reserved
peak and the code whose allocation made each (equal live peaks can still reserve differently). Prints tables;
``--out`` appends the rows to a JSON file.

    python benchmarks/forward_peak.py --checkpoint CKPT --tokens 1000                 # CPU engine, float32
    python benchmarks/forward_peak.py --checkpoint CKPT --tokens 2048 --seqs 256 --device cuda --dtype bfloat16
    python benchmarks/forward_peak.py --model qwen2 --tokens 2048 --seqs 256 --device cuda --dtype bfloat16 \
        --baseline-path /tmp/before        # a bench_specs shape, vLLM's dummy weights; and another commit's backend
    python benchmarks/forward_peak.py --model 8b --tokens 8320 --seqs 256 --device cuda --dtype bfloat16 \
        --no-body-off --segments          # which segments the backend's profiling run reserves beyond native's
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

#: (label, model_impl, extra environment): the backend with every speed pass, and with HF's body forward.
VARIANTS = [("native", "vllm", {}), ("backend", "transformers", {}),
            ("backend, body_forward off", "transformers", {"VLLM_TRANSFORMERS_BACKEND_FUSE_BODY": "0"})]


def _where(frames: List[Dict[str, Any]]) -> str:
    """The innermost frames of an allocation outside torch itself: which code asked for the memory."""
    own = [f for f in frames if "/torch/" not in f.get("filename", "") and f.get("filename", "").endswith(".py")]
    return " < ".join(f"{Path(f['filename']).name}:{f.get('line')} {f.get('name')}" for f in own[:3]) or "?"


def new_segments(trace: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What the caching allocator reserved from the device during a traced window (``segment_alloc`` and
    ``segment_free`` events of ``torch.cuda.memory._snapshot()['device_traces']``): its peak, and the segments
    held at that peak with their sizes and the code whose allocation made each. vLLM 0.6.2 reads the device's
    free memory right after its profiling run, before its own ``empty_cache``, so every segment reserved then
    counts as used: a segment one engine adds and the other does not is KV cache it loses, even at equal live
    peaks."""
    held: Dict[int, Dict[str, Any]] = {}
    reserved = peak = 0
    at_peak: List[Dict[str, Any]] = []
    for event in trace:
        action = event.get("action")
        if action == "segment_alloc":
            held[event["addr"]] = {"bytes": event["size"], "where": _where(event.get("frames") or [])}
            reserved += event["size"]
            if reserved > peak:
                peak, at_peak = reserved, list(held.values())
        elif action == "segment_free" and event.get("addr") in held:
            reserved -= held.pop(event["addr"])["bytes"]
    at_peak.sort(key=lambda seg: -seg["bytes"])
    segments = [{"mib": seg["bytes"] / 2 ** 20, "where": seg["where"]} for seg in at_peak]
    return {"reserved_peak_mib": peak / 2 ** 20, "segments": segments}


def segment_misses(trace: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Why the allocator made each new segment of a traced window although it already held a partly free one as
    large as the request: the live blocks that occupied every such segment then (``alloc`` / ``free_completed``
    events), with the code that allocated each, and the largest free gap left in it. With equal live bytes, these are the
    placements that cost one engine a segment the other does not reserve (blocks from before the window are not
    in the trace and count as free)."""
    segments: Dict[int, int] = {}
    live: Dict[int, Any] = {}
    misses: List[Dict[str, Any]] = []
    pending: Dict[str, Any] | None = None
    for event in trace:
        action, addr = event.get("action"), event.get("addr")
        if action == "segment_alloc":
            if pending is not None:  # no block came from the previous one (not seen in torch 2.4's traces)
                segments[pending["addr"]] = pending["size"]
            pending = {"addr": addr, "size": event["size"], "where": _where(event.get("frames") or [])}
        elif action == "segment_free":
            segments.pop(addr, None)
        elif action == "alloc":
            if pending is not None and pending["addr"] <= addr < pending["addr"] + pending["size"]:
                blocked = []
                for start, size in sorted(segments.items()):
                    if size < event["size"]:
                        continue
                    inside = sorted((a, b) for a, b in live.items() if start <= a < start + size)
                    if sum(n for _, (n, _) in inside) >= size:
                        continue  # full: nothing placed differently would have freed it
                    edges = [start] + [x for a, (n, _) in inside for x in (a, a + n)] + [start + size]
                    gap = max(edges[i + 1] - edges[i] for i in range(0, len(edges), 2))
                    blocked.append({"segment_mib": size / 2 ** 20, "largest_gap_mib": gap / 2 ** 20,
                                    "live": [{"mib": n / 2 ** 20, "where": _where(f)} for _, (n, f) in inside]})
                if blocked:
                    misses.append({"segment_mib": pending["size"] / 2 ** 20, "request_mib": event["size"] / 2 ** 20,
                                   "where": pending["where"], "blocked": blocked})
                segments[pending["addr"]] = pending["size"]
                pending = None
            live[addr] = (event["size"], event.get("frames") or [])  # named only if it is ever listed
        elif action == "free_completed":
            live.pop(addr, None)
    return misses


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    """In this process: one engine, one profiled prefill; the peak of live bytes the step created."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vllm import LLM, SamplingParams

    sizing: Dict[str, Any] = {}
    if args.device == "cuda":
        # vLLM sizes the KV cache from the device memory its profiling run leaves in use (mem_get_info, so the
        # caching allocator's reserved segments count, not only live tensors): both peaks, read at its end
        from vllm.worker.worker import Worker

        determine = Worker.determine_num_available_blocks

        def determine_and_record(self):
            # after loading, what vLLM's own empty_cache cannot give back: free blocks inside segments that
            # also hold live tensors (the profile reads the device's free memory, so they count as used)
            torch.cuda.empty_cache()
            sizing.update(loaded_allocated_mib=torch.cuda.memory_allocated() / 2 ** 20,
                          loaded_held_free_mib=(torch.cuda.memory_reserved() - torch.cuda.memory_allocated()) / 2 ** 20)
            torch.cuda.reset_peak_memory_stats()
            if args.segments:  # the allocator's own event trace, Python stacks included, over the profiling run
                torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
            blocks = determine(self)
            sizing.update(num_gpu_blocks=blocks[0], profile_allocated_mib=torch.cuda.max_memory_allocated() / 2 ** 20,
                          profile_reserved_mib=torch.cuda.max_memory_reserved() / 2 ** 20)
            if args.segments:
                snapshot = torch.cuda.memory._snapshot()
                torch.cuda.memory._record_memory_history(enabled=None)
                traces = snapshot.get("device_traces") or [[]]
                trace = traces[torch.cuda.current_device()]
                sizing["profile_segments"] = {**new_segments(trace), "misses": segment_misses(trace)}
            return blocks

        Worker.determine_num_available_blocks = determine_and_record
    import vllm_transformers_backend

    sizing["package"] = str(Path(vllm_transformers_backend.__file__).resolve().parent)  # which backend code ran
    llm = LLM(model=args.checkpoint, model_impl=args.impl, dtype=args.dtype, device=args.device,
              max_model_len=args.tokens + 8, max_num_batched_tokens=args.tokens + 8, enforce_eager=True,
              skip_tokenizer_init=True, gpu_memory_utilization=0.4, max_num_seqs=args.seqs,
              load_format=args.load_format)
    params = SamplingParams(max_tokens=1, detokenize=False)

    def prompts(first_id: int) -> List[Dict[str, List[int]]]:
        # --seqs N: the step's tokens split over N prompts, as vLLM's profiling run splits its batch
        size = args.tokens // args.seqs
        return [{"prompt_token_ids": list(range(first_id + i * size, first_id + (i + 1) * size))}
                for i in range(args.seqs)]

    if not args.first:
        llm.generate(prompts(100), params, use_tqdm=False)
    if args.device == "cuda":
        # the profiler's memory timeline fails on exit on this torch with CUDA (python replay stack); the
        # allocator's own peak of the step stands in (no list of tensors)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        llm.generate(prompts(200), params, use_tqdm=False)
        return {"peak_mib": (torch.cuda.max_memory_allocated() - before) / 2 ** 20, "largest_at_peak_mib": [],
                **sizing}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        llm.generate(prompts(200), params, use_tqdm=False)
    live, peak, at_peak, alive = 0, 0, [], {}
    for _, action, (key, _version), size in prof._memory_profile().timeline:
        name = getattr(action, "name", str(action))
        if name == "CREATE":
            alive[key] = size
            live += size
        elif name == "DESTROY" and key in alive:
            live -= alive.pop(key)
        if live > peak:
            peak, at_peak = live, sorted(alive.values(), reverse=True)[:8]
    return {"peak_mib": peak / 2 ** 20, "largest_at_peak_mib": [round(s / 2 ** 20, 3) for s in at_peak], **sizing}


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint directory")
    source.add_argument("--model", help="a random-weight shape of bench_specs.py (1b, 8b, qwen2, ...): its config "
                                        "only, vLLM draws the weights (load_format dummy)")
    p.add_argument("--baseline-path", action="append", default=[], help="also run the backend from the package "
                   "under this folder (another commit's vllm_transformers_backend, patches inside): a before/after; "
                   "repeat it for several")
    p.add_argument("--no-body-off", action="store_true", help="leave out the body_forward-off variant")
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--seqs", type=int, default=1, help="split the tokens over this many prompts (one step)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--first", action="store_true", help="profile the engine's first forward")
    p.add_argument("--out", default=None, help="a JSON file the rows are appended to")
    p.add_argument("--segments", action="store_true", help="cuda: trace the allocator over vLLM's profiling run and "
                   "list the segments it held at its reserved peak, with the code that made each")
    p.add_argument("--impl", help=argparse.SUPPRESS)  # set in the child process, with:
    p.add_argument("--load-format", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.segments and args.device != "cuda":
        p.error("--segments reads the CUDA caching allocator's trace: add --device cuda")
    if args.impl:
        print("RESULT " + json.dumps(measure(args)))
        return 0
    if args.model:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_specs import config_checkpoint

        args.checkpoint = str(config_checkpoint(args.model, args.dtype, Path("/tmp/vtb-bench")))
        args.load_format = "dummy"
    variants = VARIANTS[:2] if args.no_body_off else list(VARIANTS)
    for n, folder in enumerate(args.baseline_path):
        path = str(Path(folder).resolve())
        variants.insert(2 + n, (f"backend at {folder}", "transformers",
                                {"PYTHONPATH": os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")]))}))
    forwarded = ["--checkpoint", args.checkpoint, "--tokens", str(args.tokens), "--seqs", str(args.seqs),
                 "--device", args.device, "--dtype", args.dtype, *(["--first"] if args.first else []),
                 *(["--segments"] if args.segments else []),
                 "--load-format", args.load_format]
    rows = []
    for label, impl, env in variants:
        cmd = [sys.executable, __file__, "--impl", impl, *forwarded]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=900)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{label}: FAILED\n{proc.stderr[-2000:]}")
            return 1
        rows.append({"variant": label, **json.loads(line[len("RESULT "):])})
    native = rows[0]["peak_mib"]
    print(f"\none prefill of {args.tokens} tokens in {args.seqs} prompt(s), {args.device} {args.dtype}, "
          f"{'first forward' if args.first else 'after a warm-up forward'}: live bytes created by the step\n")
    print("| variant | peak MiB | vs native | largest tensors alive at the peak, MiB |\n|---|---:|---:|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['peak_mib']:.2f} | {row['peak_mib'] - native:+.2f} | "
              f"{', '.join(str(s) for s in row['largest_at_peak_mib'])} |")
    if "num_gpu_blocks" in rows[0]:
        print("\nAfter loading (allocated; free inside part-used segments, which empty_cache keeps) and vLLM's "
              "profiling run (it sizes the KV cache):\n\n| variant | loaded MiB | held free MiB | KV blocks | "
              "vs native | profile peak allocated MiB | profile peak reserved MiB |\n|---|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            print(f"| {row['variant']} | {row['loaded_allocated_mib']:.1f} | {row['loaded_held_free_mib']:.1f} | "
                  f"{row['num_gpu_blocks']} | {row['num_gpu_blocks'] - rows[0]['num_gpu_blocks']:+d} | "
                  f"{row['profile_allocated_mib']:.1f} | {row['profile_reserved_mib']:.1f} |")
    if any("profile_segments" in row for row in rows):
        print("\nSegments vLLM's profiling run reserved, at its reserved peak (the KV sizing counts them as used), "
              "largest first, with the code whose allocation made each:\n")
        for row in rows:
            seg = row.get("profile_segments") or {"segments": [], "reserved_peak_mib": 0.0}
            print(f"- {row['variant']}: {len(seg['segments'])} segments, {seg['reserved_peak_mib']:.1f} MiB")
            for one in seg["segments"][:8]:
                print(f"    {one['mib']:9.1f} MiB  {one['where']}")
            for miss in seg.get("misses", [])[:6]:  # a new segment although one as large was held: what sat in it
                print(f"    new {miss['segment_mib']:.1f} MiB for {miss['request_mib']:.1f} MiB ({miss['where']}) "
                      f"while held:")
                for held in miss["blocked"][:3]:
                    print(f"      {held['segment_mib']:.1f} MiB, largest gap {held['largest_gap_mib']:.1f}: " + "; ".join(
                        f"{b['mib']:.1f} MiB {b['where']}" for b in held["live"][:4]))
    if args.out:
        out = Path(args.out)
        data = json.loads(out.read_text()) if out.exists() else []
        data.append({"options": {k: v for k, v in vars(args).items() if k not in ("impl", "out")}, "rows": rows})
        out.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
