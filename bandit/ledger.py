"""Decision log and reward join in SQLite: the record the policy learns from."""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NewType, Protocol

from bandit.features import ExpertFeatures, QueryFeatures

DecisionId = NewType("DecisionId", str)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    decision_id TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    query_sha256 TEXT NOT NULL,
    query_json TEXT NOT NULL,
    candidates_json TEXT NOT NULL,
    probabilities_json TEXT NOT NULL,
    chosen_index INTEGER NOT NULL,
    chosen_probability REAL NOT NULL,
    policy_version INTEGER NOT NULL,
    token_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    served_index INTEGER NOT NULL,
    fallback_reason TEXT
);
CREATE TABLE IF NOT EXISTS rewards (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    decision_id TEXT NOT NULL UNIQUE REFERENCES decisions(decision_id),
    reward REAL NOT NULL,
    rewarded_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS groups (
    group_id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL,
    decision_ids_json TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
"""


class LedgerError(Exception):
    """Base of the errors the ledger raises on purpose."""


class UnknownDecision(LedgerError):
    """No decision with that id was recorded."""


class AlreadyRated(LedgerError):
    """The decision already has its reward; a rating counts once."""


class DuplicateDecision(LedgerError):
    """A decision with that id was already recorded."""


class DecisionStatus(enum.StrEnum):
    """Where a decision is in its life."""

    PENDING = "pending"
    FALLBACK = "fallback"
    RATED = "rated"


@dataclass(frozen=True)
class Decision:
    """One routing decision as logged before the answer goes out."""

    decision_id: DecisionId
    created_ms: int
    query_sha256: str
    query: QueryFeatures
    candidates: tuple[ExpertFeatures, ...]
    probabilities: tuple[float, ...]
    chosen_index: int
    policy_version: int
    token_sha256: str
    status: DecisionStatus = DecisionStatus.PENDING
    served_index: int | None = None
    fallback_reason: str | None = None

    def __post_init__(self) -> None:
        if len(self.candidates) != len(self.probabilities) or not self.candidates:
            raise ValueError("need one probability per candidate, and at least one candidate")
        if not 0 <= self.chosen_index < len(self.candidates):
            raise ValueError("chosen_index out of range")
        if self.served_index is None:
            object.__setattr__(self, "served_index", self.chosen_index)

    @property
    def chosen_probability(self) -> float:
        """The probability the chosen expert was sampled with."""
        return self.probabilities[self.chosen_index]

    @property
    def chosen(self) -> ExpertFeatures:
        """The expert the policy sampled."""
        return self.candidates[self.chosen_index]


@dataclass(frozen=True)
class DecisionGroup:
    """The part decisions of one decomposed query, rated together with one token."""

    group_id: str
    token_sha256: str
    decision_ids: tuple[DecisionId, ...]
    created_ms: int


@dataclass(frozen=True)
class Rewarded:
    """A decision joined with its reward."""

    decision: Decision
    reward: float
    rewarded_ms: int
    seq: int = 0  # the reward's arrival order, for replaying only what a saved policy has not learned


@dataclass(frozen=True)
class LedgerStats:
    """Counts over the whole ledger."""

    decisions: int
    rated: int
    fallbacks: int
    mean_reward: float | None


class Learner(Protocol):
    """What `replay` needs from a policy."""

    def learn(
        self,
        query: QueryFeatures,
        experts: Sequence[ExpertFeatures],
        chosen_index: int,
        probability: float,
        reward: float,
    ) -> None:
        """Update on one logged decision."""
        ...


def new_feedback_token() -> str:
    """A fresh secret that lets only the asker rate the answer."""
    return secrets.token_urlsafe(32)


def token_sha256(token: str) -> str:
    """What the ledger stores instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_token(decision: Decision, token: str) -> bool:
    """Whether `token` is the decision's feedback token (constant-time)."""
    return hmac.compare_digest(token_sha256(token), decision.token_sha256)


def query_sha256(text: str) -> str:
    """The hash the ledger keeps of a query text (the text itself is not stored)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Ledger:
    """SQLite decision log (WAL, synchronous=FULL); safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: every write below opens its own explicit transaction.
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record_decision(self, decision: Decision) -> None:
        """Log a decision; call before the answer goes out."""
        row = (
            decision.decision_id,
            decision.created_ms,
            decision.query_sha256,
            json.dumps(decision.query.to_dict()),
            json.dumps([c.to_dict() for c in decision.candidates]),
            json.dumps(list(decision.probabilities)),
            decision.chosen_index,
            decision.chosen_probability,
            decision.policy_version,
            decision.token_sha256,
            decision.status.value,
            decision.served_index,
            decision.fallback_reason,
        )
        with self._lock:
            try:
                self._conn.execute(
                    "INSERT INTO decisions (decision_id, created_ms, query_sha256, query_json,"
                    " candidates_json, probabilities_json, chosen_index, chosen_probability,"
                    " policy_version, token_sha256, status, served_index, fallback_reason)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
            except sqlite3.IntegrityError as exc:
                raise DuplicateDecision(decision.decision_id) from exc

    def record_fallback(self, decision_id: DecisionId, new_index: int, reason: str) -> None:
        """Note that another candidate served the query because the chosen one failed."""
        with self._lock:
            row = self._conn.execute(
                "SELECT candidates_json FROM decisions WHERE decision_id = ?", (decision_id,)
            ).fetchone()
            if row is None:
                raise UnknownDecision(decision_id)
            if not 0 <= new_index < len(json.loads(row[0])):
                raise ValueError(f"fallback index {new_index} out of range")
            self._conn.execute(
                "UPDATE decisions SET served_index = ?, fallback_reason = ?,"
                " status = CASE status WHEN ? THEN status ELSE ? END WHERE decision_id = ?",
                (
                    new_index,
                    reason,
                    DecisionStatus.RATED.value,
                    DecisionStatus.FALLBACK.value,
                    decision_id,
                ),
            )

    def forget(self, decision_id: DecisionId) -> bool:
        """Delete an unrated decision (a request refused before anything was answered); True when deleted."""
        with self._lock:
            cursor = self._conn.execute(
                "DELETE FROM decisions WHERE decision_id = ? AND decision_id NOT IN (SELECT decision_id FROM rewards)",
                (decision_id,),
            )
            return cursor.rowcount > 0

    def delete_older_than(self, cutoff_ms: int) -> int:
        """Delete decisions (with their rewards and groups) created before `cutoff_ms`; the retention limit."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    "DELETE FROM rewards WHERE decision_id IN (SELECT decision_id FROM decisions WHERE created_ms < ?)",
                    (cutoff_ms,),
                )
                deleted = self._conn.execute("DELETE FROM decisions WHERE created_ms < ?", (cutoff_ms,)).rowcount
                self._conn.execute("DELETE FROM groups WHERE created_ms < ?", (cutoff_ms,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return deleted

    def record_group(self, group: DecisionGroup) -> None:
        """Log the decisions that answered the parts of one decomposed query, under one id and token."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO groups (group_id, token_sha256, decision_ids_json, created_ms) VALUES (?, ?, ?, ?)",
                (group.group_id, group.token_sha256, json.dumps(list(group.decision_ids)), group.created_ms),
            )

    def get_group(self, group_id: str) -> DecisionGroup | None:
        """A group of part decisions, if `group_id` names one."""
        with self._lock:
            row = self._conn.execute(
                "SELECT group_id, token_sha256, decision_ids_json, created_ms FROM groups WHERE group_id = ?", (group_id,)
            ).fetchone()
        if row is None:
            return None
        return DecisionGroup(row[0], row[1], tuple(DecisionId(d) for d in json.loads(row[2])), row[3])

    def record_reward(self, decision_id: DecisionId, reward: float, now_ms: int) -> Decision:
        """Join a reward to its decision, once; returns the decision it rated."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                decision = self._get_locked(decision_id)
                if decision is None:
                    raise UnknownDecision(decision_id)
                try:
                    self._conn.execute(
                        "INSERT INTO rewards (decision_id, reward, rewarded_ms) VALUES (?, ?, ?)",
                        (decision_id, float(reward), now_ms),
                    )
                except sqlite3.IntegrityError as exc:
                    raise AlreadyRated(decision_id) from exc
                self._conn.execute(
                    "UPDATE decisions SET status = ? WHERE decision_id = ?",
                    (DecisionStatus.RATED.value, decision_id),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return decision

    def get(self, decision_id: DecisionId) -> Decision | None:
        """The decision with that id, or None."""
        with self._lock:
            return self._get_locked(decision_id)

    def reward_of(self, decision_id: DecisionId) -> Rewarded | None:
        """The decision joined with its reward, or None if it is not rated."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS}, r.seq AS reward_seq, r.reward, r.rewarded_ms"
                " FROM decisions d JOIN rewards r ON r.decision_id = d.decision_id"
                " WHERE d.decision_id = ?",
                (decision_id,),
            ).fetchone()
        return None if row is None else _rewarded(row)

    def iter_rewarded(self, batch_size: int = 500, *, after_seq: int = 0) -> Iterator[Rewarded]:
        """Rated decisions in the order their rewards arrived (the order to replay), after `after_seq`."""
        after = after_seq
        while True:
            # Paged, so the lock is not held while the caller works on each item.
            with self._lock:
                rows = self._conn.execute(
                    f"SELECT {_COLUMNS}, r.seq AS reward_seq, r.reward, r.rewarded_ms"
                    " FROM rewards r JOIN decisions d ON d.decision_id = r.decision_id"
                    " WHERE r.seq > ? ORDER BY r.seq LIMIT ?",
                    (after, batch_size),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield _rewarded(row)
            after = rows[-1]["reward_seq"]

    def recent(self, limit: int = 5000) -> list[tuple[Decision, float | None]]:
        """The latest decisions, oldest first, each with its reward (None when unrated)."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS}, r.reward FROM decisions d LEFT JOIN rewards r ON r.decision_id = d.decision_id"
                " ORDER BY d.rowid DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [(_decision(row), None if row["reward"] is None else float(row["reward"])) for row in reversed(rows)]

    def stats(self) -> LedgerStats:
        """How many decisions, ratings and fallbacks, and the mean reward."""
        with self._lock:
            decisions, fallbacks = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(served_index != chosen_index), 0) FROM decisions"
            ).fetchone()
            rated, mean = self._conn.execute(
                "SELECT COUNT(*), AVG(reward) FROM rewards"
            ).fetchone()
        return LedgerStats(decisions=decisions, rated=rated, fallbacks=fallbacks, mean_reward=mean)

    def _get_locked(self, decision_id: DecisionId) -> Decision | None:
        """`get` for a caller that holds the lock."""
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM decisions d WHERE d.decision_id = ?", (decision_id,)
        ).fetchone()
        return None if row is None else _decision(row)


_COLUMNS = (
    "d.decision_id, d.created_ms, d.query_sha256, d.query_json, d.candidates_json,"
    " d.probabilities_json, d.chosen_index, d.policy_version, d.token_sha256, d.status,"
    " d.served_index, d.fallback_reason"
)


def _decision(row: sqlite3.Row) -> Decision:
    """A Decision from a row selected with `_COLUMNS`."""
    return Decision(
        decision_id=DecisionId(row["decision_id"]),
        created_ms=row["created_ms"],
        query_sha256=row["query_sha256"],
        query=QueryFeatures.from_dict(json.loads(row["query_json"])),
        candidates=tuple(ExpertFeatures.from_dict(c) for c in json.loads(row["candidates_json"])),
        probabilities=tuple(float(p) for p in json.loads(row["probabilities_json"])),
        chosen_index=row["chosen_index"],
        policy_version=row["policy_version"],
        token_sha256=row["token_sha256"],
        status=DecisionStatus(row["status"]),
        served_index=row["served_index"],
        fallback_reason=row["fallback_reason"],
    )


def _rewarded(row: sqlite3.Row) -> Rewarded:
    """A Rewarded from a row selected with `_COLUMNS` plus the reward columns."""
    return Rewarded(_decision(row), float(row["reward"]), int(row["rewarded_ms"]), int(row["reward_seq"]))


def replay(
    ledger: Ledger, policy: Learner, *, after_seq: int = 0, seen: Callable[[Rewarded], None] | None = None
) -> int:
    """Teach `policy` every rated decision after `after_seq`, in arrival order; returns how many it learned.

    Rebuilds a policy whose model file was lost or corrupt, and catches a live one up with new
    ratings. Decisions served by a fallback are skipped: their rating is about an expert the policy
    did not sample, so learning it with the sampled probability would bias the estimate. `seen` is
    told of every rating in order, learned or skipped (the router counts them and keeps its place).
    """
    learned = 0
    for item in ledger.iter_rewarded(after_seq=after_seq):
        decision = item.decision
        if decision.served_index == decision.chosen_index:
            policy.learn(
                decision.query,
                decision.candidates,
                decision.chosen_index,
                decision.chosen_probability,
                item.reward,
            )
            learned += 1
        if seen is not None:
            seen(item)
    return learned
