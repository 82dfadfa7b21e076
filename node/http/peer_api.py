"""Routes other nodes call (msgpack under /peer/v1/): hello, peer exchange, generate on a local expert."""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import Any

from aiohttp import web

from node import keys
from node.errors import (
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    NodeError,
    PayloadTooLarge,
    UpgradeRequired,
)
from node.http import chat
from node.http.peer_guard import (
    MAX_PEER_BODY_BYTES,
    body_key,
    peer_guard_middleware,
    signer_key,
    stream_reply_headers,
)
from node.mesh.adopt import definition_message
from node.serving.expert import run
from node.serving.experts import ChatMessage, Delta, Finished, GenerationParams
from node.serving.structured import forwarded_grammar
from peers.addresses import is_loopback_host
from peers.wire import (
    CONTENT_TYPE,
    MAX_HOPS,
    CardSubmission,
    GenerateFrame,
    GenerateRequest,
    Hello,
    PeersRequest,
    WireError,
    WireMessage,
    decode,
    encode,
)

log = logging.getLogger(__name__)

network_key = keys.network_key


def _wire_error(exc: WireError) -> NodeError:
    """The node error matching a wire decoding failure."""
    if exc.status == 413:
        return PayloadTooLarge(str(exc))
    if exc.status == 426:
        return UpgradeRequired(str(exc))
    return InvalidRequest(str(exc), param=getattr(exc, "field", None))


async def _read_message(request: web.Request, shape: type[Any]) -> Any:
    """Decode a peer request body the guard has read and authenticated."""
    body = request[body_key]
    try:
        return decode(body, shape, max_bytes=MAX_PEER_BODY_BYTES)
    except WireError as exc:
        raise _wire_error(exc) from exc


def _msgpack_response(message: WireMessage) -> web.Response:
    return web.Response(body=encode(message), content_type=CONTENT_TYPE)


async def hello(request: web.Request) -> web.Response:
    """`POST /peer/v1/hello`: exchange signed cards."""
    message = await _read_message(request, Hello)
    if message.card.card.node_id != request[signer_key].node_id:
        raise Forbidden("a hello must be signed by the node whose card it carries")
    try:
        reply = request.config_dict[network_key].on_hello(message)
    except WireError as exc:
        raise _wire_error(exc) from exc
    return _msgpack_response(reply)


async def peers(request: web.Request) -> web.Response:
    """`POST /peer/v1/peers`: the peers this node knows to be alive."""
    message = await _read_message(request, PeersRequest)
    return _msgpack_response(request.config_dict[network_key].exchange_reply(message.max_peers))


async def generate(request: web.Request) -> web.StreamResponse:
    """`POST /peer/v1/generate`: run a chat on a local expert; never forwarded further."""
    app = request.config_dict  # this sub-app, then the node app
    message: GenerateRequest = await _read_message(request, GenerateRequest)
    if message.hops > MAX_HOPS:
        raise InvalidRequest(f"hops {message.hops} is over {MAX_HOPS}", param="hops")
    _check_may_generate(request)
    expert = app[keys.experts_key].local_named(message.expert_id)
    if expert is None:
        raise ModelNotFound(f"expert {message.expert_id!r} is not hosted on this node", param="expert_id")
    prepared = await expert.prepare([ChatMessage(m.role, m.content) for m in message.messages])
    settings = app[keys.settings_key]
    params = GenerationParams(
        max_tokens=message.max_tokens or settings.max_tokens_default,
        temperature=chat.DEFAULT_TEMPERATURE if message.temperature is None else message.temperature,
        top_p=chat.DEFAULT_TOP_P if message.top_p is None or message.top_p == 0 else message.top_p,
        stop=tuple(message.stop),
        seed=message.seed,
        grammar=forwarded_grammar(message.response_format),
        response_format=message.response_format,
    )
    node_id = app[keys.node_info_key].node_id
    # The expert's place is held for the life of `events` and given back however the reply ends.
    async with aclosing(run(expert, prepared, params)) as events:
        first = await events.__anext__()  # a failure before any token stays a plain HTTP error
        response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE, **stream_reply_headers(request)})
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
                    expert_id=expert.card.expert_id,
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


async def definition(request: web.Request) -> web.Response:
    """`POST /peer/v1/experts/{expert_id}/definition` (empty body, signed like every peer request): a served
    specialist's definition, as data."""
    expert_id = request.match_info["expert_id"]
    expert = request.config_dict[keys.pool_key].get(expert_id)
    if expert is None:
        raise ModelNotFound(f"expert {expert_id!r} is not hosted on this node", param="expert_id")
    message = definition_message(expert)
    if message is None:
        raise ModelNotFound(f"expert {expert_id!r} is a plain model, not a specialist with a definition", param="expert_id")
    return _msgpack_response(message)


async def cards(request: web.Request) -> web.Response:
    """`POST /peer/v1/cards`: a judge's signed card about one of our experts; echoed back once stored."""
    message: CardSubmission = await _read_message(request, CardSubmission)
    sender = request[signer_key].node_id
    if not request.config_dict[network_key].is_verified_peer(sender):
        raise Forbidden("cards are accepted from verified peers only: this node has not verified yours by its own hello")
    await request.config_dict[keys.judging_key].accept_submitted(message.card, sender=sender)
    return _msgpack_response(message)


def _check_may_generate(request: web.Request) -> None:
    """On a public address with no community secret, only peers this node verified may use its experts."""
    settings = request.config_dict[keys.settings_key]
    if settings.community_secret is not None or is_loopback_host(settings.host):
        return
    sender = request[signer_key].node_id
    if not request.config_dict[network_key].is_verified_peer(sender):
        log.warning("refused /peer/v1/generate from unverified node %s", sender)
        raise Forbidden("this node generates for verified peers only (or members of its community)")


def create_peer_app(identity_of, secret: bytes | None) -> web.Application:
    """The peer API as a sub-application mounted at PEER_PATH, guarded by its own middleware (node/http/peer_guard.py).

    Other modules add their peer routes to it (invites: /join, directory: /gossip). The relay's routes stay on the
    node app: they authenticate end to end instead (see node/mesh/relay.py).
    """
    peer_app = web.Application(middlewares=[peer_guard_middleware(identity_of, secret)])
    peer_app.router.add_post("/hello", hello)
    peer_app.router.add_post("/peers", peers)
    peer_app.router.add_post("/generate", generate)
    peer_app.router.add_post("/cards", cards)
    peer_app.router.add_post("/experts/{expert_id}/definition", definition)
    return peer_app
