"""The SQLite decision ledger: persistence, one rating per decision, crash safety."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from bandit.features import ExpertFeatures, ExpertId, NodeId, QueryFeatures, query_features
from bandit.ledger import (
    AlreadyRated,
    Decision,
    DecisionId,
    DecisionStatus,
    DuplicateDecision,
    Ledger,
    UnknownDecision,
    check_token,
    new_feedback_token,
    query_sha256,
    replay,
    token_sha256,
)

EXPERTS = (
    ExpertFeatures(ExpertId("a"), NodeId("n1"), "llama", "1B", "q4_0", {"knowledge": 0.7}, 120.0),
    ExpertFeatures(ExpertId("b"), NodeId("n2"), "qwen", "0.5B", "q8_0", {}, None, 3, False),
)


def _decision(decision_id: str, token: str = "tok", chosen: int = 0) -> Decision:
    text = "Who wrote Hamlet?"
    return Decision(
        decision_id=DecisionId(decision_id),
        created_ms=1_700_000_000_000,
        query_sha256=query_sha256(text),
        query=query_features(text),
        candidates=EXPERTS,
        probabilities=(0.75, 0.25),
        chosen_index=chosen,
        policy_version=7,
        token_sha256=token_sha256(token),
    )


class _Recorder:
    """A hand-written learner that remembers what it was taught."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float, float]] = []

    def learn(
        self,
        query: QueryFeatures,
        experts: Sequence[ExpertFeatures],
        chosen_index: int,
        probability: float,
        reward: float,
    ) -> None:
        self.calls.append((chosen_index, probability, reward))


def test_decision_round_trips_and_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    original = _decision("d1")
    with Ledger(path) as ledger:
        ledger.record_decision(original)
        assert ledger.get(DecisionId("d1")) == original
        assert ledger.get(DecisionId("nope")) is None
    with Ledger(path) as reopened:
        got = reopened.get(DecisionId("d1"))
        assert got == original
        assert got is not None and got.chosen_probability == 0.75
        assert got.chosen == EXPERTS[0]
        reopened.record_reward(DecisionId("d1"), 1.0, now_ms=5)
    with Ledger(path) as again:
        rated = again.reward_of(DecisionId("d1"))
        assert rated is not None and rated.reward == 1.0 and rated.rewarded_ms == 5
        assert rated.decision.status is DecisionStatus.RATED


def test_uses_wal_and_full_sync(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite") as ledger:
        conn = ledger._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_reward_counts_once(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite") as ledger:
        ledger.record_decision(_decision("d1"))
        ledger.record_reward(DecisionId("d1"), 1.0, now_ms=10)
        with pytest.raises(AlreadyRated):
            ledger.record_reward(DecisionId("d1"), 0.0, now_ms=11)
        rated = ledger.reward_of(DecisionId("d1"))
        assert rated is not None and rated.reward == 1.0
        with pytest.raises(UnknownDecision):
            ledger.record_reward(DecisionId("ghost"), 1.0, now_ms=12)
        with pytest.raises(DuplicateDecision):
            ledger.record_decision(_decision("d1"))
        assert ledger.stats().rated == 1


def test_feedback_token_is_checked_and_never_stored(tmp_path: Path) -> None:
    token = new_feedback_token()
    assert len(token) >= 40 and token != new_feedback_token()
    path = tmp_path / "l.sqlite"
    with Ledger(path) as ledger:
        ledger.record_decision(_decision("d1", token=token))
        stored = ledger.get(DecisionId("d1"))
    assert stored is not None
    assert check_token(stored, token)
    assert not check_token(stored, token + "x")
    assert not check_token(stored, "")
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert token.encode() not in raw


def test_fallback_is_recorded_and_skipped_by_replay(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite") as ledger:
        for i in range(3):
            ledger.record_decision(_decision(f"d{i}", chosen=i % 2))
        ledger.record_fallback(DecisionId("d1"), 0, "peer_unavailable")
        got = ledger.get(DecisionId("d1"))
        assert got is not None
        assert got.status is DecisionStatus.FALLBACK
        assert got.served_index == 0 and got.chosen_index == 1
        assert got.fallback_reason == "peer_unavailable"
        with pytest.raises(UnknownDecision):
            ledger.record_fallback(DecisionId("ghost"), 0, "x")
        with pytest.raises(ValueError):
            ledger.record_fallback(DecisionId("d0"), 5, "x")
        # Rewards arrive out of decision order; replay follows arrival.
        ledger.record_reward(DecisionId("d2"), 0.0, now_ms=1)
        ledger.record_reward(DecisionId("d1"), 1.0, now_ms=2)
        ledger.record_reward(DecisionId("d0"), 1.0, now_ms=3)
        assert [r.decision.decision_id for r in ledger.iter_rewarded(batch_size=1)] == [
            "d2",
            "d1",
            "d0",
        ]
        learner = _Recorder()
        assert replay(ledger, learner) == 2
        assert learner.calls == [(0, 0.75, 0.0), (0, 0.75, 1.0)]
        stats = ledger.stats()
        assert (stats.decisions, stats.rated, stats.fallbacks) == (3, 3, 1)
        assert stats.mean_reward == pytest.approx(2 / 3)


def test_empty_stats(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite") as ledger:
        stats = ledger.stats()
    assert (stats.decisions, stats.rated, stats.fallbacks, stats.mean_reward) == (0, 0, 0, None)


def test_decision_survives_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite"
    script = textwrap.dedent(
        f"""
        import os
        from bandit.features import ExpertFeatures, ExpertId, NodeId, QueryFeatures, query_features
        from bandit.ledger import Decision, DecisionId, Ledger, token_sha256
        expert = ExpertFeatures(ExpertId("a"), NodeId("n1"), "llama", "1B", "q4_0")
        ledger = Ledger({str(path)!r})
        ledger.record_decision(Decision(
            decision_id=DecisionId("crashy"), created_ms=1, query_sha256="h",
            query=query_features("Who wrote Hamlet?"), candidates=(expert,),
            probabilities=(1.0,), chosen_index=0, policy_version=3,
            token_sha256=token_sha256("t"),
        ))
        ledger.record_reward(DecisionId("crashy"), 1.0, now_ms=42)
        os._exit(0)  # no close, no checkpoint
        """
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, cwd=root)
    with Ledger(path) as ledger:
        rated = ledger.reward_of(DecisionId("crashy"))
    assert rated is not None
    assert (rated.reward, rated.rewarded_ms) == (1.0, 42)
    assert rated.decision.policy_version == 3
    assert rated.decision.query == query_features("Who wrote Hamlet?")


def test_decision_rejects_inconsistent_input() -> None:
    with pytest.raises(ValueError):
        Decision(
            decision_id=DecisionId("x"),
            created_ms=0,
            query_sha256="",
            query=query_features("hi"),
            candidates=EXPERTS,
            probabilities=(1.0,),
            chosen_index=0,
            policy_version=0,
            token_sha256="",
        )


def test_rewards_reference_decisions(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite") as ledger:
        with pytest.raises(sqlite3.IntegrityError):
            ledger._conn.execute(
                "INSERT INTO rewards (decision_id, reward, rewarded_ms) VALUES ('zz', 1, 1)"
            )
