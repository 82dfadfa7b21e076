"""The relay path on loopback, real sockets: tunnel, relayed stream, limits, and hostile relays in the middle.

The home node's peer API here is a small stand-in that streams fixed frames (the point is what the
relay does to them); tests/test_relay_nodes.py runs the same path between real nodes with models.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from node.config import Settings
from node.http.middleware import error_middleware
from node.mesh.admission import Admissions
from node.mesh.relay import RelayLinks, RelayServer
from peers.client import PEER_PATH, PeerClient, PeerRejected, PeerUnreachable
from peers.identity import NodeId, NodeIdentity
from peers.relay import CONNECT_PATH, RELAY_PREFIX, EnvelopeSealer, parse_relayed_url
from peers.wire import ChatMessage, GenerateFrame, GenerateRequest, encode
from tests.nodes import wait_until

TOKENS = ["Paris", " is", " the", " capital", " of", " France"]


async def _home_peer_api(request: web.Request) -> web.StreamResponse:
    """Streams the fixed tokens at a generation's pace."""
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "application/msgpack"})
    await response.prepare(request)
    for token in TOKENS:
        await response.write(encode(GenerateFrame(kind="delta", text=token)))
        await asyncio.sleep(0.04)
    await response.write(encode(GenerateFrame(kind="done", finish_reason="stop", completion_tokens=len(TOKENS))))
    return response


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def _relay_app(server: RelayServer) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app.router.add_get(CONNECT_PATH, server.connect)
    app.router.add_post(RELAY_PREFIX + "/{node_id}" + PEER_PATH + "/{route}", server.forward)
    return app


def _request() -> GenerateRequest:
    return GenerateRequest(
        request_id="r1", expert_id="e", messages=(ChatMessage("user", "capital of France?"),),
        max_tokens=8, temperature=0.0, top_p=None, stop=(), seed=1, origin_node=NodeId("requester"), hops=1,
    )


@contextlib.asynccontextmanager
async def _mesh(tmp_path: Path, **relay_settings):
    """A relay, a home node tunnelled to it, and a requester's client; torn down in order."""
    runners: list[web.AppRunner] = []
    home_app = web.Application()
    home_app.router.add_post(f"{PEER_PATH}/generate", _home_peer_api)
    runner, home_url = await _serve(home_app)
    runners.append(runner)
    settings = Settings(data_dir=tmp_path / "relay", relay=True, relay_open=True, relay_max_streams=2, **relay_settings)
    (tmp_path / "relay").mkdir(parents=True)
    relay = RelayServer(settings, NodeIdentity.generate(), Admissions(tmp_path / "relay"))
    runner, relay_url = await _serve(_relay_app(relay))
    runners.append(runner)
    home = NodeIdentity.generate()
    home_settings = Settings(data_dir=tmp_path / "home", relays=(relay_url,))
    network = SimpleNamespace(urls=())
    session = aiohttp.ClientSession()
    links = RelayLinks(home_settings, home, session, network)
    await links.start(home_url)
    for _ in range(200):
        if network.urls:
            break
        await asyncio.sleep(0.02)
    client_session = aiohttp.ClientSession()
    yield SimpleNamespace(
        relay=relay, relay_url=relay_url, home=home, url=network.urls[0], network=network,
        client=PeerClient(client_session, idle_timeout_s=5), session=client_session, runners=runners, links=links,
    )
    await links.close()
    await session.close()
    await client_session.close()
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture()
async def mesh(tmp_path: Path):
    async with _mesh(tmp_path) as running:
        yield running


async def _texts(client: PeerClient, url: str) -> list[str]:
    return [f.text async for f in client.generate(url, _request()) if f.kind == "delta"]


async def test_a_relayed_stream_arrives_whole_and_in_order(mesh) -> None:
    relayed = parse_relayed_url(mesh.url)
    assert relayed is not None and relayed.node_id == mesh.home.node_id and relayed.relay_url == mesh.relay_url
    assert await _texts(mesh.client, mesh.url) == TOKENS
    for _ in range(100):  # the relay's handler finishes just after the requester has read the end
        if mesh.relay.active_streams == 0:
            break
        await asyncio.sleep(0.01)
    assert mesh.relay.relayed_bytes > 0 and mesh.relay.active_streams == 0


async def test_the_relay_limits_streams(mesh) -> None:
    async def slow_call():
        return [f async for f in mesh.client.generate(mesh.url, _request())]

    assert await _texts(mesh.client, mesh.url) == TOKENS  # the home node's end-to-end key is known from here on
    # Two streams in flight fill the relay (max 2); a third is told to come back later.
    tasks = [asyncio.create_task(slow_call()) for _ in range(2)]
    for _ in range(100):
        if mesh.relay.active_streams == 2:
            break
        await asyncio.sleep(0.005)
    assert mesh.relay.active_streams == 2
    with pytest.raises(PeerRejected) as caught:
        await slow_call()
    assert caught.value.status == 429 and caught.value.retry_after_s == 1
    assert all(len(frames) == len(TOKENS) + 1 for frames in await asyncio.gather(*tasks))


async def test_the_relay_holds_its_byte_rate(tmp_path: Path) -> None:
    async with _mesh(tmp_path / "fast") as fast:
        started = time.perf_counter()
        assert await _texts(fast.client, fast.url) == TOKENS
        fast_s = time.perf_counter() - started
        stream_bytes = fast.relay.relayed_bytes
    rate = 400.0
    async with _mesh(tmp_path / "slow", relay_max_bytes_per_s=rate) as slow:
        started = time.perf_counter()
        assert await _texts(slow.client, slow.url) == TOKENS
        slow_s = time.perf_counter() - started
    # The bucket starts full (one second's worth); the rest of the stream has to wait for tokens.
    floor_s = (stream_bytes - rate) / rate
    assert slow_s >= 0.8 * floor_s and slow_s > fast_s + 0.5, (slow_s, fast_s, stream_bytes)


async def test_an_unknown_node_at_the_relay_is_a_clear_error(mesh) -> None:
    other = NodeIdentity.generate().node_id
    with pytest.raises(PeerRejected) as caught:
        await _texts(mesh.client, f"{mesh.relay_url}{RELAY_PREFIX}/{other}")
    assert caught.value.status == 502


async def _mitm(upstream: str, rewrite) -> tuple[web.AppRunner, str]:
    """A hostile relay: forwards to the honest one and rewrites the reply bytes on the way."""
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower().startswith("x-expertmesh") or k == "Content-Type"}
        async with aiohttp.ClientSession() as session:
            async with session.post(upstream + request.path, data=body, headers=headers) as answer:
                data = await answer.read()
                return web.Response(status=answer.status, body=rewrite(data, request))

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    return await _serve(app)


def _flip_middle(data: bytes, request: web.Request) -> bytes:
    """Alter one byte in the middle of a sealed reply (the tokens are encrypted: a relay can only flip bits)."""
    if not request.path.endswith("/sealed") or not data:
        return data
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


async def test_a_relay_that_alters_a_token_is_caught(mesh) -> None:
    runner, evil = await _mitm(mesh.relay_url, _flip_middle)
    try:
        url = mesh.url.replace(mesh.relay_url, evil)
        with pytest.raises(PeerUnreachable, match="end-to-end"):
            await _texts(mesh.client, url)
        # The same relay passing bytes untouched is fine: the check is not what fails.
        runner2, fair = await _mitm(mesh.relay_url, lambda data, _r: data)
        try:
            assert await _texts(mesh.client, mesh.url.replace(mesh.relay_url, fair)) == TOKENS
        finally:
            await runner2.cleanup()
    finally:
        await runner.cleanup()


async def test_a_relay_that_injects_or_cuts_is_caught(mesh) -> None:
    injected = encode(GenerateFrame(kind="delta", text=" (sponsored)"))

    def inject(data: bytes, _r) -> bytes:
        return data[:200] + injected + data[200:]

    runner, evil = await _mitm(mesh.relay_url, inject)
    try:
        with pytest.raises(PeerUnreachable, match="relayed reply"):
            await _texts(mesh.client, mesh.url.replace(mesh.relay_url, evil))
    finally:
        await runner.cleanup()
    runner, cutter = await _mitm(mesh.relay_url, lambda data, _r: data[: len(data) // 2])
    try:
        with pytest.raises(PeerUnreachable):
            await _texts(mesh.client, mesh.url.replace(mesh.relay_url, cutter))
    finally:
        await runner.cleanup()


async def test_a_relay_cannot_pose_as_the_home_node(mesh) -> None:
    impostor = NodeIdentity.generate()

    def impersonate(_data: bytes, request: web.Request) -> bytes:
        # The relay answers by itself, sealing a plausible reply with its own key for the home node's id.
        nonce = bytes.fromhex(request.headers["X-Expertmesh-E2E-Nonce"])
        from peers.relay import request_digest

        sealer = EnvelopeSealer(impostor, nonce, request_digest("generate", b""))
        out = sealer.seal(b"", status=200)
        out += sealer.seal(encode(GenerateFrame(kind="delta", text="I am the home node")))
        out += sealer.seal(encode(GenerateFrame(kind="done", finish_reason="stop")), end=True)
        return b"".join(out)

    runner, evil = await _mitm(mesh.relay_url, impersonate)
    try:
        with pytest.raises(PeerUnreachable, match="not signed by node"):
            await _texts(mesh.client, mesh.url.replace(mesh.relay_url, evil))
    finally:
        await runner.cleanup()


async def test_a_relay_refuses_a_node_it_never_admitted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node.mesh.relay")
    (tmp_path / "relay").mkdir()
    admissions = Admissions(tmp_path / "relay")
    relay = RelayServer(Settings(data_dir=tmp_path / "relay", relay=True), NodeIdentity.generate(), admissions)
    runner, relay_url = await _serve(_relay_app(relay))
    home = NodeIdentity.generate()
    network = SimpleNamespace(urls=())
    async with aiohttp.ClientSession() as session:
        links = RelayLinks(Settings(data_dir=tmp_path / "home", relays=(relay_url,)), home, session, network)
        await links.start("http://127.0.0.1:9")
        # Not a pause: wait until the relay has heard the home node out and refused it.
        refused = f"relay: refused a tunnel from {home.node_id}"
        await wait_until(lambda: any(refused in r.getMessage() for r in caplog.records), "the relay to refuse the tunnel")
        assert network.urls == () and relay.tunnels == {}
        admissions.nodes[home.node_id] = dataclasses.replace(
            __import__("node.mesh.admission", fromlist=["Admitted"]).Admitted(admitted_ms=1)
        )
        await wait_until(lambda: network.urls, "the home node to publish its relayed address", timeout_s=6.0)
        assert home.node_id in relay.tunnels
        relay.close_tunnel(home.node_id)  # revoked: the tunnel goes, and the address with it
        admissions.revoke(home.node_id, 2)
        await wait_until(lambda: network.urls == (), "the relayed address to go", timeout_s=6.0)
        await links.close()
    await runner.cleanup()


async def test_a_relay_cannot_read_the_prompt_or_the_tokens(mesh, monkeypatch) -> None:
    """Every byte the relay handles, both sides (requester and tunnel), is scanned for the plaintext."""
    import node.mesh.relay as relay_module

    seen: list[bytes] = []
    real_decode, real_send = relay_module.decode_tunnel, relay_module._Tunnel.send

    def decode_tunnel(data, allowed):
        seen.append(bytes(data))  # what the home node sends the relay
        return real_decode(data, allowed)

    async def send(self, message) -> None:
        seen.append(encode(message))  # what the relay sends the home node
        await real_send(self, message)

    monkeypatch.setattr(relay_module, "decode_tunnel", decode_tunnel)
    monkeypatch.setattr(relay_module._Tunnel, "send", send)

    def record(data: bytes, request: web.Request) -> bytes:
        seen.append(data)
        return data

    runner, watched = await _mitm(mesh.relay_url, record)
    original = web.Request.read
    at_home: list[bytes] = []

    async def read(self):  # the requester's bytes as the watching relay receives them (and, apart, the home's)
        body = await original(self)
        (seen if RELAY_PREFIX in self.path else at_home).append(body)
        return body

    monkeypatch.setattr(web.Request, "read", read)
    try:
        assert await _texts(mesh.client, mesh.url.replace(mesh.relay_url, watched)) == TOKENS
    finally:
        await runner.cleanup()
    blob = b"".join(seen)
    assert len(blob) > 1000 and any(b"tunnel_data" in chunk for chunk in seen)
    for secret in (b"capital of France", b"Paris", b"France", b"capital", b"delta"):
        assert secret not in blob, secret
    # The same scan finds the prompt where it is plaintext: at the home node's own peer API.
    assert b"capital of France" in b"".join(at_home)
