"""The requester's side of a relayed call: sealed for the home node's key, a fresh nonce out, only verified bytes back in."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import AsyncIterator

import aiohttp

from peers.relay import (
    E2E_KEY_HEADER,
    KEY_ROUTE,
    NONCE_BYTES,
    NONCE_HEADER,
    SEALED_ROUTE,
    X25519_BYTES,
    EnvelopeOpener,
    RelayedAddress,
    RelayForgery,
    request_digest,
    seal_request,
)
from peers.wire import WireError

_PEER_PATH = "/peer/v1"
_MAX_KEYS = 4096
# Home nodes' X25519 keys, each proven by the node's own signature; derived from its node key, so they never go stale.
_home_keys: OrderedDict[str, bytes] = OrderedDict()


class VerifiedReply:
    """Looks like the parts of an aiohttp response the peer client reads, but yields only bytes the node signed."""

    def __init__(self, raw: aiohttp.ClientResponse, opener: EnvelopeOpener, errors) -> None:
        self._raw = raw
        self._opener = opener
        self._errors = errors
        self._buffered: list[bytes] = []
        self._pending: list = []
        self.status = 0
        self.headers: dict[str, str] = {}
        self.content = self

    async def _first(self) -> None:
        """Read up to the first envelope, which carries the home node's status."""
        opened = await self._next_opened()
        if opened is None:
            raise self._errors.unreachable("the relay ended the reply before the node's first envelope")
        self.status = opened.status
        if opened.retry_after_s:
            self.headers["Retry-After"] = str(opened.retry_after_s)
        if opened.data:
            self._buffered.append(opened.data)

    async def _next_opened(self):
        """The next verified envelope, None after the signed end; a cut or a forgery raises."""
        pending = self._pending
        while not pending:
            if self._opener.ended:
                return None
            chunk = await self._raw.content.readany()
            if not chunk:
                raise self._errors.unreachable("the relay cut the reply before the node's signed end")
            try:
                pending = list(self._opener.feed(chunk))
            except RelayForgery as exc:
                raise self._errors.protocol(f"relayed reply failed end-to-end verification: {exc}") from exc
            except WireError as exc:
                raise self._errors.protocol(f"relayed reply is malformed: {exc}") from exc
        self._pending = pending[1:]
        return pending[0]

    async def readany(self) -> bytes:
        """The next verified bytes; b"" at the node's signed end."""
        while not self._buffered:
            opened = await self._next_opened()
            if opened is None:
                return b""
            if opened.data:
                self._buffered.append(opened.data)
        return self._buffered.pop(0)

    async def iter_chunked(self, _size: int) -> AsyncIterator[bytes]:
        """Verified bytes until the signed end."""
        while True:
            chunk = await self.readany()
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        """Close the relay's connection."""
        self._raw.close()

    def release(self) -> None:
        """Hand the relay's connection back to the pool."""
        self._raw.release()


class RelayErrors:
    """The peer client's error types, handed in so this module does not import the client."""

    def __init__(self, unreachable, protocol) -> None:
        self.unreachable = unreachable
        self.protocol = protocol


def nonce_headers() -> tuple[bytes, dict[str, str]]:
    """A fresh nonce and the header that carries it."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, {NONCE_HEADER: nonce.hex()}


async def _home_key(session: aiohttp.ClientSession, url: str, address: RelayedAddress, timeout, errors):
    """The home node's X25519 key, fetched once through the relay and checked against the node's signature.

    The relay's own refusal (busy, no tunnel) comes back as its raw response, for the caller to report.
    """
    key = _home_keys.get(address.node_id)
    if key is not None:
        _home_keys.move_to_end(address.node_id)
        return key
    nonce, header = nonce_headers()
    raw = await session.post(f"{url.rstrip('/')}{_PEER_PATH}/{KEY_ROUTE}", data=b"", headers=header, timeout=timeout, allow_redirects=False)
    if raw.status != 200:
        return raw
    try:
        reply = await open_verified(raw, EnvelopeOpener(address.node_id, nonce, request_digest(KEY_ROUTE, b"")), errors)
        if reply.status != 200:
            raise errors.unreachable(f"{url}: the relay gave no end-to-end key (status {reply.status})")
        key = b"".join([chunk async for chunk in reply.iter_chunked(64)])
    finally:
        raw.close()
    if len(key) != X25519_BYTES:
        raise errors.protocol(f"{url}: the home node's end-to-end key has {len(key)} bytes")
    _home_keys[address.node_id] = key
    while len(_home_keys) > _MAX_KEYS:
        _home_keys.popitem(last=False)
    return key


async def post_sealed(
    session: aiohttp.ClientSession, url: str, address: RelayedAddress, route: str, body: bytes, headers: dict[str, str], timeout, errors: RelayErrors
):
    """POST a peer request through a relay, encrypted for the home node; its reply verified and decrypted."""
    key = await _home_key(session, url, address, timeout, errors)
    if not isinstance(key, bytes):
        return key
    nonce, nonce_header = nonce_headers()
    sealed = seal_request(address.node_id, key, nonce, route, headers, body)
    raw = await session.post(
        f"{url.rstrip('/')}{_PEER_PATH}/{SEALED_ROUTE}", data=sealed.body, timeout=timeout, allow_redirects=False,
        headers={"Content-Type": "application/octet-stream", **nonce_header, E2E_KEY_HEADER: sealed.requester_key.hex()},
    )
    opener = EnvelopeOpener(address.node_id, nonce, request_digest(SEALED_ROUTE, sealed.body), cipher=sealed.reply_cipher)
    return await open_verified(raw, opener, errors)


async def open_verified(raw: aiohttp.ClientResponse, opener: EnvelopeOpener, errors: RelayErrors):
    """The relay's raw response if it refused (its own error), else a reply verified end to end by `opener`."""
    if raw.status != 200:
        return raw
    reply = VerifiedReply(raw, opener, errors)
    try:
        await reply._first()
    except BaseException:
        raw.close()
        raise
    return reply
