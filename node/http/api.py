"""OpenAI-compatible user API: chat and text completions, models, health and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from node.config import Settings
from node.errors import (
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    NodeError,
    PayloadTooLarge,
)
from node.generation import (
    Generation,
    decomposed_generation,
    forward_generation,
    plan_query,
    routed_generation,
    start_generation,
)
from node.http import openapi
from node.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    JudgeRequest,
    parse_body,
)
from node.judging.service import card_view
from node.keys import (  # noqa: F401 - re-exported: the app factory and the peer API read state through api
    NodeInfo,
    judging_key,
    metrics_key,
    network_key,
    node_info_key,
    peer_client_key,
    pool_key,
    router_key,
    settings_key,
)
from node.mesh.network import Network, RemoteExpert
from node.mesh.relay import reach_of
from node.routing.router import RATINGS, parse_constraints
from node.serving.experts import (
    ChatMessage,
    Delta,
    ExpertPool,
    Finished,
    GenerationEvent,
    GenerationParams,
    LocalExpert,
)
from node.serving.specialist_serving import specialist_fields
from node.serving.structured import response_format_grammar
from peers.table import PeerState

log = logging.getLogger(__name__)

AUTO_MODEL = "auto"
DEFAULT_TEMPERATURE = 0.8  # llama.cpp server's default; OpenAI's 1.0 is too wild for small models
DEFAULT_TOP_P = 0.95


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
    except (web.HTTPException, NodeError) as exc:
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
    """The local expert a request names; for `auto` (only text completions get here: they are not routed), the first."""
    expert = pool.first() if model == AUTO_MODEL else pool.get(model)
    if expert is None:
        known = ", ".join([AUTO_MODEL, *(e.spec.id for e in pool)])
        raise ModelNotFound(f"model {model!r} does not exist; known models: {known}", param="model")
    return expert


def resolve_target(app: web.Application, model: str) -> LocalExpert | list[RemoteExpert]:
    """A local expert when this node has it, else the alive peers hosting it (nearest first)."""
    pool = app[pool_key]
    if model == AUTO_MODEL or pool.get(model) is not None:
        return resolve_expert(pool, model)
    hosts = app[network_key].hosts_of(model)
    if not hosts:
        known = sorted({AUTO_MODEL, *(e.spec.id for e in pool), *(r.info.expert_id for r in app[network_key].remote_experts())})
        raise ModelNotFound(f"model {model!r} does not exist; known models: {', '.join(known)}", param="model")
    return hosts


def generation_params(request: ChatCompletionRequest | CompletionRequest, settings: Settings) -> GenerationParams:
    """Sampling settings from a request, with the node's defaults."""
    max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens or settings.max_tokens_default
    grammar = response_format_grammar(request.response_format)
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=DEFAULT_TOP_P if request.top_p is None else request.top_p,
        stop=request.stop_list(),
        seed=request.seed,
        grammar=grammar,
        response_format=None if grammar is None else json.dumps(request.response_format, separators=(",", ":")),
    )


def _usage(finished: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode("utf-8")


class _ChunkMaker:
    """Builds OpenAI stream chunks (chat or text) for one generation."""

    def __init__(self, generation: Generation, completion_id: str, created: int, chat: bool) -> None:
        self._generation = generation
        self._id = completion_id
        self._created = created
        self._chat = chat

    def __call__(self, text: str | None, finish_reason: str | None, *, first_chunk: bool = False, usage=None):
        generation = self._generation
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk" if self._chat else "text_completion",
            "created": self._created,
            "model": generation.expert_id,
        }
        if self._chat:
            chunk["system_fingerprint"] = None
        chunk["expertmesh"] = generation.provenance()
        if usage is not None:
            chunk["choices"] = []
            chunk["usage"] = usage
            return chunk
        if self._chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first_chunk else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        chunk["choices"] = [choice]
        return chunk


async def _stream(
    request: web.Request, generation: Generation, make_chunk: _ChunkMaker, include_usage: bool
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
                "X-Expertmesh-Expert": generation.expert_id,
                "X-Expertmesh-Node": generation.node_id,
            }
        )
        await response.prepare(request)
        # The role chunk and the first token leave in one write: one segment, one wake-up for the client.
        pending = _sse(make_chunk(None, None, first_chunk=True))
        event: GenerationEvent | None = first
        while event is not None:
            if isinstance(event, Delta):
                await response.write(pending + _sse(make_chunk(event.text, None)))
                pending = b""
            else:
                await response.write(pending + _sse(make_chunk(None, event.finish_reason)))
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


def _headers(generation: Generation) -> dict[str, str]:
    return {"X-Expertmesh-Expert": generation.expert_id, "X-Expertmesh-Node": generation.node_id}



def _decompose_requested(body: ChatCompletionRequest, settings: Settings) -> bool:
    """The request's `expertmesh.decompose`, else the node's default."""
    value = (body.expertmesh or {}).get("decompose", settings.decompose_default)
    if not isinstance(value, bool):
        raise InvalidRequest("expertmesh.decompose must be true or false", param="expertmesh.decompose")
    return value


def _routing_text(messages: list[ChatMessage]) -> str:
    """What the router reads of a conversation: the last user message."""
    return next((m.content for m in reversed(messages) if m.role == "user"), messages[-1].content)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/chat/completions`: routed (`auto`), on a local expert, or forwarded to the peer hosting it."""
    app = request.app
    body = parse_body(await read_body(request), ChatCompletionRequest)
    messages = [ChatMessage(m.role, m.text()) for m in body.messages]
    params = generation_params(body, app[settings_key])
    constraints = parse_constraints(body.expertmesh)  # malformed constraints are a 400 whatever the model
    if body.model == AUTO_MODEL:
        # One structured answer cannot be several parts under headings.
        enabled = _decompose_requested(body, app[settings_key]) and params.grammar is None
        query_plan = await plan_query(app, _routing_text(messages), enabled=enabled, constraints=constraints)
        if query_plan.compound:
            generation = await decomposed_generation(app, query_plan, messages, params, constraints)
        else:
            routed = await app[router_key].route(_routing_text(messages), constraints)
            generation = routed_generation(app, routed, messages, params)
    else:
        target = resolve_target(app, body.model)
        if not isinstance(target, list):
            prompt_tokens, stops = await asyncio.to_thread(target.tokenize_chat, messages)
            generation = start_generation(app, target, prompt_tokens, stops, params)
        else:
            generation = forward_generation(app, target, messages, params)
    return await _respond(request, generation, body, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/completions`: the prompt goes to a local model as it is, whatever its style."""
    app = request.app
    body = parse_body(await read_body(request), CompletionRequest)
    target = resolve_target(app, body.model)
    if isinstance(target, list):
        raise InvalidRequest(
            f"{body.model} is on another node; text completions run on local experts only (use chat completions)",
            param="model",
        )
    prompt_tokens = await asyncio.to_thread(target.tokenize_text, body.prompt_text())
    if not prompt_tokens:  # refused before taking a queue place (generate checks it again for chat)
        raise InvalidRequest("the prompt is empty", param="prompt")
    params = generation_params(body, app[settings_key])
    generation = start_generation(app, target, prompt_tokens, (), params)
    return await _respond(request, generation, body, chat=False)


async def _respond(
    request: web.Request, generation: Generation, body: ChatCompletionRequest | CompletionRequest, *, chat: bool
) -> web.StreamResponse:
    """A chat or text completion in OpenAI's shape: streamed as server-sent events, or as one JSON body."""
    completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream(request, generation, _ChunkMaker(generation, completion_id, created, chat), include_usage)
    texts, finished = await _collect(generation)
    text = "".join(texts)
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finished.finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finished.finish_reason}
    response: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": generation.expert_id,
    }
    if chat:
        response["system_fingerprint"] = None
    response.update(choices=[choice], usage=_usage(finished), expertmesh=generation.provenance())
    return web.json_response(response, headers=_headers(generation))


async def _collect(generation: Generation) -> tuple[list[str], Finished]:
    """Run a generation to its end."""
    texts: list[str] = []
    finished: Finished | None = None
    async for event in generation:
        if isinstance(event, Delta):
            texts.append(event.text)
        else:
            finished = event
    assert finished is not None  # every generation ends with Finished or raises
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
            **specialist_fields(expert),
        },
    }


def _remote_entry(app: web.Application, hosts: list[RemoteExpert]) -> dict[str, Any]:
    info = hosts[0].info
    return {
        "id": info.expert_id,
        "object": "model",
        "created": int(app[node_info_key].started_s),
        "owned_by": hosts[0].peer.node_id,
        "expertmesh": {
            "name": info.name,
            "sha256": info.sha256,
            "family": info.family,
            "quantization": info.quantization,
            "prompt_style": info.prompt_style,
            "n_ctx": info.n_ctx,
            "queue_depth": info.queue_depth,
            "local": False,
            "nodes": [h.peer.node_id for h in hosts],
        },
    }


def _remote_by_expert(app: web.Application) -> dict[str, list[RemoteExpert]]:
    """Remote experts not hosted here, grouped by id (one listing entry each, nearest host first)."""
    local = {e.spec.id for e in app[pool_key]}
    grouped: dict[str, list[RemoteExpert]] = {}
    for remote in app[network_key].remote_experts():
        if remote.info.expert_id not in local:
            grouped.setdefault(remote.info.expert_id, []).append(remote)
    return grouped


async def list_models(request: web.Request) -> web.Response:
    """`GET /v1/models`: `auto`, the local experts, and every expert on an alive peer."""
    app = request.app
    data = [_model_entry(app, None), *(_model_entry(app, e) for e in app[pool_key])]
    data += [_remote_entry(app, hosts) for hosts in _remote_by_expert(app).values()]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """`GET /v1/models/{model}`."""
    app = request.app
    model = request.match_info["model"]
    target = resolve_target(app, model)
    if not isinstance(target, list):
        return web.json_response(_model_entry(app, None if model == AUTO_MODEL else target))
    return web.json_response(_remote_entry(app, target))


def _peer_entry(network: Network, peer: PeerState, alive: set[str]) -> dict[str, Any]:
    trust = network.trust_of(peer.node_id)
    return {
        "id": peer.node_id,
        "url": peer.url,
        "alive": peer.node_id in alive,
        "rtt_ms": None if peer.rtt_ms is None else round(peer.rtt_ms, 2),
        "reach": reach_of(network, peer.url),
        "last_seen_ms": peer.last_seen_ms,
        "source": peer.source,
        "experts": [e.expert_id for e in peer.card.experts] if peer.card else [],
        "trust": round(trust.score, 3),
        "distrusted": trust.distrusted,
        "evidence": [{"kind": e.kind, "detail": e.detail, "at_ms": e.at_ms} for e in trust.evidence],
    }


async def list_peers(request: web.Request) -> web.Response:
    """`GET /v1/peers`: the peers this node knows, alive or not."""
    network = request.app[network_key]
    alive = {p.node_id for p in network.alive_peers()}
    data = [_peer_entry(network, peer, alive) for peer in network.table.peers.values() if peer.node_id != network.node_id]
    data.sort(key=lambda p: (not p["alive"], p["id"]))
    return web.json_response({"object": "list", "node_id": network.node_id, "data": data})


async def feedback(request: web.Request) -> web.Response:
    """`POST /v1/feedback`: rate a routed answer; stored first, then learned."""
    body = parse_body(await read_body(request), FeedbackRequest)
    reward = RATINGS[body.rating] if body.rating is not None else body.reward
    router = request.app[router_key]
    await router.feedback(body.decision_id, body.token, reward)
    return web.json_response(
        {"decision_id": body.decision_id, "reward": reward, "recorded": True, "policy_version": router.policy_version}
    )


async def get_decision(request: web.Request) -> web.Response:
    """`GET /v1/decisions/{id}`: a routing decision as recorded, with its reward."""
    decision, reward = await request.app[router_key].decision(request.match_info["decision_id"])

    def expert(index: int) -> dict[str, Any]:
        features = decision.candidates[index]
        return {
            "expert": features.expert_id,
            "node": features.node_id,
            "local": features.local,
            "probability": decision.probabilities[index],
        }

    return web.json_response(
        {
            "decision_id": decision.decision_id,
            "created_ms": decision.created_ms,
            "task": decision.query.task.value,
            "policy_version": decision.policy_version,
            "status": decision.status.value,
            "chosen": expert(decision.chosen_index),
            "served": expert(decision.served_index),
            "fallback_reason": decision.fallback_reason,
            "candidates": [expert(i) for i in range(len(decision.candidates))],
            "reward": reward,
        }
    )


async def router_stats(request: web.Request) -> web.Response:
    """`GET /v1/router/stats`: reward over time and routing shares, for the learning view."""
    return web.json_response(await request.app[router_key].stats())


async def list_experts(request: web.Request) -> web.Response:
    """`GET /v1/experts`: every known expert with its capability cards by judge, flags and live figures."""
    judging = request.app[judging_key]
    rows = judging.experts_view()  # in-memory, verified once: cheap enough for the loop
    return web.json_response({"object": "list", "data": rows})


def _loopback_only(request: web.Request) -> None:
    """Judging runs cost minutes of model time: only a local client may start one."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    host = peer[0] if peer else ""
    if not (host.startswith("127.") or host == "::1"):
        raise Forbidden("judging can only be started from this machine")


async def judge(request: web.Request) -> web.StreamResponse:
    """`POST /v1/judge`: judge local experts (or a peer's), streaming progress as JSON lines, then the cards."""
    _loopback_only(request)
    body = parse_body(await read_body(request), JudgeRequest)
    judging = request.app[judging_key]
    pool = request.app[pool_key]
    if body.peer is None:
        experts = [resolve_expert(pool, body.expert)] if body.expert else list(pool)
    elif not body.expert:
        raise InvalidRequest("judging a peer needs the expert id", param="expert")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def progress(expert_id: str, done: int, total: int) -> None:
        lines.put_nowait({"type": "progress", "expert": expert_id, "done": done, "total": total})

    async def run() -> None:
        try:
            if body.peer is not None:
                signed = await judging.judge_peer(
                    body.peer, body.expert, dimensions=body.dimensions, items_per_dimension=body.items_per_dimension or 8, progress=progress
                )
                lines.put_nowait({"type": "card", "card": card_view(signed.card)})
            for expert in experts if body.peer is None else []:
                signed = await judging.judge_local(
                    expert, dimensions=body.dimensions, items_per_dimension=body.items_per_dimension, force=body.force, progress=progress
                )
                lines.put_nowait({"type": "card", "card": card_view(signed.card)})
        except NodeError as exc:
            lines.put_nowait({"type": "error", "error": error_body(exc.message, exc.error_type, exc.code)["error"]})
        finally:
            lines.put_nowait({"type": "end"})

    task = asyncio.create_task(run())
    try:
        while True:
            line = await lines.get()
            await response.write((json.dumps(line) + "\n").encode())
            if line["type"] == "end":
                break
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await response.write_eof()
    return response


async def healthz(request: web.Request) -> web.Response:
    """`GET /healthz`: alive, with the experts loaded."""
    app = request.app
    info = app[node_info_key]
    return web.json_response(
        {
            "status": "ok",
            "node_id": info.node_id,
            "uptime_s": round(time.time() - info.started_s, 1),
            "experts": [
                {
                    "id": e.spec.id,
                    "queue_depth": e.queue_depth,
                    "capacity": e.capacity,
                    "parallel": e.parallel,
                    "running": e.running,
                    "waiting": e.waiting,
                    "tokens_per_s": round(e.tokens_per_s(), 2),
                    "worker_restarts": e.restarts,
                    "safe_cpu_kernels": e.safe_cpu_kernels,
                }
                for e in app[pool_key]
            ],
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """`GET /metrics`: Prometheus text format."""
    app = request.app
    node_metrics = app[metrics_key]
    for expert in app[pool_key]:
        expert_id = expert.spec.id
        node_metrics.queue_depth.labels(expert_id).set(expert.queue_depth)
        node_metrics.running.labels(expert_id).set(expert.running)
        node_metrics.waiting.labels(expert_id).set(expert.waiting)
        node_metrics.tokens_per_s.labels(expert_id).set(round(expert.tokens_per_s(), 2))
        node_metrics.worker_restarts.labels(expert_id).set(expert.restarts)
    body = generate_latest(node_metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    """Mount the user API."""
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/v1/peers", list_peers)
    app.router.add_post("/v1/feedback", feedback)
    app.router.add_get("/v1/decisions/{decision_id}", get_decision)
    app.router.add_get("/v1/router/stats", router_stats)
    app.router.add_get("/v1/experts", list_experts)
    app.router.add_post("/v1/judge", judge)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi.openapi_handler)
    app.router.add_get("/metrics", metrics)
