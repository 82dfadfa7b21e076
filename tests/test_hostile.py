"""Hostile peers and clients: a hand-written lying peer on loopback, the API key, and rate limits."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletion

from peers import auth
from peers.identity import NodeIdentity
from peers.wire import (
    ExpertInfo,
    GenerateFrame,
    Hello,
    HelloReply,
    NodeCard,
    PeersReply,
    PeersRequest,
    decode,
    encode,
    sign_card,
)
from tests.nodes import FAST, RunningNode, get_json, model_ids, start_node, wait_for

pytestmark = pytest.mark.model

FAKE_SHA = "f" * 64


class LyingPeer:
    """A peer that speaks the protocol but lies: its behaviour per expert is set by the test."""

    def __init__(self, data_dir: Path) -> None:
        self.identity = NodeIdentity.load_or_create(data_dir)
        self.modes = {"missing@000000000000": "missing", "garbage@000000000000": "garbage",
                      "stall@000000000000": "stall", "boaster@000000000000": "boaster"}
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def card(self) -> NodeCard:
        experts = tuple(
            ExpertInfo(
                expert_id=expert_id, name=expert_id.split("@")[0], family="fake", params="1B", quantization="Q4_0",
                sha256=FAKE_SHA, prompt_style="chat", n_ctx=2048, queue_depth=0, queue_size=8,
                tokens_per_s=100000.0 if mode == "boaster" else None,
            )
            for expert_id, mode in self.modes.items()
        )
        return NodeCard(node_id=self.identity.node_id, public_key=self.identity.public_key_raw,
                        addresses=(self.url,), experts=experts, issued_ms=int(time.time() * 1000))

    async def _hello(self, request: web.Request) -> web.Response:
        hello = decode(await request.read(), Hello, max_bytes=1 << 20)
        body = encode(HelloReply(card=sign_card(self.card(), self.identity), echo_sent_ms=hello.sent_ms))
        # A liar still holds its key: its replies are signed, so it is a peer, if a lying one.
        signature = auth.sign_reply(self.identity, request.headers[auth.NONCE_HEADER], 200, body)
        return web.Response(body=body, content_type="application/msgpack", headers=signature)

    async def _peers(self, request: web.Request) -> web.Response:
        decode(await request.read(), PeersRequest, max_bytes=1 << 20)
        body = encode(PeersReply(peers=()))
        signature = auth.sign_reply(self.identity, request.headers[auth.NONCE_HEADER], 200, body)
        return web.Response(body=body, content_type="application/msgpack", headers=signature)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        mode = next((m for e, m in self.modes.items() if e.encode() in body), "missing")
        if mode == "missing":
            return web.json_response({"error": {"message": "no such expert"}}, status=404)
        signature = auth.sign_reply(self.identity, request.headers[auth.NONCE_HEADER], 200, None)
        response = web.StreamResponse(headers={"Content-Type": "application/msgpack", **signature})
        await response.prepare(request)
        if mode == "garbage":
            await response.write(b"\xc1" * 64)
        elif mode == "stall":
            await response.write(encode(GenerateFrame(kind="delta", text="Well")))
            await asyncio.sleep(30)  # silent far past the node's idle timeout
        else:  # boaster: claims 100000 tokens/s, delivers about 10
            for _ in range(10):
                await response.write(encode(GenerateFrame(kind="delta", text=" slow")))
                await asyncio.sleep(0.1)
            await response.write(encode(GenerateFrame(kind="done", finish_reason="stop", prompt_tokens=3, completion_tokens=10)))
        return response

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/peer/v1/hello", self._hello)
        app.router.add_post("/peer/v1/peers", self._peers)
        app.router.add_post("/peer/v1/generate", self._generate)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        asyncio.run_coroutine_threadsafe(self._cancel_rest(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _cancel_rest(self) -> None:
        """Cancel handlers still sleeping (the stalling one), so nothing is left pending at exit."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture()
def liar_and_node(tmp_path: Path) -> Iterator[tuple[LyingPeer, RunningNode]]:
    liar = LyingPeer(tmp_path / "liar")
    liar.start()
    node = start_node(tmp_path / "node", "--model", "smollm2-135m", "--peer", liar.url, "--peer-idle-timeout-s", "2", *FAST)
    try:
        yield liar, node
    finally:
        node.stop()
        liar.stop()


def _liar_row(node: RunningNode, liar: LyingPeer) -> dict:
    return next(p for p in get_json(node.url + "/v1/peers")["data"] if p["id"] == liar.identity.node_id)


def _ask(node: RunningNode, model: str) -> ChatCompletion:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="unused", timeout=60, max_retries=0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=16)


def test_a_lying_peer_is_caught_shown_with_evidence_and_dropped(liar_and_node) -> None:
    liar, node = liar_and_node
    wait_for(lambda: "missing@000000000000" in model_ids(node), what="the liar's experts to be listed")

    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as stalled:
        _ask(node, "stall@000000000000")  # a stream that goes silent is given up after the idle timeout
    assert stalled.value.status_code == 502 and time.monotonic() - started < 20
    response = _ask(node, "boaster@000000000000")  # served, but far slower than claimed
    assert "slow" in response.choices[0].message.content
    with pytest.raises(openai.APIStatusError) as garbage:
        _ask(node, "garbage@000000000000")
    assert garbage.value.status_code == 502
    kinds = [e["kind"] for e in _liar_row(node, liar)["evidence"]]
    assert kinds[:3] == ["timeout", "speed_lie", "garbage"], kinds
    assert _liar_row(node, liar)["trust"] < 0.3
    assert _liar_row(node, liar)["distrusted"]
    # A distrusted peer's experts are no longer offered, nor routed to.
    assert not {m for m in model_ids(node) if m.endswith("@000000000000")}
    with pytest.raises(openai.NotFoundError):
        _ask(node, "missing@000000000000")


def test_a_peer_advertising_an_expert_it_lacks_loses_trust(liar_and_node) -> None:
    liar, node = liar_and_node
    wait_for(lambda: "missing@000000000000" in model_ids(node), what="the liar's experts to be listed")
    with pytest.raises(openai.APIStatusError) as raised:
        _ask(node, "missing@000000000000")
    assert raised.value.status_code == 502
    row = _liar_row(node, liar)
    assert row["evidence"][0]["kind"] == "missing_expert" and row["trust"] == 0.5


def test_api_key_is_required_when_asked_and_checked(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", "--model", "smollm2-135m", "--require-api-key")
    try:
        key_file = node.data_dir / "api_key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        assert get_json(node.url + "/healthz")["status"] == "ok"  # liveness stays open
        assert get_json(node.url + "/v1/models")["error"]["code"] == "unauthorized"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=node.url + "/v1", api_key="wrong", max_retries=0).models.list()
        models = openai.OpenAI(base_url=node.url + "/v1", api_key=key, max_retries=0).models.list()
        assert "auto" in {m.id for m in models}
        assert (node.data_dir.stat().st_mode & 0o777) == 0o700
        assert ((node.data_dir / "node.key").stat().st_mode & 0o777) == 0o600
    finally:
        node.stop()


def test_a_flooding_client_is_rate_limited(tmp_path: Path) -> None:
    node = start_node(
        tmp_path / "node", "--model", "smollm2-135m",
        env={"EXPERTMESH_RATE_LIMIT_PER_S": "5", "EXPERTMESH_RATE_LIMIT_BURST": "10"},
    )
    try:
        async def flood() -> list[tuple[int, str | None]]:
            async with aiohttp.ClientSession() as session:
                results = []
                for _ in range(40):
                    async with session.get(node.url + "/v1/models") as response:
                        results.append((response.status, response.headers.get("Retry-After")))
                return results

        results = asyncio.run(flood())
        statuses = [s for s, _ in results]
        assert set(statuses) == {200, 429}
        assert 10 <= statuses.count(200) < 40
        assert all(int(retry or 0) >= 1 for s, retry in results if s == 429)
        time.sleep(1.5)
        assert get_json(node.url + "/healthz")["status"] == "ok"  # the budget refills
    finally:
        node.stop()


def test_spot_checks_catch_a_lying_peer_without_any_user_request(tmp_path: Path) -> None:
    liar = LyingPeer(tmp_path / "liar")
    liar.start()
    node = start_node(
        tmp_path / "node", "--model", "smollm2-135m", "--peer", liar.url,
        "--peer-idle-timeout-s", "2", "--spot-check-interval-s", "0.5", *FAST,
    )
    try:
        wait_for(lambda: bool(_liar_row(node, liar)["evidence"]) if liar.identity.node_id in {
            p["id"] for p in get_json(node.url + "/v1/peers")["data"]} else False, timeout_s=150, what="a spot check to catch the liar")
        evidence = _liar_row(node, liar)["evidence"]
        # The spot-check loop also verifies unverified experts (README: Trust), which may catch the liar first.
        verification = {"model_mismatch", "score_lie"}
        assert {e["kind"] for e in evidence} <= {"missing_expert", "garbage", "timeout", "speed_lie", *verification}
        assert all(e["detail"].startswith("spot check") or e["kind"] in verification for e in evidence)
    finally:
        node.stop()
        liar.stop()
