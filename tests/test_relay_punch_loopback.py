"""Hole punching's home side on loopback: it serves the peer API alone over a punched connection.

(Simultaneous open itself needs a NAT that drops the early SYN instead of refusing it: see
tests/test_relay_punch_netns.py.)"""

from __future__ import annotations

import asyncio
import socket

import aiohttp
from aiohttp import web

from node.mesh.punch import PunchHome, PunchReply, PunchRequest, bound_socket
from peers.wire import decode, encode


async def test_a_punched_connection_carries_the_peer_api_and_nothing_else() -> None:
    seen: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(body=b"ok " + await request.read(), headers={"X-Expertmesh-Sig": "s", "Set-Cookie": "x=1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    local = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with aiohttp.ClientSession() as session:
        home = PunchHome(local, session)
        probe = bound_socket()
        port = probe.getsockname()[1]
        probe.close()
        status, body = home.answer(encode(PunchRequest(port=port)), "127.0.0.1", "127.0.0.1")
        assert status == 200 and decode(body, PunchReply, max_bytes=256).ip == "127.0.0.1"
        # Stand in for the punched connection: a connected socket pair handed to the home side.
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        serving = asyncio.create_task(home.serve(theirs))
        reader, writer = await asyncio.open_connection(sock=ours)

        async def call(method: str, path: str, data: bytes = b"") -> bytes:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), None)
            if length is not None:
                return head + await reader.readexactly(length)
            return head + await reader.readuntil(b"\r\n0\r\n\r\n")  # chunked: streamed through as it came

        answer = await call("POST", "/peer/v1/hello", b"hi")
        assert answer.startswith(b"HTTP/1.1 200") and b"ok hi" in answer
        assert b"X-Expertmesh-Sig" in answer and b"Set-Cookie" not in answer
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/"), ("POST", "/peer/v1/relay/x/peer/v1/hello")):
            assert (await call(method, path)).startswith(b"HTTP/1.1 404"), path
        assert seen == ["/peer/v1/hello"]
        writer.close()
        await asyncio.wait_for(serving, 5)
        # Asked with no public address known (say, a relay on this host), the home node does not punch.
        assert home.answer(encode(PunchRequest(port=port)), "127.0.0.1", "")[0] == 409
        await home.close()
    await runner.cleanup()
