"""Patch of ``vllm.entrypoints.launcher.serve_http`` (vLLM 0.6.2): the server's ``/classify``, ``/score``,
``/rerank`` and ``/pooling`` routes.

vLLM 0.6.2's OpenAI server has ``/v1/embeddings`` only. Both entry points (``vllm serve`` and
``python -m vllm.entrypoints.openai.api_server``, which runs the server module as ``__main__``, a copy a
patch of ``vllm.entrypoints.openai.api_server`` would miss) build the app, fill its state
(``init_app_state``) and hand it to ``serve_http``, which they import by name after ``import vllm`` has
applied this patch. The wrapped ``serve_http`` adds the routes of
``vllm_transformers_backend.serving`` to that app, with newer vLLM's request and response shapes, then
serves it as before.

Decode step: not on it (applied at ``import vllm``; acts when the engine is configured or loads the model).
"""
from __future__ import annotations

from ._base import Patch, require_parameters, wrap


class LauncherPatch(Patch):
    #: Only the server's pooling routes need it; the rest of the backend works without (doctor lists it).
    required = False
    name = "launcher"
    target = "vllm.entrypoints.launcher.serve_http: /classify, /score (/v1/score), /rerank (/v1/rerank), /pooling"

    wraps = (("vllm.entrypoints.launcher", "serve_http"),)

    def _apply(self) -> None:
        owner = self.owner()
        require_parameters(owner.serve_http, ["app"], self.target)

        def make(original):
            async def serve_http(app, **uvicorn_kwargs):
                from vllm_transformers_backend.serving import install

                install(app)
                return await original(app, **uvicorn_kwargs)

            return serve_http

        wrap(owner, "serve_http", self.name, make)
