"""The requester's side of a relayed call: a fresh nonce out, only verified envelope bytes back in."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import aiohttp

from peers.relay import NONCE_BYTES, NONCE_HEADER, EnvelopeOpener, RelayedAddress, RelayForgery, request_digest
from peers.wire import WireError


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


async def open_verified(
    raw: aiohttp.ClientResponse, address: RelayedAddress, nonce: bytes, route: str, body: bytes, errors: RelayErrors
):
    """The relay's raw response if it refused (its own error), else a reply verified end to end."""
    if raw.status != 200:
        return raw
    reply = VerifiedReply(raw, EnvelopeOpener(address.node_id, nonce, request_digest(route, body)), errors)
    try:
        await reply._first()
    except BaseException:
        raw.close()
        raise
    return reply
