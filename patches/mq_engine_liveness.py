"""Patch of ``vllm.engine.multiprocessing.engine.MQLLMEngine._heartbeat`` (vLLM 0.6.2): a slow engine step
no longer gets the OpenAI server's engine declared dead.

vLLM 0.6.2's engine process runs a heartbeat thread that reports the engine unhealthy ("Engine loop has
died") as soon as one pass of the engine loop, that is one ``engine.step()``, takes longer than
3 x ``VLLM_RPC_TIMEOUT`` (30 s by default). The server then fails every request and exits ("MQLLMEngine is
already dead, terminating server process"). A step is not hung when it is slow: a burst of requests
makes a large first prefill step, and on a loaded or small machine (CPU engine) that step alone can take
longer than 30 s, for vLLM's own models as for the backend. vLLM removed this timer in 0.6.4 (pull
request 9818, "replace heartbeat with pid check"): the engine is dead when its process is dead or a step
raised, not when a step is slow.

The patched heartbeat counts the loop as alive whenever it runs, so the timer never fires; everything
else the heartbeat does stays: an engine that raised still reports its error, ``check_health()`` still
runs and a failing check still marks the engine dead, and healthy beats keep reaching the client during
long steps (the heartbeat thread runs beside the step: vLLM as shipped reports the dead loop from it in
the middle of the step). A dead engine process still ends the server through the client's missed
heartbeats. What is lost is what vLLM itself dropped: a step that hangs forever is not caught by a timer.

Decode step: not on it (the heartbeat thread runs beside the engine loop in the server's engine process).
"""
from __future__ import annotations

from ._base import FixPatch, PatchError, wrap


class MQEngineLivenessPatch(FixPatch):
    name = "mq_engine_liveness"
    target = "vllm.engine.multiprocessing.engine.MQLLMEngine._heartbeat: no 'Engine loop has died' timer on slow steps"

    wraps = (("vllm.engine.multiprocessing.engine:MQLLMEngine", "_heartbeat"),)

    def _apply(self) -> None:
        owner = self.owner()
        # the timer this patch disarms: _heartbeat compares _last_alive_time, which _alive() sets
        uses_timer = {"_last_alive_time", "last_alive_threshold"} <= set(owner._heartbeat.__code__.co_names)
        if not uses_timer or not callable(getattr(owner, "_alive", None)):
            raise PatchError(f"{self.target}: the heartbeat has no loop timer (_alive, _last_alive_time); "
                             "unknown vLLM build")

        def make(original):
            def _heartbeat(self):
                self._alive()  # a step in progress is not a dead loop (vLLM >= 0.6.4 has no such timer)
                return original(self)

            return _heartbeat

        wrap(owner, "_heartbeat", self.name, make)
