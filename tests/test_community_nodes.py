"""Community learning between real nodes on loopback, with the real models."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import urllib.request
from pathlib import Path

import msgpack
import pytest

from peers import auth
from peers.identity import NodeIdentity
from peers.learning import verify_summary
from peers.wire import CONTENT_TYPE, Hello, NodeCard, encode, sign_card
from tests.nodes import start_node

_SPEC = importlib.util.spec_from_file_location(
    "demo_community", Path(__file__).resolve().parents[1] / "scripts" / "demo_community.py"
)
assert _SPEC is not None and _SPEC.loader is not None
demo = importlib.util.module_from_spec(_SPEC)
sys.modules["demo_community"] = demo  # dataclasses look their module up while the script loads
_SPEC.loader.exec_module(demo)

pytestmark = pytest.mark.model


def test_a_fresh_node_picks_the_better_expert_from_its_first_queries(tmp_path: Path) -> None:
    results = demo.teach_and_join(tmp_path, teach=24, fresh=8)
    shared, alone = results["with sharing"], results["without sharing"]
    assert shared.correct >= 7, shared
    assert shared.community == 8 and set(shared.reporters) == {2}, shared  # the explanation says from how many nodes
    assert alone.community == 0, alone


def _hello_bytes(url: str) -> bytes:
    """POST a stranger's hello to a node's peer API; the raw reply bytes."""
    stranger = NodeIdentity.generate()
    card = NodeCard(
        node_id=stranger.node_id, public_key=stranger.public_key_raw, addresses=(), experts=(), issued_ms=int(time.time() * 1000)
    )
    body = encode(Hello(card=sign_card(card, stranger), sent_ms=int(time.time() * 1000)))
    headers = {"Content-Type": CONTENT_TYPE, **auth.sign_request(stranger, "POST", "/peer/v1/hello", body)}
    request = urllib.request.Request(url + "/peer/v1/hello", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def test_a_node_says_only_the_documented_summary_and_nothing_with_sharing_off(tmp_path: Path) -> None:
    words = ("zanzibar", "quokka")
    node = start_node(tmp_path / "n", "--model", "smollm2-135m", *demo.NODE_ARGS)
    decision_ids = []
    try:
        for i in range(4):
            body = {"model": "auto", "messages": [{"role": "user", "content": f"What is {i} plus {words[i % 2]}?"}], "max_tokens": 2}
            routing = demo._request(node.url + "/v1/chat/completions", body)["expertmesh"]
            demo._request(node.url + "/v1/feedback", {"decision_id": routing["decision_id"], "token": routing["feedback_token"], "rating": "up"})
            decision_ids.append(routing["decision_id"])
        reply = msgpack.unpackb(_hello_bytes(node.url), raw=False)
        learning = reply["learning"]
        summary = msgpack.unpackb(learning, raw=False)
        assert set(summary) == {"v", "type", "summary", "signature"}
        assert set(summary["summary"]) == {"node_id", "public_key", "seq", "issued_ms", "cells"}
        assert summary["summary"]["cells"] == [{"expert_id": demo.SMOLLM2_ID, "task": "arithmetic", "n": 4, "mean": 1.0}]
        assert verify_summary(learning, now_ms=int(time.time() * 1000)).node_id == node.node_id
        for secret in (*words, "plus", *decision_ids):
            assert secret.encode() not in learning
        stats = json.loads(urllib.request.urlopen(node.url + "/v1/router/stats", timeout=30).read())
        assert stats["community"]["share"] is True and stats["community"]["own_cells"] == 1
    finally:
        node.stop()
    quiet = start_node(tmp_path / "n", "--model", "smollm2-135m", *demo.NODE_ARGS, env={"EXPERTMESH_SHARE_LEARNING": "false"})
    try:
        reply = msgpack.unpackb(_hello_bytes(quiet.url), raw=False)
        assert reply["learning"] == b""  # the same ledger, sharing off: nothing leaves
    finally:
        quiet.stop()
