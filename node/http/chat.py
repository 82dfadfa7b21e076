"""`/v1/chat/completions` and `/v1/completions`: OpenAI's shapes, streamed or whole."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web

from node.config import Settings
from node.errors import InvalidRequest, NodeError
from node.generation import (
    Generation,
    decomposed_generation,
    forward_generation,
    plan_query,
    routed_generation,
    start_generation,
)
from node.http.middleware import error_body, read_body
from node.http.models import AUTO_MODEL, resolve_target
from node.http.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from node.keys import router_key, settings_key
from node.routing.router import parse_constraints
from node.serving.experts import ChatMessage, Delta, Finished, GenerationEvent, GenerationParams
from node.serving.structured import response_format_grammar

DEFAULT_TEMPERATURE = 0.8  # llama.cpp server's default; OpenAI's 1.0 is too wild for small models
DEFAULT_TOP_P = 0.95


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
