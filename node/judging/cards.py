"""Capability cards: a judge's signed scores for one expert, their wire form, store and cross-checks."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from node.errors import NodeError
from node.judging.stats import DimensionScore, disagrees
from peers.identity import (
    NODE_ID_CHARS,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    NodeIdentity,
    node_id_from_public_key,
    verify_signature,
)

log = logging.getLogger(__name__)

CARD_VERSION = 1
CARD_TYPE = "capability_card"
SIGNED_CARD_TYPE = "signed_capability_card"
# A card rides inside a peer's hello as one opaque bytes item of at most this size.
MAX_CARD_BYTES = 4096
# Bounds chosen so that the largest valid card still fits in MAX_CARD_BYTES.
MAX_DIMENSIONS = 16
MAX_DIMENSION_CHARS = 32
MAX_EXPERT_ID_CHARS = 128
MAX_SUITE_VERSION_CHARS = 256
MAX_ITEMS = 1_000_000
MAX_TOKENS_PER_S = 1e6
MAX_TTFT_MS = 1e9
MAX_N_CTX = 1 << 24
MAX_ISSUED_MS = (1 << 63) - 1
# Rounding makes the signed bytes independent of float noise in how a score was computed.
FLOAT_DECIMALS = 4
FULL_SAMPLE = "full"

_DIMENSION_RE = re.compile(rf"[a-z][a-z0-9_]{{0,{MAX_DIMENSION_CHARS - 1}}}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_NODE_ID_RE = re.compile(rf"[a-z2-7]{{{NODE_ID_CHARS}}}")
_SAMPLE_RE = re.compile(r"full|sampled:(?:0|[1-9]\d{0,6})\+private:(?:0|[1-9]\d{0,6})")
_CARD_KEYS = (
    "expert_id",
    "model_sha256",
    "scores",
    "performance",
    "suite_version",
    "suite_digest",
    "judge_node_id",
    "judge_public_key",
    "owner_node_id",
    "issued_ms",
    "sample",
)
_SCORE_KEYS = ("dimension", "mean", "n", "ci_low", "ci_high")
_PERFORMANCE_KEYS = ("tokens_per_s", "ttft_ms", "n_ctx")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS capability_cards (
    model_sha256 TEXT NOT NULL,
    suite_version TEXT NOT NULL,
    judge_node_id TEXT NOT NULL,
    expert_id TEXT NOT NULL,
    issued_ms INTEGER NOT NULL,
    signed_card BLOB NOT NULL,
    PRIMARY KEY (model_sha256, suite_version, judge_node_id)
)
"""
_INDEX = "CREATE INDEX IF NOT EXISTS capability_cards_expert ON capability_cards (expert_id)"


class CardError(NodeError):
    """A capability card that is malformed or does not verify."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_capability_card"


@dataclass(frozen=True)
class Performance:
    """How fast the expert answered while it was judged."""

    tokens_per_s: float
    ttft_ms: float
    n_ctx: int

    def __post_init__(self) -> None:
        _check_float("performance.tokens_per_s", self.tokens_per_s, 0.0, MAX_TOKENS_PER_S)
        _check_float("performance.ttft_ms", self.ttft_ms, 0.0, MAX_TTFT_MS)
        _check_int("performance.n_ctx", self.n_ctx, 1, MAX_N_CTX)


@dataclass(frozen=True)
class CapabilityCard:
    """What one judge measured about one expert hosted by one node."""

    expert_id: str
    model_sha256: str
    scores: tuple[DimensionScore, ...]
    performance: Performance
    suite_version: str
    suite_digest: str
    judge_node_id: str
    judge_public_key: bytes
    owner_node_id: str
    issued_ms: int
    sample: str

    def __post_init__(self) -> None:
        _check_str("expert_id", self.expert_id, MAX_EXPERT_ID_CHARS)
        _check_pattern("model_sha256", self.model_sha256, _HEX64_RE)
        _check_scores(self.scores)
        if not isinstance(self.performance, Performance):
            raise CardError("performance must be a Performance")
        _check_str("suite_version", self.suite_version, MAX_SUITE_VERSION_CHARS)
        _check_pattern("suite_digest", self.suite_digest, _HEX64_RE)
        _check_pattern("judge_node_id", self.judge_node_id, _NODE_ID_RE)
        if not isinstance(self.judge_public_key, bytes) or len(self.judge_public_key) != PUBLIC_KEY_BYTES:
            raise CardError(f"judge_public_key must be {PUBLIC_KEY_BYTES} bytes")
        _check_pattern("owner_node_id", self.owner_node_id, _NODE_ID_RE)
        _check_int("issued_ms", self.issued_ms, 0, MAX_ISSUED_MS)
        _check_pattern("sample", self.sample, _SAMPLE_RE)

    def score(self, dimension: str) -> DimensionScore | None:
        """The score on `dimension`, if the card has one."""
        return next((s for s in self.scores if s.dimension == dimension), None)

    @property
    def self_judged(self) -> bool:
        """Whether the node hosting the expert judged it itself."""
        return self.judge_node_id == self.owner_node_id


@dataclass(frozen=True)
class SignedCapabilityCard:
    """A card with its judge's Ed25519 signature over `card_signing_bytes(card)`."""

    card: CapabilityCard
    signature: bytes


@dataclass(frozen=True)
class Flag:
    """An owner's own score that an independent judge's interval contradicts."""

    expert_id: str
    dimension: str
    owner_score: DimensionScore
    independent_score: DimensionScore
    judge_node_id: str


def sample_label(n_per_dimension: int | None, n_private: int = 0) -> str:
    """The card's `sample` text: 'full', or 'sampled:<n>+private:<m>'."""
    if n_per_dimension is None:
        return FULL_SAMPLE
    return f"sampled:{n_per_dimension}+private:{n_private}"


# ---- canonical form and signatures ----------------------------------------------------


def _rounded(value: float) -> float:
    # +0.0 makes -0.0 and 0.0 one encoding.
    return round(float(value), FLOAT_DECIMALS) + 0.0


def canonical_card(card: CapabilityCard) -> CapabilityCard:
    """The card with every float rounded to FLOAT_DECIMALS: exactly what a signature covers."""
    scores = tuple(
        DimensionScore(s.dimension, _rounded(s.mean), s.n, _rounded(s.ci_low), _rounded(s.ci_high))
        for s in card.scores
    )
    performance = Performance(
        _rounded(card.performance.tokens_per_s), _rounded(card.performance.ttft_ms), card.performance.n_ctx
    )
    return dataclasses.replace(card, scores=scores, performance=performance)


def _card_body(card: CapabilityCard) -> dict[str, Any]:
    rounded = canonical_card(card)
    scores = [
        {"ci_high": s.ci_high, "ci_low": s.ci_low, "dimension": s.dimension, "mean": s.mean, "n": s.n}
        for s in rounded.scores
    ]
    perf = rounded.performance
    body = {
        "expert_id": card.expert_id,
        "issued_ms": card.issued_ms,
        "judge_node_id": card.judge_node_id,
        "judge_public_key": card.judge_public_key,
        "model_sha256": card.model_sha256,
        "owner_node_id": card.owner_node_id,
        "performance": {"n_ctx": perf.n_ctx, "tokens_per_s": perf.tokens_per_s, "ttft_ms": perf.ttft_ms},
        "sample": card.sample,
        "scores": scores,
        "suite_digest": card.suite_digest,
        "suite_version": card.suite_version,
        "type": CARD_TYPE,
        "v": CARD_VERSION,
    }
    return dict(sorted(body.items()))


def card_signing_bytes(card: CapabilityCard) -> bytes:
    """Canonical msgpack of the card (sorted keys, rounded floats): what its signature covers."""
    return msgpack.packb(_card_body(card), use_bin_type=True)


def sign_capability_card(card: CapabilityCard, identity: NodeIdentity) -> SignedCapabilityCard:
    """Sign the card's canonical form; ValueError when the card names another judge."""
    if card.judge_node_id != identity.node_id or card.judge_public_key != identity.public_key_raw:
        raise ValueError("a judge can only sign cards that name it as the judge")
    rounded = canonical_card(card)
    return SignedCapabilityCard(rounded, identity.sign(card_signing_bytes(rounded)))


def verify_capability_card(signed: SignedCapabilityCard) -> CapabilityCard:
    """The card when its judge id and signature check out; CardError otherwise."""
    card = signed.card
    if node_id_from_public_key(card.judge_public_key) != card.judge_node_id:
        raise CardError("judge_node_id does not derive from judge_public_key", param="judge_node_id")
    if not verify_signature(card.judge_public_key, card_signing_bytes(card), signed.signature):
        raise CardError("signature does not verify against judge_public_key", param="signature")
    return card


# ---- wire form -------------------------------------------------------------------------


def encode_signed_card(signed: SignedCapabilityCard) -> bytes:
    """Msgpack of the signed card; CardError when it is over MAX_CARD_BYTES."""
    data = msgpack.packb(
        {"card": _card_body(signed.card), "signature": signed.signature, "type": SIGNED_CARD_TYPE, "v": CARD_VERSION},
        use_bin_type=True,
    )
    if len(data) > MAX_CARD_BYTES:
        raise CardError(f"signed card is {len(data)} bytes, over the {MAX_CARD_BYTES}-byte cap")
    return data


def decode_signed_card(data: bytes, max_bytes: int = MAX_CARD_BYTES) -> SignedCapabilityCard:
    """Parse and validate a signed card (not its signature: see verify_capability_card)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CardError("a signed card must be bytes")
    if len(data) > max_bytes:
        raise CardError(f"signed card is {len(data)} bytes, over the {max_bytes}-byte cap")
    try:
        raw = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise CardError(f"signed card is not valid msgpack: {type(exc).__name__}") from exc
    top = _as_map("signed card", raw)
    _check_envelope("signed card", top, SIGNED_CARD_TYPE)
    signature = _field(top, "signature", "signature")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise CardError(f"signature must be {SIGNATURE_BYTES} bytes", param="signature")
    return SignedCapabilityCard(_card_from_map(_as_map("card", _field(top, "card", "card"))), signature)


def _card_from_map(raw: Mapping[str, Any]) -> CapabilityCard:
    _check_envelope("card", raw, CARD_TYPE)
    values = {key: _field(raw, key, f"card.{key}") for key in _CARD_KEYS}
    scores = values["scores"]
    if not isinstance(scores, list):
        raise CardError("card.scores must be a list", param="card.scores")
    values["scores"] = tuple(_score_from_map(i, entry) for i, entry in enumerate(scores))
    perf = _as_map("card.performance", values["performance"])
    values["performance"] = Performance(
        tokens_per_s=_float(perf, "tokens_per_s", "card.performance"),
        ttft_ms=_float(perf, "ttft_ms", "card.performance"),
        n_ctx=_field(perf, "n_ctx", "card.performance.n_ctx"),
    )
    return CapabilityCard(**values)


def _score_from_map(index: int, entry: object) -> DimensionScore:
    where = f"card.scores[{index}]"
    raw = _as_map(where, entry)
    for key in _SCORE_KEYS:
        _field(raw, key, f"{where}.{key}")
    dimension, n = raw["dimension"], raw["n"]
    _check_pattern(f"{where}.dimension", dimension, _DIMENSION_RE)
    _check_int(f"{where}.n", n, 0, MAX_ITEMS)
    mean, low, high = (_float(raw, key, where) for key in ("mean", "ci_low", "ci_high"))
    for name, value in (("mean", mean), ("ci_low", low), ("ci_high", high)):
        _check_float(f"{where}.{name}", value, 0.0, 1.0)
    try:
        return DimensionScore(dimension, mean, n, low, high)
    except ValueError as exc:
        raise CardError(f"{where}: {exc}", param=where) from exc


def _check_envelope(where: str, raw: Mapping[str, Any], expected_type: str) -> None:
    version = raw.get("v")
    if type(version) is not int or version != CARD_VERSION:
        raise CardError(f"{where}: unsupported version {version!r}; expected {CARD_VERSION}", param=f"{where}.v")
    if raw.get("type") != expected_type:
        raise CardError(f"{where}: type must be {expected_type!r}", param=f"{where}.type")


def _as_map(where: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise CardError(f"{where} must be a map", param=where)
    return value


def _field(raw: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in raw:
        raise CardError(f"missing {where}", param=where)
    return raw[key]


def _float(raw: Mapping[str, Any], key: str, where: str) -> float:
    value = _field(raw, key, f"{where}.{key}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CardError(f"{where}.{key} must be a number", param=f"{where}.{key}")
    return float(value)


# ---- field checks ----------------------------------------------------------------------


def _check_str(where: str, value: object, max_chars: int) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= max_chars:
        raise CardError(f"{where} must be a string of 1..{max_chars} characters", param=where)
    if any(not c.isprintable() for c in value):
        raise CardError(f"{where} contains unprintable characters", param=where)


def _check_pattern(where: str, value: object, pattern: re.Pattern[str]) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise CardError(f"{where} is malformed: {str(value)[:40]!r}", param=where)


def _check_int(where: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CardError(f"{where} must be an integer in {low}..{high}", param=where)


def _check_float(where: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CardError(f"{where} must be a number", param=where)
    if not math.isfinite(value) or not low <= value <= high:
        raise CardError(f"{where} must be finite and within [{low:g}, {high:g}]", param=where)


def _check_scores(scores: object) -> None:
    if not isinstance(scores, tuple) or not all(isinstance(s, DimensionScore) for s in scores):
        raise CardError("scores must be a tuple of DimensionScore", param="scores")
    if len(scores) > MAX_DIMENSIONS:
        raise CardError(f"a card holds at most {MAX_DIMENSIONS} dimensions", param="scores")
    seen: set[str] = set()
    for score in scores:
        _check_pattern("scores.dimension", score.dimension, _DIMENSION_RE)
        _check_int("scores.n", score.n, 0, MAX_ITEMS)
        if score.dimension in seen:
            raise CardError(f"dimension {score.dimension!r} appears twice", param="scores")
        seen.add(score.dimension)


# ---- disagreements ---------------------------------------------------------------------


def flag_disagreements(cards: Iterable[CapabilityCard]) -> list[Flag]:
    """Owners' own scores whose interval misses an independent judge's on the same model (any host) and suite."""
    chosen = list(cards)
    flags: list[Flag] = []
    for own in (c for c in chosen if c.self_judged):
        for other in chosen:
            comparable = (
                other.judge_node_id != own.owner_node_id
                and other.model_sha256 == own.model_sha256
                and other.suite_version == own.suite_version
            )
            if not comparable:
                continue
            for owner_score in own.scores:
                independent = other.score(owner_score.dimension)
                if independent is not None and disagrees(owner_score, independent):
                    flags.append(
                        Flag(own.expert_id, owner_score.dimension, owner_score, independent, other.judge_node_id)
                    )
    return sorted(flags, key=lambda f: (f.expert_id, f.dimension, f.judge_node_id))


# ---- store -----------------------------------------------------------------------------


MAX_CARDS_PER_MODEL = 32  # a flood of throwaway judges cannot grow the store or slow views past this
MAX_CARDS_PER_JUDGE = 64
MAX_CARDS = 4096  # in all: many Sybil owners together cannot grow the store past this either
_VERIFIED_CACHE = 4096


class CardStore:
    """Every verified card about every expert, from every judge; blocking calls, run them off the loop.

    Bounded: at most MAX_CARDS_PER_MODEL cards per model and MAX_CARDS_PER_JUDGE per judge; the
    oldest cards of judges not in `protected` go first. A database that is not a database is a
    cache: it is moved aside and rebuilt.
    """

    def __init__(self, path: Path) -> None:
        from node.state_files import open_cache_db

        self._lock = threading.Lock()
        self._verified: dict[bytes, SignedCapabilityCard] = {}
        self._db = open_cache_db(path, (_SCHEMA, _INDEX))

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def put(self, signed: SignedCapabilityCard, protected: frozenset[str] = frozenset()) -> None:
        """Verify and store a card, replacing the judge's earlier card on that model and suite; enforce the caps."""
        card = verify_capability_card(signed)
        data = encode_signed_card(signed)
        keep = sorted(protected)
        marks = ",".join("?" * len(keep)) or "''"
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO capability_cards "
                "(model_sha256, suite_version, judge_node_id, expert_id, issued_ms, signed_card) "
                "VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(model_sha256, suite_version, judge_node_id) DO UPDATE SET "
                "expert_id=excluded.expert_id, issued_ms=excluded.issued_ms, signed_card=excluded.signed_card",
                (card.model_sha256, card.suite_version, card.judge_node_id, card.expert_id, card.issued_ms, data),
            )
            for column, value, cap in (
                ("model_sha256", card.model_sha256, MAX_CARDS_PER_MODEL),
                ("judge_node_id", card.judge_node_id, MAX_CARDS_PER_JUDGE),
                ("1", 1, MAX_CARDS),
            ):
                (count,) = self._db.execute(f"SELECT COUNT(*) FROM capability_cards WHERE {column} = ?", (value,)).fetchone()
                if count > cap:
                    self._db.execute(
                        f"DELETE FROM capability_cards WHERE rowid IN (SELECT rowid FROM capability_cards "
                        f"WHERE {column} = ? AND judge_node_id NOT IN ({marks}) ORDER BY issued_ms LIMIT ?)",
                        (value, *keep, count - cap),
                    )

    def all_cards(self) -> list[SignedCapabilityCard]:
        """Every valid stored card."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model_sha256, suite_version, judge_node_id, expert_id, signed_card FROM capability_cards "
                "ORDER BY issued_ms, judge_node_id"
            ).fetchall()
        return self._valid(rows)

    def get(self, model_sha256: str, suite_version: str, judge_node_id: str) -> SignedCapabilityCard | None:
        """The judge's card on this model and suite version, if stored and still valid."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model_sha256, suite_version, judge_node_id, expert_id, signed_card FROM capability_cards "
                "WHERE model_sha256 = ? AND suite_version = ? AND judge_node_id = ?",
                (model_sha256, suite_version, judge_node_id),
            ).fetchall()
        valid = self._valid(rows)
        return valid[0] if valid else None

    def cards_for(self, expert_id_or_sha256: str) -> list[SignedCapabilityCard]:
        """Every valid card about an expert (by expert id or model sha256), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model_sha256, suite_version, judge_node_id, expert_id, signed_card FROM capability_cards "
                "WHERE expert_id = ? OR model_sha256 = ? ORDER BY issued_ms, judge_node_id",
                (expert_id_or_sha256, expert_id_or_sha256),
            ).fetchall()
        return self._valid(rows)

    def _valid(self, rows: list[tuple[Any, ...]]) -> list[SignedCapabilityCard]:
        valid: list[SignedCapabilityCard] = []
        for sha, version, judge, expert_id, data in rows:
            signed = self._verified.get(data)
            if signed is None:
                try:
                    signed = decode_signed_card(data)
                    verify_capability_card(signed)
                except CardError as exc:
                    log.warning("dropping stored card of judge %s on %s: %s", judge, expert_id, exc.message)
                    continue
                if len(self._verified) >= _VERIFIED_CACHE:
                    self._verified.pop(next(iter(self._verified)))
                self._verified[data] = signed
            card = signed.card
            if (card.model_sha256, card.suite_version, card.judge_node_id, card.expert_id) != (
                sha,
                version,
                judge,
                expert_id,
            ):
                log.warning("dropping stored card of judge %s on %s: row keys do not match the card", judge, expert_id)
                continue
            valid.append(signed)
        return valid
