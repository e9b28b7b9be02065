"""Where an engine step's time goes: host time per phase and device time of the model, for one LLMEngine.

:class:`StepTimer` wraps, from outside and on this engine's objects only (instance attributes; nothing in
the vLLM package is patched), the calls one ``LLMEngine.step()`` makes in vLLM 0.6.2:

* ``schedule``: ``Scheduler.schedule``;
* ``prepare``: the model runner's ``prepare_model_input`` (batch tensors, attention metadata, sampling);
* ``forward``: the model's forward (eager) or the CUDA-graph runner's (input copies and the replay);
* ``logits``: ``compute_logits``; ``wait``: on CUDA, an explicit synchronisation at the start of ``sample``
  (vLLM's sampler would block there anyway, copying the sampled ids to the host; after the overlapped output
  processing has run), so that the host's own time per step is ``wall - wait``; ``sample``: ``sample``;
* ``process``: ``_process_model_outputs`` (detokenisation is off; stop checks, request outputs), which
  runs inside the next step's ``execute_model`` when vLLM overlaps it (async output processing);
* ``other``: the rest of ``step()`` and of the executor/worker between those calls.

Times are exclusive (a phase nested in another is subtracted from it), so the phases of a step add up to
its wall time; ``cpu`` is the process's CPU time over the step and ``<phase>_cpu`` each phase's (all its
threads; on a shared host CPU time leaves out the time other tenants held the cores). On CUDA, events around ``forward``, ``logits`` and ``sample`` give the device span of each
(read after the round, so no extra synchronisation happens inside a step). A span runs from the device
reaching the start event to reaching the end one: for an eager forward it includes the device waiting for
the host to launch kernels, so a span close to the host time of the same phase says the host was the limit. On the CPU the host
times are the whole story (the CPU engine computes synchronously) and the device fields are None.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

PHASES = ("schedule", "prepare", "forward", "logits", "wait", "sample", "process", "other")


class StepTimer:
    def __init__(self, engine: Any, device_type: str) -> None:
        self.engine = engine
        self.cuda = device_type == "cuda"
        self.records: List[Dict[str, Any]] = []
        self._current: Optional[Dict[str, Any]] = None
        self._stack: List[List[Any]] = []  # [phase, start, time spent in nested phases]
        self._events: List[tuple] = []  # (record, key, start event, end event) to read after the round
        self.enabled = True
        executor = engine.model_executor
        worker = getattr(executor, "driver_worker", None)
        if worker is None:
            raise RuntimeError(f"{type(executor).__name__} has no driver_worker: StepTimer needs a single-process "
                               "executor (tensor_parallel_size=1)")
        runner = worker.model_runner
        self.runner = runner
        for scheduler in engine.scheduler:
            self._wrap(scheduler, "schedule", "schedule", self._after_schedule)
        self._wrap(runner, "prepare_model_input", "prepare")
        self._wrap(runner.model, "forward", "forward", device=True)
        for runners in getattr(runner, "graph_runners", None) or []:
            for graph_runner in runners.values():
                self._wrap(graph_runner, "forward", "forward", device=True)
        self._wrap(runner.model, "compute_logits", "logits", device=True)
        sample = runner.model.sample
        self._wrap(runner.model, "sample", "sample", device=True)
        if self.cuda:
            import torch

            timed_sample, timed_wait = runner.model.sample, self._timed(torch.cuda.synchronize, "wait")

            def sample_after_wait(*args: Any, **kwargs: Any) -> Any:
                if self._current is not None and self.enabled:
                    timed_wait()
                return timed_sample(*args, **kwargs)

            sample_after_wait.__wrapped__ = sample  # type: ignore[attr-defined]
            runner.model.sample = sample_after_wait
        self._wrap(engine, "_process_model_outputs", "process")
        # The async output callbacks were bound to the unwrapped method when the engine was built.
        callbacks = getattr(engine, "async_callbacks", None) or []
        for i, callback in enumerate(callbacks):
            callbacks[i] = self._timed(callback, "process")

    # -- wrapping ---------------------------------------------------------------------------------------
    def _wrap(self, owner: Any, attr: str, phase: str, after: Optional[Callable] = None, device: bool = False) -> None:
        setattr(owner, attr, self._timed(getattr(owner, attr), phase, after, device))

    def _timed(self, fn: Callable, phase: str, after: Optional[Callable] = None, device: bool = False) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._current is None or not self.enabled:
                return fn(*args, **kwargs)
            start_event = self._event() if device else None
            self._stack.append([phase, time.perf_counter(), 0.0, time.process_time(), 0.0])
            try:
                result = fn(*args, **kwargs)
            finally:
                name, start, nested, cpu_start, cpu_nested = self._stack.pop()
                elapsed = time.perf_counter() - start
                cpu = time.process_time() - cpu_start
                record = self._current
                record[name] = record.get(name, 0.0) + elapsed - nested
                record[f"{name}_cpu"] = record.get(f"{name}_cpu", 0.0) + cpu - cpu_nested
                if self._stack:
                    self._stack[-1][2] += elapsed
                    self._stack[-1][4] += cpu
            if start_event is not None:
                self._events.append((record, phase, start_event, self._event()))
            if after is not None:
                after(record, result)
            return result

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def _event(self) -> Any:
        if not self.cuda:
            return None
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def _after_schedule(record: Dict[str, Any], result: Any) -> None:
        metadata, outputs = result[0], result[1]
        record["tokens"] = record.get("tokens", 0) + int(outputs.num_batched_tokens)
        record["prefill_groups"] = record.get("prefill_groups", 0) + int(outputs.num_prefill_groups)
        record["seqs"] = record.get("seqs", 0) + sum(len(m.seq_data) for m in metadata)
        # Sequences that get a token this step (a partial prefill chunk does not).
        record["generated"] = record.get("generated", 0) + sum(len(m.seq_data) for m in metadata if m.do_sample)
        record["preempted"] = record.get("preempted", 0) + int(getattr(outputs, "preempted", 0) or 0)

    # -- stepping ---------------------------------------------------------------------------------------
    def step(self) -> Dict[str, Any]:
        """One ``engine.step()``, timed; returns its record (device times filled in by :meth:`resolve`)."""
        record: Dict[str, Any] = {}
        self._current = record
        cpu_start = time.process_time()
        start = time.perf_counter()
        try:
            self.engine.step()
        finally:
            wall = time.perf_counter() - start
            record["cpu"] = time.process_time() - cpu_start
            self._current = None
            self._stack.clear()
        record["wall"] = wall
        record["other"] = wall - sum(record.get(p, 0.0) for p in PHASES if p != "other")
        record["other_cpu"] = record["cpu"] - sum(record.get(f"{p}_cpu", 0.0) for p in PHASES if p != "other")
        record["host"] = wall - record.get("wait", 0.0)  # the host's own time (CUDA: not waiting for the device)
        tokens, decode_seqs = record.get("tokens", 0), record.get("seqs", 0) - record.get("prefill_groups", 0)
        record["kind"] = ("idle" if not tokens else "prefill" if not decode_seqs else
                          "decode" if not record.get("prefill_groups") else "mixed")
        self.records.append(record)
        return record

    def resolve(self) -> None:
        """Reads the device spans of the steps so far (ms); call after the device has finished them."""
        if self._events:
            import torch

            torch.cuda.synchronize()
            for record, key, start, end in self._events:
                name = f"device_{key}"
                record[name] = record.get(name, 0.0) + start.elapsed_time(end) / 1000.0
            self._events.clear()

    def take(self) -> List[Dict[str, Any]]:
        """The records since the last call, device times resolved, in seconds; JSON-ready."""
        self.resolve()
        records, self.records = self.records, []
        return records


def summarize(records: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per step kind: the number of steps and the median of each phase, the wall time and the device spans
    (milliseconds), and the median batch (sequences, tokens)."""
    import statistics

    by_kind: Dict[str, List[Dict[str, Any]]] = {}
    for record in records:
        by_kind.setdefault(record["kind"], []).append(record)
    out: Dict[str, Dict[str, Any]] = {}
    for kind, group in by_kind.items():
        row: Dict[str, Any] = {"steps": len(group), "seqs": statistics.median(r.get("seqs", 0) for r in group),
                               "tokens": statistics.median(r.get("tokens", 0) for r in group)}
        for key in ("wall", "host", "cpu", *PHASES, *(f"{p}_cpu" for p in PHASES), "device_forward", "device_logits",
                    "device_sample"):
            values = [r[key] for r in group if r.get(key) is not None]
            row[f"{key}_ms"] = statistics.median(values) * 1000.0 if values else None
        out[kind] = row
    return out
