"""Capability cards: signatures, wire form, the card store and owner/independent disagreements."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.errors import NodeError
from node.judging.cards import (
    MAX_CARD_BYTES,
    MAX_DIMENSIONS,
    MAX_EXPERT_ID_CHARS,
    MAX_SUITE_VERSION_CHARS,
    CapabilityCard,
    CardError,
    CardStore,
    Flag,
    Performance,
    SignedCapabilityCard,
    card_signing_bytes,
    decode_signed_card,
    encode_signed_card,
    flag_disagreements,
    sample_label,
    sign_capability_card,
    verify_capability_card,
)
from node.judging.stats import DimensionScore
from peers.identity import NodeIdentity

OWNER = NodeIdentity.generate()
JUDGE_A = NodeIdentity.generate()
JUDGE_B = NodeIdentity.generate()
SHA = "ab" * 32
OTHER_SHA = "cd" * 32
DIGEST = "0f" * 32
DIMENSIONS = ("arithmetic", "classification", "instruction", "knowledge", "reasoning", "safety", "translation")


def _scores(
    mean: float = 0.5, half: float = 0.1, dimensions: tuple[str, ...] = DIMENSIONS
) -> tuple[DimensionScore, ...]:
    return tuple(DimensionScore(d, mean, 12, max(0.0, mean - half), min(1.0, mean + half)) for d in dimensions)


def _card(judge: NodeIdentity = OWNER, owner: NodeIdentity = OWNER, **changes: Any) -> CapabilityCard:
    card = CapabilityCard(
        expert_id=f"smollm2-135m@{SHA[:12]}",
        model_sha256=SHA,
        scores=_scores(),
        performance=Performance(tokens_per_s=87.123456, ttft_ms=41.98765, n_ctx=1024),
        suite_version="2026.11.1",
        suite_digest=DIGEST,
        judge_node_id=judge.node_id,
        judge_public_key=judge.public_key_raw,
        owner_node_id=owner.node_id,
        issued_ms=1_790_000_000_000,
        sample=sample_label(6),
    )
    return dataclasses.replace(card, **changes)


def _signed(judge: NodeIdentity = OWNER, owner: NodeIdentity = OWNER, **changes: Any) -> SignedCapabilityCard:
    return sign_capability_card(_card(judge, owner, **changes), judge)


def _tampered(signed: SignedCapabilityCard, **changes: Any) -> SignedCapabilityCard:
    return dataclasses.replace(signed, card=dataclasses.replace(signed.card, **changes))


# ---- signatures ------------------------------------------------------------------------


def test_sign_verify_round_trip() -> None:
    signed = _signed()
    assert verify_capability_card(signed) == signed.card
    assert signed.card.judge_node_id == OWNER.node_id


def test_signing_rounds_floats_so_the_signed_card_is_what_was_signed() -> None:
    raw = _card(scores=(DimensionScore("arithmetic", 0.1234567, 9, 0.0123456, 0.4567891),))
    signed = sign_capability_card(raw, OWNER)
    assert signed.card.scores[0] == DimensionScore("arithmetic", 0.1235, 9, 0.0123, 0.4568)
    assert signed.card.performance.tokens_per_s == 87.1235
    assert card_signing_bytes(raw) == card_signing_bytes(signed.card)
    verify_capability_card(signed)


@pytest.mark.parametrize(
    "changes",
    [
        {"expert_id": "gemma3-270m@a5fd3b62230a"},
        {"model_sha256": OTHER_SHA},
        {"scores": _scores(mean=0.6)},
        {"scores": _scores()[:-1]},
        {"performance": Performance(tokens_per_s=500.0, ttft_ms=41.9877, n_ctx=1024)},
        {"suite_version": "2026.12.1"},
        {"sample": "full"},
        {"owner_node_id": JUDGE_B.node_id},
        {"issued_ms": 1_790_000_000_001},
    ],
    ids=lambda changes: next(iter(changes)),
)
def test_tampering_with_any_field_fails(changes: dict[str, Any]) -> None:
    with pytest.raises(CardError, match="signature"):
        verify_capability_card(_tampered(_signed(), **changes))


def test_tampering_with_one_score_fails() -> None:
    signed = _signed()
    scores = list(signed.card.scores)
    scores[3] = dataclasses.replace(scores[3], mean=scores[3].mean + 0.01)
    with pytest.raises(CardError):
        verify_capability_card(_tampered(signed, scores=tuple(scores)))


def test_swapping_the_judge_fails() -> None:
    signed = _signed()
    swapped = _tampered(signed, judge_node_id=JUDGE_A.node_id, judge_public_key=JUDGE_A.public_key_raw)
    with pytest.raises(CardError, match="signature"):
        verify_capability_card(swapped)


def test_card_claiming_another_judges_id_fails() -> None:
    # Signed with JUDGE_A's key and carrying that key, but naming JUDGE_B as the judge.
    card = _card(JUDGE_A, judge_node_id=JUDGE_B.node_id)
    forged = SignedCapabilityCard(card, JUDGE_A.sign(card_signing_bytes(card)))
    with pytest.raises(CardError, match="derive") as raised:
        verify_capability_card(forged)
    assert raised.value.status == 400
    assert isinstance(raised.value, NodeError)


def test_a_judge_cannot_sign_a_card_naming_another_judge() -> None:
    with pytest.raises(ValueError):
        sign_capability_card(_card(JUDGE_A), OWNER)


def test_invalid_cards_cannot_be_built() -> None:
    with pytest.raises(CardError):
        _card(model_sha256="not-hex")
    with pytest.raises(CardError):
        _card(sample="most of them")
    with pytest.raises(CardError):
        _card(scores=_scores(dimensions=("arithmetic", "arithmetic")))
    with pytest.raises(CardError):
        Performance(tokens_per_s=float("nan"), ttft_ms=1.0, n_ctx=1024)


# ---- wire form -------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    signed = _signed(JUDGE_A, OWNER)
    decoded = decode_signed_card(encode_signed_card(signed))
    assert decoded == signed
    assert verify_capability_card(decoded) == signed.card


def test_eight_dimensions_fit_in_the_hello_cap() -> None:
    dimensions = (*DIMENSIONS, "summarization")
    signed = _signed(scores=_scores(0.3333333, 0.1111111, dimensions), sample=sample_label(999_999, 999_999))
    assert len(encode_signed_card(signed)) <= MAX_CARD_BYTES


def test_largest_valid_card_fits() -> None:
    dimensions = tuple(f"d{i:02d}".ljust(32, "x") for i in range(MAX_DIMENSIONS))
    scores = tuple(DimensionScore(d, 0.123456, 999_999, 0.012345, 0.987654) for d in dimensions)
    signed = _signed(
        expert_id="e" * MAX_EXPERT_ID_CHARS, suite_version="v" * MAX_SUITE_VERSION_CHARS, scores=scores
    )
    assert len(encode_signed_card(signed)) <= MAX_CARD_BYTES


def test_decode_rejects_oversized_input() -> None:
    data = encode_signed_card(_signed())
    with pytest.raises(CardError, match="over"):
        decode_signed_card(data, max_bytes=len(data) - 1)


def _repack(signed: SignedCapabilityCard, change: Any) -> bytes:
    raw = msgpack.unpackb(encode_signed_card(signed), raw=False)
    change(raw)
    return msgpack.packb(raw, use_bin_type=True)


@pytest.mark.parametrize(
    "change",
    [
        lambda raw: raw.update(v=2),
        lambda raw: raw.update(type="node_card"),
        lambda raw: raw.update(signature=b"x" * 10),
        lambda raw: raw.pop("signature"),
        lambda raw: raw["card"].update(v=True),
        lambda raw: raw["card"].update(v=1.0),
        lambda raw: raw["card"].pop("sample"),
        lambda raw: raw["card"].update(issued_ms=True),
        lambda raw: raw["card"].update(issued_ms=1.5),
        lambda raw: raw["card"].update(expert_id=7),
        lambda raw: raw["card"].update(judge_public_key="k" * 32),
        lambda raw: raw["card"].update(scores={"arithmetic": 0.5}),
        lambda raw: raw["card"]["scores"][0].update(mean="0.5"),
        lambda raw: raw["card"]["scores"][0].update(mean=1.5),
        lambda raw: raw["card"]["scores"][0].update(n=-1),
        lambda raw: raw["card"]["scores"][0].update(ci_low=0.9),
        lambda raw: raw["card"]["scores"][0].update(dimension="Arithmetic!"),
        lambda raw: raw["card"]["performance"].update(n_ctx=0),
        lambda raw: raw["card"]["performance"].update(tokens_per_s=float("inf")),
    ],
)
def test_decode_validates_every_field(change: Any) -> None:
    with pytest.raises(CardError):
        decode_signed_card(_repack(_signed(), change))


def test_decode_ignores_unknown_fields() -> None:
    signed = _signed()
    data = _repack(signed, lambda raw: (raw.update(extra=1), raw["card"].update(later="x")))
    assert verify_capability_card(decode_signed_card(data)) == signed.card


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_decoding_arbitrary_bytes_only_raises_card_error(data: bytes) -> None:
    try:
        decode_signed_card(data)
    except CardError:
        pass


_INTEGERS = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
_LEAVES = st.none() | st.booleans() | _INTEGERS | st.floats() | st.text(max_size=40) | st.binary(max_size=70)
_VALUES = st.recursive(
    _LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(
        [("signature",), ("card", "expert_id"), ("card", "scores"), ("card", "performance"), ("card", "sample")]
    ),
    value=_VALUES,
)
def test_decoding_mutated_cards_only_raises_card_error(path: tuple[str, ...], value: Any) -> None:
    raw = msgpack.unpackb(encode_signed_card(_signed()), raw=False)
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    try:
        verify_capability_card(decode_signed_card(msgpack.packb(raw, use_bin_type=True)))
    except CardError:
        pass


# ---- store -----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CardStore]:
    opened = CardStore(tmp_path / "cards.db")
    yield opened
    opened.close()


def test_store_keeps_cards_from_several_judges(store: CardStore) -> None:
    own, by_a, by_b = _signed(OWNER, OWNER), _signed(JUDGE_A, OWNER), _signed(JUDGE_B, OWNER)
    for signed in (own, by_a, by_b):
        store.put(signed)
    store.put(_signed(JUDGE_A, OWNER, model_sha256=OTHER_SHA, expert_id="gemma3-270m@cdcdcdcdcdcd"))
    by_expert = store.cards_for(own.card.expert_id)
    assert {s.card.judge_node_id for s in by_expert} == {OWNER.node_id, JUDGE_A.node_id, JUDGE_B.node_id}
    assert len(store.cards_for(SHA)) == 3
    assert len(store.cards_for(OTHER_SHA)) == 1
    assert store.cards_for("nobody@000000000000") == []


def test_second_put_of_the_same_key_replaces(store: CardStore) -> None:
    store.put(_signed(JUDGE_A, OWNER))
    newer = _signed(JUDGE_A, OWNER, scores=_scores(mean=0.7), issued_ms=1_790_000_000_500)
    store.put(newer)
    assert store.cards_for(SHA) == [newer]
    assert store.get(SHA, "2026.11.1", JUDGE_A.node_id) == newer


def test_cache_lookup_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "cards.db"
    first = CardStore(path)
    signed = _signed()
    first.put(signed)
    first.close()
    reopened = CardStore(path)
    try:
        assert reopened.get(SHA, "2026.11.1", OWNER.node_id) == signed
        assert reopened.get(SHA, "2026.12.1", OWNER.node_id) is None
        assert reopened.get(SHA, "2026.11.1", JUDGE_A.node_id) is None
    finally:
        reopened.close()


def test_store_refuses_cards_that_do_not_verify(store: CardStore) -> None:
    with pytest.raises(CardError):
        store.put(_tampered(_signed(), scores=_scores(mean=0.9)))
    assert store.cards_for(SHA) == []


def test_tampered_row_is_dropped_on_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cards.db"
    store = CardStore(path)
    honest, victim = _signed(JUDGE_A, OWNER), _signed(OWNER, OWNER)
    store.put(honest)
    store.put(victim)
    forged = _tampered(victim, scores=_scores(mean=0.99, half=0.01))
    db = sqlite3.connect(path)
    with db:
        db.execute(
            "UPDATE capability_cards SET signed_card = ? WHERE judge_node_id = ?",
            (encode_signed_card(forged), OWNER.node_id),
        )
    db.close()
    try:
        with caplog.at_level("WARNING", logger="node.judging.cards"):
            assert store.cards_for(SHA) == [honest]
            assert store.get(SHA, "2026.11.1", OWNER.node_id) is None
        assert "dropping stored card" in caplog.text
    finally:
        store.close()


def test_row_moved_to_another_key_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "cards.db"
    store = CardStore(path)
    store.put(_signed(JUDGE_A, OWNER))
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE capability_cards SET suite_version = '2027.1.1'")
    db.close()
    try:
        assert store.get(SHA, "2027.1.1", JUDGE_A.node_id) is None
    finally:
        store.close()


# ---- disagreements ---------------------------------------------------------------------


def test_inflated_owner_card_is_flagged() -> None:
    own = _card(OWNER, OWNER, scores=_scores(0.9, 0.05, ("arithmetic", "safety")))
    independent = _card(
        JUDGE_A,
        OWNER,
        scores=(DimensionScore("arithmetic", 0.2, 12, 0.15, 0.25), DimensionScore("safety", 0.88, 12, 0.8, 0.95)),
    )
    flags = flag_disagreements([own, independent])
    assert flags == [
        Flag(own.expert_id, "arithmetic", own.scores[0], independent.scores[0], JUDGE_A.node_id)
    ]


def test_overlapping_cards_are_not_flagged() -> None:
    own = _card(OWNER, OWNER, scores=_scores(0.9, 0.05))
    close = _card(JUDGE_A, OWNER, scores=_scores(0.82, 0.05))
    assert flag_disagreements([own, close]) == []


def test_only_owner_cards_are_flagged() -> None:
    # Two independent judges disagreeing with each other is not an owner inflating its expert.
    high = _card(JUDGE_A, OWNER, scores=_scores(0.9, 0.05))
    low = _card(JUDGE_B, OWNER, scores=_scores(0.2, 0.05))
    assert flag_disagreements([high, low]) == []


def test_cards_on_other_models_or_suites_are_not_compared() -> None:
    own = _card(OWNER, OWNER, scores=_scores(0.9, 0.05))
    other_model = _card(JUDGE_A, OWNER, model_sha256=OTHER_SHA, scores=_scores(0.2, 0.05))
    other_suite = _card(JUDGE_B, OWNER, suite_version="2027.1.1", scores=_scores(0.2, 0.05))
    assert flag_disagreements([own, other_model, other_suite]) == []
