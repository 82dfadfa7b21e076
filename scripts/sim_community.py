"""Community learning simulation: how fast a late-joining node reaches its own oracle, with and without shared evidence.

Pure logic (the real VW policy, no sockets, no models). A network of reporter nodes whose
users have different but overlapping tastes (the default world's truth, moved per node by
noise) each route with their own bandit and publish a summary; a node that joins late
routes its own users' queries from the first one, three ways over the same queries and luck:
without sharing, with the honest reporters' summaries, and with 30% of reporters lying
(inflated means and made-up counts for one expert, zero for the rest).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bandit.community import (  # noqa: E402
    CellKey,
    OwnCell,
    Report,
    ReportedCell,
    add_rating,
    apply_prior,
    combine,
    to_report,
)
from bandit.features import ExpertFeatures  # noqa: E402
from bandit.policy import Policy, sample_index  # noqa: E402
from bandit.simulate import World, default_world, sample_events  # noqa: E402

log = logging.getLogger("sim_community")

TASTE_NOISE = 0.08
GOAL_SPEEDUP = 3.0
TARGET = 0.9
LIE_COUNT = 1_000_000
MAX_CELLS = 128


def taste(world: World, rng: np.random.Generator) -> np.ndarray:
    """One node's users' truth: the world's, moved a little (different but overlapping tastes)."""
    return np.clip(world.reward_probs + rng.normal(0.0, TASTE_NOISE, world.reward_probs.shape), 0.05, 0.95)


def route(
    world: World,
    probs: np.ndarray,
    n_events: int,
    rng: np.random.Generator,
    seed: int,
    reports: list[Report] | None,
) -> tuple[np.ndarray, np.ndarray, dict[CellKey, OwnCell], int, dict[str, float]]:
    """One node routing `n_events` of its users' queries; expected and oracle reward per event, its own cells, community-weighed decisions."""
    events = sample_events(world, n_events, rng)
    luck = rng.random(n_events)
    choice_rng = random.Random(seed)
    policy = Policy(seed=seed)
    own: dict[CellKey, OwnCell] = {}
    expected = np.zeros(n_events)
    oracle = np.zeros(n_events)
    weighed = 0
    prior = None
    for event in events:
        experts: list[ExpertFeatures] = list(world.experts)
        if reports:
            if prior is None:
                prior = combine(reports, own, lambda _r: 1.0)
            experts, use = apply_prior(experts, event.query.task, prior, own, reports)
            weighed += use is not None
        p = policy.probabilities(event.query, experts)
        index = sample_index(p, choice_rng)
        truth = probs[:, event.category_index]
        reward = 1.0 if luck[event.index] < truth[index] else 0.0
        policy.learn(event.query, experts, index, p[index], reward)
        own = add_rating(own, str(experts[index].expert_id), event.query.task.value, reward)
        prior = None  # own ratings changed: agreements and the prior are recomputed
        expected[event.index] = truth[index]
        oracle[event.index] = truth.max()
    policy.close()
    final = dict(combine(reports, own, lambda _r: 1.0).weights) if reports else {}
    return expected, oracle, own, weighed, final


def liar_report(world: World, name: str, rng: np.random.Generator) -> Report:
    """A reporter that promotes one expert (mean 1 with a made-up count) and runs down all others."""
    favourite = int(rng.integers(len(world.experts)))
    cells = {
        (str(e.expert_id), cat.value): ReportedCell(LIE_COUNT, 1.0 if k == favourite else 0.0)
        for k, e in enumerate(world.experts)
        for cat in world.categories
    }
    return Report(name, 1, 0, cells)


def reached(ratio: np.ndarray) -> int | None:
    """Own rated queries after which the reward so far stays at least TARGET of the oracle's (None: never in the run)."""
    cumulative = np.cumsum(ratio) / np.arange(1, len(ratio) + 1)
    below = np.nonzero(cumulative < TARGET)[0]
    if len(below) == 0:
        return 1
    return None if below[-1] == len(ratio) - 1 else int(below[-1]) + 2


def _show(value: int | None, n: int) -> str:
    return f">{n}" if value is None else str(value)


def simulate(
    seeds: list[int], reporters: int, reporter_events: int, late_events: int, liar_share: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-event expected/oracle ratio of the late node per condition (mean over seeds); mean reporter weight before and after, liars vs honest."""
    world = default_world()
    sums = {"without": np.zeros(late_events), "with": np.zeros(late_events), "with, 30% lying": np.zeros(late_events)}
    expected_sum = {k: 0.0 for k in sums}
    oracle_sum = 0.0
    weighed = {k: 0 for k in sums}
    weights: dict[str, list[tuple[float, float]]] = {}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        honest: list[Report] = []
        for r in range(reporters):
            probs = taste(world, rng)
            _, _, own, _, _ = route(world, probs, reporter_events, np.random.default_rng([seed, r]), seed * 1000 + r, None)
            honest.append(to_report(f"node-{r}", 1, 0, own, MAX_CELLS))
        n_liars = round(liar_share * reporters)
        lying = honest[: reporters - n_liars] + [liar_report(world, f"liar-{i}", rng) for i in range(n_liars)]
        late_taste = taste(world, rng)
        for name, reports in (("without", None), ("with", honest), ("with, 30% lying", lying)):
            # The same queries and luck for every condition (common random numbers).
            expected, oracle, _, used, final = route(world, late_taste, late_events, np.random.default_rng([seed, 999]), seed, reports)
            sums[name] += expected / oracle
            expected_sum[name] += expected.sum()
            weighed[name] += used
            if name == "with, 30% lying":
                start = combine(lying, {}, lambda _r: 1.0).weights
                for who, w in final.items():
                    kind = "liar" if who.startswith("liar") else "honest"
                    weights.setdefault(kind, []).append((start[who], w))
        oracle_sum += oracle.sum()
    result = {name: total / len(seeds) for name, total in sums.items()}
    for name in sums:
        log.debug("%s: community weighed in %d decisions", name, weighed[name])
    return result, {kind: np.mean(pairs, axis=0) for kind, pairs in weights.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the simulation over many seeds and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--reporters", type=int, default=10)
    parser.add_argument("--reporter-events", type=int, default=300)
    parser.add_argument("--late-events", type=int, default=500)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    curves, weights = simulate(list(range(args.seeds)), args.reporters, args.reporter_events, args.late_events, 0.3)
    checkpoints = [c for c in (10, 20, 50, 100, 200, 500) if c <= args.late_events]
    out = sys.stdout
    out.write(
        f"late node, {args.seeds} seeds, {args.reporters} reporters x {args.reporter_events} rated queries, "
        f"taste noise {TASTE_NOISE}\n"
    )
    n = args.late_events
    out.write(
        "condition".ljust(18) + f"{'reaches 90%':>12}"
        + "".join(f"{f'%oracle@{c}':>13}" for c in checkpoints) + "\n"
    )
    reach = {}
    for name, ratio in curves.items():
        reach[name] = reached(ratio)
        cumulative = [100.0 * ratio[:c].mean() for c in checkpoints]
        out.write(
            name.ljust(18) + f"{_show(reach[name], n):>12}"
            + "".join(f"{v:13.1f}" for v in cumulative) + "\n"
        )
    without = reach["without"] if reach["without"] is not None else n + 1
    speedup = without / reach["with"] if reach["with"] is not None else 0.0
    lying_ok = all(
        curves["with, 30% lying"][:c].mean() >= curves["without"][:c].mean() for c in checkpoints
    )
    out.write(
        "own rated queries after which the late node's reward so far stays at or above 90% of its own oracle's: "
        f"{_show(reach['without'], n)} without sharing, {_show(reach['with'], n)} with "
        f"({'>=' if reach['without'] is None else ''}{speedup:.1f}x fewer; goal >= {GOAL_SPEEDUP:.0f}x), "
        f"{_show(reach['with, 30% lying'], n)} with 30% of reporters lying\n"
    )
    for kind, (before, after) in sorted(weights.items()):
        out.write(
            f"mean weight of a {kind} reporter (trust 1 x agreement, fresh keys scaled together): "
            f"{before:.3f} before the late node's first rating, {after:.3f} after its last\n"
        )
    out.write(f"30% lying at least as good as without sharing at every checkpoint: {'yes' if lying_ok else 'NO'}\n")
    out.write(f"({time.perf_counter() - started:.0f} s)\n")
    return 0 if speedup >= GOAL_SPEEDUP and lying_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
