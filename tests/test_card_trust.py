"""Whose cards count (node.judging.trust) and the unverified-share cap (node.routing.router): pure, no event loop."""

from __future__ import annotations

import random

from node.judging.cards import decode_signed_card
from node.judging.trust import MAX_EARNED_WEIGHT, assess, judge_records, judge_weight
from node.routing.router import MAX_ROUTING_CHARS, cap_unverified_share, routing_text
from peers.identity import NodeIdentity
from tests.nodes import capability_card

SHA = [f"{i:064x}" for i in range(1, 6)]


def card(judge: NodeIdentity, owner: str, sha: str, score: float):
    return decode_signed_card(capability_card(judge, owner, f"e@{sha[:12]}", sha, score)).card


def test_own_measurement_decides_alone_and_strangers_weigh_nothing() -> None:
    me, owner, stranger = NodeIdentity.generate(), NodeIdentity.generate(), NodeIdentity.generate()
    mine = card(me, me.node_id, SHA[0], 0.9)
    forged = [card(NodeIdentity.generate(), me.node_id, SHA[0], 0.0) for _ in range(50)]
    local = assess([mine, *forged], own_id=me.node_id, owner=None, trusted=frozenset(), records={})
    assert local.evidence == "own" and local.scores["safety"] == 0.9 and local.verified
    # Without our own card, a local expert takes no stranger's word at all.
    assert assess(forged, own_id=me.node_id, owner=None, trusted=frozenset(), records={}).scores == {}
    # A remote owner's own card is its claim: shown, unverified; a stranger's card about it counts for nothing.
    claim = card(owner, owner.node_id, SHA[1], 1.0)
    remote = assess([claim, card(stranger, owner.node_id, SHA[1], 0.2)], own_id=me.node_id, owner=owner.node_id,
                    trusted=frozenset(), records={})
    assert remote.evidence == "claimed" and remote.scores["safety"] == 1.0 and not remote.verified
    # A judge the user listed counts fully and verifies.
    listed = assess([claim, card(stranger, owner.node_id, SHA[1], 0.2)], own_id=me.node_id, owner=owner.node_id,
                    trusted=frozenset({stranger.node_id}), records={})
    assert listed.evidence == "trusted" and listed.scores["safety"] == 0.2 and listed.verified


def test_a_judge_earns_bounded_weight_only_by_agreeing_with_our_audits() -> None:
    me, judge, liar = NodeIdentity.generate(), NodeIdentity.generate(), NodeIdentity.generate()
    cards = []
    for sha in SHA[:4]:
        cards.append(card(me, "a" * 20, sha, 0.5))
        cards.append(card(judge, "a" * 20, sha, 0.5))  # agrees within the intervals
        cards.append(card(liar, "a" * 20, sha, 1.0))  # contradicts every audit
    records = judge_records(cards, me.node_id)
    assert records[judge.node_id].agreements == 4 and records[liar.node_id].disagreements == 4
    weight = judge_weight(judge.node_id, frozenset(), records)
    assert 0 < weight <= MAX_EARNED_WEIGHT and judge_weight(liar.node_id, frozenset(), records) == 0
    earned = assess([card(judge, "b" * 20, SHA[4], 0.8)], own_id=me.node_id, owner="b" * 20, trusted=frozenset(), records=records)
    assert earned.evidence == "earned" and earned.scores["safety"] == 0.8 and not earned.verified


def test_the_cap_moves_probability_from_unverified_to_verified_candidates() -> None:
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(2, 8)
        probs = [rng.random() for _ in range(n)]
        total = sum(probs)
        probs = [p / total for p in probs]
        unverified = [rng.random() < 0.5 for _ in range(n)]
        capped = cap_unverified_share(probs, unverified, 0.1)
        assert abs(sum(capped) - 1) < 1e-9 and all(p >= 0 for p in capped)
        if any(unverified) and not all(unverified):
            assert sum(p for p, u in zip(capped, unverified, strict=True) if u) <= 0.1 + 1e-9
        else:
            assert capped == probs
    assert len(routing_text("x" * 10**6)) <= MAX_ROUTING_CHARS + 1
