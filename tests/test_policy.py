"""The VW policy: probabilities, learning, warm start, persistence, explanations."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bandit.features import ExpertFeatures, ExpertId, NodeId, query_features
from bandit.ledger import Decision, DecisionId, Ledger, replay, token_sha256
from bandit.policy import (
    Policy,
    PolicyLoadError,
    reward_to_cost,
    rng_for_decision,
    sample_index,
)
from bandit.simulate import (
    JudgeGreedyChooser,
    VWChooser,
    default_world,
    percent_of_oracle,
    run,
    sample_events,
)


def _expert(name: str, scores: dict[str, float]) -> ExpertFeatures:
    return ExpertFeatures(
        expert_id=ExpertId(name),
        node_id=NodeId("node-" + name),
        family="llama",
        params="1B",
        quantization="q4_k_m",
        scores=scores,
    )


MATH = _expert("math", {"arithmetic": 0.9, "knowledge": 0.3})
TRIVIA = _expert("trivia", {"arithmetic": 0.2, "knowledge": 0.8})
BLANK = _expert("blank", {})


def _train(policy: Policy, n_events: int, seed: int) -> None:
    """Feed `policy` simulated traffic with its own choices."""
    world = default_world()
    run(world, VWChooser(policy), n_events, np.random.default_rng(seed))


def test_probabilities_are_a_distribution_in_candidate_order() -> None:
    policy = Policy()
    q = query_features("What is 12*7?")
    probs = policy.probabilities(q, [TRIVIA, MATH, BLANK])
    assert len(probs) == 3
    assert sum(probs) == pytest.approx(1.0)
    assert all(p > 0 for p in probs)
    assert max(probs) == probs[1]
    assert policy.probabilities(q, [MATH]) == [1.0]
    with pytest.raises(ValueError):
        policy.probabilities(q, [])


def test_warm_start_follows_judged_score_for_detected_task() -> None:
    policy = Policy()
    assert policy.version == 0
    arithmetic = policy.probabilities(query_features("Calculate 17 * 23"), [TRIVIA, MATH])
    knowledge = policy.probabilities(query_features("Who wrote Hamlet?"), [TRIVIA, MATH])
    assert arithmetic[1] > 0.7 > arithmetic[0]
    assert knowledge[0] > 0.7 > knowledge[1]
    # Unjudged experts still get explored, just less than a well-judged one.
    with_blank = policy.probabilities(query_features("Calculate 17 * 23"), [MATH, BLANK])
    assert with_blank[0] > with_blank[1] > 0.0
    # Without the prior, nothing separates them before feedback.
    unprimed = Policy(prior_weight=0.0)
    flat = unprimed.probabilities(query_features("Calculate 17 * 23"), [TRIVIA, MATH])
    assert flat == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("seed", range(10))  # every seed in a range: seed 0 alone hid that the claim needs exploration
def test_feedback_overrides_the_card(seed: int) -> None:
    """Users' ratings beat a wrong card within a few queries of exploration first trying the other expert."""
    policy = Policy()
    q = query_features("Who wrote Hamlet?")
    experts = [TRIVIA, MATH]
    rng = random.Random(seed)
    explored_at: int | None = None
    for t in range(2000):  # the card leaves "math" 0.5% a query: not tried in 2000 has probability 5e-5
        probs = policy.probabilities(q, experts)
        i = sample_index(probs, rng)
        # The card is wrong: "math" is the one users like for this question.
        policy.learn(q, experts, i, probs[i], 1.0 if i == 1 else 0.0)
        if i == 1 and explored_at is None:
            explored_at = t
        if explored_at is not None and t >= explored_at + 20:
            break
    assert explored_at is not None
    assert policy.version == explored_at + 21
    assert policy.probabilities(q, experts)[1] > 0.8


def test_learns_on_the_simulator() -> None:
    world = default_world()
    vw = run(world, VWChooser(Policy(seed=0)), 1000, np.random.default_rng(0))
    judge = run(world, JudgeGreedyChooser(), 1000, np.random.default_rng(0))
    assert percent_of_oracle(vw, 1000) >= 85.0
    assert percent_of_oracle(vw, 1000) > percent_of_oracle(judge, 1000) + 3.0


def test_reward_to_cost_is_the_negation() -> None:
    assert reward_to_cost(1.0) == -1.0
    assert reward_to_cost(0.0) == 0.0


def test_learn_rejects_bad_input() -> None:
    policy = Policy()
    q = query_features("hi")
    with pytest.raises(ValueError):
        policy.learn(q, [MATH, TRIVIA], 2, 0.5, 1.0)
    with pytest.raises(ValueError):
        policy.learn(q, [MATH, TRIVIA], 0, 0.0, 1.0)
    with pytest.raises(ValueError):
        policy.learn(q, [MATH, TRIVIA], 0, 0.5, float("nan"))
    assert policy.version == 0


def test_save_load_resumes_identical_probabilities(tmp_path: Path) -> None:
    policy = Policy(seed=3)
    _train(policy, 300, seed=3)
    path = tmp_path / "policy.bin"
    policy.save(path)
    loaded = Policy.load(path, seed=3)
    assert loaded.version == policy.version == 300
    assert loaded.exploration == "squarecb"
    world = default_world()
    events = sample_events(world, 20, np.random.default_rng(9))
    for event in events:
        assert loaded.probabilities(event.query, world.experts) == pytest.approx(
            policy.probabilities(event.query, world.experts), abs=1e-6
        )
    # And they keep learning in step.
    for p in (policy, loaded):
        p.learn(events[0].query, world.experts, 1, 0.3, 1.0)
    assert loaded.probabilities(events[1].query, world.experts) == pytest.approx(
        policy.probabilities(events[1].query, world.experts), abs=1e-6
    )
    assert not list(tmp_path.glob(".policy-*"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "empty", "missing"])
def test_damaged_file_raises_policy_load_error(tmp_path: Path, damage: str) -> None:
    policy = Policy()
    _train(policy, 50, seed=1)
    path = tmp_path / "policy.bin"
    policy.save(path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 40])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a model" * 20)
    elif damage == "flip":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(PolicyLoadError):
        Policy.load(path)


def test_corrupt_file_then_rebuild_by_replay(tmp_path: Path) -> None:
    world = default_world()
    events = sample_events(world, 300, np.random.default_rng(4))
    luck = np.random.default_rng(5).random(len(events))
    live = Policy(seed=4)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        for event in events:
            decision_id = DecisionId(f"d-{event.index}")
            probs = live.probabilities(event.query, world.experts)
            chosen = sample_index(probs, rng_for_decision(decision_id))
            ledger.record_decision(
                Decision(
                    decision_id=decision_id,
                    created_ms=event.index,
                    query_sha256="x",
                    query=event.query,
                    candidates=world.experts,
                    probabilities=tuple(probs),
                    chosen_index=chosen,
                    policy_version=live.version,
                    token_sha256=token_sha256("t"),
                )
            )
            p_true = world.reward_probs[chosen, event.category_index]
            reward = 1.0 if luck[event.index] < p_true else 0.0
            ledger.record_reward(decision_id, reward, now_ms=event.index)
            live.learn(event.query, world.experts, chosen, probs[chosen], reward)
        path = tmp_path / "policy.bin"
        live.save(path)
        path.write_bytes(path.read_bytes()[:100])
        with pytest.raises(PolicyLoadError):
            Policy.load(path, seed=4)
        rebuilt = Policy(seed=4)
        assert replay(ledger, rebuilt) == 300
    assert rebuilt.version == live.version
    for event in events[:20]:
        assert rebuilt.probabilities(event.query, world.experts) == pytest.approx(
            live.probabilities(event.query, world.experts), abs=1e-6
        )


def test_sample_index_is_reproducible_per_decision_id() -> None:
    probs = [0.1, 0.6, 0.0, 0.3]
    first = [sample_index(probs, rng_for_decision(f"dec-{i}")) for i in range(200)]
    second = [sample_index(probs, rng_for_decision(f"dec-{i}")) for i in range(200)]
    assert first == second
    counts = Counter(first)
    assert counts[2] == 0
    assert counts[1] > counts[3] > counts[0] > 0
    assert sample_index([0.0, 1.0], random.Random(1)) == 1
    with pytest.raises(ValueError):
        sample_index([0.0, 0.0], random.Random(1))


def test_top_features_explain_the_choice() -> None:
    policy = Policy(seed=2)
    q = query_features("Calculate 17 * 23")
    fresh = policy.top_features(q, MATH)
    assert fresh[0][0] == "s^task_score"
    assert fresh[0][1] == pytest.approx(0.9, abs=1e-3)
    _train(policy, 400, seed=2)
    world = default_world()
    for task in world.categories:
        query = query_features(world.query_text(task, np.random.default_rng(0)))
        probs = policy.probabilities(query, world.experts)
        totals = [sum(v for _, v in policy.top_features(query, e, k=10_000)) for e in world.experts]
        # The per-feature weights add up to VW's own ranking.
        assert int(np.argmax(totals)) == int(np.argmax(probs)), task
    sentiment = query_features("Classify the sentiment: awful")
    learned = policy.top_features(sentiment, world.experts[3], k=50)
    assert any("*a^id=sorter" in name for name, _ in learned)


def test_other_explorations_work() -> None:
    q = query_features("Who wrote Hamlet?")
    for exploration in ("epsilon", "softmax"):
        policy = Policy(exploration, epsilon=0.1)
        probs = policy.probabilities(q, [MATH, TRIVIA])
        assert probs[1] > probs[0]
        policy.learn(q, [MATH, TRIVIA], 1, probs[1], 1.0)
    with pytest.raises(ValueError):
        Policy("thompson")


def test_prior_evidence_fades_the_card_per_cell_and_is_saved(tmp_path: Path) -> None:
    q = query_features("What is 12*7?")
    policy = Policy(prior_evidence=4.0)
    assert policy.prior_scale(MATH, q.task) == 1.0
    # MATH's card says 0.9 on arithmetic but it keeps failing: after 4 ratings its card counts half.
    for _ in range(4):
        probs = policy.probabilities(q, [MATH, TRIVIA])
        policy.learn(q, [MATH, TRIVIA], 0, probs[0], 0.0)
    assert policy.prior_scale(MATH, q.task) == pytest.approx(0.5)
    assert policy.prior_scale(TRIVIA, q.task) == 1.0  # never tried there: its card stands
    assert policy.prior_scale(MATH, query_features("Who wrote Hamlet?").task) == 1.0
    explained = dict(policy.top_features(q, MATH, k=50))
    assert "s^task_score" in explained
    path = tmp_path / "policy.bin"
    policy.save(path)
    loaded = Policy.load(path)
    assert loaded.prior_scale(MATH, q.task) == pytest.approx(0.5)
    assert loaded.probabilities(q, [MATH, TRIVIA]) == pytest.approx(policy.probabilities(q, [MATH, TRIVIA]))
    # Off (the default), the card never fades.
    plain = Policy()
    plain.learn(q, [MATH, TRIVIA], 0, 0.5, 0.0)
    assert plain.prior_scale(MATH, q.task) == 1.0
