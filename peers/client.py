"""aiohttp client for the peer API: hello, peer exchange and streamed generation."""

from __future__ import annotations

import json
import logging
from urllib.parse import quote
from typing import AsyncIterator, TypeVar

import aiohttp
import msgpack

from peers.wire import (
    BODY_HMAC_HEADER,
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
    body_hmac,
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


class PeerClient:
    """Calls other nodes' peer APIs; one instance per node, sharing one session."""

    def __init__(self, session: aiohttp.ClientSession, *, secret: bytes | None = None, idle_timeout_s: float = 60.0) -> None:
        self._session = session
        self._secret = secret
        self._idle_timeout_s = idle_timeout_s

    def _headers(self, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": CONTENT_TYPE}
        if self._secret is not None:
            headers[BODY_HMAC_HEADER] = body_hmac(self._secret, body)
        return headers

    async def _call(self, url: str, route: str, message: WireMessage, reply: type[Reply], timeout_s: float) -> Reply:
        body = encode(message)
        try:
            async with self._session.post(
                f"{url.rstrip('/')}{PEER_PATH}/{route}",
                data=body,
                headers=self._headers(body),
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
            ) as response:
                data = await _read_capped(response, MAX_REPLY_BYTES)
                if response.status != 200:
                    raise PeerRejected(response.status, _error_text(data))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerUnreachable(f"{url}: {type(exc).__name__}: {exc}") from exc
        try:
            return decode(data, reply, max_bytes=MAX_REPLY_BYTES)
        except WireError as exc:
            raise PeerProtocolError(f"{url} sent an invalid {reply.TYPE}: {exc}") from exc

    async def hello(self, url: str, hello: Hello, *, timeout_s: float = 5.0) -> HelloReply:
        """Exchange cards with the node at `url`."""
        return await self._call(url, "hello", hello, HelloReply, timeout_s)

    async def peers(self, url: str, max_peers: int, *, timeout_s: float = 5.0) -> PeersReply:
        """Ask the node at `url` for the peers it knows to be alive."""
        return await self._call(url, "peers", PeersRequest(max_peers=max_peers), PeersReply, timeout_s)

    async def submit_card(self, url: str, card: bytes, *, timeout_s: float = 5.0) -> None:
        """Hand the node at `url` a signed capability card about one of its experts."""
        await self._call(url, "cards", CardSubmission(card=card), CardSubmission, timeout_s)

    async def definition(self, url: str, expert_id: str, *, timeout_s: float = 10.0) -> ExpertDefinition:
        """Fetch the definition of a specialist the node at `url` serves (data only, capped and validated)."""
        try:
            async with self._session.get(
                f"{url.rstrip('/')}{PEER_PATH}/experts/{quote(expert_id, safe='@')}/definition",
                headers=self._headers(b""),
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
            ) as response:
                data = await _read_capped(response, MAX_DEFINITION_REPLY_BYTES)
                if response.status != 200:
                    raise PeerRejected(response.status, _error_text(data))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerUnreachable(f"{url}: {type(exc).__name__}: {exc}") from exc
        try:
            return decode(data, ExpertDefinition, max_bytes=MAX_DEFINITION_REPLY_BYTES)
        except WireError as exc:
            raise PeerProtocolError(f"{url} sent an invalid {ExpertDefinition.TYPE}: {exc}") from exc

    async def generate(
        self, url: str, request: GenerateRequest, *, connect_timeout_s: float = 5.0
    ) -> AsyncIterator[GenerateFrame]:
        """Run a generation on the node at `url`, yielding its frames as they arrive.

        A peer that sends nothing for `idle_timeout_s` is given up on, so a slow or stalled
        peer cannot hold a request forever; the stream's size is capped as well.
        """
        body = encode(request)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=self._idle_timeout_s)
        try:
            response = await self._session.post(
                f"{url.rstrip('/')}{PEER_PATH}/generate",
                data=body,
                headers=self._headers(body),
                timeout=timeout,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PeerUnreachable(f"{url}: {type(exc).__name__}: {exc}") from exc
        try:
            if response.status != 200:
                retry_after = response.headers.get("Retry-After")
                data = await _read_capped(response, MAX_REPLY_BYTES)
                raise PeerRejected(
                    response.status, _error_text(data), int(retry_after) if retry_after and retry_after.isdigit() else None
                )
            reader = FrameReader(GenerateFrame, max_frame_bytes=MAX_FRAME_BYTES, max_total_bytes=MAX_STREAM_BYTES)
            ended = False
            while not ended:
                try:
                    chunk = await response.content.readany()
                except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
                    raise PeerTimedOut(f"{url} sent nothing for {self._idle_timeout_s:.0f} s") from exc
                except (aiohttp.ClientError, OSError) as exc:
                    raise PeerUnreachable(f"{url} broke off the stream: {type(exc).__name__}") from exc
                if not chunk:
                    break
                try:
                    reader.feed(chunk)
                    for frame in reader:
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
