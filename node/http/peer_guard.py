"""The peer API's gate: msgpack only, the whole body read, the sender's signature, membership and replay checked, replies signed.

It is the middleware of the peer sub-application (node/http/peer_api.py: create_peer_app), so it sees peer requests
only; every failure, expected or not, leaves it as a signed error reply.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from node.errors import (
    Forbidden,
    InvalidRequest,
    NodeError,
    Unauthorized,
)
from node.http.middleware import error_response
from node.peer_request import _request_key, body_key, read_whole_body, signer_key
from peers import auth
from peers.identity import NodeIdentity
from peers.wire import CONTENT_TYPE

log = logging.getLogger(__name__)

MAX_PEER_BODY_BYTES = 256 << 10
_reply_signing_key = _request_key("expertmesh.reply_signing", tuple)  # (identity, secret) to sign a streamed reply


class _Internal(NodeError):
    """A peer handler failed unexpectedly."""

    status = 500
    error_type = "server_error"
    code = "internal_error"


def _http_error(exc: web.HTTPException) -> NodeError:
    """aiohttp's own HTTP error (a wrong method, a too large body) as a node error with its status."""
    error = NodeError(exc.reason)
    error.status = exc.status
    error.error_type = "invalid_request_error" if exc.status < 500 else "server_error"
    error.code = exc.reason.lower().replace(" ", "_")
    return error


class Unsupported(NodeError):
    """The peer API speaks msgpack only."""

    status = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


def _media_type(request: web.Request) -> str:
    return request.headers.get("Content-Type", "").split(";")[0].strip().lower()


def peer_guard_middleware(identity_of, secret: bytes | None, replay: auth.ReplayCache | None = None):
    """Authenticate every request to the peer sub-app and sign every reply; `identity_of(app)` gives this node's identity
    (called with the request's config_dict, which reaches the node app's state)."""
    replay = replay or auth.ReplayCache()

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        identity: NodeIdentity = identity_of(request.config_dict)
        nonce = request.headers.get(auth.NONCE_HEADER, "")
        try:
            if request.method != "POST":
                raise InvalidRequest("the peer API takes POST only")
            # A browser's "simple" request (text/plain, form) cannot set this type without a CORS preflight.
            if _media_type(request) != CONTENT_TYPE:
                raise Unsupported(f"the peer API takes Content-Type: {CONTENT_TYPE} only")
            body = await read_whole_body(request, MAX_PEER_BODY_BYTES)
            try:
                signer = auth.verify_request(request.headers, request.method, request.path, body, replay, secret=secret)
            except auth.AuthError as exc:
                log.info("refused a peer request from %s on %s: %s", _remote(request), request.path, exc.message)
                if exc.status == 403:
                    raise Forbidden(exc.message) from exc
                raise Unauthorized(exc.message) from exc
            request[signer_key] = signer
            request[body_key] = body
            request[_reply_signing_key] = (identity, secret)
            response = await handler(request)
        except NodeError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = error_response(_http_error(exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled error on peer route %s", request.path)
            response = error_response(_Internal("internal error"))
        if not response.prepared and isinstance(response, web.Response):
            reply = response.body
            assert reply is None or isinstance(reply, (bytes, bytearray)), "peer replies are bytes, never a Payload"
            response.headers.update(auth.sign_reply(identity, nonce, response.status, bytes(reply or b""), secret=secret))
        return response

    return middleware


def stream_reply_headers(request: web.Request, status: int = 200) -> dict[str, str]:
    """Signature headers for a streamed reply, bound to the request's nonce."""
    identity, secret = request[_reply_signing_key]
    return auth.sign_reply(identity, request[signer_key].nonce, status, None, secret=secret)


def _remote(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if peer else "unknown"
