"""How far a node trusts each peer: pure state lowered by evidence of misbehaviour, slowly restored by good service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# How much one piece of evidence multiplies a peer's trust by: lies cost more than accidents.
PENALTIES: Mapping[str, float] = {
    "missing_expert": 0.5,  # advertised an expert, then said it has none
    "garbage": 0.4,  # sent frames or replies that are not valid protocol
    "bad_card": 0.5,  # relayed a capability card that does not verify
    "speed_lie": 0.6,  # claimed far more tokens/s than it delivered
    "model_mismatch": 0.3,  # answered a greedy probe unlike the model file it claims to serve
    "score_lie": 0.5,  # its own card claims scores this node's own probes contradict
    "timeout": 0.7,  # went silent mid-answer
    "broke_stream": 0.8,  # dropped the connection mid-answer
}
RECOVERY_PER_SUCCESS = 0.02
DISTRUSTED_BELOW = 0.3
MAX_EVIDENCE = 10


@dataclass(frozen=True)
class Evidence:
    """One observed misbehaviour."""

    kind: str
    detail: str
    at_ms: int


@dataclass(frozen=True)
class Trust:
    """A peer's trust score in [0, 1] and the latest evidence against it."""

    score: float = 1.0
    evidence: tuple[Evidence, ...] = ()

    @property
    def distrusted(self) -> bool:
        """Whether its experts should no longer be used."""
        return self.score < DISTRUSTED_BELOW


def penalize(trust: Trust, kind: str, detail: str, now_ms: int) -> Trust:
    """Lower trust for one piece of evidence, keeping the latest few as proof."""
    factor = PENALTIES.get(kind, 0.8)
    evidence = (*trust.evidence, Evidence(kind, detail[:300], now_ms))[-MAX_EVIDENCE:]
    return Trust(trust.score * factor, evidence)


def reward(trust: Trust) -> Trust:
    """Restore a little trust after a request served well."""
    return Trust(min(1.0, trust.score + RECOVERY_PER_SUCCESS), trust.evidence)
