"""The offline world, baseline choosers, metrics and off-policy estimators."""

from __future__ import annotations

import numpy as np
import pytest

from bandit.features import Task
from bandit.policy import Policy
from bandit.simulate import (
    BestSingleChooser,
    JudgeGreedyChooser,
    OracleChooser,
    RandomChooser,
    VWChooser,
    cumulative_regret,
    default_world,
    drift_recovery_events,
    drift_world,
    ips,
    percent_of_oracle,
    run,
    sample_events,
    snips,
)


def test_world_is_not_trivial() -> None:
    world = default_world()
    k, c = world.reward_probs.shape
    assert (k, c) == (4, 5)
    best = world.reward_probs.argmax(axis=0)
    assert set(best.tolist()) == {0, 1, 2, 3}  # every expert is best somewhere
    for task in (Task.KNOWLEDGE, Task.ARITHMETIC, Task.TRANSLATION, Task.CLASSIFICATION,
                 Task.INSTRUCTION):
        assert len(world.templates[task]) >= 8
    judged = np.array([[e.scores[t.value] for t in world.categories] for e in world.experts])
    corr = np.corrcoef(judged.ravel(), world.reward_probs.ravel())[0, 1]
    assert 0.5 < corr < 0.99
    assert (judged.argmax(axis=0) != best).any()  # the judge is wrong somewhere


def test_queries_mostly_detect_their_category() -> None:
    world = default_world()
    events = sample_events(world, 400, np.random.default_rng(0))
    hits = sum(e.query.task is world.categories[e.category_index] for e in events)
    assert 0.8 * len(events) < hits < len(events)  # realistic: the rules miss a few
    assert len({e.text for e in events}) > 150


def test_same_seed_same_run() -> None:
    world = default_world()
    a = run(world, RandomChooser(), 300, np.random.default_rng(7))
    b = run(world, RandomChooser(), 300, np.random.default_rng(7))
    assert np.array_equal(a.chosen, b.chosen)
    assert np.array_equal(a.rewards, b.rewards)


def test_baselines_order_as_expected() -> None:
    world = default_world()
    score = {
        chooser.name: percent_of_oracle(run(world, chooser, 1000, np.random.default_rng(1)))
        for chooser in (RandomChooser(), BestSingleChooser(), JudgeGreedyChooser(), OracleChooser())
    }
    assert score["oracle"] == pytest.approx(100.0)
    assert score["random"] < score["best-single"] < score["judge-greedy"] < 90.0
    oracle = run(world, OracleChooser(), 200, np.random.default_rng(1))
    assert cumulative_regret(oracle, 200) == pytest.approx(0.0)


def test_vw_beats_baselines_and_regret_flattens() -> None:
    world = default_world()
    vw = run(world, VWChooser(Policy(seed=0)), 1000, np.random.default_rng(0))
    judge = run(world, JudgeGreedyChooser(), 1000, np.random.default_rng(0))
    best = run(world, BestSingleChooser(), 1000, np.random.default_rng(0))
    assert percent_of_oracle(vw, 1000) >= 85.0
    assert percent_of_oracle(vw) > percent_of_oracle(judge) > percent_of_oracle(best)
    first_half = cumulative_regret(vw, 500)
    second_half = cumulative_regret(vw, 1000) - first_half
    assert second_half < first_half


def test_vw_recovers_from_drift() -> None:
    world = drift_world(at_event=600)
    assert world.probs_at(599)[0, 0] == 0.8 and world.probs_at(600)[0, 0] == 0.2
    result = run(world, VWChooser(Policy(seed=0)), 1200, np.random.default_rng(0))
    recovery = drift_recovery_events(world, result)
    assert recovery is not None and recovery <= 300
    frozen = run(world, JudgeGreedyChooser(), 1200, np.random.default_rng(0))
    assert drift_recovery_events(world, frozen) is None
    with pytest.raises(ValueError):
        drift_recovery_events(default_world(), result)


def test_ips_and_snips_on_a_known_case() -> None:
    rewards = [1.0, 0.0, 1.0, 1.0]
    logged = [0.5, 0.5, 0.25, 1.0]
    target = [1.0, 0.0, 0.5, 0.5]
    # Importance weights 2, 0, 2, 0.5: IPS = (2 + 0 + 2 + 0.5) / 4; SNIPS divides by 4.5.
    assert ips(rewards, logged, target) == pytest.approx(4.5 / 4)
    assert snips(rewards, logged, target) == pytest.approx(1.0)
    assert snips([1.0], [0.5], [0.0]) == 0.0
    with pytest.raises(ValueError):
        ips([1.0], [0.0], [1.0])
    with pytest.raises(ValueError):
        snips([1.0, 0.0], [0.5], [1.0])


def test_ips_is_unbiased_on_simulated_logs() -> None:
    world = default_world()
    logged = run(world, RandomChooser(), 4000, np.random.default_rng(3))
    k = len(world.experts)
    target = (logged.chosen == world.reward_probs.argmax(axis=0)[logged.categories]).astype(float)
    estimate = ips(logged.rewards, np.full(len(target), 1.0 / k), target)
    truth = float(world.reward_probs.max(axis=0) @ np.asarray(world.category_weights))
    assert estimate == pytest.approx(truth, abs=0.06)
    assert snips(logged.rewards, np.full(len(target), 1.0 / k), target) == pytest.approx(
        truth, abs=0.06
    )
