"""aiohttp client for the peer API: hello, peer exchange and streamed generation."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TypeVar
from urllib.parse import quote

import aiohttp
import msgpack

from peers import auth
from peers.identity import NodeIdentity, node_id_from_public_key
from peers.relay import RelayedAddress, parse_relayed_url
from peers.relay_client import RelayErrors, post_sealed
from peers.wire import (
    CONTENT_TYPE,
    CardSubmission,
    ExpertDefinition,
    FrameReader,
    GenerateFrame,
    GenerateRequest,
    Hello,
    HelloReply,
    PeersReply,
    PeersRequest,
    WireError,
    WireMessage,
    decode,
    encode,
)

log = logging.getLogger(__name__)

PEER_PATH = "/peer/v1"
MAX_REPLY_BYTES = 1 << 20
MAX_FRAME_BYTES = 64 << 10
MAX_STREAM_BYTES = 16 << 20
MAX_DEFINITION_REPLY_BYTES = 80 << 10  # a definition of at most 64 KiB plus its envelope

Reply = TypeVar("Reply", bound=WireMessage)


class PeerError(Exception):
    """Talking to a peer failed."""


class PeerUnreachable(PeerError):
    """The peer could not be reached, or the connection broke."""


class PeerTimedOut(PeerUnreachable):
    """The peer went silent for longer than the idle timeout."""


class PeerRejected(PeerError):
    """The peer answered with an error status."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(f"peer answered {status}: {message}")
        self.status = status
        self.retry_after_s = retry_after_s


class PeerProtocolError(PeerError):
    """The peer sent something that is not valid protocol."""


class PeerUnauthentic(PeerUnreachable):
    """The reply is not signed by the node asked (or lacks the community's membership tag)."""


class PeerClient:
    """Calls other nodes' peer APIs; one instance per node, sharing one session.

    Every request is signed with this node's key (and tagged with the community secret, if
    any); every reply must be signed by the node asked, bound to the request's nonce.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        identity: NodeIdentity | None = None,
        secret: bytes | None = None,
        idle_timeout_s: float = 60.0,
        stream_deadline_s: float = 600.0,
    ) -> None:
        self._session = session
        self._identity = identity if identity is not None else NodeIdentity.generate()
        self._secret = secret
        self._idle_timeout_s = idle_timeout_s
        self._stream_deadline_s = stream_deadline_s

    def _headers(self, route: str, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": CONTENT_TYPE}
        headers.update(auth.sign_request(self._identity, "POST", f"{PEER_PATH}/{route}", body, secret=self._secret))
        return headers

    def _check_reply(self, url: str, headers, nonce: str, status: int, body: bytes | None, expected_key: bytes | None) -> bytes:
        try:
            return auth.verify_reply(headers, nonce, status, body, expected_key=expected_key, secret=self._secret)
        except auth.AuthError as exc:
            raise PeerUnauthentic(f"{url}: {exc.message}") from exc

    async def _post(self, url: str, route: str, body: bytes, headers: dict[str, str], timeout: aiohttp.ClientTimeout):
        """POST to a peer route; through a relay, encrypted for the node and only its signed reply read (peers/relay_client)."""
        relayed = parse_relayed_url(url)
        if relayed is None:
            return await self._session.post(
                f"{url.rstrip('/')}{PEER_PATH}/{route}", data=body, headers=headers, timeout=timeout, allow_redirects=False
            )
        # A reply that fails verification is the relay's doing, not the node's: a broken path, like a cut connection.
        errors = RelayErrors(PeerUnreachable, PeerUnreachable)
        return await post_sealed(self._session, url, relayed, route, body, headers, timeout, errors)

    def _reply_key(
        self, url: str, response, nonce: str, body: bytes | None, expected_key: bytes | None
    ) -> bytes | None:
        """The key that signed the reply; None for a relayed reply, whose envelopes proved the node id instead."""
        relayed: RelayedAddress | None = parse_relayed_url(url)
        if relayed is None:
            return self._check_reply(url, response.headers, nonce, 200, body, expected_key)
        if expected_key is not None and node_id_from_public_key(expected_key) != relayed.node_id:
            raise PeerUnauthentic(f"{url}: the relayed address names another node than the one expected")
        return expected_key

    async def _call(
        self, url: str, route: str, message: WireMessage, reply: type[Reply], timeout_s: float, expected_key: bytes | None
    ) -> tuple[Reply, bytes | None]:
        body = encode(message)
        headers = self._headers(route, body)
        try:
            response = await self._post(url, route, body, headers, aiohttp.ClientTimeout(total=timeout_s))
            try:
                data = await _read_capped(response, MAX_REPLY_BYTES)
                if response.status != 200:
                    raise PeerRejected(response.status, _error_text(data))
                key = self._reply_key(url, response, headers[auth.NONCE_HEADER], data, expected_key)
            finally:
                response.release()  # back to the pool, as `async with` did
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerUnreachable(f"{url}: {type(exc).__name__}: {exc}") from exc
        try:
            return decode(data, reply, max_bytes=MAX_REPLY_BYTES), key
        except WireError as exc:
            raise PeerProtocolError(f"{url} sent an invalid {reply.TYPE}: {exc}") from exc

    async def hello(self, url: str, hello: Hello, *, timeout_s: float = 5.0) -> HelloReply:
        """Exchange cards with the node at `url`; the reply must be signed by the key its card names."""
        reply, key = await self._call(url, "hello", hello, HelloReply, timeout_s, None)
        relayed = parse_relayed_url(url)
        if relayed is not None:
            if reply.card.card.node_id != relayed.node_id:  # the envelopes were signed by the node the address names
                raise PeerUnauthentic(f"{url}: the relayed hello reply carries another node's card")
        elif reply.card.card.public_key != key:
            raise PeerUnauthentic(f"{url}: the hello reply is signed by another key than its card's")
        return reply

    async def peers(self, url: str, max_peers: int, *, timeout_s: float = 5.0, expected_key: bytes | None = None) -> PeersReply:
        """Ask the node at `url` for the peers it knows to be alive."""
        reply, _ = await self._call(url, "peers", PeersRequest(max_peers=max_peers), PeersReply, timeout_s, expected_key)
        return reply

    async def submit_card(self, url: str, card: bytes, *, timeout_s: float = 5.0, expected_key: bytes | None = None) -> None:
        """Hand the node at `url` a signed capability card about one of its experts."""
        await self._call(url, "cards", CardSubmission(card=card), CardSubmission, timeout_s, expected_key)

    async def definition(
        self, url: str, expert_id: str, *, timeout_s: float = 10.0, expected_key: bytes | None = None
    ) -> ExpertDefinition:
        """Fetch the definition of a specialist the node at `url` serves (data only, capped and validated)."""
        route = f"experts/{quote(expert_id, safe='@')}/definition"
        headers = self._headers(route, b"")
        try:
            response = await self._post(url, route, b"", headers, aiohttp.ClientTimeout(total=timeout_s))
            try:
                data = await _read_capped(response, MAX_DEFINITION_REPLY_BYTES)
                if response.status != 200:
                    raise PeerRejected(response.status, _error_text(data))
                self._reply_key(url, response, headers[auth.NONCE_HEADER], data, expected_key)
            finally:
                response.release()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerUnreachable(f"{url}: {type(exc).__name__}: {exc}") from exc
        try:
            return decode(data, ExpertDefinition, max_bytes=MAX_DEFINITION_REPLY_BYTES)
        except WireError as exc:
            raise PeerProtocolError(f"{url} sent an invalid {ExpertDefinition.TYPE}: {exc}") from exc

    async def generate(
        self, url: str, request: GenerateRequest, *, connect_timeout_s: float = 5.0, expected_key: bytes | None = None
    ) -> AsyncIterator[GenerateFrame]:
        """Run a generation on the node at `url`, yielding its frames as they arrive.

        A peer that sends no frame for `idle_timeout_s` is given up on, and so is a stream still
        running after `stream_deadline_s` (a frame now and then does not keep it alive forever);
        the stream's size is capped as well.
        """
        body = encode(request)
        headers = self._headers("generate", body)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=self._idle_timeout_s)
        try:
            response = await self._post(url, "generate", body, headers, timeout)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerUnreachable(f"{url}: {type(exc).__name__}: {exc}") from exc
        try:
            if response.status != 200:
                retry_after = response.headers.get("Retry-After")
                data = await _read_capped(response, MAX_REPLY_BYTES)
                raise PeerRejected(
                    response.status, _error_text(data), int(retry_after) if retry_after and retry_after.isdigit() else None
                )
            self._reply_key(url, response, headers[auth.NONCE_HEADER], None, expected_key)
            reader = FrameReader(GenerateFrame, max_frame_bytes=MAX_FRAME_BYTES, max_total_bytes=MAX_STREAM_BYTES)
            ended = False
            loop = asyncio.get_running_loop()
            deadline_s = loop.time() + self._stream_deadline_s
            last_frame_s = loop.time()
            while not ended:
                now_s = loop.time()
                wait_s = min(last_frame_s + self._idle_timeout_s, deadline_s) - now_s
                try:
                    if wait_s <= 0:
                        raise TimeoutError
                    chunk = await asyncio.wait_for(response.content.readany(), wait_s)
                except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
                    if loop.time() >= deadline_s:
                        raise PeerTimedOut(f"{url} was still streaming after the {self._stream_deadline_s:.0f} s deadline") from exc
                    raise PeerTimedOut(f"{url} sent no frame for {self._idle_timeout_s:.0f} s") from exc
                except (aiohttp.ClientError, OSError) as exc:
                    raise PeerUnreachable(f"{url} broke off the stream: {type(exc).__name__}") from exc
                if not chunk:
                    break
                try:
                    reader.feed(chunk)
                    for frame in reader:
                        last_frame_s = loop.time()  # bytes that complete no frame do not count as life
                        yield frame
                        if frame.kind in ("done", "error"):
                            ended = True
                            break
                except WireError as exc:
                    raise PeerProtocolError(f"{url} sent an invalid frame: {exc}") from exc
            if not ended:
                raise PeerUnreachable(f"{url} ended the stream before it was done")
        finally:
            response.close()


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """Read a body, refusing one over `max_bytes` without buffering it all."""
    data = bytearray()
    async for chunk in response.content.iter_chunked(64 << 10):
        data += chunk
        if len(data) > max_bytes:
            raise PeerProtocolError(f"reply over the {max_bytes}-byte cap")
    return bytes(data)


def _error_text(data: bytes) -> str:
    """A peer's error message, from a msgpack or JSON error body, or its first bytes."""
    for parse in (lambda d: msgpack.unpackb(d, raw=False), json.loads):
        try:
            obj = parse(data)
            if isinstance(obj, dict):
                error = obj.get("error")
                if isinstance(error, dict):
                    return str(error.get("message", ""))[:500]
                if isinstance(error, str):
                    return error[:500]
        except Exception:  # noqa: BLE001 - any parse failure just falls through to the raw text
            continue
    return data[:200].decode("utf-8", errors="replace")
