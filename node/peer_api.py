"""Routes other nodes call (msgpack under /peer/v1/): hello, peer exchange, generate on a local expert."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from node import api
from node.errors import (
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    NodeError,
    PayloadTooLarge,
    UpgradeRequired,
)
from node.adopt import definition_message
from node.experts import ChatMessage, Delta, Finished, GenerationParams
from node.structured import forwarded_grammar
from peers.client import PEER_PATH
from peers.wire import (
    BODY_HMAC_HEADER,
    CONTENT_TYPE,
    MAX_HOPS,
    CardSubmission,
    GenerateFrame,
    GenerateRequest,
    Hello,
    PeersRequest,
    WireError,
    WireMessage,
    check_body_hmac,
    decode,
    encode,
)

log = logging.getLogger(__name__)

network_key = api.network_key
MAX_PEER_BODY_BYTES = 256 << 10


def _wire_error(exc: WireError) -> NodeError:
    """The node error matching a wire decoding failure."""
    if exc.status == 413:
        return PayloadTooLarge(str(exc))
    if exc.status == 426:
        return UpgradeRequired(str(exc))
    return InvalidRequest(str(exc), param=getattr(exc, "field", None))


async def _read_message(request: web.Request, shape: type[Any]) -> Any:
    """Read, authenticate and decode a peer request body."""
    if request.content_length is not None and request.content_length > MAX_PEER_BODY_BYTES:
        raise PayloadTooLarge(f"peer request over {MAX_PEER_BODY_BYTES} bytes")
    body = await request.content.read(MAX_PEER_BODY_BYTES + 1)
    if len(body) > MAX_PEER_BODY_BYTES:
        raise PayloadTooLarge(f"peer request over {MAX_PEER_BODY_BYTES} bytes")
    secret = request.app[api.settings_key].community_secret
    if secret is not None and not check_body_hmac(secret.encode(), body, request.headers.get(BODY_HMAC_HEADER)):
        raise Forbidden("this network needs its community secret: the request's HMAC is missing or wrong")
    try:
        return decode(body, shape, max_bytes=MAX_PEER_BODY_BYTES)
    except WireError as exc:
        raise _wire_error(exc) from exc


def _msgpack_response(message: WireMessage) -> web.Response:
    return web.Response(body=encode(message), content_type=CONTENT_TYPE)


async def hello(request: web.Request) -> web.Response:
    """`POST /peer/v1/hello`: exchange signed cards."""
    message = await _read_message(request, Hello)
    try:
        reply = request.app[network_key].on_hello(message)
    except WireError as exc:
        raise _wire_error(exc) from exc
    return _msgpack_response(reply)


async def peers(request: web.Request) -> web.Response:
    """`POST /peer/v1/peers`: the peers this node knows to be alive."""
    message = await _read_message(request, PeersRequest)
    return _msgpack_response(request.app[network_key].exchange_reply(message.max_peers))


async def generate(request: web.Request) -> web.StreamResponse:
    """`POST /peer/v1/generate`: run a chat on a local expert; never forwarded further."""
    app = request.app
    message: GenerateRequest = await _read_message(request, GenerateRequest)
    if message.hops > MAX_HOPS:
        raise InvalidRequest(f"hops {message.hops} is over {MAX_HOPS}", param="hops")
    expert = app[api.pool_key].get(message.expert_id)
    if expert is None:
        raise ModelNotFound(f"expert {message.expert_id!r} is not hosted on this node", param="expert_id")
    prompt_tokens, stops = expert.tokenize_chat([ChatMessage(m.role, m.content) for m in message.messages])
    settings = app[api.settings_key]
    params = GenerationParams(
        max_tokens=message.max_tokens or settings.max_tokens_default,
        temperature=api.DEFAULT_TEMPERATURE if message.temperature is None else message.temperature,
        top_p=api.DEFAULT_TOP_P if message.top_p is None or message.top_p == 0 else message.top_p,
        stop=tuple(message.stop),
        seed=message.seed,
        grammar=forwarded_grammar(message.response_format),
        response_format=message.response_format,
    )
    generation = api.start_generation(app, expert, prompt_tokens, stops, params)
    node_id = app[api.node_info_key].node_id
    events = generation.__aiter__()
    try:
        first = await events.__anext__()  # a failure before any token stays a plain HTTP error
        response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
        await response.prepare(request)
        event = first
        while True:
            if isinstance(event, Delta):
                frame = GenerateFrame(kind="delta", text=event.text)
            else:
                assert isinstance(event, Finished)
                frame = GenerateFrame(
                    kind="done",
                    finish_reason=event.finish_reason,
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    node_id=node_id,
                    expert_id=expert.spec.id,
                )
            await response.write(encode(frame))
            if frame.kind == "done":
                break
            try:
                event = await events.__anext__()
            except NodeError as exc:
                await response.write(encode(GenerateFrame(kind="error", error=exc.message[:2000])))
                break
        await events.aclose()
        await response.write_eof()
        return response
    finally:
        await events.aclose()


async def definition(request: web.Request) -> web.Response:
    """`GET /peer/v1/experts/{expert_id}/definition`: a served specialist's definition, as data."""
    secret = request.app[api.settings_key].community_secret
    if secret is not None and not check_body_hmac(secret.encode(), b"", request.headers.get(BODY_HMAC_HEADER)):
        raise Forbidden("this network needs its community secret: the request's HMAC is missing or wrong")
    expert_id = request.match_info["expert_id"]
    expert = request.app[api.pool_key].get(expert_id)
    if expert is None:
        raise ModelNotFound(f"expert {expert_id!r} is not hosted on this node", param="expert_id")
    message = definition_message(expert)
    if message is None:
        raise ModelNotFound(f"expert {expert_id!r} is a plain model, not a specialist with a definition", param="expert_id")
    return _msgpack_response(message)


async def cards(request: web.Request) -> web.Response:
    """`POST /peer/v1/cards`: a judge's signed card about one of our experts; echoed back once stored."""
    message: CardSubmission = await _read_message(request, CardSubmission)
    await request.app[api.judging_key].accept_submitted(message.card)
    return _msgpack_response(message)


def add_routes(app: web.Application) -> None:
    """Mount the peer API."""
    app.router.add_post(f"{PEER_PATH}/hello", hello)
    app.router.add_post(f"{PEER_PATH}/peers", peers)
    app.router.add_post(f"{PEER_PATH}/generate", generate)
    app.router.add_post(f"{PEER_PATH}/cards", cards)
    app.router.add_get(f"{PEER_PATH}/experts/{{expert_id}}/definition", definition)
