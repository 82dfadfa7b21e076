"""Glue between requests and the bandit: candidates -> policy -> ledger, and feedback -> ledger -> policy."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bandit.community import CommunityUse
from bandit.features import ExpertFeatures, QueryFeatures, query_features
from bandit.ledger import (
    AlreadyRated,
    Decision,
    DecisionGroup,
    DecisionId,
    Ledger,
    Rewarded,
    UnknownDecision,
    check_token,
    new_feedback_token,
    query_sha256,
    replay,
    token_sha256,
)
from bandit.policy import Policy, PolicyLoadError, rng_for_decision, sample_index
from node.errors import Conflict, Forbidden, NotFound
from node.judging.trust import Assessment
from node.routing.community import Community
from node.serving.expert import Expert
from node.state_files import corrupt_ledger

log = logging.getLogger(__name__)

POLICY_FILE = "router.policy"
LEDGER_FILE = "ledger.db"
AUTOSAVE_INTERVAL_S = 30.0
RATINGS = {"up": 1.0, "down": 0.0}
EXPLAIN_FEATURES = 5
SALT_FILE = "ledger_salt"
# The router reads at most this much of a query: features of a 1 MB message are no better than of its start and end.
MAX_ROUTING_CHARS = 8192
RETENTION_CHECK_S = 3600.0


@dataclass(frozen=True)
class RouteConstraints:
    """What a user allows for one request, on top of the node's approved set."""

    approved: tuple[str, ...] = ()  # empty: everything the node approves
    exclude: tuple[str, ...] = ()
    local_only: bool = False
    max_latency_ms: float | None = None
    min_scores: Mapping[str, float] = field(default_factory=dict)
    verified_only: bool = False  # only local experts and remote ones this node verified


@dataclass(frozen=True)
class Candidate:
    """One expert on one node that may answer, with what the bandit sees of it."""

    features: ExpertFeatures
    expert: Expert
    assessment: Assessment = field(default_factory=Assessment)

    @property
    def sha256(self) -> str:
        """The model file's digest."""
        return self.expert.card.sha256

    @property
    def name(self) -> str:
        """The model's name."""
        return self.expert.card.name

    @property
    def verified(self) -> bool:
        """Local, or remote and checked by this node (or a judge the user trusts)."""
        return self.expert.local or self.assessment.verified


@dataclass(frozen=True)
class Routed:
    """A recorded decision and the order to try its candidates in (chosen first)."""

    decision: Decision
    candidates: tuple[Candidate, ...]
    order: tuple[int, ...]
    token: str
    explanation: dict[str, Any]


def _matches(candidate: Candidate, patterns: Sequence[str]) -> bool:
    """Whether a node id, expert id, model name or family, or sha256 (12+ hex prefix) names the candidate."""
    f = candidate.features
    for pattern in patterns:
        if pattern in (f.node_id, f.expert_id, candidate.name, f.family):
            return True
        if len(pattern) >= 12 and candidate.sha256.startswith(pattern.lower()):
            return True
    return False


def _allowed(candidate: Candidate, constraints: RouteConstraints) -> bool:
    """Whether a candidate passes one set of constraints."""
    f = candidate.features
    if constraints.approved and not _matches(candidate, constraints.approved):
        return False
    if constraints.exclude and _matches(candidate, constraints.exclude):
        return False
    if constraints.local_only and not f.local:
        return False
    if constraints.verified_only and not candidate.verified:
        return False
    if constraints.max_latency_ms is not None and f.latency_ms_avg is not None and f.latency_ms_avg > constraints.max_latency_ms:
        return False
    for dimension, minimum in constraints.min_scores.items():
        if f.scores.get(dimension, -1.0) < minimum:
            return False
    return True


def routing_text(text: str) -> str:
    """What the router reads of a query: all of a short one, the start and end of a long one."""
    if len(text) <= MAX_ROUTING_CHARS:
        return text
    half = MAX_ROUTING_CHARS // 2
    return text[:half] + " " + text[-half:]


def cap_unverified_share(probabilities: Sequence[float], unverified: Sequence[bool], cap: float) -> list[float]:
    """Probabilities with at most `cap` in total on unverified candidates; the rest moves to verified ones pro rata.

    The capped probabilities are what is sampled from and logged, so learning stays unbiased.
    Nothing moves when every candidate is unverified (there is nowhere to move it).
    """
    probs = [max(0.0, float(p)) for p in probabilities]
    mass = sum(p for p, u in zip(probs, unverified, strict=True) if u)
    if mass <= cap or all(unverified) or not any(unverified):
        return probs
    verified_mass = sum(p for p, u in zip(probs, unverified, strict=True) if not u)
    verified_count = sum(1 for u in unverified if not u)
    out = []
    for p, u in zip(probs, unverified, strict=True):
        if u:
            out.append(p * cap / mass)
        elif verified_mass > 0:
            out.append(p / verified_mass * (1 - cap))
        else:
            out.append((1 - cap) / verified_count)
    total = sum(out)
    return [p / total for p in out]


def _evidence_line(candidate: Candidate) -> str:
    """Which evidence backed the chosen expert, in words."""
    a = candidate.assessment
    where = "local expert" if candidate.expert.local else ("verified remote expert" if a.verified else "unverified remote expert")
    return f"{where}; scores from {a.describe()}" + (f" ({', '.join(a.judges)})" if a.judges else "")


def _load_salt(path: Path) -> bytes:
    """This node's secret key for hashing query words in the ledger, created once."""
    from node.state_files import write_private_atomically

    try:
        data = path.read_bytes()
        if len(data) >= 16:
            return data
    except FileNotFoundError:
        pass
    salt = secrets.token_bytes(32)
    write_private_atomically(path, salt)
    return salt


class Router:
    """Chooses experts with the bandit and learns from feedback; the only user of the VW workspace."""

    def __init__(
        self,
        experts: Callable[[], Sequence[Expert]],
        data_dir: Path,
        *,
        node_constraints: RouteConstraints = RouteConstraints(),
        exploration: str = "squarecb",
        assess: Callable[[str, str | None], Assessment] = lambda _sha256, _owner: Assessment(),
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        community: Community | None = None,
        unverified_share_max: float = 1.0,
        plain_words: bool = False,
        retention_days: float = 0.0,
    ) -> None:
        self._experts = experts
        self.community = community
        self._node_constraints = node_constraints
        self._exploration = exploration
        self._assess = assess
        self._clock_ms = clock_ms
        self._unverified_share_max = unverified_share_max
        self._plain_words = plain_words
        self._retention_ms = int(retention_days * 86_400_000)
        self._salt = None if plain_words else _load_salt(data_dir / SALT_FILE)
        self._policy_path = data_dir / POLICY_FILE
        try:
            self.ledger = Ledger(data_dir / LEDGER_FILE)
        except sqlite3.DatabaseError as exc:
            raise corrupt_ledger(data_dir / LEDGER_FILE, exc) from exc
        # VW's workspace is not thread-safe: every policy call runs on this one thread.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router")
        self._policy: Policy | None = None
        self._learned_seq = 0
        self._saved_version = -1
        self._autosave: asyncio.Task | None = None

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the saved policy, or rebuild it from the ledger, then catch up on newer feedback."""
        await self._in_thread(self._load)
        self._autosave = asyncio.create_task(self._autosave_loop(), name="router-autosave")

    def _load(self) -> None:
        try:
            self._policy = Policy.load(self._policy_path)
            self._learned_seq = int(self._policy.meta.get("learned_seq", 0))
            log.info("router: policy version %d loaded", self._policy.version)
        except PolicyLoadError as exc:
            if self._policy_path.exists():
                log.warning("router: policy file unusable (%s); rebuilding it from the ledger", exc)
            self._policy = Policy(self._exploration)
            self._learned_seq = 0
        if self.community is not None:
            counted = self.community.catch_up(self.ledger.iter_rewarded())
            log.info("router: %d ratings summarized for community learning", counted)
        replayed = self._replay()
        if replayed:
            log.info("router: learned %d ratings from the ledger", replayed)
            self._save()

    def _replay(self) -> int:
        """Teach the policy every rating it has not learned yet, in arrival order (and count each for the community)."""

        def seen(item: Rewarded) -> None:
            if self.community is not None:
                self.community.record(item)
            self._learned_seq = item.seq

        assert self._policy is not None  # loaded before anything is replayed
        return replay(self.ledger, self._policy, after_seq=self._learned_seq, seen=seen)

    def _save(self) -> None:
        if self._policy is not None and self._policy.version != self._saved_version:
            self._policy.save(self._policy_path, meta={"learned_seq": self._learned_seq})
            self._saved_version = self._policy.version

    async def _autosave_loop(self) -> None:
        last_retention_s = 0.0
        while True:
            if self._retention_ms and time.monotonic() - last_retention_s >= RETENTION_CHECK_S:
                last_retention_s = time.monotonic()
                deleted = await self._in_thread(self.ledger.delete_older_than, self._clock_ms() - self._retention_ms)
                if deleted:
                    log.info("router: deleted %d decisions past the retention limit", deleted)
            await asyncio.sleep(AUTOSAVE_INTERVAL_S)
            try:
                await self._in_thread(self._save)
            except OSError as exc:
                log.warning("router: could not save the policy: %s", exc)

    async def close(self) -> None:
        """Save the policy and close the ledger."""
        if self._autosave is not None:
            self._autosave.cancel()
        await self._in_thread(self._save)
        await self._in_thread(self._close_policy)
        self._thread.shutdown(wait=True)
        self.ledger.close()

    def _close_policy(self) -> None:
        if self._policy is not None:
            self._policy.close()
            self._policy = None

    # ---- choosing -----------------------------------------------------------------------

    def candidates(self, constraints: RouteConstraints) -> list[Candidate]:
        """Alive, approved experts (local and remote) that meet the request's constraints."""
        found: list[Candidate] = []
        for expert in self._experts():
            assessed = self._assess(expert.card.sha256, None if expert.local else expert.node_id)
            found.append(Candidate(expert.features(assessed.scores), expert, assessed))
        return [c for c in found if _allowed(c, self._node_constraints) and _allowed(c, constraints)]

    async def route(self, text: str, constraints: RouteConstraints) -> Routed:
        """Choose an expert for `text` and record the decision before anything is answered."""
        candidates = self.candidates(constraints)
        if not candidates:
            raise NotFound("no approved expert is available for this request (check expertmesh constraints)", param="model")
        features = [c.features for c in candidates]
        unverified = [not c.verified for c in candidates]
        token = new_feedback_token()
        # Feature extraction of a long text is real work: it runs on the router thread, not the loop.
        decision, top, community = await self._in_thread(
            self._decide, routing_text(text), features, unverified, token_sha256(token)
        )
        query = decision.query
        probabilities, chosen = decision.probabilities, decision.chosen_index
        rest = sorted((i for i in range(len(candidates)) if i != chosen), key=lambda i: -probabilities[i])
        explanation = {
            "task": query.task.value,
            "candidates": [
                {
                    "expert": c.features.expert_id,
                    "node": c.features.node_id,
                    "local": c.features.local,
                    "probability": round(p, 4),
                    "verified": c.verified,
                    "evidence": c.assessment.describe(),
                }
                for c, p in sorted(zip(candidates, probabilities, strict=True), key=lambda cp: -cp[1])
            ],
            "evidence": _evidence_line(candidates[chosen]),
            "top_features": [[name, round(weight, 4)] for name, weight in top],
        }
        if community is not None:
            # Other nodes' users' ratings weighed in this choice: say so, and how many nodes they came from.
            explanation["community"] = {"reporters": community.reporters, "expected_reward": dict(community.experts)}
        return Routed(decision, tuple(candidates), (chosen, *rest), token, explanation)

    def _decide(
        self, text: str, features: list[ExpertFeatures], unverified: list[bool], token_hash: str
    ) -> tuple[Decision, list[tuple[str, float]], CommunityUse | None]:
        """On the router thread: probabilities, a sample seeded by the decision id, the ledger record, the explanation."""
        policy = self._policy
        assert policy is not None  # loaded by start() before any request is routed
        query = self._private(query_features(text))
        decision_id = DecisionId(uuid.uuid4().hex)
        community = None
        if self.community is not None:
            # The ledger logs the candidates as the policy saw them, community prior included, so replay is exact.
            features, community = self.community.apply(features, query.task)
        probabilities = cap_unverified_share(policy.probabilities(query, features), unverified, self._unverified_share_max)
        chosen = sample_index(probabilities, rng_for_decision(decision_id))
        decision = Decision(
            decision_id=decision_id,
            created_ms=self._clock_ms(),
            query_sha256=query_sha256(text),
            query=query,
            candidates=tuple(features),
            probabilities=tuple(probabilities),
            chosen_index=chosen,
            policy_version=policy.version,
            token_sha256=token_hash,
        )
        self.ledger.record_decision(decision)
        return decision, policy.top_features(query, features[chosen], k=EXPLAIN_FEATURES), community

    def _private(self, query: QueryFeatures) -> QueryFeatures:
        """The query as the ledger keeps it: words as keyed hashes unless plain words are configured."""
        if self._salt is None:
            return query
        hashed = tuple("h" + hmac.new(self._salt, w.encode(), hashlib.sha256).hexdigest()[:12] for w in query.words)
        return dataclasses.replace(query, words=hashed)

    async def forget(self, decision_id: str) -> None:
        """Delete a decision whose request was refused before any answer: nothing to learn from it."""
        await self._in_thread(self.ledger.forget, DecisionId(decision_id))

    async def record_fallback(self, decision_id: str, index: int, reason: str) -> None:
        """Note in the ledger that another candidate answered."""
        await self._in_thread(self.ledger.record_fallback, DecisionId(decision_id), index, reason)

    # ---- feedback -----------------------------------------------------------------------

    async def feedback(self, decision_id: str, token: str, reward: float) -> Decision | None:
        """Store a rating (403 wrong token, 404 unknown, 409 rated already), then learn from it.

        A decomposed answer's group id rates each of its parts not rated on its own yet.
        """
        decision = await self._in_thread(self.ledger.get, DecisionId(decision_id))
        if decision is None:
            group = await self._in_thread(self.ledger.get_group, decision_id)
            if group is None:
                raise NotFound(f"no decision {decision_id!r}", param="decision_id")
            await self._group_feedback(group, token, reward)
            return None
        if not check_token(decision, token):
            raise Forbidden("the feedback token does not match this decision", param="token")
        try:
            decision = await self._in_thread(self.ledger.record_reward, DecisionId(decision_id), reward, self._clock_ms())
        except AlreadyRated as exc:
            raise Conflict(f"decision {decision_id!r} was rated already", param="decision_id") from exc
        except UnknownDecision as exc:
            raise NotFound(f"no decision {decision_id!r}", param="decision_id") from exc
        await self._in_thread(self._replay)  # the rating is stored; learn it (and anything missed) in order
        return decision

    async def record_group(self, decision_ids: Sequence[str]) -> tuple[str, str]:
        """One id and token to rate every part of a decomposed answer at once."""
        group_id, token = uuid.uuid4().hex, new_feedback_token()
        group = DecisionGroup(group_id, token_sha256(token), tuple(DecisionId(d) for d in decision_ids), self._clock_ms())
        await self._in_thread(self.ledger.record_group, group)
        return group_id, token

    async def _group_feedback(self, group: DecisionGroup, token: str, reward: float) -> None:
        """Rate every part of a decomposed answer that was not rated on its own yet."""
        if not hmac.compare_digest(token_sha256(token), group.token_sha256):
            raise Forbidden("the feedback token does not match this decision", param="token")
        rated = 0
        for decision_id in group.decision_ids:
            try:
                await self._in_thread(self.ledger.record_reward, decision_id, reward, self._clock_ms())
                rated += 1
            except AlreadyRated:
                continue
        if rated == 0:
            raise Conflict(f"every part of {group.group_id!r} was rated already", param="decision_id")
        await self._in_thread(self._replay)

    async def decision(self, decision_id: str) -> tuple[Decision, float | None]:
        """A recorded decision and its reward, if rated."""
        decision = await self._in_thread(self.ledger.get, DecisionId(decision_id))
        if decision is None:
            raise NotFound(f"no decision {decision_id!r}", param="decision_id")
        rewarded = await self._in_thread(self.ledger.reward_of, DecisionId(decision_id))
        return decision, None if rewarded is None else rewarded.reward

    async def stats(self, window: int = 5000, points: int = 50) -> dict[str, Any]:
        """Reward over time and who answered which kind of query, from the latest decisions."""
        history = await self._in_thread(self.ledger.recent, window)
        rated = [(d, r) for d, r in history if r is not None]
        step = max(1, len(rated) // points)
        reward_over_time = []
        for start in range(0, len(rated), step):
            bucket = rated[start : start + step]
            reward_over_time.append(
                {
                    "t_ms": bucket[-1][0].created_ms,
                    "reward": round(sum(r for _, r in bucket) / len(bucket), 4),
                    "n": start + len(bucket),
                }
            )
        share_by_expert: dict[str, int] = {}
        share_by_task: dict[str, dict[str, int]] = {}
        for decision, _ in history:
            served = decision.candidates[decision.served_index].expert_id
            share_by_expert[served] = share_by_expert.get(served, 0) + 1
            by_task = share_by_task.setdefault(decision.query.task.value, {})
            by_task[served] = by_task.get(served, 0) + 1
        return {
            "decisions": len(history),
            "rated": len(rated),
            "mean_reward": round(sum(r for _, r in rated) / len(rated), 4) if rated else None,
            "policy_version": self.policy_version,
            "reward_over_time": reward_over_time,
            "share_by_expert": share_by_expert,
            "share_by_task": share_by_task,
            **({"community": await self._in_thread(self.community.status)} if self.community is not None else {}),
        }

    @property
    def policy_version(self) -> int:
        """How many ratings the live policy has learned."""
        return 0 if self._policy is None else self._policy.version
