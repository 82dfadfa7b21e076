"""Signed learning summaries on the wire: what a node's users taught, per expert and task kind, and nothing else."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, ClassVar

import msgpack
from pydantic import AfterValidator, Field

from peers.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    NodeIdentity,
    node_id_from_public_key,
    verify_signature,
)
from peers.wire import (
    MAX_LEARNING_BYTES,
    PROTOCOL_VERSION,
    Bytes,
    Float,
    Int,
    Items,
    NodeIdText,
    Str,
    WireError,
    WireMessage,
    WireRecord,
    _plain,
    decode,
    encode,
)

MAX_CELLS = 128
MAX_SUMMARY_BYTES = MAX_LEARNING_BYTES
# A summary dated further ahead of our clock than this is refused (a replay guard needs sane clocks).
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000

_TASK_RE = re.compile(r"[a-z][a-z_]{0,31}")


def _task_kind(value: str) -> str:
    """`value` when it is a task kind name (lowercase letters and underscores); ValueError otherwise."""
    if not _TASK_RE.fullmatch(value):
        raise ValueError("expected a task kind: lowercase letters and underscores")
    return value


@dataclass(frozen=True)
class LearningCell(WireRecord):
    """How many rated decisions this node's users gave one expert on one task kind, and their mean reward."""

    expert_id: Annotated[Str, Field(min_length=1, max_length=128)]
    task: Annotated[Str, Field(min_length=1, max_length=32), AfterValidator(_task_kind)]
    n: Annotated[Int, Field(ge=1)]
    mean: Annotated[Float, Field(ge=0.0, le=1.0)]


@dataclass(frozen=True)
class LearningSummary(WireMessage):
    """Everything a node shares about its users' ratings: who, which edition, when, and the cells."""

    TYPE: ClassVar[str] = "learning_summary"
    node_id: NodeIdText
    public_key: Annotated[Bytes, Field(min_length=PUBLIC_KEY_BYTES, max_length=PUBLIC_KEY_BYTES)]
    seq: Annotated[Int, Field(ge=0)]
    issued_ms: Annotated[Int, Field(ge=0)]
    cells: Annotated[tuple[LearningCell, ...], Items(MAX_CELLS)] = ()


@dataclass(frozen=True)
class SignedSummary(WireMessage):
    """A learning summary with its node's Ed25519 signature over `summary_signing_bytes`."""

    TYPE: ClassVar[str] = "signed_learning_summary"
    summary: LearningSummary
    signature: Annotated[Bytes, Field(min_length=SIGNATURE_BYTES, max_length=SIGNATURE_BYTES)]


def summary_signing_bytes(summary: LearningSummary) -> bytes:
    """Canonical msgpack (sorted keys, with `v` and `type`) of the summary: what the signature covers."""
    body = {"v": PROTOCOL_VERSION, "type": LearningSummary.TYPE, **_plain(summary, sort_keys=True)}
    return msgpack.packb(dict(sorted(body.items())), use_bin_type=True)


def sign_summary(summary: LearningSummary, identity: NodeIdentity) -> bytes:
    """The encoded, signed summary; ValueError when it is not this node's or over the size cap."""
    if summary.node_id != identity.node_id or summary.public_key != identity.public_key_raw:
        raise ValueError("a node can only sign its own learning summary")
    data = encode(SignedSummary(summary=summary, signature=identity.sign(summary_signing_bytes(summary))))
    if len(data) > MAX_SUMMARY_BYTES:
        raise ValueError(f"summary of {len(data)} bytes is over the {MAX_SUMMARY_BYTES}-byte cap")
    return data


def verify_summary(data: bytes, *, now_ms: int) -> LearningSummary:
    """The summary when its size, schema, id, signature and date check out; WireError otherwise."""
    signed = decode(data, SignedSummary, max_bytes=MAX_SUMMARY_BYTES)
    summary = signed.summary
    if node_id_from_public_key(summary.public_key) != summary.node_id:
        raise WireError(400, "does not derive from summary.public_key", field="summary.node_id")
    if not verify_signature(summary.public_key, summary_signing_bytes(summary), signed.signature):
        raise WireError(400, "does not verify against summary.public_key", field="signature")
    if summary.issued_ms > now_ms + MAX_CLOCK_SKEW_MS:
        raise WireError(400, "is in the future", field="summary.issued_ms")
    if len({(c.expert_id, c.task) for c in summary.cells}) != len(summary.cells):
        raise WireError(400, "names one expert and task twice", field="summary.cells")
    return summary


__all__ = [
    "MAX_CELLS",
    "MAX_SUMMARY_BYTES",
    "LearningCell",
    "LearningSummary",
    "SignedSummary",
    "sign_summary",
    "summary_signing_bytes",
    "verify_summary",
]
