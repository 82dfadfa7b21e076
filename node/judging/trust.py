"""Whose capability cards count: this node's own measurement first, then judges it trusts; pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from node.judging.cards import CapabilityCard
from node.judging.stats import disagrees

# An earned judge never weighs as much as one the user listed, and it takes several
# agreements with this node's own audits (and more agreements than disagreements) to earn any.
MAX_EARNED_WEIGHT = 0.5
EARN_HALF_AT = 3  # agreements (net) at which an earned judge reaches half its maximum weight
MIN_NET_AGREEMENTS = 2


@dataclass(frozen=True)
class JudgeRecord:
    """How often a judge's cards agreed with this node's own on the same model and suite."""

    agreements: int = 0
    disagreements: int = 0


@dataclass(frozen=True)
class Assessment:
    """The scores this node believes for one expert, and on what evidence."""

    scores: Mapping[str, float] = field(default_factory=dict)
    evidence: str = "none"  # own | trusted | earned | claimed | none
    judges: tuple[str, ...] = ()
    verified: bool = False  # backed by this node's own measurement or a judge the user trusts

    def describe(self) -> str:
        """A short phrase for a decision's explanation."""
        return {
            "own": "this node's own measurement",
            "trusted": "judges listed in trusted_judges",
            "earned": "judges that agreed with this node's own audits",
            "claimed": "the owner's own claim (unverified)",
            "none": "no judged scores",
        }[self.evidence]


def judge_records(cards: Iterable[CapabilityCard], own_id: str) -> dict[str, JudgeRecord]:
    """For every other judge, its agreements and disagreements with this node's own cards."""
    cards = list(cards)
    own = {(c.model_sha256, c.suite_version): c for c in cards if c.judge_node_id == own_id}
    counts: dict[str, list[int]] = {}
    for card in cards:
        if card.judge_node_id == own_id:
            continue
        mine = own.get((card.model_sha256, card.suite_version))
        if mine is None:
            continue
        shared = [(s, theirs) for s in mine.scores if (theirs := card.score(s.dimension)) is not None]
        if not shared:
            continue
        entry = counts.setdefault(card.judge_node_id, [0, 0])
        entry[1 if any(disagrees(a, b) for a, b in shared) else 0] += 1
    return {judge: JudgeRecord(a, d) for judge, (a, d) in counts.items()}


def judge_weight(judge_id: str, trusted: frozenset[str], records: Mapping[str, JudgeRecord]) -> float:
    """How much a judge's word counts here: 1 when the user trusts it, a bounded earned weight, else 0."""
    if judge_id in trusted:
        return 1.0
    record = records.get(judge_id)
    if record is None:
        return 0.0
    net = record.agreements - 2 * record.disagreements  # a disagreement costs two agreements
    if net < MIN_NET_AGREEMENTS:
        return 0.0
    return MAX_EARNED_WEIGHT * net / (net + EARN_HALF_AT)


def assess(
    cards: Iterable[CapabilityCard],
    *,
    own_id: str,
    owner: str | None,
    trusted: frozenset[str],
    records: Mapping[str, JudgeRecord],
) -> Assessment:
    """The scores to believe for one model, hosted here (`owner=None`) or by `owner`.

    This node's own newest card decides alone. Failing that, judges weigh by `judge_weight`
    (a stranger weighs nothing). Failing that, a remote owner's card about itself is shown as
    its claim, unverified; a local expert never takes another node's claim.
    """
    cards = list(cards)
    own = [c for c in cards if c.judge_node_id == own_id and (owner is None or c.owner_node_id == owner)]
    if own:
        newest = max(own, key=lambda c: c.issued_ms)
        return Assessment({s.dimension: s.mean for s in newest.scores}, "own", (own_id,), True)
    weighted = [
        (c, w)
        for c in cards
        if c.judge_node_id != own_id and c.judge_node_id != owner and (w := judge_weight(c.judge_node_id, trusted, records)) > 0
    ]
    if weighted:
        sums: dict[str, list[float]] = {}
        for card, weight in weighted:
            for score in card.scores:
                entry = sums.setdefault(score.dimension, [0.0, 0.0])
                entry[0] += weight * score.mean
                entry[1] += weight
        any_trusted = any(c.judge_node_id in trusted for c, _ in weighted)
        return Assessment(
            {d: total / weight for d, (total, weight) in sums.items()},
            "trusted" if any_trusted else "earned",
            tuple(sorted({c.judge_node_id for c, _ in weighted})),
            any_trusted,
        )
    if owner is not None:
        claims = [c for c in cards if c.self_judged and c.owner_node_id == owner]
        if claims:
            newest = max(claims, key=lambda c: c.issued_ms)
            return Assessment({s.dimension: s.mean for s in newest.scores}, "claimed", (owner,), False)
    return Assessment()
