"""What relaying costs: a token stream direct vs through a relay (tunnel + signed envelopes), on loopback.

The home node's peer API is a stand-in that streams `--tokens` generation frames as fast as it
can (or one every `--interval-ms`, as a model would), so the figures are the transport's. Prints tokens/s, time to the first token
and bytes on the wire per token for both paths, and their ratios, measured in the same run.

    python scripts/bench_relay.py [--tokens 2000] [--rounds 3] [--interval-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
from aiohttp import web

from node.config import Settings
from node.mesh.admission import Admissions
from node.mesh.relay import RelayLinks, RelayServer
from peers.client import PEER_PATH, PeerClient
from peers.identity import NodeId, NodeIdentity
from peers.relay import CONNECT_PATH, RELAY_PREFIX
from peers.wire import ChatMessage, GenerateFrame, GenerateRequest, encode

log = logging.getLogger("bench_relay")
TOKEN = " token"  # a typical short piece of text per frame


def _home(tokens: int, sent: list[int], interval_s: float, identity: NodeIdentity) -> web.Application:
    """A stand-in peer API behind the node's own peer guard: requests checked, replies signed, as at a real node."""
    from node.http.peer_guard import peer_guard_middleware, stream_reply_headers

    async def generate(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/msgpack", **stream_reply_headers(request)})
        await response.prepare(request)
        for _ in range(tokens):
            frame = encode(GenerateFrame(kind="delta", text=TOKEN))
            sent[0] += len(frame)
            await response.write(frame)
            if interval_s:
                await asyncio.sleep(interval_s)
        await response.write(encode(GenerateFrame(kind="done", finish_reason="length", completion_tokens=tokens)))
        return response

    app = web.Application(middlewares=[peer_guard_middleware(lambda _app: identity, None)])
    app.router.add_post(f"{PEER_PATH}/generate", generate)
    return app


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _stream(client: PeerClient, url: str) -> tuple[float, float, int]:
    request = GenerateRequest(
        request_id="b", expert_id="e", messages=(ChatMessage("user", "go"),), max_tokens=None, temperature=None,
        top_p=None, stop=(), seed=None, origin_node=NodeId("bench"), hops=1,
    )
    started = time.perf_counter()
    first = None
    count = 0
    async for frame in client.generate(url, request):
        if frame.kind == "delta":
            count += 1
            if first is None:
                first = time.perf_counter() - started
    return time.perf_counter() - started, first or 0.0, count


async def main(tokens: int, rounds: int, interval_s: float) -> None:
    sent = [0]
    with tempfile.TemporaryDirectory() as tmp:
        home = NodeIdentity.generate()
        home_runner, home_url = await _serve(_home(tokens, sent, interval_s, home))
        relay = RelayServer(Settings(data_dir=Path(tmp), relay=True, relay_open=True, relay_max_bytes_per_s=1e12),
                            NodeIdentity.generate(), Admissions(Path(tmp)))
        relay_app = web.Application()
        relay_app.router.add_get(CONNECT_PATH, relay.connect)
        relay_app.router.add_post(RELAY_PREFIX + "/{node_id}" + PEER_PATH + "/{route}", relay.forward)
        relay_runner, relay_url = await _serve(relay_app)
        network = SimpleNamespace(urls=())
        async with aiohttp.ClientSession() as link_session, aiohttp.ClientSession() as session:
            links = RelayLinks(Settings(data_dir=Path(tmp) / "home", relays=(relay_url,)), home, link_session, network)
            await links.start(home_url)
            while not network.urls:
                await asyncio.sleep(0.01)
            client = PeerClient(session)
            results: dict[str, list[tuple[float, float, int]]] = {"direct": [], "relayed": []}
            wire: dict[str, float] = {}
            for _ in range(rounds):
                sent[0] = 0
                results["direct"].append(await _stream(client, home_url))
                wire["direct"] = sent[0] / tokens
                before = relay.relayed_bytes
                results["relayed"].append(await _stream(client, network.urls[0]))
                wire["relayed"] = (relay.relayed_bytes - before) / tokens
            await links.close()
        await relay_runner.cleanup()
        await home_runner.cleanup()
    rows = {}
    for path, runs in results.items():
        assert all(count == tokens for _, _, count in runs)
        rows[path] = (tokens / statistics.median(t for t, _, _ in runs), statistics.median(f for _, f, _ in runs) * 1000)
        log.info("%-8s %9.0f tokens/s   first token %6.1f ms   %5.0f bytes/token on the wire", path, *rows[path], wire[path])
    log.info(
        "relayed/direct: throughput x%.2f, first token x%.2f, bytes per token x%.2f  (%d tokens%s, median of %d)",
        rows["relayed"][0] / rows["direct"][0], rows["relayed"][1] / rows["direct"][1], wire["relayed"] / wire["direct"],
        tokens, f" one every {interval_s * 1000:.0f} ms" if interval_s else " as fast as possible", rounds,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval-ms", type=float, default=0.0, help="pace tokens like a model (20: 50 tokens/s)")
    args = parser.parse_args()
    asyncio.run(main(args.tokens, args.rounds, args.interval_ms / 1000))
