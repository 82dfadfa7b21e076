"""Relaying for nodes behind NAT: the public node's relay and the home node's tunnels."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from functools import partial

import aiohttp
from aiohttp import web

from node import keys
from node.config import Settings
from node.errors import ExpertBusy, InvalidRequest, NotFound, PayloadTooLarge, PeerUnavailable
from node.mesh.admission import Admissions
from node.mesh.punch import OBSERVED_HEADER, PUNCH_ROUTE, PUNCHED, PunchedPeer, PunchHome, PunchReply, PunchRequest
from peers.client import PEER_PATH
from peers.identity import NodeIdentity
from peers.relay import (
    CONNECT_PATH,
    E2E_KEY_HEADER,
    FORWARDED_HEADER_PREFIX,
    KEY_ROUTE,
    MAX_TUNNEL_MESSAGE_BYTES,
    NONCE_BYTES,
    NONCE_HEADER,
    RELAY_PREFIX,
    SEALED_ROUTE,
    TUNNEL_TO_HOME,
    EnvelopeSealer,
    TunnelAuth,
    TunnelCancel,
    TunnelChallenge,
    TunnelData,
    TunnelReady,
    TunnelRequest,
    check_tunnel,
    decode_tunnel,
    home_e2e_key,
    open_request,
    parse_relayed_url,
    prove_tunnel,
    relayed_url,
    request_digest,
)
from peers.wire import CONTENT_TYPE, WireError, encode

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 << 10
STREAM_QUEUE = 256
STREAM_IDLE_S = 120.0
HEARTBEAT_S = 10.0
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 5.0
REFUSED_RETRY_MAX_S = 60.0
MAX_HOME_STREAMS = 64  # relayed requests a home node serves at once, per tunnel
_ROUTE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


# ---- the relay (public side) -------------------------------------------------------------


class _Tunnel:
    """One home node's open tunnel at this relay."""

    def __init__(self, node_id: str, ws: web.WebSocketResponse) -> None:
        self.node_id = node_id
        self.ws = ws
        self.streams: dict[int, asyncio.Queue] = {}
        self._send_lock = asyncio.Lock()

    async def send(self, message) -> None:
        async with self._send_lock:
            await self.ws.send_bytes(encode(message))


class _ByteBudget:
    """A token bucket over relayed bytes: waits rather than fails, so streams slow down fairly."""

    def __init__(self, rate_per_s: float) -> None:
        self._rate = rate_per_s
        self._tokens = rate_per_s
        self._updated_s = time.monotonic()

    async def spend(self, n_bytes: int) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(self._rate, self._tokens + (now - self._updated_s) * self._rate)
            self._updated_s = now
            if self._tokens >= min(n_bytes, self._rate):
                self._tokens -= n_bytes
                return
            await asyncio.sleep((min(n_bytes, self._rate) - self._tokens) / self._rate)


class RelayServer:
    """Relays peer requests to home nodes over their tunnels, within limits; admits nodes by invite."""

    def __init__(self, settings: Settings, identity: NodeIdentity, admissions: Admissions) -> None:
        self._settings = settings
        self.identity = identity
        self.admissions = admissions
        self.tunnels: dict[str, _Tunnel] = {}
        self.active_streams = 0
        self.relayed_bytes = 0
        self._budget = _ByteBudget(settings.relay_max_bytes_per_s)
        self._ids = itertools.count(1)

    async def connect(self, request: web.Request) -> web.WebSocketResponse:
        """`GET /peer/v1/relay-connect`: a home node opens its tunnel (WebSocket)."""
        if not self._settings.relay:
            raise NotFound("this node does not relay")
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_TUNNEL_MESSAGE_BYTES)
        await ws.prepare(request)
        challenge = TunnelChallenge(nonce=secrets.token_bytes(NONCE_BYTES), relay_node_id=self.identity.node_id)
        await ws.send_bytes(encode(challenge))
        try:
            msg = await ws.receive(timeout=10)
            auth = decode_tunnel(msg.data, (TunnelAuth,)) if msg.type == aiohttp.WSMsgType.BINARY else None
            if not isinstance(auth, TunnelAuth):
                raise WireError(400, "expected tunnel_auth")
            node_id = check_tunnel(challenge, auth)
        except (TimeoutError, WireError) as exc:
            await ws.close(code=4400, message=str(exc)[:100].encode())
            return ws
        if self.admissions.is_revoked(node_id) or not (self._settings.relay_open or self.admissions.is_admitted(node_id)):
            log.info("relay: refused a tunnel from %s (not admitted)", node_id)
            await ws.close(code=4403, message=b"not admitted: join with an invite first")
            return ws
        if node_id not in self.tunnels and len(self.tunnels) >= self._settings.relay_max_tunnels:
            await ws.close(code=4429, message=b"relay full")
            return ws
        old = self.tunnels.get(node_id)
        tunnel = self.tunnels[node_id] = _Tunnel(node_id, ws)
        if old is not None:
            await old.ws.close(code=4409, message=b"replaced by a newer tunnel")
        await tunnel.send(TunnelReady(
            url=relayed_url(self._public_url(request), node_id),
            max_streams=self._settings.relay_max_streams,
            max_bytes_per_s=int(self._settings.relay_max_bytes_per_s),
            observed_ip=request.remote or "",
        ))
        log.info("relay: tunnel open for %s (%d tunnels)", node_id, len(self.tunnels))
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                try:
                    data = decode_tunnel(msg.data, (TunnelData,))
                except WireError as exc:
                    log.warning("relay: %s sent a bad tunnel message: %s", node_id, exc)
                    break
                queue = tunnel.streams.get(data.stream_id)
                if queue is None:
                    continue
                try:
                    queue.put_nowait(data)
                except asyncio.QueueFull:
                    # The requester reads slower than the home node sends: give up on that stream alone.
                    tunnel.streams.pop(data.stream_id, None)
                    queue.get_nowait()
                    queue.put_nowait(None)
                    await tunnel.send(TunnelCancel(stream_id=data.stream_id))
        finally:
            if self.tunnels.get(node_id) is tunnel:
                del self.tunnels[node_id]
            for queue in tunnel.streams.values():
                _offer_end(queue)
            log.info("relay: tunnel closed for %s", node_id)
        return ws

    def _public_url(self, request: web.Request) -> str:
        urls = self._settings.advertise_urls
        return urls[0].rstrip("/") if urls else f"{request.scheme}://{request.host}"

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """`POST /peer/v1/relay/{node_id}/peer/v1/{route}`: pass a peer request to a home node, stream back its envelopes."""
        if not self._settings.relay:
            raise NotFound("this node does not relay")
        node_id, route = request.match_info["node_id"], request.match_info["route"]
        if not _ROUTE.match(route):
            raise InvalidRequest("not a peer route", param="route")
        tunnel = self.tunnels.get(node_id)
        if tunnel is None:
            raise PeerUnavailable(f"node {node_id} has no tunnel at this relay")
        if self.active_streams >= self._settings.relay_max_streams:
            raise ExpertBusy(f"this relay carries {self._settings.relay_max_streams} streams already", retry_after_s=1)
        body = await request.content.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"relayed request over {MAX_BODY_BYTES} bytes")
        try:
            nonce = bytes.fromhex(request.headers.get(NONCE_HEADER, ""))
        except ValueError as exc:
            raise InvalidRequest(f"{NONCE_HEADER} must be hex") from exc
        headers: list[str] = []
        for name, value in request.headers.items():
            if name.lower().startswith(FORWARDED_HEADER_PREFIX) and name.lower() not in (NONCE_HEADER.lower(), OBSERVED_HEADER.lower()):
                headers += [name, value]
        headers = [OBSERVED_HEADER, request.remote or ""] + headers  # where the requester is, for hole punching
        await self._budget.spend(len(body))
        stream_id = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue(maxsize=STREAM_QUEUE)
        tunnel.streams[stream_id] = queue
        self.active_streams += 1
        ended = False
        try:
            await tunnel.send(TunnelRequest(stream_id=stream_id, route=route, body=body, headers=tuple(headers[:32]), nonce=nonce))
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            try:
                while not ended:
                    try:
                        item = await asyncio.wait_for(queue.get(), STREAM_IDLE_S)
                    except TimeoutError:
                        break
                    if item is None:
                        break
                    await self._budget.spend(len(item.data))
                    self.relayed_bytes += len(item.data)
                    if item.data:
                        await response.write(item.data)
                    ended = item.end
                await response.write_eof()
            except ConnectionError:
                pass  # the requester hung up (or had read the signed end already)
            return response
        finally:
            self.active_streams -= 1
            tunnel.streams.pop(stream_id, None)
            if not ended and not tunnel.ws.closed:
                asyncio.ensure_future(_quiet(tunnel.send(TunnelCancel(stream_id=stream_id))))

    def close_tunnel(self, node_id: str) -> None:
        """Drop a revoked node's tunnel."""
        tunnel = self.tunnels.pop(node_id, None)
        if tunnel is not None:
            asyncio.ensure_future(_quiet(tunnel.ws.close(code=4403, message=b"revoked")))


def _offer_end(queue: asyncio.Queue) -> None:
    try:
        queue.put_nowait(None)
    except asyncio.QueueFull:
        pass


async def _quiet(coroutine) -> None:
    try:
        await coroutine
    except (ConnectionError, RuntimeError, aiohttp.ClientError):
        pass


# ---- the tunnels (home side) -------------------------------------------------------------


class RelayLinks:
    """Keeps a tunnel open to each configured relay and serves relayed requests from the local peer API."""

    def __init__(self, settings: Settings, identity: NodeIdentity, session: aiohttp.ClientSession, network) -> None:
        self._settings = settings
        self.identity = identity
        self.session = session
        self._network = network
        self._relays: list[str] = [r.rstrip("/") for r in settings.relays]
        self._local_url = ""
        self._direct_urls: tuple[str, ...] = ()
        self.relayed: dict[str, str] = {}  # relay url -> our address there, while the tunnel is up
        self.public_ip: dict[str, str] = {}  # relay url -> our address as that relay sees it
        self._tasks: set[asyncio.Task] = set()
        self.punch_home: PunchHome | None = None

    async def start(self, local_url: str) -> None:
        """Redeem pending invites, then open a tunnel to every relay (each retried for ever)."""
        self._local_url = local_url.rstrip("/")
        self.punch_home = PunchHome(self._local_url, self.session)
        self._direct_urls = tuple(self._network.urls)
        for relay in self._relays:
            self._spawn(self._keep_tunnel(relay))

    def add_relay(self, relay: str) -> None:
        """Keep a tunnel to one more relay (joined at run time)."""
        if relay not in self._relays:
            self._relays.append(relay)
            self._spawn(self._keep_tunnel(relay))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.punch_home is not None:
            await self.punch_home.close()

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _publish(self) -> None:
        """Our card's addresses: direct ones first (used where they work), then every open relay."""
        self._network.urls = self._direct_urls + tuple(self.relayed[r] for r in self._relays if r in self.relayed)

    async def _keep_tunnel(self, relay: str) -> None:
        delay_s = RECONNECT_MIN_S
        while True:
            refused = False
            try:
                refused = not await self._tunnel(relay)
                if not refused:
                    delay_s = RECONNECT_MIN_S
            except (TimeoutError, aiohttp.ClientError, OSError, WireError) as exc:
                log.debug("tunnel to %s: %s", relay, exc)
            finally:
                if self.relayed.pop(relay, None) is not None:
                    log.warning("tunnel to relay %s closed; reconnecting", relay)
                    self._publish()
            await asyncio.sleep(delay_s)
            # A relay that refuses us (not admitted yet, or revoked) is asked again less and less often.
            delay_s = min(delay_s * 2, REFUSED_RETRY_MAX_S if refused else RECONNECT_MAX_S)

    async def _tunnel(self, relay: str) -> bool:
        """Open one tunnel and serve it until it closes; False when the relay refused it."""
        async with self.session.ws_connect(
            relay + CONNECT_PATH, heartbeat=HEARTBEAT_S, max_msg_size=MAX_TUNNEL_MESSAGE_BYTES, timeout=aiohttp.ClientWSTimeout(ws_close=5)
        ) as ws:
            challenge = decode_tunnel((await ws.receive_bytes(timeout=10)), (TunnelChallenge,))
            await ws.send_bytes(encode(prove_tunnel(self.identity, challenge)))
            msg = await ws.receive(timeout=10)
            if msg.type != aiohttp.WSMsgType.BINARY:
                log.info("relay %s refused the tunnel: %s", relay, ws.close_code and (msg.extra or ws.close_code))
                return False
            ready = decode_tunnel(msg.data, (TunnelReady,))
            self.relayed[relay] = ready.url
            self.public_ip[relay] = ready.observed_ip
            self._publish()
            log.info("tunnel open to relay %s (node %s): reachable at %s", relay, challenge.relay_node_id, ready.url)
            streams: dict[int, asyncio.Task] = {}
            send_lock = asyncio.Lock()

            async def send(message) -> None:
                async with send_lock:
                    await ws.send_bytes(encode(message))

            try:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        continue
                    message = decode_tunnel(msg.data, TUNNEL_TO_HOME)
                    if isinstance(message, TunnelRequest):
                        if len(streams) >= MAX_HOME_STREAMS:
                            # The relay sends more than this node serves at once: a signed "busy", not a queue.
                            sealer, _inner = self._open(message)
                            for env in sealer.seal(b"", status=429, retry_after_s=1, end=True):
                                await send(TunnelData(stream_id=message.stream_id, data=env, end=True))
                            continue
                        task = self._spawn(self._serve(message, send, relay))
                        streams[message.stream_id] = task
                        task.add_done_callback(partial(_forget_stream, streams, message.stream_id))
                    elif isinstance(message, TunnelCancel):
                        cancelled = streams.pop(message.stream_id, None)
                        if cancelled is not None:
                            cancelled.cancel()
            finally:
                for task in streams.values():
                    task.cancel()
        return True

    def _open(self, request: TunnelRequest) -> tuple[EnvelopeSealer, TunnelRequest | None]:
        """The reply's sealer, and the request as sent (decrypted when sealed; None when it does not decrypt)."""
        digest = request_digest(request.route, request.body)
        if request.route != SEALED_ROUTE:
            return EnvelopeSealer(self.identity, request.nonce, digest), request
        headers = dict(zip(request.headers[0::2], request.headers[1::2], strict=False))
        key = next((v for k, v in headers.items() if k.lower() == E2E_KEY_HEADER.lower()), "")
        try:
            inner = open_request(self.identity, request.nonce, bytes.fromhex(key), request.body)
        except (WireError, ValueError) as exc:
            log.info("relayed sealed request refused: %s", exc)
            return EnvelopeSealer(self.identity, request.nonce, digest), None
        sealer = EnvelopeSealer(self.identity, request.nonce, digest, cipher=inner.reply_cipher)
        return sealer, TunnelRequest(stream_id=request.stream_id, route=inner.route, body=inner.body, headers=inner.headers, nonce=request.nonce)

    async def _serve(self, relayed: TunnelRequest, send, relay: str = "") -> None:
        """Run one relayed request against our own peer API and send its reply back sealed."""
        sid = relayed.stream_id
        if relayed.route == KEY_ROUTE:  # our X25519 key, signed by our node key, for the requester to encrypt to
            sealer = EnvelopeSealer(self.identity, relayed.nonce, request_digest(relayed.route, relayed.body))
            for env in sealer.seal(home_e2e_key(self.identity).public_key().public_bytes_raw(), status=200, end=True):
                await send(TunnelData(stream_id=sid, data=env, end=True))
            return
        sealer, request = self._open(relayed)
        if request is None:
            for env in sealer.seal(b"", status=400, end=True):
                await send(TunnelData(stream_id=sid, data=env, end=True))
            return
        if request.route == PUNCH_ROUTE:  # answered here: our public address and a port, then we connect out
            outer = {k.lower(): v for k, v in zip(relayed.headers[0::2], relayed.headers[1::2], strict=False)}
            public_ip = self.public_ip.get(relay, "")
            # A relay that sees us on loopback shares our host: there is no NAT to punch through.
            if public_ip.startswith("127.") or public_ip == "::1" or self.punch_home is None:
                public_ip = ""
            status, body = self.punch_home.answer(request.body, outer.get(OBSERVED_HEADER.lower(), ""), public_ip) if self.punch_home else (409, b"")
            for env in sealer.seal(body, status=status, end=True):
                await send(TunnelData(stream_id=sid, data=env, end=True))
            return
        headers = dict(zip(request.headers[0::2], request.headers[1::2], strict=False))
        headers = {k: v for k, v in headers.items() if k.lower().startswith(FORWARDED_HEADER_PREFIX)}
        headers["Content-Type"] = CONTENT_TYPE
        if not _ROUTE.match(request.route):
            for env in sealer.seal(b"", status=400, end=True):
                await send(TunnelData(stream_id=sid, data=env, end=True))
            return
        try:
            async with self.session.post(
                f"{self._local_url}{PEER_PATH}/{request.route}", data=request.body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=self._settings.peer_idle_timeout_s),
            ) as response:
                retry = response.headers.get("Retry-After", "")
                for env in sealer.seal(b"", status=response.status, retry_after_s=int(retry) if retry.isdigit() else 0):
                    await send(TunnelData(stream_id=sid, data=env))
                async for chunk in response.content.iter_any():
                    for env in sealer.seal(chunk):
                        await send(TunnelData(stream_id=sid, data=env))
            for env in sealer.seal(b"", end=True):
                await send(TunnelData(stream_id=sid, data=env, end=True))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.info("relayed %s failed locally: %s", request.route, exc)
            await _quiet(send(TunnelData(stream_id=sid, end=True)))  # unsigned end: the requester sees a broken stream


# ---- routes ---------------------------------------------------------------------------------

from node.keys import admissions_key, relay_links_key, relay_server_key  # noqa: E402 (they name classes above)


def _forget_stream(streams: dict[int, asyncio.Task], stream_id: int, _task: asyncio.Task) -> None:
    """A done callback: a finished stream's task leaves the table."""
    streams.pop(stream_id, None)


async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
    """The relay (if offered), the admissions and the tunnels of this node."""

    settings = app[keys.settings_key]
    identity = app[keys.identity_key]
    admissions = Admissions(settings.data_dir)
    app[admissions_key] = admissions
    app[relay_server_key] = RelayServer(settings, identity, admissions)
    network = app[keys.network_key]
    network.attach(refused=admissions.is_revoked)
    async with aiohttp.ClientSession() as session:
        links = RelayLinks(settings, identity, session, network)
        app[relay_links_key] = links
        punching = Punching(network, session)
        network.attach(punch=punching.try_punch)
        try:
            yield
        finally:
            await punching.close()
            await links.close()
            for tunnel in list(app[relay_server_key].tunnels.values()):
                await _quiet(tunnel.ws.close())


def add_routes(app: web.Application) -> None:
    """Mount the relay's routes: tunnels in, relayed requests through."""

    async def connect(request: web.Request) -> web.StreamResponse:
        return await request.app[relay_server_key].connect(request)

    async def forward(request: web.Request) -> web.StreamResponse:
        return await request.app[relay_server_key].forward(request)

    app.router.add_get(CONNECT_PATH, connect)
    app.router.add_post(RELAY_PREFIX + "/{node_id}" + PEER_PATH + "/{route}", forward)


def reach_of(network, url: str) -> dict:
    """How a peer at `url` is reached: direct, hole-punched (set up through which relay) or relayed via which node."""
    punched = PUNCHED.get(url.rstrip("/"))
    relayed = parse_relayed_url(punched or url)
    if relayed is None:
        return {"kind": "direct", "via": None, "via_url": None}
    via = next((p.node_id for p in network.table.peers.values() if p.url.rstrip("/") == relayed.relay_url), None)
    return {"kind": "hole-punched" if punched else "relayed", "via": via, "via_url": relayed.relay_url}


class Punching:
    """The requester's side of hole punching: for a peer reached through a relay, try a punched path now and then."""

    def __init__(self, network, session: aiohttp.ClientSession) -> None:
        self._network = network
        self._session = session
        self._peers: dict[str, PunchedPeer] = {}
        self._tasks: set[asyncio.Task] = set()

    def try_punch(self, relayed: str) -> None:
        """Hello the peer at `relayed` over a punched connection; if that answers, the table moves to it."""
        task = asyncio.create_task(self._try(relayed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _try(self, relayed: str) -> None:
        peer = self._peers.get(relayed)
        if peer is None:
            peer = self._peers[relayed] = PunchedPeer(relayed, lambda port: self._ask(relayed, port))
            await peer.start()
        self._network._hello_soon(peer.url)

    async def _ask(self, relayed: str, port: int) -> PunchReply | None:
        """Ask the home node, through the relay and sealed, for its address and port to punch to."""
        from peers.client import PeerUnreachable
        from peers.relay_client import RelayErrors, post_sealed

        address = parse_relayed_url(relayed)
        if address is None:
            return None
        try:
            reply = await post_sealed(
                self._session, relayed, address, PUNCH_ROUTE, encode(PunchRequest(port=port)), {},
                aiohttp.ClientTimeout(total=10), RelayErrors(PeerUnreachable, PeerUnreachable),
            )
            try:
                if reply.status != 200:
                    return None
                data = b"".join([chunk async for chunk in reply.content.iter_chunked(1024)])
            finally:
                reply.close()
            return decode_punch(data)
        except (TimeoutError, aiohttp.ClientError, OSError, WireError, PeerUnreachable) as exc:
            log.debug("punch request to %s failed: %s", relayed, exc)
            return None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for peer in self._peers.values():
            await peer.close()


def decode_punch(data: bytes) -> PunchReply:
    """A punch reply, bounded."""
    from peers.wire import decode

    return decode(data, PunchReply, max_bytes=256)
