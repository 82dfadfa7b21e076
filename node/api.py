"""OpenAI-compatible user API: chat and text completions, models, health and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from node.config import Settings
from node.errors import ModelNotFound, NodeError, PayloadTooLarge
from node.experts import (
    ChatMessage,
    Delta,
    ExpertPool,
    Finished,
    GenerationEvent,
    GenerationParams,
    LocalExpert,
)
from node.metrics import NodeMetrics
from node.schemas import ChatCompletionRequest, CompletionRequest, parse_body

log = logging.getLogger(__name__)

AUTO_MODEL = "auto"
DEFAULT_TEMPERATURE = 0.8  # llama.cpp server's default; OpenAI's 1.0 is too wild for small models
DEFAULT_TOP_P = 0.95


@dataclass(frozen=True)
class NodeInfo:
    """Who this node is, for responses and listings."""

    node_id: str
    started_s: float


settings_key = web.AppKey("settings", Settings)
pool_key = web.AppKey("pool", ExpertPool)
metrics_key = web.AppKey("metrics", NodeMetrics)
node_info_key = web.AppKey("node_info", NodeInfo)


def error_body(message: str, error_type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: NodeError) -> web.Response:
    """A JSON error response with the error's status (and Retry-After when busy)."""
    headers = {}
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    return web.json_response(
        error_body(exc.message, exc.error_type, exc.code, exc.param), status=exc.status, headers=headers
    )


_HTTP_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every failure leaves as an OpenAI error body with the right status; never a traceback."""
    try:
        return await handler(request)
    except NodeError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if isinstance(exc, web.HTTPRequestEntityTooLarge):
            return error_response(PayloadTooLarge(f"request body is larger than {exc.max_size} bytes"))
        error_type = _HTTP_ERROR_TYPES.get(exc.status, "invalid_request_error" if exc.status < 500 else "server_error")
        body = error_body(exc.reason, error_type, exc.reason.lower().replace(" ", "_"))
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return web.json_response(body, status=exc.status, headers=headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response(error_body("internal error", "server_error", "internal_error"), status=500)


@web.middleware
async def metrics_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Count requests by endpoint and status, and time them."""
    metrics = request.app[metrics_key]
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started_s = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.request_latency.labels(endpoint).observe(time.perf_counter() - started_s)


async def read_body(request: web.Request) -> bytes:
    """The request body, refusing early when the declared length is over the cap."""
    cap = request.app[settings_key].max_body_bytes
    if request.content_length is not None and request.content_length > cap:
        raise PayloadTooLarge(f"request body is larger than {cap} bytes")
    return await request.read()


def resolve_expert(pool: ExpertPool, model: str) -> LocalExpert:
    """The expert a request names; `auto` takes the first local expert until routing exists."""
    expert = pool.first() if model == AUTO_MODEL else pool.get(model)
    if expert is None:
        known = ", ".join([AUTO_MODEL, *(e.spec.id for e in pool)])
        raise ModelNotFound(f"model {model!r} does not exist; known models: {known}", param="model")
    return expert


def generation_params(request: ChatCompletionRequest | CompletionRequest, settings: Settings) -> GenerationParams:
    """Sampling settings from a request, with the node's defaults."""
    max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens or settings.max_tokens_default
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=DEFAULT_TOP_P if request.top_p is None else request.top_p,
        stop=request.stop_list(),
        seed=request.seed,
    )


class Generation:
    """One admitted request on one expert: events out, metrics in, the slot freed at the end."""

    def __init__(self, app: web.Application, expert: LocalExpert, events: AsyncIterator[GenerationEvent]) -> None:
        self._metrics = app[metrics_key]
        self.expert = expert
        self._events = events
        self._started_s = time.perf_counter()
        self._first = True

    async def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        expert_id = self.expert.spec.id
        try:
            async for event in self._events:
                if self._first and isinstance(event, Delta):
                    self._first = False
                    self._metrics.time_to_first_token.labels(expert_id).observe(time.perf_counter() - self._started_s)
                if isinstance(event, Finished):
                    self._metrics.tokens.labels(expert_id, "prompt").inc(event.prompt_tokens)
                    self._metrics.tokens.labels(expert_id, "completion").inc(event.completion_tokens)
                yield event
        finally:
            await self._events.aclose()
            self.expert.release()


def start_generation(
    app: web.Application, expert: LocalExpert, prompt_tokens: list[int], stops: tuple[str, ...], params: GenerationParams
) -> Generation:
    """Admit a request (429 at once when the queue is full) and start generating."""
    try:
        expert.admit()
    except NodeError:
        app[metrics_key].rejected.labels(expert.spec.id).inc()
        raise
    return Generation(app, expert, expert.generate(prompt_tokens, stops, params))


def _usage(finished: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def _provenance(app: web.Application, expert: LocalExpert) -> dict[str, Any]:
    return {"expert": expert.spec.id, "node": app[node_info_key].node_id}


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode("utf-8")


async def _stream(
    request: web.Request,
    generation: Generation,
    make_chunk,
    include_usage: bool,
) -> web.StreamResponse:
    """Send a generation as server-sent events ending with `data: [DONE]`."""
    events = generation.__aiter__()
    try:
        # Wait for the first event before sending headers, so a failure before any token is a plain HTTP error.
        first = await events.__anext__()
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Expertmesh-Expert": generation.expert.spec.id,
            }
        )
        await response.prepare(request)
        await response.write(_sse(make_chunk(None, None, first_chunk=True)))
        event: GenerationEvent | None = first
        while event is not None:
            if isinstance(event, Delta):
                await response.write(_sse(make_chunk(event.text, None)))
            else:
                await response.write(_sse(make_chunk(None, event.finish_reason)))
                if include_usage:
                    await response.write(_sse(make_chunk(None, None, usage=_usage(event))))
                break
            try:
                event = await events.__anext__()
            except NodeError as exc:
                await response.write(_sse(error_body(exc.message, exc.error_type, exc.code)))
                break
        # Free the expert's slot before the client hears [DONE], so its next request finds it free.
        await events.aclose()
        await response.write(_sse("[DONE]"))
        await response.write_eof()
        return response
    finally:
        await events.aclose()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/chat/completions`."""
    app = request.app
    body = parse_body(await read_body(request), ChatCompletionRequest)
    expert = resolve_expert(app[pool_key], body.model)
    messages = [ChatMessage(m.role, m.text()) for m in body.messages]
    prompt_tokens, stops = expert.tokenize_chat(messages)
    params = generation_params(body, app[settings_key])
    generation = start_generation(app, expert, prompt_tokens, stops, params)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    provenance = _provenance(app, expert)

    if body.stream:
        def make_chunk(text, finish_reason, *, first_chunk=False, usage=None):
            chunk: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": expert.spec.id,
                "system_fingerprint": None,
                "expertmesh": provenance,
            }
            if usage is not None:
                chunk["choices"] = []
                chunk["usage"] = usage
                return chunk
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first_chunk else {}
            if text is not None:
                delta["content"] = text
            chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
            return chunk

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream(request, generation, make_chunk, include_usage)

    texts, finished = await _collect(generation)
    return web.json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": expert.spec.id,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(texts)},
                    "logprobs": None,
                    "finish_reason": finished.finish_reason,
                }
            ],
            "usage": _usage(finished),
            "expertmesh": provenance,
        },
        headers={"X-Expertmesh-Expert": expert.spec.id},
    )


async def completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/completions`: the prompt goes to the model as it is, whatever its style."""
    app = request.app
    body = parse_body(await read_body(request), CompletionRequest)
    expert = resolve_expert(app[pool_key], body.model)
    prompt_tokens = expert.tokenize_text(body.prompt_text())
    params = generation_params(body, app[settings_key])
    generation = start_generation(app, expert, prompt_tokens, (), params)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    provenance = _provenance(app, expert)

    if body.stream:
        def make_chunk(text, finish_reason, *, first_chunk=False, usage=None):
            chunk: dict[str, Any] = {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": expert.spec.id,
                "expertmesh": provenance,
            }
            if usage is not None:
                chunk["choices"] = []
                chunk["usage"] = usage
                return chunk
            chunk["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
            return chunk

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream(request, generation, make_chunk, include_usage)

    texts, finished = await _collect(generation)
    return web.json_response(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": expert.spec.id,
            "choices": [{"index": 0, "text": "".join(texts), "logprobs": None, "finish_reason": finished.finish_reason}],
            "usage": _usage(finished),
            "expertmesh": provenance,
        },
        headers={"X-Expertmesh-Expert": expert.spec.id},
    )


async def _collect(generation: Generation) -> tuple[list[str], Finished]:
    """Run a generation to its end."""
    texts: list[str] = []
    finished: Finished | None = None
    async for event in generation:
        if isinstance(event, Delta):
            texts.append(event.text)
        else:
            finished = event
    assert finished is not None  # generate() always ends with Finished or raises
    return texts, finished


def _model_entry(app: web.Application, expert: LocalExpert | None) -> dict[str, Any]:
    info = app[node_info_key]
    if expert is None:
        return {"id": AUTO_MODEL, "object": "model", "created": int(info.started_s), "owned_by": info.node_id}
    spec = expert.spec
    return {
        "id": spec.id,
        "object": "model",
        "created": int(info.started_s),
        "owned_by": info.node_id,
        "expertmesh": {
            "name": spec.name,
            "sha256": spec.sha256,
            "family": spec.family,
            "quantization": spec.quantization,
            "prompt_style": spec.prompt_style,
            "n_ctx": spec.n_ctx,
            "size_bytes": spec.size_bytes,
            "queue_depth": expert.queue_depth,
            "local": True,
        },
    }


async def list_models(request: web.Request) -> web.Response:
    """`GET /v1/models`: `auto` and every expert this node can reach."""
    app = request.app
    data = [_model_entry(app, None), *(_model_entry(app, e) for e in app[pool_key])]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """`GET /v1/models/{model}`."""
    app = request.app
    model = request.match_info["model"]
    if model == AUTO_MODEL:
        return web.json_response(_model_entry(app, None))
    expert = resolve_expert(app[pool_key], model)
    return web.json_response(_model_entry(app, expert))


async def healthz(request: web.Request) -> web.Response:
    """`GET /healthz`: alive, with the experts loaded."""
    app = request.app
    info = app[node_info_key]
    return web.json_response(
        {
            "status": "ok",
            "node_id": info.node_id,
            "uptime_s": round(time.time() - info.started_s, 1),
            "experts": [{"id": e.spec.id, "queue_depth": e.queue_depth, "capacity": e.capacity} for e in app[pool_key]],
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """`GET /metrics`: Prometheus text format."""
    app = request.app
    node_metrics = app[metrics_key]
    for expert in app[pool_key]:
        node_metrics.queue_depth.labels(expert.spec.id).set(expert.queue_depth)
    body = generate_latest(node_metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    """Mount the user API."""
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
