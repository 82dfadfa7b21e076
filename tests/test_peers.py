"""Nodes on loopback meet through --peer and peer exchange, forward requests, and refuse bad peer input."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import aiohttp
import msgpack
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from peers.identity import NodeId, NodeIdentity
from peers.wire import (
    ChatMessage,
    GenerateRequest,
    Hello,
    NodeCard,
    encode,
    sign_card,
)
from tests.nodes import FAST, GEMMA3_ID, SMOLLM2_ID, RunningNode, get_json, model_ids, signed, start_node, wait_for

pytestmark = pytest.mark.model



def alive_peer_ids(node: RunningNode) -> set[str]:
    return {p["id"] for p in get_json(node.url + "/v1/peers")["data"] if p["alive"]}


def refused_hellos(node: RunningNode) -> int:
    """How many hellos `node` refused as unauthenticated (401/403), from its Prometheus counters."""
    text = asyncio.run(_get_text(node.url + "/metrics"))
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("expertmesh_requests_total{") and 'endpoint="/peer/v1/hello"' in line
        and ('status="401"' in line or 'status="403"' in line)
    )


async def _get_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


def _met_all(node: RunningNode, ids: set[str]) -> bool:
    """Whether `node` holds every other node of `ids` alive."""
    return alive_peer_ids(node) == ids - {node.node_id}


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningNode, RunningNode, RunningNode]]:
    """A (gemma3) <- B (smollm2, --peer A) <- C (smollm2, --peer B); mDNS off."""
    nodes: list[RunningNode] = []
    try:
        a = start_node(tmp_path_factory.mktemp("a"), "--model", "gemma3-270m", *FAST)
        nodes.append(a)
        b = start_node(tmp_path_factory.mktemp("b"), "--model", "smollm2-135m", "--peer", a.url, *FAST)
        nodes.append(b)
        c = start_node(tmp_path_factory.mktemp("c"), "--model", "smollm2-135m", "--peer", b.url, *FAST)
        nodes.append(c)
        yield a, b, c
    finally:
        for node in nodes:
            node.stop()


def test_bootstrap_and_peer_exchange_connect_everyone(trio) -> None:
    a, b, c = trio
    wait_for(lambda: alive_peer_ids(a) == {b.node_id, c.node_id}, what="A to know B and C")
    wait_for(lambda: alive_peer_ids(b) == {a.node_id, c.node_id}, what="B to know A and C")
    # C was only told about B; it met A through peer exchange.
    wait_for(lambda: alive_peer_ids(c) == {a.node_id, b.node_id}, what="C to know A through B")
    peers = get_json(c.url + "/v1/peers")["data"]
    through_exchange = next(p for p in peers if p["id"] == a.node_id)
    assert through_exchange["rtt_ms"] is not None and through_exchange["rtt_ms"] >= 0
    assert through_exchange["experts"] == [GEMMA3_ID]


def test_models_lists_remote_experts_with_their_owner(trio) -> None:
    a, b, c = trio
    wait_for(lambda: SMOLLM2_ID in model_ids(a), what="A to list smollm2")
    entry = next(m for m in get_json(a.url + "/v1/models")["data"] if m["id"] == SMOLLM2_ID)
    assert entry["owned_by"] in (b.node_id, c.node_id)
    assert set(entry["expertmesh"]["nodes"]) == {b.node_id, c.node_id}
    assert entry["expertmesh"]["local"] is False
    wait_for(lambda: GEMMA3_ID in model_ids(c), what="C to list gemma3")


def test_requests_are_forwarded_to_the_hosting_node(trio) -> None:
    a, b, c = trio
    wait_for(lambda: GEMMA3_ID in model_ids(c), what="C to list gemma3")
    client = openai.OpenAI(base_url=c.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    question: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model=GEMMA3_ID, messages=question, max_tokens=12, temperature=0)
    assert "Paris" in plain.choices[0].message.content
    assert plain.model_extra["expertmesh"] == {"expert": GEMMA3_ID, "node": a.node_id}
    assert plain.usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(model=GEMMA3_ID, messages=question, max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == plain.choices[0].message.content
    assert {ch.model_extra["expertmesh"]["node"] for ch in chunks} == {a.node_id}


async def test_the_peer_api_never_forwards_again(trio) -> None:
    a, _, _ = trio
    request = GenerateRequest(
        request_id="r1",
        expert_id=SMOLLM2_ID,  # hosted by B and C, not A
        messages=(ChatMessage(role="user", content="Hi"),),
        max_tokens=4,
        temperature=0.0,
        top_p=None,
        stop=(),
        seed=None,
        origin_node=NodeId("someone"),
        hops=1,
    )
    someone = NodeIdentity.generate()
    async with aiohttp.ClientSession() as session:
        body = encode(request)
        async with session.post(a.url + "/peer/v1/generate", data=body, headers=signed(someone, "/peer/v1/generate", body)) as response:
            assert response.status == 404
        twice = encode(GenerateRequest(**{**request.__dict__, "expert_id": GEMMA3_ID, "hops": 2}))
        async with session.post(a.url + "/peer/v1/generate", data=twice, headers=signed(someone, "/peer/v1/generate", twice)) as response:
            assert response.status == 400


def _hello_bytes(identity: NodeIdentity) -> bytes:
    card = NodeCard(node_id=identity.node_id, public_key=identity.public_key_raw, addresses=(), experts=(), issued_ms=1)
    return encode(Hello(card=sign_card(card, identity), sent_ms=1))


async def test_malformed_oversized_and_forged_peer_messages_are_refused(trio, tmp_path: Path) -> None:
    a, _, _ = trio
    identity = NodeIdentity.load_or_create(tmp_path)
    good = _hello_bytes(identity)
    unpacked = msgpack.unpackb(good)
    bad_signature = msgpack.unpackb(good)
    bad_signature["card"]["signature"] = bytes(64)
    unpacked["card"]["card"]["issued_ms"] = 2  # the signed content changed, the signature did not
    tampered = msgpack.packb(unpacked)
    wrong_version = msgpack.packb({**msgpack.unpackb(good), "v": 99})
    cases = [
        (b"\xc1\xc1 not msgpack", 400),
        (msgpack.packb([1, 2, 3]), 400),
        (msgpack.packb({"v": 1, "type": "hello"}), 400),
        (tampered, 400),
        (msgpack.packb(bad_signature), 400),
        (wrong_version, 426),
        (b"\x00" * (300 << 10), 413),
    ]
    async with aiohttp.ClientSession() as session:
        async with session.post(a.url + "/peer/v1/hello", data=good, headers=signed(identity, "/peer/v1/hello", good)) as response:
            assert response.status == 200
        for body, status in cases:
            async with session.post(a.url + "/peer/v1/hello", data=body, headers=signed(identity, "/peer/v1/hello", body)) as response:
                assert response.status == status, body[:40]
                assert (await response.json())["error"]["message"]


def test_a_dead_peer_fails_over_then_leaves_the_listing_then_returns(tmp_path: Path) -> None:
    a = start_node(tmp_path / "a", "--model", "gemma3-270m", *FAST)
    b = start_node(tmp_path / "b", "--model", "smollm2-135m", "--peer", a.url, *FAST)
    c = start_node(tmp_path / "c", "--model", "smollm2-135m", "--peer", a.url, *FAST)
    try:
        wait_for(lambda: alive_peer_ids(a) == {b.node_id, c.node_id}, what="A to know B and C")
        entry = next(m for m in get_json(a.url + "/v1/models")["data"] if m["id"] == SMOLLM2_ID)
        nearest, other = (b, c) if entry["expertmesh"]["nodes"][0] == b.node_id else (c, b)
        os.kill(nearest.process.pid, signal.SIGKILL)
        nearest.process.wait(timeout=10)
        # Nothing was sent yet when the dead host fails, so the next candidate answers.
        client = openai.OpenAI(base_url=a.url + "/v1", api_key="unused", timeout=120, max_retries=0)
        response = client.chat.completions.create(
            model=SMOLLM2_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
        assert response.model_extra["expertmesh"]["node"] == other.node_id
        wait_for(lambda: nearest.node_id not in alive_peer_ids(a), timeout_s=4 + 5, what="the dead peer to leave")
        entry = next(m for m in get_json(a.url + "/v1/models")["data"] if m["id"] == SMOLLM2_ID)
        assert entry["expertmesh"]["nodes"] == [other.node_id]
        # Back with the same key (same node id) on a new port: it says hello and is listed again.
        back = start_node(nearest.data_dir, "--model", "smollm2-135m", "--peer", a.url, *FAST)
        try:
            assert back.node_id == nearest.node_id
            wait_for(lambda: back.node_id in alive_peer_ids(a), what="the peer to come back")
        finally:
            back.stop()
    finally:
        for node in (a, b, c):
            node.stop()


def test_kill_9_of_the_answering_peer_mid_stream_gives_a_clear_error(tmp_path: Path) -> None:
    a = start_node(tmp_path / "a", "--model", "gemma3-270m", *FAST)
    b = start_node(tmp_path / "b", "--model", "smollm2-135m", "--peer", a.url, *FAST)
    try:
        wait_for(lambda: SMOLLM2_ID in model_ids(a), what="A to list smollm2")
        client = openai.OpenAI(base_url=a.url + "/v1", api_key="unused", timeout=120, max_retries=0)
        stream = client.chat.completions.create(
            model=SMOLLM2_ID,
            messages=[{"role": "user", "content": "Write a very long essay about the sea."}],
            max_tokens=1000,
            stream=True,
        )
        received = []
        with pytest.raises(openai.APIError) as raised:
            for chunk in stream:
                received.append(chunk)
                if len(received) == 3:
                    os.kill(b.process.pid, signal.SIGKILL)
        assert len(received) >= 3
        assert b.node_id in str(raised.value)
        # A is unharmed and answers with its own expert.
        assert client.chat.completions.create(
            model=GEMMA3_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        ).choices
    finally:
        a.stop()
        b.stop()


def test_community_secret_keeps_outsiders_out(tmp_path: Path) -> None:
    secret = ("--community-secret", "open sesame")
    a = start_node(tmp_path / "a", "--model", "gemma3-270m", *secret, *FAST)
    b = start_node(tmp_path / "b", "--model", "smollm2-135m", "--peer", a.url, *secret, *FAST)
    outsider = start_node(tmp_path / "x", "--model", "smollm2-135m", "--peer", a.url, "--community-secret", "wrong", *FAST)
    try:
        wait_for(lambda: alive_peer_ids(a) == {b.node_id}, what="A to know B")
        # Not a pause: A's own count of hellos it refused (the outsider's, with the wrong secret) proves the tries.
        wait_for(lambda: refused_hellos(a) >= 3, what="A to refuse the outsider's hellos three times")
        assert outsider.node_id not in alive_peer_ids(a)
        assert alive_peer_ids(outsider) == set()

        async def raw_hellos() -> tuple[int, int, int]:
            identity = NodeIdentity.load_or_create(tmp_path / "raw")
            body = _hello_bytes(identity)
            async with aiohttp.ClientSession() as session:
                statuses = []
                for secret in (None, b"wrong", b"open sesame"):
                    headers = signed(identity, "/peer/v1/hello", body, secret)
                    async with session.post(a.url + "/peer/v1/hello", data=body, headers=headers) as response:
                        statuses.append(response.status)
                first, second, third = statuses
                return first, second, third

        assert asyncio.run(raw_hellos()) == (403, 403, 200)
    finally:
        for node in (a, b, outsider):
            node.stop()


def test_three_nodes_find_each_other_by_mdns_alone(tmp_path: Path) -> None:
    nodes = []
    try:
        for name, model in (("a", "smollm2-135m"), ("b", "gemma3-270m"), ("c", "smollm2-135m")):
            nodes.append(start_node(tmp_path / name, "--model", model, *FAST, mdns=True))
        ids = {n.node_id for n in nodes}
        for node in nodes:
            wait_for(partial(_met_all, node, ids), what=f"{node.node_id} to meet both")
            peers = get_json(node.url + "/v1/peers")["data"]
            # No --peer anywhere: each address was found by mDNS, or heard in a hello that an mDNS find caused.
            assert {p["source"] for p in peers} <= {"mdns", "exchange"}
        assert any(p["source"] == "mdns" for node in nodes for p in get_json(node.url + "/v1/peers")["data"])
        wait_for(lambda: GEMMA3_ID in model_ids(nodes[0]), what="a to list b's expert")
    finally:
        for node in nodes:
            node.stop()


def test_known_peers_are_remembered_across_restarts(tmp_path: Path) -> None:
    b = start_node(tmp_path / "b", "--model", "smollm2-135m", *FAST)
    try:
        a = start_node(tmp_path / "a", "--model", "gemma3-270m", "--peer", b.url, *FAST)
        try:
            wait_for(lambda: b.node_id in alive_peer_ids(a), what="A to meet B")
        finally:
            a.stop()
        # No --peer this time: A finds B again from its peer database.
        again = start_node(tmp_path / "a", "--model", "gemma3-270m", *FAST)
        try:
            wait_for(lambda: b.node_id in alive_peer_ids(again), what="A to remember B")
            listing = subprocess.run(
                [sys.executable, "-m", "node", "peers", "--node", again.url],
                capture_output=True, text=True, timeout=60,
            )
            assert listing.returncode == 0, listing.stderr
            assert b.node_id in listing.stdout and SMOLLM2_ID in listing.stdout
        finally:
            again.stop()
    finally:
        b.stop()
