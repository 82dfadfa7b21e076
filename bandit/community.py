"""Community learning, pure: what a node's users taught, other nodes' reports of theirs, and a bounded prior from them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from bandit.features import ExpertFeatures, Task

CellKey = tuple[str, str]  # (expert id, task kind)

# A reporter never seen agreeing or disagreeing starts here, as if seen over PRIOR_EVIDENCE ratings.
PRIOR_AGREEMENT = 0.2
PRIOR_EVIDENCE = 5.0
# Mean squared gap between a reporter's means and ours that halves its agreement: tastes differ a little.
AGREEMENT_TOLERANCE = 0.01
# A reporter is proven once this many own ratings checked its cells and it agreed at least this well;
# the others (fresh keys, liars) together weigh at most UNPROVEN_TOTAL_WEIGHT.
PROVEN_EVIDENCE = 10.0
PROVEN_AGREEMENT = 0.5
UNPROVEN_TOTAL_WEIGHT = 0.5
# Made-up counts are bounded: a reporter's cell weighs as at most this many ratings.
MAX_COUNT_PER_REPORTER = 10
# Sybil bound: the whole community weighs as at most this many ratings per cell, however many keys report.
MAX_COMMUNITY_WEIGHT = 10.0
# The judged score counts as this many ratings when blended with community and own means.
JUDGE_WEIGHT = 2.0
# A mean from own ratings with no judge behind it still starts from this neutral guess.
NEUTRAL_MEAN = 0.5


@dataclass(frozen=True)
class ReportedCell:
    """What a reporter says its users taught about one expert on one task kind."""

    n: int
    mean: float


@dataclass(frozen=True)
class Report:
    """One reporter's latest summary: who, which edition, and its cells."""

    reporter: str
    seq: int
    issued_ms: int
    cells: Mapping[CellKey, ReportedCell]


@dataclass(frozen=True)
class OwnCell:
    """This node's own ratings of one expert on one task kind: count, sum and sum of squares."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    @property
    def mean(self) -> float:
        """Mean reward (NEUTRAL_MEAN when empty)."""
        return self.total / self.n if self.n else NEUTRAL_MEAN

    def add(self, reward: float) -> OwnCell:
        """The cell with one more rating."""
        return OwnCell(self.n + 1, self.total + reward, self.total_sq + reward * reward)

    def sample_variance(self) -> float:
        """Unbiased variance of the rewards (0 under two ratings)."""
        if self.n < 2:
            return 0.0
        return max(0.0, (self.total_sq - self.total * self.total / self.n) / (self.n - 1))


def add_rating(own: Mapping[CellKey, OwnCell], expert_id: str, task: str, reward: float) -> dict[CellKey, OwnCell]:
    """Own cells with one more rating."""
    key = (expert_id, task)
    updated = dict(own)
    updated[key] = own.get(key, OwnCell()).add(reward)
    return updated


def summarize(ratings: Iterable[tuple[str, str, float]]) -> dict[CellKey, OwnCell]:
    """Own cells from (served expert id, task kind, reward) triples."""
    cells: dict[CellKey, OwnCell] = {}
    for expert_id, task, reward in ratings:
        key = (expert_id, task)
        cells[key] = cells.get(key, OwnCell()).add(reward)
    return cells


def to_report(reporter: str, seq: int, issued_ms: int, own: Mapping[CellKey, OwnCell], max_cells: int) -> Report:
    """What this node publishes: count and mean per cell, the best-attested `max_cells` cells."""
    ranked = sorted(own.items(), key=lambda kv: (-kv[1].n, kv[0]))[:max_cells]
    cells = {key: ReportedCell(cell.n, round(cell.mean, 4)) for key, cell in ranked if cell.n > 0}
    return Report(reporter, seq, issued_ms, cells)


@dataclass(frozen=True)
class Agreement:
    """How well a reporter's means predicted this node's own ratings."""

    score: float  # in (0, 1]: PRIOR_AGREEMENT with no evidence
    evidence: float  # own ratings on cells the reporter also reported
    gap: float  # noise-corrected mean squared gap between its means and ours

    @property
    def proven(self) -> bool:
        """Whether enough own ratings checked it, and it agreed, for it to weigh on its own."""
        return self.evidence >= PROVEN_EVIDENCE and self.score >= PROVEN_AGREEMENT


def agreement(report: Report, own: Mapping[CellKey, OwnCell]) -> Agreement:
    """Compare a reporter's means with own means where both have ratings, shrunk towards PRIOR_AGREEMENT.

    The squared gap of two noisy means overstates the gap of what they estimate by both
    sampling variances, which are subtracted, so an honest reporter with thin cells is not
    read as a liar. A reporter that inflates or invents means keeps a large gap and its
    score falls with every own rating on its cells.
    """
    weighted_gap = 0.0
    evidence = 0.0
    for key, claimed in report.cells.items():
        mine = own.get(key)
        if mine is None or mine.n < 2 or claimed.n < 1:
            continue
        theirs_var = claimed.mean * (1.0 - claimed.mean) / min(claimed.n, MAX_COUNT_PER_REPORTER)
        gap = (claimed.mean - mine.mean) ** 2 - mine.sample_variance() / mine.n - max(0.0, theirs_var)
        weighted_gap += mine.n * gap
        evidence += mine.n
    if evidence == 0:
        return Agreement(PRIOR_AGREEMENT, 0.0, 0.0)
    gap = max(0.0, weighted_gap / evidence)
    measured = 1.0 / (1.0 + gap / AGREEMENT_TOLERANCE)
    score = (PRIOR_EVIDENCE * PRIOR_AGREEMENT + evidence * measured) / (PRIOR_EVIDENCE + evidence)
    return Agreement(score, evidence, gap)


@dataclass(frozen=True)
class PriorCell:
    """The community's estimate for one cell: a mean, how many ratings it weighs as, and who said it."""

    mean: float
    weight: float
    reporters: int


@dataclass(frozen=True)
class CommunityPrior:
    """The community estimate per cell and each reporter's weight in it."""

    cells: Mapping[CellKey, PriorCell]
    weights: Mapping[str, float]
    agreements: Mapping[str, Agreement]


def reporter_weights(
    reports: Sequence[Report], own: Mapping[CellKey, OwnCell], trust_of: Callable[[str], float]
) -> tuple[dict[str, float], dict[str, Agreement]]:
    """Each reporter's weight: trust x agreement; unproven reporters together weigh at most UNPROVEN_TOTAL_WEIGHT."""
    agreements = {r.reporter: agreement(r, own) for r in reports}
    weights = {r.reporter: max(0.0, min(1.0, trust_of(r.reporter))) * agreements[r.reporter].score for r in reports}
    unproven = [name for name, a in agreements.items() if not a.proven]
    unproven_total = math.fsum(weights[name] for name in unproven)
    if unproven_total > UNPROVEN_TOTAL_WEIGHT:
        # Fresh keys cost nothing: however many there are, fresh or caught disagreeing, together they
        # count as one trusted reporter. A key earns weight of its own only by agreeing with own ratings.
        scale = UNPROVEN_TOTAL_WEIGHT / unproven_total
        for name in unproven:
            weights[name] *= scale
    return weights, agreements


def _weighted_median(values: Sequence[tuple[float, float]]) -> float:
    """The value at half the total weight of (value, weight) pairs."""
    ordered = sorted(values)
    half = math.fsum(w for _, w in ordered) / 2.0
    running = 0.0
    for value, weight in ordered:
        running += weight
        if running >= half:
            return value
    return ordered[-1][0]


def combine(
    reports: Sequence[Report], own: Mapping[CellKey, OwnCell], trust_of: Callable[[str], float]
) -> CommunityPrior:
    """The community prior per cell: a weighted median of reporters' means, its weight capped.

    A median, not a mean, so a minority of liars cannot drag a well-attested cell; the
    weight a cell carries is the sum of reporter weight x (capped) count, capped again at
    MAX_COMMUNITY_WEIGHT, so neither made-up counts nor many keys outweigh a few own ratings.
    """
    weights, agreements = reporter_weights(reports, own, trust_of)
    by_cell: dict[CellKey, list[tuple[float, float]]] = {}
    for report in reports:
        w = weights[report.reporter]
        if w <= 0:
            continue
        for key, cell in report.cells.items():
            if cell.n < 1 or not math.isfinite(cell.mean):
                continue
            mass = w * min(cell.n, MAX_COUNT_PER_REPORTER)
            by_cell.setdefault(key, []).append((min(1.0, max(0.0, cell.mean)), mass))
    cells = {
        key: PriorCell(
            mean=_weighted_median(entries),
            weight=min(MAX_COMMUNITY_WEIGHT, math.fsum(m for _, m in entries)),
            reporters=len(entries),
        )
        for key, entries in by_cell.items()
    }
    return CommunityPrior(cells, weights, agreements)


def blended_score(judged: float | None, prior: PriorCell | None, mine: OwnCell | None) -> float | None:
    """Expected reward from the judge, the community and own ratings, each weighed by what it counts as.

    Own ratings count fully, the community at most MAX_COMMUNITY_WEIGHT ratings, so own
    evidence dominates as it accumulates. None without community evidence (the judged
    score stands as it is, exactly as without sharing).
    """
    if prior is None or prior.weight <= 0:
        return judged
    judge_weight = JUDGE_WEIGHT if judged is not None else 0.0
    n_own = mine.n if mine is not None else 0
    total = judge_weight * (judged or 0.0) + prior.weight * prior.mean + (mine.total if mine is not None else 0.0)
    return min(1.0, max(0.0, total / (judge_weight + prior.weight + n_own)))


@dataclass(frozen=True)
class CommunityUse:
    """What the community contributed to one decision, for its explanation."""

    reporters: int  # distinct reporters behind the candidates' priors
    experts: Mapping[str, float]  # expert id -> the blended expected reward the bandit saw


def apply_prior(
    experts: Sequence[ExpertFeatures],
    task: Task,
    prior: CommunityPrior,
    own: Mapping[CellKey, OwnCell],
    reports: Sequence[Report] = (),
) -> tuple[list[ExpertFeatures], CommunityUse | None]:
    """Candidates whose score for `task` carries the community prior; None when no prior applied."""
    updated: list[ExpertFeatures] = []
    used: dict[str, float] = {}
    for expert in experts:
        key = (str(expert.expert_id), task.value)
        cell = prior.cells.get(key)
        score = blended_score(expert.task_score(task), cell, own.get(key))
        if cell is None or score is None:
            updated.append(expert)
            continue
        used[str(expert.expert_id)] = round(score, 4)
        updated.append(dataclasses.replace(expert, scores={**expert.scores, task.value: score}))
    if not used:
        return list(experts), None
    names = {
        r.reporter
        for r in reports
        if prior.weights.get(r.reporter, 0.0) > 0 and any((e, task.value) in r.cells for e in used)
    }
    reporters = len(names) if reports else max(prior.cells[(e, task.value)].reporters for e in used)
    return updated, CommunityUse(reporters, used)
