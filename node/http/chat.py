"""`/v1/chat/completions` and `/v1/completions`: OpenAI's shapes in, a pipeline query, OpenAI's shapes out."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from aiohttp import web

from node.config import Settings
from node.errors import InvalidRequest, NodeError
from node.http.middleware import error_body, read_body
from node.http.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from node.keys import pipeline_key, settings_key
from node.pipeline import Answer, PartServed, Query, served
from node.pipeline.query import AUTO_MODEL
from node.routing.router import parse_constraints
from node.serving.experts import ChatMessage, Delta, Finished, GenerationParams
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


def _decompose_requested(body: ChatCompletionRequest, settings: Settings) -> bool:
    """The request's `expertmesh.decompose`, else the node's default."""
    value = (body.expertmesh or {}).get("decompose", settings.decompose_default)
    if not isinstance(value, bool):
        raise InvalidRequest("expertmesh.decompose must be true or false", param="expertmesh.decompose")
    return value


def chat_query(body: ChatCompletionRequest, settings: Settings) -> Query:
    """A chat request as a pipeline query; malformed options are a 400 naming the field."""
    messages = tuple(ChatMessage(m.role, m.text()) for m in body.messages)
    params = generation_params(body, settings)
    constraints = parse_constraints(body.expertmesh)  # malformed constraints are a 400 whatever the model
    decompose = _decompose_requested(body, settings) if body.model == AUTO_MODEL else False
    return Query(body.model, messages, params, constraints, decompose)


def text_query(body: CompletionRequest, settings: Settings) -> Query:
    """A text completion request as a pipeline query: the prompt goes to a local model as it is."""
    return Query(body.model, body.prompt_text(), generation_params(body, settings))


def _usage(finished: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


class _Rendering:
    """What the chunks of one answer say about who answered; a decomposed answer names each part's expert as it starts."""

    def __init__(self, answer: Answer, completion_id: str, created: int, chat: bool) -> None:
        self.model = answer.expert_id
        self.provenance: dict[str, Any] = dict(answer.provenance)
        self._id = completion_id
        self.created = created
        self._chat = chat

    def part_served(self, event: PartServed) -> None:
        """Another part of a decomposed answer has an expert."""
        self.provenance = served(self.provenance, event)
        self.model = self.provenance["expert"]

    def chunk(self, text: str | None, finish_reason: str | None, *, first_chunk: bool = False, usage=None) -> dict[str, Any]:
        """One OpenAI stream chunk (chat or text)."""
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk" if self._chat else "text_completion",
            "created": self.created,
            "model": self.model,
        }
        if self._chat:
            chunk["system_fingerprint"] = None
        chunk["expertmesh"] = self.provenance
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


def _headers(expert_id: str, node_id: str) -> dict[str, str]:
    return {"X-Expertmesh-Expert": expert_id, "X-Expertmesh-Node": node_id}


async def _stream(request: web.Request, answer: Answer, rendering: _Rendering, include_usage: bool) -> web.StreamResponse:
    """Send an answer as server-sent events ending with `data: [DONE]`."""
    events = answer.events
    try:
        # The answer has started (its first event is ready): a failure before any token was a plain HTTP error.
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **_headers(answer.expert_id, answer.node_id)}
        )
        await response.prepare(request)
        # The role chunk and the first token leave in one write: one segment, one wake-up for the client.
        pending = b""
        first_chunk = True
        while True:
            try:
                event = await events.__anext__()
            except StopAsyncIteration:
                break
            except NodeError as exc:
                await response.write(pending + _sse(error_body(exc.message, exc.error_type, exc.code)))
                break
            if isinstance(event, PartServed):
                rendering.part_served(event)
                continue
            if first_chunk:
                pending, first_chunk = _sse(rendering.chunk(None, None, first_chunk=True)), False
            if isinstance(event, Delta):
                await response.write(pending + _sse(rendering.chunk(event.text, None)))
                pending = b""
            else:
                await response.write(pending + _sse(rendering.chunk(None, event.finish_reason)))
                if include_usage:
                    await response.write(_sse(rendering.chunk(None, None, usage=_usage(event))))
                break
        # Free the expert's slot before the client hears [DONE], so its next request finds it free.
        await events.aclose()  # type: ignore[attr-defined]
        await response.write(_sse("[DONE]"))
        await response.write_eof()
        return response
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/chat/completions`: routed (`auto`), on a local expert, or forwarded to the peer hosting it."""
    body = parse_body(await read_body(request), ChatCompletionRequest)
    answer = await request.app[pipeline_key].answer(chat_query(body, request.app[settings_key]))
    return await _respond(request, answer, body, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/completions`: the prompt goes to a local model as it is, whatever its style."""
    body = parse_body(await read_body(request), CompletionRequest)
    answer = await request.app[pipeline_key].answer(text_query(body, request.app[settings_key]))
    return await _respond(request, answer, body, chat=False)


async def _respond(
    request: web.Request, answer: Answer, body: ChatCompletionRequest | CompletionRequest, *, chat: bool
) -> web.StreamResponse:
    """A chat or text completion in OpenAI's shape: streamed as server-sent events, or as one JSON body."""
    completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    rendering = _Rendering(answer, completion_id, int(time.time()), chat)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream(request, answer, rendering, include_usage)
    texts, finished = await _collect(answer, rendering)
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
        "created": rendering.created,
        "model": rendering.model,
    }
    if chat:
        response["system_fingerprint"] = None
    response.update(choices=[choice], usage=_usage(finished), expertmesh=rendering.provenance)
    return web.json_response(response, headers=_headers(rendering.model, rendering.provenance["node"]))


async def _collect(answer: Answer, rendering: _Rendering) -> tuple[list[str], Finished]:
    """Run an answer to its end."""
    texts: list[str] = []
    finished: Finished | None = None
    try:
        async for event in answer.events:
            if isinstance(event, PartServed):
                rendering.part_served(event)
            elif isinstance(event, Delta):
                texts.append(event.text)
            else:
                finished = event
    finally:
        await answer.events.aclose()  # type: ignore[attr-defined]
    assert finished is not None  # every answer ends with Finished or raises
    return texts, finished
