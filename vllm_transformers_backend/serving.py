"""The OpenAI-compatible server's ``/classify``, ``/score`` (``/v1/score``), ``/rerank`` (``/v1/rerank``,
``/v2/rerank``) and ``/pooling`` routes, with newer vLLM's request and response shapes, for vLLM 0.6.2's
``vllm serve``.

:func:`install` adds them to the server's FastAPI app (the launcher patch calls it once the app and its
state exist). The handlers tokenize, send one engine request per prompt or pair, and shape the answer;
what decides the model's output (task, activation, token types) is :mod:`.pooling_api`, shared with
``LLM.classify`` / ``score``. A request the engine cannot serve is an HTTP 400 naming the problem.

Decode step: not on it (HTTP routes around the engine).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, List, Optional, Sequence, Tuple, Union

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from vllm.entrypoints.openai.protocol import ErrorResponse, OpenAIBaseModel, UsageInfo
from vllm.entrypoints.openai.serving_engine import OpenAIServing
from vllm.inputs.parse import parse_and_batch_prompt
from vllm.utils import merge_async_iterators, random_uuid

from . import pooling_api
from ._logging import get_logger
from .options import pooling_task_of
from .outputs import ClassificationRequestOutput, ScoringRequestOutput

logger = get_logger(__name__)

class _PoolingRequestBase(OpenAIBaseModel):
    model: Optional[str] = None
    truncate_prompt_tokens: Optional[int] = Field(default=None, ge=1)
    use_activation: Optional[bool] = Field(default=None, description="False: raw logits. Default: the task's "
                                           "activation (see the README).")
    # older names of use_activation in newer vLLM
    activation: Optional[bool] = None
    softmax: Optional[bool] = None
    priority: int = 0
    user: Optional[str] = None

    def activation_choice(self) -> Optional[bool]:
        return next((v for v in (self.use_activation, self.activation, self.softmax) if v is not None), None)


class ClassificationRequest(_PoolingRequestBase):
    input: Union[List[int], List[List[int]], str, List[str]]


class ClassificationData(OpenAIBaseModel):
    index: int
    label: Optional[str]
    probs: List[float]
    num_classes: int


class _ListResponse(OpenAIBaseModel):
    """What newer vLLM's list answers share (their ``id`` prefix and ``data`` items differ)."""

    id: str
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: List[Any]
    usage: UsageInfo


class ClassificationResponse(_ListResponse):
    id: str = Field(default_factory=lambda: f"classify-{random_uuid()}")
    data: List[ClassificationData]


class PoolingRequest(_PoolingRequestBase):
    input: Union[List[int], List[List[int]], str, List[str]]


class PoolingResponseData(OpenAIBaseModel):
    index: int
    object: str = "pooling"
    data: List[float]


class PoolingResponse(_ListResponse):
    id: str = Field(default_factory=lambda: f"pool-{random_uuid()}")
    data: List[PoolingResponseData]


class ScoreRequest(_PoolingRequestBase):
    text_1: Union[List[str], str]
    text_2: Union[List[str], str]


class ScoreResponseData(OpenAIBaseModel):
    index: int
    object: str = "score"
    score: float


class ScoreResponse(_ListResponse):
    id: str = Field(default_factory=lambda: f"score-{random_uuid()}")
    data: List[ScoreResponseData]


class RerankRequest(_PoolingRequestBase):
    query: str
    documents: List[str]
    top_n: int = 0


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"rerank-{random_uuid()}")
    model: str
    usage: RerankUsage
    results: List[RerankResult]


class ServingPooling(OpenAIServing):
    """Handlers of ``/classify``, ``/pooling``, ``/score`` and ``/rerank`` over vLLM 0.6.2's engine client."""

    def __init__(self, engine_client: Any, model_config: Any, base_model_paths: List[Any], *,
                 request_logger: Any = None) -> None:
        super().__init__(engine_client=engine_client, model_config=model_config, base_model_paths=base_model_paths,
                         lora_modules=None, prompt_adapters=None, request_logger=request_logger)

    # --- routes ------------------------------------------------------------------------------------

    async def classify(self, request: ClassificationRequest, raw_request: Optional[Request] = None):
        return await self._answer(request, raw_request, self._classify)

    async def pooling(self, request: PoolingRequest, raw_request: Optional[Request] = None):
        return await self._answer(request, raw_request, self._pooling)

    async def score(self, request: ScoreRequest, raw_request: Optional[Request] = None):
        return await self._answer(request, raw_request, self._score)

    async def rerank(self, request: RerankRequest, raw_request: Optional[Request] = None):
        return await self._answer(request, raw_request, self._rerank)

    async def _answer(self, request: _PoolingRequestBase, raw_request: Optional[Request], handler: Any):
        if request.model is not None:
            error = await self._check_model(request)
            if error is not None:
                return error
        if request.priority != 0:
            return self.create_error_response("priority scheduling is not enabled on this server; leave priority 0")
        try:
            return await handler(request, raw_request)
        except asyncio.CancelledError:
            return self.create_error_response("Client disconnected")
        except ValueError as exc:
            return self.create_error_response(str(exc))

    async def _classify(self, request: ClassificationRequest, raw_request: Optional[Request]) -> ClassificationResponse:
        pooling_api.require_head(self.model_config, "/classify")
        tokenizer = await self.engine_client.get_tokenizer(None)
        prompts = [self._prompt(tokenizer, item, request.truncate_prompt_tokens)
                   for item in parse_and_batch_prompt(request.input)]
        params = pooling_api.params_for("classify", request.activation_choice())
        outputs = await self._run("classify", prompts, [params] * len(prompts), raw_request)
        id2label = getattr(self.model_config.hf_config, "id2label", None) or {}
        data = []
        for index, output in enumerate(outputs):
            probs = ClassificationRequestOutput.from_base(output).outputs.probs
            best = max(range(len(probs)), key=probs.__getitem__)
            label = id2label.get(best, id2label.get(str(best)))
            data.append(ClassificationData(index=index, label=label, probs=probs, num_classes=len(probs)))
        return ClassificationResponse(model=self._model_name(request), data=data, usage=self._usage(outputs))

    async def _pooling(self, request: PoolingRequest, raw_request: Optional[Request]) -> PoolingResponse:
        """The raw pooled output per input: a head's logits (what ``LLM.reward`` returns), or an embedding."""
        if pooling_task_of(self.model_config) is None:
            raise ValueError("/pooling needs a pooling engine (--runner pooling / --task ...); this one generates")
        tokenizer = await self.engine_client.get_tokenizer(None)
        prompts = [self._prompt(tokenizer, item, request.truncate_prompt_tokens)
                   for item in parse_and_batch_prompt(request.input)]
        params = pooling_api.params_for("reward")
        outputs = await self._run("pool", prompts, [params] * len(prompts), raw_request)
        data = [PoolingResponseData(index=i, data=list(o.outputs.embedding)) for i, o in enumerate(outputs)]
        return PoolingResponse(model=self._model_name(request), data=data, usage=self._usage(outputs))

    async def _score(self, request: ScoreRequest, raw_request: Optional[Request]) -> ScoreResponse:
        scores, usage = await self._pair_scores(request, request.text_1, request.text_2, raw_request)
        return ScoreResponse(model=self._model_name(request), usage=usage,
                             data=[ScoreResponseData(index=i, score=s) for i, s in enumerate(scores)])

    async def _rerank(self, request: RerankRequest, raw_request: Optional[Request]) -> RerankResponse:
        if not request.documents:
            raise ValueError("rerank needs at least one document")
        scores, usage = await self._pair_scores(request, request.query, request.documents, raw_request)
        ranked = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        top_n = request.top_n if request.top_n > 0 else len(ranked)
        results = [RerankResult(index=i, document=RerankDocument(text=request.documents[i]), relevance_score=scores[i])
                   for i in ranked[:top_n]]
        return RerankResponse(model=self._model_name(request), usage=RerankUsage(total_tokens=usage.total_tokens),
                              results=results)

    # --- helpers -----------------------------------------------------------------------------------

    async def _pair_scores(self, request: _PoolingRequestBase, first: Any, second: Any,
                           raw_request: Optional[Request]) -> Tuple[List[float], UsageInfo]:
        mode = pooling_api.score_mode(self.model_config)
        tokenizer = await self.engine_client.get_tokenizer(None)
        first, second = pooling_api.score_inputs(first, second, tokenizer)
        if mode == pooling_api.EMBEDDING:
            texts = first[:1] + second if len(set(first)) == 1 else first + second
            prompts = [self._prompt(tokenizer, {"is_tokens": False, "content": t}, request.truncate_prompt_tokens)
                       for t in texts]
            outputs = await self._run("score", prompts, [pooling_api.params_for("embed")] * len(prompts), raw_request)
            split = len(texts) - len(second)
            scored = pooling_api.cosine_scores(outputs[:split], outputs[split:])
            return [s.outputs.score for s in scored], self._usage(outputs)
        prompts, params = pooling_api.cross_encoder_requests(tokenizer, self.model_config, first, second,
                                                             request.activation_choice(),
                                                             request.truncate_prompt_tokens)
        outputs = await self._run("score", prompts, params, raw_request)
        return [ScoringRequestOutput.from_base(o).outputs.score for o in outputs], self._usage(outputs)

    def _prompt(self, tokenizer: Any, item: Any, truncate: Optional[int]) -> dict:
        if item["is_tokens"]:
            ids = list(item["content"])
            ids = ids[-truncate:] if truncate is not None else ids
        else:
            kwargs = {} if truncate is None else {"truncation": True, "max_length": truncate}
            ids = list(tokenizer(item["content"], **kwargs)["input_ids"])
        if not ids:
            raise ValueError("an input is empty")
        if len(ids) > self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens; an input has "
                             f"{len(ids)} tokens. Shorten it or pass truncate_prompt_tokens.")
        return {"prompt_token_ids": ids}

    async def _run(self, kind: str, prompts: Sequence[dict], params: Sequence[Any],
                   raw_request: Optional[Request]) -> List[Any]:
        request_id = f"{kind}-{random_uuid()}"
        generators = []
        for i, (prompt, param) in enumerate(zip(prompts, params)):
            self._log_inputs(f"{request_id}-{i}", prompt["prompt_token_ids"], params=param, lora_request=None,
                             prompt_adapter_request=None)
            generators.append(self.engine_client.encode(prompt, param, f"{request_id}-{i}"))
        results: List[Any] = [None] * len(generators)
        async for i, output in merge_async_iterators(
                *generators, is_cancelled=raw_request.is_disconnected if raw_request else None):
            results[i] = output
        return results

    def _model_name(self, request: _PoolingRequestBase) -> str:
        return request.model or self.base_model_paths[0].name

    @staticmethod
    def _usage(outputs: Sequence[Any]) -> UsageInfo:
        tokens = sum(len(o.prompt_token_ids or []) for o in outputs)
        return UsageInfo(prompt_tokens=tokens, total_tokens=tokens)


def _response(result: Any) -> JSONResponse:
    if isinstance(result, ErrorResponse):
        return JSONResponse(content=result.model_dump(), status_code=result.code)
    return JSONResponse(content=result.model_dump())


def _handler(request: Request) -> ServingPooling:
    return request.app.state.vllm_transformers_backend_pooling


router = APIRouter()


@router.post("/classify")
async def create_classify(request: ClassificationRequest, raw_request: Request):
    return _response(await _handler(raw_request).classify(request, raw_request))


@router.post("/pooling")
async def create_pooling(request: PoolingRequest, raw_request: Request):
    return _response(await _handler(raw_request).pooling(request, raw_request))


@router.post("/score")
@router.post("/v1/score")
async def create_score(request: ScoreRequest, raw_request: Request):
    return _response(await _handler(raw_request).score(request, raw_request))


@router.post("/rerank")
@router.post("/v1/rerank")
@router.post("/v2/rerank")
async def do_rerank(request: RerankRequest, raw_request: Request):
    return _response(await _handler(raw_request).rerank(request, raw_request))


def install(app: FastAPI) -> None:
    """Adds the routes to a vLLM 0.6.2 server app whose state ``init_app_state`` has filled."""
    state = app.state
    if getattr(state, "vllm_transformers_backend_pooling", None) is not None:
        return
    embedding = getattr(state, "openai_serving_embedding", None)
    if embedding is None:
        logger.warning("the server app has no embedding handler; /classify, /score and /rerank are not added")
        return
    state.vllm_transformers_backend_pooling = ServingPooling(
        embedding.engine_client, embedding.model_config, embedding.base_model_paths,
        request_logger=embedding.request_logger)
    app.include_router(router)
    task = pooling_task_of(embedding.model_config)
    logger.info("added /classify, /pooling, /score (/v1/score) and /rerank (/v1/rerank, /v2/rerank) (pooling task: "
                "%s)", task)
