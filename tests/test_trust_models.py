"""Issue 13 with real models: big requests do not block the loop (item 6), refused requests leave no decision,
and a remote expert serving the same model file is verified by a greedy probe (item 2)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from tests.nodes import FAST, SMOLLM2_ID, get_json, start_node, wait_for

SMOLLM2_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

pytestmark = pytest.mark.model

def test_megabyte_requests_do_not_block_the_loop_and_refusals_leave_no_decision(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", "--model", "smollm2-135m", "--threads", "1")
    try:
        before = get_json(node.url + "/v1/router/stats")["decisions"]
        words = " ".join(f"word{i} and" for i in range(100_000))[: (1 << 20) - 4096]
        body = {"model": "auto", "messages": [{"role": "user", "content": words}], "max_tokens": 4}

        async def attack() -> tuple[list[int], float, int]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
                async def big() -> int:
                    async with session.post(node.url + "/v1/chat/completions", json=body) as response:
                        return response.status

                async def health() -> tuple[float, int]:
                    worst, polls = 0.0, 0
                    while not all(t.done() for t in bigs):
                        started = time.monotonic()
                        async with session.get(node.url + "/healthz") as response:
                            assert response.status == 200
                        worst, polls = max(worst, time.monotonic() - started), polls + 1
                        await asyncio.sleep(0.05)
                    return worst, polls

                bigs = [asyncio.create_task(big()) for _ in range(3)]
                worst, polls = await health()
                return [t.result() for t in bigs], worst, polls

        statuses, worst_s, polls = asyncio.run(attack())
        after = get_json(node.url + "/v1/router/stats")["decisions"]
        print(f"\nitem 6: three 1 MB auto requests -> {statuses}; worst /healthz {worst_s * 1000:.0f} ms over {polls} polls; "
              f"ledger decisions {before} -> {after}")
        assert statuses == [400, 400, 400]  # far longer than the context: refused as the client's error
        assert worst_s < 1.0
        assert after == before  # refused before anything was answered: nothing to learn, nothing kept
    finally:
        node.stop()


def test_a_peer_serving_the_same_model_is_verified_by_a_greedy_probe(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    a = start_node(tmp_path / "a", "--model", "smollm2-135m", "--threads", "1", "--spot-check-interval-s", "0.5", *FAST, env=env)
    b = start_node(tmp_path / "b", "--model", "smollm2-135m", "--threads", "1", "--peer", a.url, *FAST, env=env)
    try:
        def remote_row() -> dict | None:
            return next((r for r in get_json(a.url + "/v1/experts")["data"] if r["id"] == SMOLLM2_ID and not r["local"]), None)

        wait_for(lambda: remote_row() is not None, what="A to see B's expert")
        started = time.monotonic()
        assert remote_row()["verified"] is False
        wait_for(lambda: remote_row()["verified"], timeout_s=120, what="A to verify B's expert")
        row = next(p for p in get_json(a.url + "/v1/peers")["data"] if p["id"] == b.node_id)
        print(f"\nitem 2: B's expert verified by A's greedy probe after {time.monotonic() - started:.1f} s; B's trust {row['trust']}")
        assert row["trust"] == 1.0 and not row["evidence"]
        assert "greedy answer matches" in a.log()
    finally:
        b.stop()
        a.stop()


def test_a_peer_with_another_model_is_verified_by_this_nodes_own_probes(tmp_path: Path) -> None:
    from node.judging.cards import CardStore, decode_signed_card
    from node.judging.runner import scorable_suites
    from node.judging.suites import combined_version, load_suites
    from peers.identity import NodeIdentity
    from tests.nodes import capability_card

    env: dict[str, str] = {}
    # B claims a perfect score on every dimension (its own card, as a lying owner would publish it).
    b_identity = NodeIdentity.load_or_create(tmp_path / "b")
    suites = scorable_suites(load_suites(None), False)  # what A's judging run uses (no judge expert)
    store = CardStore(tmp_path / "b" / "cards.db")
    store.put(decode_signed_card(capability_card(
        b_identity, b_identity.node_id, SMOLLM2_ID, SMOLLM2_SHA, 1.0, dimensions=sorted(suites), n=40,
        suite_version=combined_version(suites),
    )))
    store.close()
    a = start_node(tmp_path / "a", "--model", "gemma3-270m", "--threads", "1", "--spot-check-interval-s", "0.5", *FAST, env=env)
    b = start_node(tmp_path / "b", "--model", "smollm2-135m", "--threads", "1", "--peer", a.url, *FAST, env=env)
    try:
        def remote_row() -> dict | None:
            return next((r for r in get_json(a.url + "/v1/experts")["data"] if r["id"] == SMOLLM2_ID), None)

        wait_for(lambda: remote_row() is not None, what="A to see B's expert")
        started = time.monotonic()
        wait_for(lambda: remote_row()["verified"], timeout_s=600, what="A's own probes of B's expert")
        row = remote_row()
        print(f"\nitem 2: B's {SMOLLM2_ID} verified by A's own probes after {time.monotonic() - started:.0f} s; "
              f"evidence {row['evidence']!r}, scores {row['scores']}")
        assert row["evidence"] == "this node's own measurement"
        assert any(c["judge"] == a.node_id and c["owner"] == b.node_id for c in row["cards"])
        # The claim its own probes contradict is evidence against B (noted once the run's card is handed over).
        def peer_row() -> dict:
            return next(p for p in get_json(a.url + "/v1/peers")["data"] if p["id"] == b.node_id)

        wait_for(lambda: bool(peer_row()["evidence"]), timeout_s=30, what="the contradicted claim to count against B")
        peer = peer_row()
        print(f"B's claim of 1.0 everywhere: evidence {[e['kind'] for e in peer['evidence']]}, trust {peer['trust']}")
        assert "score_lie" in [e["kind"] for e in peer["evidence"]] and peer["trust"] < 1.0
    finally:
        b.stop()
        a.stop()
