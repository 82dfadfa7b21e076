"""The node's judge: judges its own experts at start, peers' experts on demand, and keeps every card it sees."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import ExpertBusy, InvalidRequest, ModelNotFound, NodeError
from node.judging.cards import (
    CapabilityCard,
    CardError,
    CardStore,
    SignedCapabilityCard,
    decode_signed_card,
    encode_signed_card,
    flag_disagreements,
    sample_label,
    sign_capability_card,
    verify_capability_card,
)
from node.judging.runner import (
    PRIVATE_PROBES_FILE,
    ProbeAnswer,
    ask,
    ask_expert,
    choose_independent_items,
    judge_local_expert,
    load_private_items,
    local_ask,
    local_judge_ask,
    run_probes,
    scorable_suites,
    summarize_run,
)
from node.judging.suites import ProbeItem, combined_version, load_suites, suite_digest
from node.judging.trust import Assessment, JudgeRecord, assess, judge_records, judge_weight
from node.mesh.network import Network, RemoteExpert
from node.mesh.remote_expert import Remote
from node.serving.expert import Expert, Local, TrustEvidence
from node.serving.experts import ExpertPool, ServedExpert
from peers.client import PeerClient, PeerError
from peers.identity import NodeIdentity
from peers.wire import NodeCard

log = logging.getLogger(__name__)

CARDS_FILE = "cards.db"
MAX_CARDS_PER_EXPERT = 16  # what travels in a hello
MAX_CLOCK_SKEW_MS = 10 * 60_000  # a card "issued" further in the future than this is a forgery, not a clock
BUSY_RETRY_S = 1.0
DEFAULT_PEER_ITEMS_PER_DIMENSION = 8
SPOT_CHECK_MAX_TOKENS = 32  # enough tokens for a meaningful speed reading

# Called with (expert_id, done, total) as probes are answered.
Progress = Callable[[str, int, int], None]


@dataclass
class JudgeStatus:
    """Where judging of one local expert stands."""

    state: str = "unjudged"  # unjudged, judging, judged, failed
    done: int = 0
    total: int = 0
    error: str | None = None


@dataclass
class _Counter:
    """Counts answered probes for progress reports."""

    expert_id: str
    total: int
    report: Progress | None
    status: JudgeStatus | None = None
    done: int = field(default=0)

    def tick(self) -> None:
        self.done += 1
        # A calm progress line every tenth of the way, for whoever watches the node's log.
        step = max(1, self.total // 10)
        if self.done % step == 0 or self.done == self.total:
            log.info("judging %s: %d/%d probes", self.expert_id, self.done, self.total)
        if self.status is not None:
            self.status.done = self.done
        if self.report is not None:
            self.report(self.expert_id, self.done, self.total)


def _key(target: RemoteExpert) -> bytes | None:
    """The public key a remote expert's replies must be signed with."""
    return target.peer.card.public_key if target.peer.card is not None else None


def card_view(card: CapabilityCard) -> dict[str, Any]:
    """A card as JSON for the user API."""
    return {
        "judge": card.judge_node_id,
        "owner": card.owner_node_id,
        "self_judged": card.self_judged,
        "expert": card.expert_id,
        "model_sha256": card.model_sha256,
        "suite_version": card.suite_version,
        "sample": card.sample,
        "issued_ms": card.issued_ms,
        "scores": {
            s.dimension: {"mean": round(s.mean, 4), "ci_low": round(s.ci_low, 4), "ci_high": round(s.ci_high, 4), "n": s.n}
            for s in card.scores
        },
        "performance": {
            "tokens_per_s": round(card.performance.tokens_per_s, 2),
            "ttft_ms": round(card.performance.ttft_ms, 1),
            "n_ctx": card.performance.n_ctx,
        },
    }


class Judging:
    """Owns the card store: judging runs, cards from peers, and the scores the router reads."""

    def __init__(
        self,
        identity: NodeIdentity,
        pool: ExpertPool,
        network: Network,
        client: PeerClient,
        data_dir: Path,
        *,
        judge_on_start: bool = True,
        items_per_dimension: int | None = None,
        judge_expert: str | None = None,
        spot_check_interval_s: float = 0.0,
        trusted_judges: Sequence[str] = (),
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._identity = identity
        self._pool = pool
        self._network = network
        self._client = client
        self._data_dir = data_dir
        self._judge_on_start = judge_on_start
        self._items_per_dimension = items_per_dimension
        self._judge_expert = judge_expert
        self._spot_check_interval_s = spot_check_interval_s
        self._spot_task: asyncio.Task | None = None
        self.store = CardStore(data_dir / CARDS_FILE)
        self.status: dict[str, JudgeStatus] = {e.spec.id: JudgeStatus() for e in pool}
        self._trusted = frozenset(trusted_judges)
        self._clock_ms = clock_ms
        # Verified cards by model, kept in memory: views and routing never re-verify signatures.
        self._cards: dict[str, list[CapabilityCard]] = {}
        self._records: dict[str, JudgeRecord] = {}
        self._assessed: dict[tuple[str, str | None], Assessment] = {}
        self.probed: dict[tuple[str, str], str] = {}  # (owner, sha256) -> how this node verified it
        self._encoded: dict[str, tuple[bytes, ...]] = {}
        self._speed: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one judging run at a time: they share the experts' workers

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load known cards, and judge the local experts in the background (the node serves meanwhile)."""
        for signed in await asyncio.to_thread(self.store.all_cards):
            self._cards.setdefault(signed.card.model_sha256, []).append(signed.card)
        for expert in self._pool:
            await self._refresh(expert.spec.sha256, expert.spec.id)
        if self._judge_on_start:
            self._task = asyncio.create_task(self._judge_all_local(), name="judge-local")
        if self._spot_check_interval_s > 0:
            self._spot_task = asyncio.create_task(self._spot_check_loop(), name="spot-checks")

    async def close(self) -> None:
        """Stop judging and close the store."""
        for task in (self._task, self._spot_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self.store.close()

    async def _judge_all_local(self) -> None:
        for expert in self._pool:
            try:
                await self.judge_local(expert)
            except asyncio.CancelledError:
                raise
            except NodeError as exc:
                log.warning("judging %s failed: %s", expert.spec.id, exc.message)
            except Exception:  # noqa: BLE001 - a failed judging run must not take the node down
                log.exception("judging %s failed", expert.spec.id)

    # ---- reading cards --------------------------------------------------------------------

    async def _refresh(self, sha256: str, expert_id: str | None = None) -> None:
        """Reload one model's cards, recompute judges' records, and the hello cards of a local expert."""
        signed = await asyncio.to_thread(self.store.cards_for, sha256)
        self._cards[sha256] = [s.card for s in signed if s.card.model_sha256 == sha256]
        node_id = self._identity.node_id
        self._records = judge_records((c for cards in self._cards.values() for c in cards), node_id)
        self._assessed.clear()
        local: dict[str, ServedExpert] = {e.spec.id: e for e in self._pool}
        for eid in [expert_id] if expert_id is not None else [e.spec.id for e in self._pool if e.spec.sha256 == sha256]:
            expert = local.get(eid)
            own = [c for c in self._cards[sha256] if c.judge_node_id == node_id and c.expert_id == eid]
            if own:
                self._speed[eid] = max(own, key=lambda c: c.issued_ms).performance.tokens_per_s
            # Only cards about this very expert on this very node travel in our hello: a card naming
            # another owner would make honest peers distrust us for relaying it.
            ours = [
                s for s in signed
                if s.card.owner_node_id == node_id and expert is not None and s.card.model_sha256 == expert.spec.sha256
            ]
            ours.sort(key=lambda s: (
                s.card.judge_node_id != node_id,
                -judge_weight(s.card.judge_node_id, self._trusted, self._records),
                -s.card.issued_ms,
            ))
            self._encoded[eid] = tuple(encode_signed_card(s) for s in ours[:MAX_CARDS_PER_EXPERT])

    def assessment(self, sha256: str, owner: str | None = None) -> Assessment:
        """What this node believes about a model hosted here (`owner=None`) or on `owner`, and why."""
        key = (sha256, owner)
        found = self._assessed.get(key)
        if found is None:
            found = assess(
                self._cards.get(sha256, ()), own_id=self._identity.node_id, owner=owner, trusted=self._trusted, records=self._records
            )
            if owner is not None and not found.verified and (owner, sha256) in self.probed:
                found = Assessment(found.scores, found.evidence, found.judges, True)
            self._assessed[key] = found
        return found

    def judged_scores(self, sha256: str, owner: str | None = None) -> Mapping[str, float]:
        """Judged score per dimension this node believes (see node.judging.trust); empty when unjudged."""
        return self.assessment(sha256, owner).scores

    def mark_verified(self, owner: str, sha256: str, how: str) -> None:
        """Record that this node checked a peer's expert itself (a spot probe matched, or its own probes agreed)."""
        self.probed[(owner, sha256)] = how
        self._assessed.clear()

    def claimed_tokens_per_s(self, expert_id: str) -> float | None:
        """The decode speed this node's own card measured for a local expert (what its hello claims)."""
        return self._speed.get(expert_id)

    def hello_cards(self, expert_id: str) -> Sequence[bytes]:
        """The signed cards about a local expert that travel in this node's hello."""
        return self._encoded.get(expert_id, ())

    async def accept_node_card(self, card: NodeCard) -> None:
        """Keep the valid capability cards a peer's hello carries; drop the rest."""
        for info in card.experts:
            stored = False
            for data in info.cards:
                try:
                    signed = decode_signed_card(data)
                    capability = verify_capability_card(signed)
                except CardError as exc:
                    log.warning("dropped a capability card from %s: %s", card.node_id, exc.message)
                    self._network.note_misbehaviour(card.node_id, TrustEvidence.BAD_CARD, exc.message)
                    continue
                if capability.owner_node_id != card.node_id or capability.model_sha256 != info.sha256:
                    log.warning("dropped a card from %s about an expert it does not host", card.node_id)
                    self._network.note_misbehaviour(card.node_id, TrustEvidence.BAD_CARD, "a card about an expert it does not host")
                    continue
                if capability.issued_ms > self._clock_ms() + MAX_CLOCK_SKEW_MS:
                    self._network.note_misbehaviour(card.node_id, TrustEvidence.BAD_CARD, "a card issued in the future")
                    continue
                if capability.judge_node_id == self._identity.node_id:
                    continue  # our own cards come from our own store, never back from a peer
                known = self._known(capability)
                if known is None or known.issued_ms < capability.issued_ms:
                    await asyncio.to_thread(self.store.put, signed, self._protected())
                    stored = True
            if stored:
                await self._refresh(info.sha256)

    def _known(self, card: CapabilityCard) -> CapabilityCard | None:
        """The stored card of the same judge on the same model and suite, if any."""
        return next(
            (
                c for c in self._cards.get(card.model_sha256, ())
                if c.judge_node_id == card.judge_node_id and c.suite_version == card.suite_version
            ),
            None,
        )

    def _protected(self) -> frozenset[str]:
        """Judges whose cards are never evicted to make room: this node and the judges it trusts."""
        earned = {j for j in self._records if judge_weight(j, self._trusted, self._records) > 0}
        return frozenset({self._identity.node_id, *self._trusted, *earned})

    async def accept_submitted(self, data: bytes, sender: str | None = None) -> CapabilityCard:
        """A verified peer sends its own card about one of our experts: keep it (it counts only as its judge is trusted)."""
        signed = decode_signed_card(data)
        card = verify_capability_card(signed)
        expert = self._pool.get(card.expert_id)
        if card.owner_node_id != self._identity.node_id or expert is None or expert.spec.sha256 != card.model_sha256:
            raise InvalidRequest("the card is not about an expert hosted on this node", param="card")
        if sender is not None and card.judge_node_id != sender:
            raise InvalidRequest("a peer may only submit cards it judged itself", param="card")
        if card.judge_node_id == self._identity.node_id:
            raise InvalidRequest("this node's own cards are not taken from others", param="card")
        if card.issued_ms > self._clock_ms() + MAX_CLOCK_SKEW_MS:
            raise InvalidRequest("the card is issued in the future", param="card")
        await asyncio.to_thread(self.store.put, signed, self._protected())
        await self._refresh(card.model_sha256, card.expert_id)
        log.info("stored a capability card on %s from judge %s", card.expert_id, card.judge_node_id)
        return card

    def cards(self, sha256: str) -> list[CapabilityCard]:
        """Every stored card about a model, from every judge (verified once, when stored or loaded)."""
        return list(self._cards.get(sha256, ()))

    def experts_view(self) -> list[dict[str, Any]]:
        """Every known expert (local and on alive peers) with its cards by judge, flags and live figures."""
        node_id = self._identity.node_id
        experts: list[Expert] = [Local(e, node_id) for e in self._pool]
        experts += [self._remote(r) for r in self._network.remote_experts()]
        return [self._expert_row(expert) for expert in experts]

    def _expert_row(self, expert: Expert) -> dict[str, Any]:
        expert_id, sha256, node, local = expert.card.expert_id, expert.card.sha256, expert.node_id, expert.local
        load = expert.load()
        cards = self.cards(sha256)
        assessed = self.assessment(sha256, None if local else node)
        flags = flag_disagreements(cards)
        status = self.status.get(expert_id) if local else None
        return {
            "id": expert_id,
            "node": node,
            "local": local,
            "model_sha256": sha256,
            "queue_depth": load.queue_depth,
            "capacity": load.capacity,
            "judging": None if status is None else {"state": status.state, "done": status.done, "total": status.total, "error": status.error},
            "judged": bool(cards),
            "scores": {d: round(v, 4) for d, v in assessed.scores.items()},
            "evidence": assessed.describe(),
            "verified": local or assessed.verified,
            "cards": [card_view(c) for c in cards],
            "flags": [
                {
                    "kind": "disagrees with an independent judge",
                    "message": (
                        f"{f.dimension}: the owner claims {f.owner_score.mean:.2f} "
                        f"[{f.owner_score.ci_low:.2f}, {f.owner_score.ci_high:.2f}], "
                        f"measured {f.independent_score.mean:.2f} "
                        f"[{f.independent_score.ci_low:.2f}, {f.independent_score.ci_high:.2f}]"
                    ),
                    "dimension": f.dimension,
                    "owner_score": round(f.owner_score.mean, 4),
                    "independent_score": round(f.independent_score.mean, 4),
                    "judge": f.judge_node_id,
                }
                for f in flags
            ],
        }

    # ---- judging --------------------------------------------------------------------------

    def _judge_ask(self):
        """The designated judge expert's grading call for open-ended items, if one is configured here."""
        if self._judge_expert is None:
            return None
        judge = self._pool.get(self._judge_expert) or next(
            (e for e in self._pool if e.spec.name == self._judge_expert), None
        )
        if judge is None:
            log.warning("judge expert %r is not a local expert: open-ended items are skipped", self._judge_expert)
            return None
        return local_judge_ask(judge)

    async def judge_local(
        self,
        expert: ServedExpert,
        *,
        dimensions: Sequence[str] | None = None,
        items_per_dimension: int | None = None,
        force: bool = False,
        progress: Progress | None = None,
    ) -> SignedCapabilityCard:
        """This node's card on a local expert: the stored one, or a fresh judging run."""
        status = self.status.setdefault(expert.spec.id, JudgeStatus())
        per_dimension = items_per_dimension if items_per_dimension is not None else self._items_per_dimension
        judge_ask = self._judge_ask()
        suites = scorable_suites(load_suites(dimensions), judge_ask is not None)
        total = sum(len(s.items) if per_dimension is None else min(per_dimension, len(s.items)) for s in suites.values())
        counter = _Counter(expert.spec.id, total, progress, status)
        ask = local_ask(expert)

        async def patient_ask(item: ProbeItem) -> ProbeAnswer:
            # Users come first: a busy expert is asked again a moment later instead of failing the run.
            while True:
                try:
                    answer = await ask(item)
                    counter.tick()
                    return answer
                except ExpertBusy:
                    await asyncio.sleep(BUSY_RETRY_S)

        async with self._lock:
            status.state, status.done, status.total, status.error = "judging", 0, total, None
            try:
                signed = await judge_local_expert(
                    expert,
                    self._identity,
                    self.store,
                    dimensions=dimensions,
                    items_per_dimension=per_dimension,
                    force=force,
                    ask=patient_ask,
                    judge_ask=judge_ask,
                )
            except BaseException as exc:
                status.state, status.error = "failed", str(exc) or type(exc).__name__
                raise
            status.state, status.done = "judged", total
        await self._refresh(expert.spec.sha256, expert.spec.id)
        return signed

    async def judge_peer(
        self,
        node_id: str,
        expert_id: str,
        *,
        dimensions: Sequence[str] | None = None,
        items_per_dimension: int = DEFAULT_PEER_ITEMS_PER_DIMENSION,
        progress: Progress | None = None,
        via: str = "judging run",
    ) -> SignedCapabilityCard:
        """Judge a peer's expert through its peer API on a random sample plus private items; sign as the judge."""
        target = self._find_remote(node_id, expert_id)
        judge_ask = self._judge_ask()
        suites = scorable_suites(load_suites(dimensions), judge_ask is not None)
        private = load_private_items(self._data_dir / PRIVATE_PROBES_FILE)
        # A fresh random sample each time, so a peer cannot learn which items it will be asked.
        rng = random.Random(int.from_bytes(os.urandom(8), "big"))
        items = choose_independent_items(suites, items_per_dimension, rng, private)
        counter = _Counter(expert_id, len(items), progress)
        async with self._lock:
            results = await run_probes(self._peer_ask(target, counter, via=via), items, judge_ask=judge_ask)
        scores, performance = summarize_run(results, expert_id, target.info.sha256, target.info.n_ctx)
        card = CapabilityCard(
            expert_id=expert_id,
            model_sha256=target.info.sha256,
            scores=scores,
            performance=performance,
            suite_version=combined_version(suites),
            suite_digest=suite_digest(suites),
            judge_node_id=self._identity.node_id,
            judge_public_key=self._identity.public_key_raw,
            owner_node_id=target.peer.node_id,
            issued_ms=int(time.time() * 1000),
            sample=sample_label(items_per_dimension, len([p for p in private if p.dimension in suites])),
        )
        signed = sign_capability_card(card, self._identity)
        await asyncio.to_thread(self.store.put, signed)
        await self._refresh(target.info.sha256)
        try:
            await self._client.submit_card(target.peer.url, encode_signed_card(signed), expected_key=_key(target))
        except PeerError as exc:
            log.warning("could not hand the card to %s: %s (kept here)", node_id, exc)
        return signed

    async def _spot_check_loop(self) -> None:
        """Now and then probe a remote expert: unverified ones first (to verify them), else a random one for speed."""
        items = [item for suite in load_suites(["knowledge", "arithmetic"]).values() for item in suite.items]
        while True:
            await asyncio.sleep(self._spot_check_interval_s)
            remotes = self._network.remote_experts()
            unverified = [r for r in remotes if not self.assessment(r.info.sha256, r.peer.node_id).verified]
            try:
                if unverified:
                    await self.verify_remote(random.choice(unverified), random.choice(items))
                elif remotes:
                    await self.spot_check(random.choice(remotes), random.choice(items))
            except asyncio.CancelledError:
                raise
            except NodeError as exc:
                log.info("spot check failed: %s", exc.message)

    async def verify_remote(
        self, target: RemoteExpert, item: ProbeItem, *, items_per_dimension: int = 2, via: str = "spot check (verification)"
    ) -> bool:
        """Check a peer's claim about its expert with this node's own evidence; True when it held.

        Same model file here: one greedy probe (temperature 0, seed 0) whose answer must equal
        this node's own. Otherwise: a small judging run of this node's own, whose scores must not
        contradict the owner's card. Either way the result is this node's evidence, not a stranger's.
        """
        node_id, sha256 = target.peer.node_id, target.info.sha256
        twin = next((e for e in self._pool if e.spec.sha256 == sha256), None)
        if twin is not None:
            max_tokens = min(item.max_tokens, SPOT_CHECK_MAX_TOKENS)
            ask = self._peer_ask(target, _Counter(target.info.expert_id, 1, None), max_tokens=max_tokens, via=via)
            try:
                theirs = await ask(item)
            except NodeError as exc:  # trust evidence, where the failure is evidence, is noted by the adapter
                log.info("verification probe of %s on %s failed: %s", target.info.expert_id, node_id, exc.message)
                return False
            while True:
                try:
                    mine = await ask_expert(twin, item.prompt, max_tokens=max_tokens)
                    break
                except ExpertBusy:
                    await asyncio.sleep(BUSY_RETRY_S)
            if theirs.text == mine.text:
                self.mark_verified(node_id, sha256, "a greedy probe answered exactly as this node's own copy")
                log.info("verified %s on %s: greedy answer matches the local copy", target.info.expert_id, node_id)
                return True
            self._network.note_misbehaviour(
                node_id, TrustEvidence.MODEL_MISMATCH, f"{target.info.expert_id}: greedy answer differs from this node's copy of {sha256[:12]}"
            )
            return False
        signed = await self.judge_peer(node_id, target.info.expert_id, items_per_dimension=items_per_dimension, via=via)
        claims = [c for c in self._cards.get(sha256, ()) if c.self_judged and c.owner_node_id == node_id]
        flags = [f for f in flag_disagreements([*claims, signed.card]) if f.judge_node_id == self._identity.node_id]
        if flags:
            detail = "; ".join(f"{f.dimension} claimed {f.owner_score.mean:.2f}, measured {f.independent_score.mean:.2f}" for f in flags)
            self._network.note_misbehaviour(node_id, TrustEvidence.SCORE_LIE, f"{target.info.expert_id}: {detail}"[:300])
            return False
        return True

    async def spot_check(self, target: RemoteExpert, item: ProbeItem) -> None:
        """One probe to a peer's expert: speed against its claim, and the protocol kept; evidence on failure."""
        node_id = target.peer.node_id
        ask = self._peer_ask(target, _Counter(target.info.expert_id, 1, None), max_tokens=SPOT_CHECK_MAX_TOKENS, via="spot check")
        try:
            answer = await ask(item)
        except NodeError as exc:  # trust evidence, where the failure is evidence, is noted by the adapter
            log.info("spot check of %s on %s failed: %s", target.info.expert_id, node_id, exc.message)
            return
        self._network.check_speed(
            node_id, target.info.expert_id, target.info.tokens_per_s, answer.completion_tokens,
            answer.elapsed_s - answer.ttft_s, via="spot check",
        )

    def _find_remote(self, node_id: str, expert_id: str) -> RemoteExpert:
        for remote in self._network.remote_experts():
            if remote.peer.node_id == node_id and remote.info.expert_id == expert_id:
                return remote
        raise ModelNotFound(f"no alive peer {node_id!r} hosting {expert_id!r}", param="expert")

    def _remote(self, target: RemoteExpert, via: str = "judging run") -> Remote:
        """A peer's expert as an `Expert`; `via` names what this node was doing, in any evidence."""
        return Remote(target, self._client, self._network, via=via)

    def _peer_ask(self, target: RemoteExpert, counter: _Counter, *, max_tokens: int | None = None, via: str):
        """Greedy probes to a peer's expert through the one remote adapter (its failures become trust evidence)."""
        expert = self._remote(target, via)

        async def peer_ask(item: ProbeItem) -> ProbeAnswer:
            answer = await ask(expert, item.prompt, max_tokens=max_tokens or item.max_tokens)
            counter.tick()
            return answer

        return peer_ask
