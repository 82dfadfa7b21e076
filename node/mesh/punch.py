"""Hole punching: a direct TCP path between two nodes behind NAT, set up through the relay, the relay kept as fallback.

TCP simultaneous open. The requester binds a local port and asks the home node, through the
relay and sealed end to end like every relayed call, to punch (route `punch`). The relay adds
the requester's public address as it sees it; the home node answers with its own public
address (as its relay saw its tunnel) and a port it bound, then both connect to each other
from those ports at once. Each side's SYN opens its own NAT for the other's (Linux conntrack
with MASQUERADE keeps the source port), so the two SYNs cross and one TCP connection forms.
The home node serves the peer API alone over it (each request passed to its own HTTP server,
as relayed requests are: never the user API or the web page); the requester serves it on a loopback port,
so its peer client talks the ordinary, signed peer API over it. Each connection the requester's
client opens is punched anew; when punching fails the peer stays reached through the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from typing import Annotated, ClassVar

import aiohttp
from aiohttp import web
from pydantic import Field

from peers.wire import Int, Str, WireError, WireMessage, decode, encode

log = logging.getLogger(__name__)

PUNCH_ROUTE = "punch"
OBSERVED_HEADER = "X-Expertmesh-Observed-Ip"  # set by the relay: the requester's address as the relay sees it
PEER_PREFIX = "/peer/v1/"
MAX_BODY_BYTES = 256 << 10
_PASSED_HEADERS = ("content-type", "retry-after")
PUNCH_WINDOW_S = 6.0  # both sides keep sending SYNs this long
CONNECT_TRY_S = 1.5
MAX_PUNCHES = 32  # punches (and punched connections) a home node keeps at once

# Loopback proxy urls of punched peers -> the relayed address they bypass (for /v1/peers' "reach").
PUNCHED: dict[str, str] = {}


@dataclass(frozen=True)
class PunchRequest(WireMessage):
    """The requester's port, bound and waiting to connect."""

    TYPE: ClassVar[str] = "punch_request"
    port: Annotated[Int, Field(ge=1, le=65535)]


@dataclass(frozen=True)
class PunchReply(WireMessage):
    """The home node's public address (as its relay sees it) and the port it connects from."""

    TYPE: ClassVar[str] = "punch_reply"
    ip: Annotated[Str, Field(min_length=1, max_length=64)]
    port: Annotated[Int, Field(ge=1, le=65535)]


def bound_socket(port: int = 0) -> socket.socket:
    """A TCP socket bound to `port` (0: any free one), reusable so it can connect while the port is in use."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("0.0.0.0", port))
    return sock


async def simultaneous_open(port: int, peer_ip: str, peer_port: int, window_s: float = PUNCH_WINDOW_S) -> socket.socket | None:
    """Connect from `port` to the peer again and again until its SYN and ours meet; None when the window closes."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + window_s
    while time.monotonic() < deadline:
        sock = bound_socket(port)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (peer_ip, peer_port)), CONNECT_TRY_S)
            return sock
        except (TimeoutError, OSError):
            sock.close()
            await asyncio.sleep(0.05)
    return None


async def splice(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    other_reader: asyncio.StreamReader, other_writer: asyncio.StreamWriter,
) -> None:
    """Copy bytes both ways until either side closes."""

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while chunk := await src.read(64 << 10):
                dst.write(chunk)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()

    await asyncio.gather(pipe(reader, other_writer), pipe(other_reader, writer))


class PunchHome:
    """The home node's side: answer a punch request, then connect out and splice to our own HTTP server."""

    def __init__(self, local_url: str, session: aiohttp.ClientSession) -> None:
        self._local_url = local_url.rstrip("/")
        self._session = session
        self._running = 0
        self._tasks: set[asyncio.Task] = set()
        self._server = web.Server(self._handle)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """A request over a punched connection: peer API only, passed to our own server, streamed back."""
        if request.method != "POST" or not request.path.startswith(PEER_PREFIX) or "/relay" in request.path:
            return web.Response(status=404, text="only the peer API is served over a punched connection")
        body = await request.content.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            return web.Response(status=413, text="request too large")
        headers = {k: v for k, v in request.headers.items() if k.lower().startswith("x-expertmesh-") or k.lower() == "content-type"}
        async with self._session.post(
            self._local_url + request.path, data=body, headers=headers, allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=120),
        ) as answer:
            kept = {k: v for k, v in answer.headers.items() if k.lower().startswith("x-expertmesh-") or k.lower() in _PASSED_HEADERS}
            response = web.StreamResponse(status=answer.status, headers=kept)
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    def answer(self, body: bytes, requester_ip: str, public_ip: str) -> tuple[int, bytes]:
        """(status, reply body) for a punch request; a punch starts in the background when it is 200."""
        if not public_ip or not requester_ip:
            return 409, b"no public address known for one side"
        if self._running >= MAX_PUNCHES:
            return 429, b"punching already"
        try:
            request = decode(body, PunchRequest, max_bytes=256)
        except WireError as exc:
            return 400, str(exc).encode()
        probe = bound_socket()
        port = probe.getsockname()[1]
        probe.close()
        task = asyncio.create_task(self._punch(port, requester_ip, request.port))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return 200, encode(PunchReply(ip=public_ip, port=port))

    async def _punch(self, port: int, ip: str, peer_port: int) -> None:
        self._running += 1
        try:
            sock = await simultaneous_open(port, ip, peer_port)
            if sock is None:
                log.info("punch to %s:%d did not connect", ip, peer_port)
                return
            log.info("punched a direct connection with %s:%d", ip, peer_port)
            await self.serve(sock)
        except OSError as exc:
            log.info("punched connection failed: %s", exc)
        finally:
            self._running -= 1

    async def serve(self, sock: socket.socket) -> None:
        """Serve the peer API over a connected socket until it closes."""
        transport, _protocol = await asyncio.get_running_loop().connect_accepted_socket(self._server, sock)
        while not transport.is_closing():
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.shutdown(1)


class PunchedPeer:
    """The requester's side for one home node: a loopback port whose every connection is punched through anew."""

    def __init__(self, relayed_url: str, ask) -> None:
        self.relayed_url = relayed_url
        self._ask = ask  # async (port) -> PunchReply | None, through the relay
        self._server: asyncio.base_events.Server | None = None
        self.url = ""
        self.connections = 0

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        PUNCHED[self.url] = self.relayed_url
        return self.url

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            probe = bound_socket()
            port = probe.getsockname()[1]
            probe.close()
            reply = await self._ask(port)
            sock = None if reply is None else await simultaneous_open(port, reply.ip, reply.port)
            if sock is None:
                writer.close()
                return
            self.connections += 1
            remote_reader, remote_writer = await asyncio.open_connection(sock=sock)
            await splice(reader, writer, remote_reader, remote_writer)
        except (TimeoutError, OSError) as exc:
            log.debug("punching to %s failed: %s", self.relayed_url, exc)
            writer.close()

    async def close(self) -> None:
        PUNCHED.pop(self.url, None)
        if self._server is not None:
            self._server.close()
