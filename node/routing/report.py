"""`expertmesh report`: what the router earned, and off-policy estimates of simpler policies, from the ledger."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bandit.features import ExpertFeatures
from bandit.ledger import Decision, Ledger
from bandit.simulate import ips, snips
from node.errors import NotFound
from node.routing.router import LEDGER_FILE

# A baseline gives, for one logged decision, the probability it would have taken the logged action.
Baseline = Callable[[Decision], float]


@dataclass(frozen=True)
class Estimate:
    """One policy's estimated mean reward on the logged events."""

    policy: str
    ips: float
    snips: float
    support: int  # events where the policy could have taken the logged action


def _uniform(decision: Decision) -> float:
    return 1.0 / len(decision.candidates)


def _always(expert_id: str) -> Baseline:
    def probability(decision: Decision) -> float:
        return 1.0 if decision.chosen.expert_id == expert_id else 0.0

    return probability


def _judge_greedy(decision: Decision) -> float:
    """The candidate with the best judged score for the detected task (the first on ties, or without scores)."""
    task = decision.query.task.value

    def score(expert: ExpertFeatures) -> float:
        return expert.scores.get(task, -1.0)

    best = max(range(len(decision.candidates)), key=lambda i: score(decision.candidates[i]))
    return 1.0 if best == decision.chosen_index else 0.0


def estimates(rewarded: Sequence[tuple[Decision, float]]) -> list[Estimate]:
    """IPS and SNIPS of the baselines, plus the logged policy's own mean reward."""
    # Fallback-served events rate an expert the policy did not sample; off-policy estimates skip them.
    events = [(d, r) for d, r in rewarded if d.served_index == d.chosen_index]
    if not events:
        return []
    rewards = [r for _, r in events]
    logged = [d.chosen_probability for d, _ in events]
    baselines: dict[str, Baseline] = {"random": _uniform, "judge-greedy": _judge_greedy}
    for expert_id in sorted({c.expert_id for d, _ in events for c in d.candidates}):
        baselines[f"always {expert_id}"] = _always(expert_id)
    result = [Estimate("router (logged)", sum(rewards) / len(rewards), sum(rewards) / len(rewards), len(events))]
    for name, baseline in baselines.items():
        target = [baseline(d) for d, _ in events]
        result.append(Estimate(name, ips(rewards, logged, target), snips(rewards, logged, target), sum(t > 0 for t in target)))
    return result


def render(data_dir: Path) -> str:
    """The report as text."""
    path = data_dir / LEDGER_FILE
    if not path.exists():
        raise NotFound(f"no ledger at {path}: this node has not routed anything yet")
    ledger = Ledger(path)
    try:
        history = ledger.recent(limit=1_000_000)
        stats = ledger.stats()
    finally:
        ledger.close()
    rewarded = [(d, r) for d, r in history if r is not None]
    lines = [
        f"ledger {path}",
        f"decisions {stats.decisions}, rated {stats.rated}, served by a fallback {stats.fallbacks}",
    ]
    if stats.mean_reward is not None:
        lines.append(f"mean reward of rated answers {stats.mean_reward:.3f}")
    rows = estimates(rewarded)
    if not rows:
        lines.append("no rated decisions yet: rate answers (thumbs up/down) to compare policies")
        return "\n".join(lines) + "\n"
    lines.append("")
    lines.append(f"{'policy':<40} {'IPS':>7} {'SNIPS':>7} {'support':>8}")
    for row in rows:
        lines.append(f"{row.policy:<40} {row.ips:>7.3f} {row.snips:>7.3f} {row.support:>8}")
    lines.append("")
    lines.append("IPS/SNIPS: what each policy would have earned on these events, estimated from the logged probabilities.")
    return "\n".join(lines) + "\n"
