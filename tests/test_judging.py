"""Judging inside running nodes: background cards at start, the cache across restarts, independent judges across nodes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from node.judging.cards import (
    CapabilityCard,
    Performance,
    SignedCapabilityCard,
    encode_signed_card,
    sign_capability_card,
)
from node.judging.stats import summarize
from peers.identity import NodeIdentity
from peers.wire import ExpertInfo, Hello, NodeCard, encode, sign_card
from tests.nodes import FAST, GEMMA3_ID, SMOLLM2_ID, get_json, model_ids, start_node, wait_for
from tests.nodes import signed as signed_headers

pytestmark = pytest.mark.model

DIMENSIONS = {"knowledge", "arithmetic", "translation", "classification", "instruction", "safety", "reasoning"}
SMOLLM2_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def experts(node) -> dict[str, dict]:
    return {row["id"]: row for row in get_json(node.url + "/v1/experts")["data"]}


def judged(node, expert_id: str) -> bool:
    row = experts(node).get(expert_id)
    return bool(row and row["judging"] and row["judging"]["state"] == "judged")


def test_a_node_judges_its_experts_in_the_background_once(tmp_path: Path) -> None:
    data = tmp_path / "node"
    node = start_node(data, "--model", "smollm2-135m", "--model", "gemma3-270m", "--judge-items", "2", judge=True)
    try:
        # The node serves while it judges.
        assert get_json(node.url + "/healthz")["status"] == "ok"
        wait_for(lambda: judged(node, SMOLLM2_ID) and judged(node, GEMMA3_ID), timeout_s=240, what="both experts judged")
        rows = experts(node)
        for expert_id in (SMOLLM2_ID, GEMMA3_ID):
            cards = rows[expert_id]["cards"]
            assert len(cards) == 1 and cards[0]["self_judged"] and cards[0]["judge"] == node.node_id
            assert set(cards[0]["scores"]) == DIMENSIONS
            assert all(score["n"] == 2 for score in cards[0]["scores"].values())
            assert cards[0]["performance"]["tokens_per_s"] > 0
            assert set(rows[expert_id]["scores"]) == DIMENSIONS
        issued = {e: rows[e]["cards"][0]["issued_ms"] for e in (SMOLLM2_ID, GEMMA3_ID)}
        # The router sees the judged scores as features of each candidate.
        body = {"model": "auto", "messages": [{"role": "user", "content": "What is 2 plus 2?"}], "max_tokens": 2}

        async def routed() -> dict:
            async with aiohttp.ClientSession() as session:
                async with session.post(node.url + "/v1/chat/completions", json=body) as response:
                    return await response.json()

        decision_id = asyncio.run(routed())["expertmesh"]["decision_id"]
        assert get_json(node.url + f"/v1/decisions/{decision_id}")["task"] == "arithmetic"
    finally:
        assert node.stop() == 0
    again = start_node(data, "--model", "smollm2-135m", "--model", "gemma3-270m", "--judge-items", "2", judge=True)
    try:
        wait_for(lambda: judged(again, SMOLLM2_ID) and judged(again, GEMMA3_ID), timeout_s=30, what="cached cards")
        rows = experts(again)
        assert {e: rows[e]["cards"][0]["issued_ms"] for e in (SMOLLM2_ID, GEMMA3_ID)} == issued
        assert again.log().count("using the stored card") == 2
    finally:
        again.stop()


def test_an_independent_judge_across_two_nodes(tmp_path: Path) -> None:
    a = start_node(tmp_path / "a", "--model", "gemma3-270m", *FAST)
    b = start_node(tmp_path / "b", "--model", "smollm2-135m", "--peer", a.url, *FAST)
    c = start_node(tmp_path / "c", "--model", "gemma3-270m", "--peer", b.url, *FAST)
    try:
        wait_for(lambda: SMOLLM2_ID in model_ids(a), what="A to list B's expert")
        result = subprocess.run(
            [sys.executable, "-m", "node", "judge", SMOLLM2_ID, "--peer", b.node_id, "--items", "2", "--node", a.url],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert f"{SMOLLM2_ID} judged by {a.node_id}" in result.stdout and "arithmetic" in result.stdout
        card = experts(a)[SMOLLM2_ID]["cards"][0]
        assert card["judge"] == a.node_id and card["owner"] == b.node_id and not card["self_judged"]
        assert card["sample"] == "sampled:2+private:0"
        # The owner keeps the judge's card and its hello carries it to everyone else.
        assert [c["judge"] for c in experts(b)[SMOLLM2_ID]["cards"]] == [a.node_id]
        wait_for(lambda: [x["judge"] for x in experts(c).get(SMOLLM2_ID, {}).get("cards", [])] == [a.node_id], what="C to get A's card via B")
    finally:
        for node in (a, b, c):
            node.stop()


def test_a_tampered_card_in_a_hello_is_dropped(tmp_path: Path) -> None:
    target = start_node(tmp_path / "target", "--model", "gemma3-270m")
    try:
        liar = NodeIdentity.load_or_create(tmp_path / "liar")
        scores = tuple(summarize(d, [1.0, 1.0]) for d in sorted(DIMENSIONS))
        capability = CapabilityCard(
            expert_id=SMOLLM2_ID,
            model_sha256=SMOLLM2_SHA,
            scores=scores,
            performance=Performance(tokens_per_s=40.0, ttft_ms=50.0, n_ctx=2048),
            suite_version="2026.11.1",
            suite_digest="0" * 64,
            judge_node_id=liar.node_id,
            judge_public_key=liar.public_key_raw,
            owner_node_id=liar.node_id,
            issued_ms=1,
            sample="full",
        )
        signed = sign_capability_card(capability, liar)
        inflated = SignedCapabilityCard(
            card=CapabilityCard(**{**capability.__dict__, "issued_ms": 2}), signature=signed.signature
        )
        info = ExpertInfo(
            expert_id=SMOLLM2_ID, name="smollm2-135m", family="smollm2", params="135M", quantization="Q4_1",
            sha256=SMOLLM2_SHA, prompt_style="chat", n_ctx=2048, queue_depth=0, queue_size=8, tokens_per_s=None,
            cards=(encode_signed_card(inflated),),
        )
        card = NodeCard(node_id=liar.node_id, public_key=liar.public_key_raw, addresses=(), experts=(info,), issued_ms=1)
        hello = encode(Hello(card=sign_card(card, liar), sent_ms=1))

        async def say_hello() -> int:
            async with aiohttp.ClientSession() as session:
                headers = signed_headers(liar, "/peer/v1/hello", hello)
                async with session.post(target.url + "/peer/v1/hello", data=hello, headers=headers) as response:
                    return response.status

        assert asyncio.run(say_hello()) == 200  # the node card itself is genuine
        time.sleep(2)
        # The liar was never verified by the target's own hello: its cards are not even looked at.
        assert experts(target).get(SMOLLM2_ID) is None
    finally:
        target.stop()


def test_cli_judges_a_local_expert_on_demand(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", "--model", "smollm2-135m")  # no judging at start
    try:
        assert experts(node)[SMOLLM2_ID]["judging"]["state"] == "unjudged"
        result = subprocess.run(
            [sys.executable, "-m", "node", "judge", SMOLLM2_ID, "--dimensions", "arithmetic", "knowledge",
             "--items", "2", "--node", node.url],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert f"{SMOLLM2_ID} judged by {node.node_id} (sampled:2+private:0" in result.stdout
        assert "arithmetic" in result.stdout and "knowledge" in result.stdout and "tokens/s" in result.stdout
        row = experts(node)[SMOLLM2_ID]
        assert row["judging"]["state"] == "judged" and set(row["scores"]) == {"arithmetic", "knowledge"}
        missing = subprocess.run(
            [sys.executable, "-m", "node", "judge", "nope@000", "--node", node.url], capture_output=True, text=True, timeout=60
        )
        assert missing.returncode == 1 and "nope@000" in missing.stderr
    finally:
        node.stop()
