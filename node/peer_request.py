"""What the peer guard learned about a peer request (its verified body, its signer), for the handlers behind it."""

from __future__ import annotations

from aiohttp import web

from node.errors import InvalidRequest, PayloadTooLarge
from peers import auth

_RequestKey = getattr(web, "RequestKey", None)  # aiohttp >= 3.12 has typed request keys


def _request_key(name: str, kind: type):
    return _RequestKey(name, kind) if _RequestKey is not None else name


signer_key = _request_key("expertmesh.signer", auth.Signer)  # the authenticated sender
body_key = _request_key("expertmesh.peer_body", bytes)  # the body bytes, read once


async def read_whole_body(request: web.Request, cap: int) -> bytes:
    """The entire body (however many segments it arrives in), refused past `cap` bytes."""
    declared = request.content_length
    if declared is not None and declared > cap:
        raise PayloadTooLarge(f"peer request over {cap} bytes")
    data = bytearray()
    # read(n) returns what is buffered; keep reading until the stream ends.
    while True:
        chunk = await request.content.read(64 << 10)
        if not chunk:
            break
        data += chunk
        if len(data) > cap:
            raise PayloadTooLarge(f"peer request over {cap} bytes")
    if declared is not None and len(data) != declared:
        raise InvalidRequest(f"peer request body ended after {len(data)} of {declared} bytes")
    return bytes(data)


async def peer_body(request: web.Request, cap: int) -> bytes:
    """The body the guard already read (and authenticated), or read it now under `cap`."""
    body = request.get(body_key)
    return body if body is not None else await read_whole_body(request, cap)
