"""Community learning: signed summaries and their caps, what leaves the node, reporters' weights, the bounded prior."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import msgpack
import pytest

from bandit.community import (
    MAX_COMMUNITY_WEIGHT,
    UNPROVEN_TOTAL_WEIGHT,
    OwnCell,
    Report,
    ReportedCell,
    add_rating,
    apply_prior,
    blended_score,
    combine,
)
from bandit.features import ExpertFeatures, ExpertId, NodeId, Task, query_features
from bandit.ledger import Decision, DecisionId, Ledger, new_feedback_token, query_sha256, token_sha256
from node.routing.community import MAX_REPORTERS, Community
from peers.identity import NodeIdentity
from peers.learning import (
    MAX_CELLS,
    MAX_SUMMARY_BYTES,
    LearningCell,
    LearningSummary,
    SignedSummary,
    sign_summary,
    verify_summary,
)
from peers.wire import Hello, NodeCard, WireError, decode, encode, sign_card

NOW_MS = 1_800_000_000_000
SECRET_WORDS = ("zanzibar", "quokka", "marmalade")


def _summary(identity: NodeIdentity, seq: int = 1, cells: tuple[LearningCell, ...] | None = None, **extra) -> LearningSummary:
    cells = cells if cells is not None else (LearningCell("smollm2-135m@b179c9523d0e", "arithmetic", 12, 0.25),)
    return LearningSummary(
        node_id=identity.node_id, public_key=identity.public_key_raw, seq=seq, issued_ms=NOW_MS, cells=cells, **extra
    )


def _community(identity: NodeIdentity | None = None, **kwargs) -> Community:
    return Community(identity or NodeIdentity.generate(), clock_ms=lambda: NOW_MS, **kwargs)


# ---- signature and caps -----------------------------------------------------------------


def test_a_signed_summary_verifies_and_any_change_breaks_it() -> None:
    identity = NodeIdentity.generate()
    data = sign_summary(_summary(identity), identity)
    assert verify_summary(data, now_ms=NOW_MS).cells[0].mean == 0.25
    signed = decode(data, SignedSummary, max_bytes=MAX_SUMMARY_BYTES)
    inflated = dataclasses.replace(signed.summary, cells=(LearningCell("smollm2-135m@b179c9523d0e", "arithmetic", 12, 0.95),))
    with pytest.raises(WireError, match="signature"):
        verify_summary(encode(SignedSummary(summary=inflated, signature=signed.signature)), now_ms=NOW_MS)
    other = NodeIdentity.generate()
    stolen_id = dataclasses.replace(signed.summary, public_key=other.public_key_raw)
    with pytest.raises(WireError, match="node_id"):
        verify_summary(encode(SignedSummary(summary=stolen_id, signature=other.sign(b"x"))), now_ms=NOW_MS)
    with pytest.raises(ValueError):
        sign_summary(_summary(identity), other)  # a node signs only its own summary


def test_caps_size_cells_values_dates_and_duplicates_are_checked() -> None:
    identity = NodeIdentity.generate()
    too_many = tuple(LearningCell(f"expert-{i}", "chat", 1, 0.5) for i in range(MAX_CELLS + 1))
    raw = encode(SignedSummary(summary=_summary(identity, cells=too_many), signature=b"\0" * 64))
    with pytest.raises(WireError) as raised:
        verify_summary(raw, now_ms=NOW_MS)
    assert raised.value.status in (400, 413)
    with pytest.raises(WireError) as raised:
        verify_summary(b"\x80" * (MAX_SUMMARY_BYTES + 1), now_ms=NOW_MS)
    assert raised.value.status == 413
    for bad in (
        LearningCell("a", "arithmetic", 3, 1.5),  # a mean above 1
        LearningCell("a", "arithmetic", 0, 0.5),  # a count of nothing
        LearningCell("a", "Arithmetic words here", 3, 0.5),  # free text where a task kind goes
        LearningCell("", "arithmetic", 3, 0.5),
    ):
        raw = encode(SignedSummary(summary=_summary(identity, cells=(bad,)), signature=b"\0" * 64))
        with pytest.raises(WireError) as raised:
            verify_summary(raw, now_ms=NOW_MS)
        assert raised.value.status == 400
    twice = (LearningCell("a", "chat", 3, 0.5), LearningCell("a", "chat", 4, 0.9))
    with pytest.raises(WireError, match="twice"):
        verify_summary(sign_summary(_summary(identity, cells=twice), identity), now_ms=NOW_MS)
    future = dataclasses.replace(_summary(identity), issued_ms=NOW_MS + 3600_000)
    with pytest.raises(WireError, match="future"):
        verify_summary(sign_summary(future, identity), now_ms=NOW_MS)
    # A hello carrying more than a summary's worth of bytes is refused by the hello's own field cap.
    identity_card = NodeCard(node_id=identity.node_id, public_key=identity.public_key_raw, addresses=(), experts=(), issued_ms=NOW_MS)
    oversized = encode(Hello(card=sign_card(identity_card, identity), sent_ms=NOW_MS, learning=b"x" * (MAX_SUMMARY_BYTES + 1)))
    with pytest.raises(WireError, match="learning"):
        decode(oversized, Hello, max_bytes=1 << 20)
    # Too many cells with the longest ids do not fit: signing refuses, and a node publishes its best-attested ones.
    longest = tuple(LearningCell(f"{i:03d}" + "e" * 125, "classification", 1 + i, 0.123456789) for i in range(MAX_CELLS))
    with pytest.raises(ValueError, match="cap"):
        sign_summary(_summary(identity, cells=longest), identity)
    community = _community(identity)
    own: dict = {}
    for cell in longest:
        for _ in range(cell.n):
            own = add_rating(own, cell.expert_id, cell.task, 1.0)
    community._own, community._own_seq = own, 1
    data = community.published()
    assert len(data) <= MAX_SUMMARY_BYTES
    kept = verify_summary(data, now_ms=NOW_MS).cells
    kept_ids = {c.expert_id for c in kept}
    assert 0 < len(kept) < MAX_CELLS and min(c.n for c in kept) > max(c.n for c in longest if c.expert_id not in kept_ids)


def test_the_node_keeps_only_verified_first_hand_newer_summaries_and_blames_bad_ones() -> None:
    blamed: list[tuple[str, str]] = []
    community = _community(on_bad_summary=lambda node, detail: blamed.append((node, detail)))
    peer, third = NodeIdentity.generate(), NodeIdentity.generate()
    second = sign_summary(_summary(peer, seq=2), peer)
    assert community.accept(peer.node_id, second)
    assert not community.accept(peer.node_id, sign_summary(_summary(peer, seq=1), peer))  # replay of an older one
    assert not community.accept(third.node_id, second)  # relayed: only first-hand summaries count
    assert blamed and blamed[-1][0] == third.node_id
    assert not community.accept(peer.node_id, second[:-3] + b"abc")
    assert blamed[-1][0] == peer.node_id
    assert [r["seq"] for r in community.status()["reporters"]] == [2]
    off = _community(use=False)
    assert not off.accept(peer.node_id, second) and off.status()["reporters"] == []


def test_the_number_of_reporters_kept_is_capped() -> None:
    community = _community()
    for _ in range(MAX_REPORTERS + 5):
        key = NodeIdentity.generate()
        assert community.accept(key.node_id, sign_summary(_summary(key), key))
    assert len(community.status()["reporters"]) == MAX_REPORTERS


# ---- what leaves the node ---------------------------------------------------------------------


EXPERTS = (
    ExpertFeatures(ExpertId("smollm2-135m@b179c9523d0e"), NodeId("nodeaaaaaaaaaaaaaaaa"), "llama", "135M", "q4_1", {}),
    ExpertFeatures(ExpertId("gemma3-270m@a5fd3b62230a"), NodeId("nodebbbbbbbbbbbbbbbb"), "gemma3", "270M", "q4_k_m", {}, None, 0, False),
)


def _rated_ledger(path: Path, n: int) -> tuple[Ledger, list[DecisionId], list[str]]:
    """A ledger of `n` rated decisions about queries full of secret words; returns it, the decision ids, the tokens."""
    ledger = Ledger(path)
    ids, tokens = [], []
    for i in range(n):
        if i % 2:
            text = f"What is {i} plus {SECRET_WORDS[i % 3]} for {SECRET_WORDS[(i + 1) % 3]}?"
        else:
            text = f"Translate '{SECRET_WORDS[i % 3]}' into French."
        token = new_feedback_token()
        decision = Decision(
            decision_id=DecisionId(f"{i:032x}"),
            created_ms=NOW_MS + i,
            query_sha256=query_sha256(text),
            query=query_features(text),
            candidates=EXPERTS,
            probabilities=(0.5, 0.5),
            chosen_index=i % 2,
            policy_version=i,
            token_sha256=token_sha256(token),
        )
        ledger.record_decision(decision)
        ledger.record_reward(decision.decision_id, float(i % 3 != 0), NOW_MS + i)
        ids.append(decision.decision_id)
        tokens.append(token)
    return ledger, ids, tokens


def test_nothing_but_the_documented_summary_leaves_the_node(tmp_path: Path) -> None:
    identity = NodeIdentity.generate()
    ledger, ids, tokens = _rated_ledger(tmp_path / "ledger.db", 30)
    community = _community(identity)
    assert community.catch_up(ledger.iter_rewarded()) == 30
    published = community.published()
    card = NodeCard(node_id=identity.node_id, public_key=identity.public_key_raw, addresses=(), experts=(), issued_ms=NOW_MS)
    hello_bytes = encode(Hello(card=sign_card(card, identity), sent_ms=NOW_MS, learning=published))
    hello = msgpack.unpackb(hello_bytes, raw=False)
    assert set(hello) == {"v", "type", "card", "sent_ms", "learning"} and hello["learning"] == published
    # The bytes, unpacked as raw msgpack: exactly the documented keys, nothing else.
    raw = msgpack.unpackb(published, raw=False)
    assert set(raw) == {"v", "type", "summary", "signature"}
    assert set(raw["summary"]) == {"node_id", "public_key", "seq", "issued_ms", "cells"}
    assert raw["summary"]["node_id"] == identity.node_id and raw["summary"]["seq"] == 30
    assert raw["summary"]["public_key"] == identity.public_key_raw and len(raw["signature"]) == 64
    for cell in raw["summary"]["cells"]:
        assert set(cell) == {"expert_id", "task", "n", "mean"}
    cells = {(c["expert_id"], c["task"]): (c["n"], c["mean"]) for c in raw["summary"]["cells"]}
    # Odd events are arithmetic answered by gemma3, even ones translation answered by smollm2; reward 0 on every third.
    assert cells == {
        ("gemma3-270m@a5fd3b62230a", "arithmetic"): (15, round(10 / 15, 4)),
        ("smollm2-135m@b179c9523d0e", "translation"): (15, round(10 / 15, 4)),
    }
    for secret in (*SECRET_WORDS, "french", "plus", *ids, *tokens, *(query_sha256(w) for w in SECRET_WORDS)):
        assert secret.encode() not in hello_bytes.lower()
    assert b"nodebbbbbbbbbbbbbbbb" not in published  # not even which peer hosted the expert
    # Sharing off: nothing at all.
    off = _community(identity, share=False)
    off.catch_up(ledger.iter_rewarded())
    assert off.published() == b""
    ledger.close()


def test_a_rating_is_counted_once_and_a_new_one_makes_a_new_edition(tmp_path: Path) -> None:
    ledger, _, _ = _rated_ledger(tmp_path / "ledger.db", 4)
    community = _community()
    community.catch_up(ledger.iter_rewarded())
    first = community.published()
    assert community.catch_up(ledger.iter_rewarded()) == 0 and community.published() is first
    last = list(ledger.iter_rewarded())[-1]
    community.record(last)  # a repeat changes nothing
    assert community.own_seq == 4 and community.published() is first
    ledger.close()


# ---- weights, agreement, Sybils, dominance ---------------------------------------------------------


def _report(name: str, means: dict[tuple[str, str], float], n: int = 10) -> Report:
    return Report(name, 1, 0, {key: ReportedCell(n, mean) for key, mean in means.items()})


TRUTH = {("a", "arithmetic"): 0.8, ("b", "arithmetic"): 0.3, ("a", "translation"): 0.3, ("b", "translation"): 0.8}


def test_a_lying_reporters_weight_falls_as_own_ratings_come_in() -> None:
    honest = _report("honest", {k: v + 0.03 for k, v in TRUTH.items()})
    liar = _report("liar", {k: 1.0 if k[0] == "b" else 0.0 for k in TRUTH}, n=1_000_000)
    own: dict = {}
    before = combine([honest, liar], own, lambda _r: 1.0).weights
    assert before["honest"] == before["liar"]  # strangers start alike, and small
    weights = [before["liar"]]
    for step in range(40):
        key = list(TRUTH)[step % 4]
        # Deterministic ratings at the true rate: 8 of 10 up for 0.8, 3 of 10 for 0.3.
        reward = 1.0 if (step // 4) % 10 < TRUTH[key] * 10 else 0.0
        own = add_rating(own, key[0], key[1], reward)
        if step % 10 == 9:
            weights.append(combine([honest, liar], own, lambda _r: 1.0).weights["liar"])
    after = combine([honest, liar], own, lambda _r: 1.0)
    assert all(w < weights[0] for w in weights[1:]) and weights[-1] < weights[0] / 3 and weights[-1] < weights[1]
    assert after.weights["honest"] > 3 * before["honest"]
    assert after.weights["liar"] < after.weights["honest"] / 10
    # With the liar down-weighted, the prior follows the honest reporter.
    assert after.cells[("a", "arithmetic")].mean == pytest.approx(0.83)
    # Trust from the trust model multiplies in: a distrusted peer weighs nothing.
    assert combine([honest], own, lambda _r: 0.0).weights["honest"] == 0.0


def test_many_fresh_keys_are_bounded_like_half_a_reporter_and_never_outweigh_own_ratings() -> None:
    honest = _report("honest", TRUTH)
    own: dict = {}
    for i in range(20):  # the honest reporter is proven by own ratings that agree with it
        for key, p in TRUTH.items():
            own = add_rating(own, key[0], key[1], 1.0 if i % 10 < p * 10 else 0.0)
    sybils = [_report(f"sybil-{i}", {k: 1.0 if k[0] == "b" else 0.0 for k in TRUTH}, n=10**6) for i in range(500)]
    prior = combine([honest, *sybils], own, lambda _r: 1.0)
    assert sum(prior.weights[s.reporter] for s in sybils) <= UNPROVEN_TOTAL_WEIGHT + 1e-9
    assert prior.cells[("a", "arithmetic")].mean == 0.8  # the proven reporter outweighs 500 fresh keys
    fresh = combine(sybils, {}, lambda _r: 1.0)  # a node with no own ratings at all
    assert all(cell.weight <= MAX_COMMUNITY_WEIGHT for cell in fresh.cells.values())
    # Own ratings dominate as they accumulate: after 100 own ratings at 0.3, the blend is near 0.3 however loud the community.
    mine = OwnCell()
    for i in range(100):
        mine = mine.add(1.0 if i % 10 < 3 else 0.0)
    blended = blended_score(0.5, fresh.cells[("b", "arithmetic")], mine)
    assert blended is not None and abs(blended - 0.3) < 0.08
    assert blended_score(0.5, None, mine) == 0.5  # no community evidence: the judged score as without sharing


def test_the_prior_reaches_the_candidates_and_says_from_how_many_reporters() -> None:
    reports = [_report(f"r{i}", {("a", "arithmetic"): 0.9, ("b", "arithmetic"): 0.2}) for i in range(3)]
    reports.append(_report("other-task", {("a", "translation"): 0.9}))
    experts = [
        ExpertFeatures(ExpertId("a"), NodeId("n1"), "f", "1B", "q", {"arithmetic": 0.4}),
        ExpertFeatures(ExpertId("b"), NodeId("n2"), "f", "1B", "q", {"arithmetic": 0.6}),
        ExpertFeatures(ExpertId("c"), NodeId("n2"), "f", "1B", "q", {"arithmetic": 0.5}),
    ]
    prior = combine(reports, {}, lambda _r: 1.0)
    updated, use = apply_prior(experts, Task.ARITHMETIC, prior, {}, reports)
    assert use is not None and use.reporters == 3
    assert updated[0].task_score(Task.ARITHMETIC) > updated[1].task_score(Task.ARITHMETIC)
    assert updated[2] is experts[2]  # nobody reported on c: untouched
    assert apply_prior(experts, Task.CHAT, prior, {}, reports) == (experts, None)
