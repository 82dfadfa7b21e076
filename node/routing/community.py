"""Community learning on a node: publish the signed summary of what its users taught, keep peers' summaries, weigh them into routing."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from bandit.community import (
    CellKey,
    CommunityPrior,
    CommunityUse,
    OwnCell,
    Report,
    ReportedCell,
    add_rating,
    apply_prior,
    combine,
    to_report,
)
from bandit.features import ExpertFeatures, Task
from bandit.ledger import Rewarded
from peers.identity import NodeIdentity
from peers.learning import MAX_CELLS, LearningCell, LearningSummary, sign_summary, verify_summary
from peers.wire import WireError

log = logging.getLogger(__name__)

# However many keys say hello, this node keeps at most this many reporters' summaries.
MAX_REPORTERS = 256


class Community:
    """This node's own rating cells and its peers' verified summaries; thread-safe.

    The router thread records ratings and asks for the prior; the event loop publishes and
    accepts summaries in hellos. `share` off: nothing is published. `use` off: peers'
    summaries are neither kept nor weighed.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        *,
        share: bool = True,
        use: bool = True,
        trust_of: Callable[[str], float] = lambda _node_id: 1.0,
        on_bad_summary: Callable[[str, str], None] = lambda _node_id, _detail: None,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._identity = identity
        self.share = share
        self.use = use
        self._trust_of = trust_of
        self._on_bad_summary = on_bad_summary
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        self._own: dict[CellKey, OwnCell] = {}
        self._own_seq = 0  # the ledger's reward seq of the last rating counted
        self._reports: dict[str, Report] = {}
        self._raw: dict[str, bytes] = {}  # the bytes each report came in, to skip re-verifying a repeat
        self._published: tuple[int, bytes] | None = None
        self._prior: CommunityPrior | None = None

    # ---- own ratings (router thread) ------------------------------------------------

    def record(self, item: Rewarded) -> None:
        """Count one rating from the ledger, once (by its reward seq)."""
        decision = item.decision
        served = decision.candidates[decision.chosen_index if decision.served_index is None else decision.served_index]
        with self._lock:
            if item.seq <= self._own_seq:
                return
            self._own = add_rating(self._own, str(served.expert_id), decision.query.task.value, item.reward)
            self._own_seq = item.seq
            self._prior = None

    def catch_up(self, ratings: Iterable[Rewarded]) -> int:
        """Count every rating not counted yet, in order; returns how many."""
        counted = 0
        for item in ratings:
            before = self._own_seq
            self.record(item)
            counted += self._own_seq != before
        return counted

    @property
    def own_seq(self) -> int:
        """The reward seq of the last rating counted (the next summary's sequence number)."""
        return self._own_seq

    # ---- publishing -------------------------------------------------------------------

    def summary(self, max_cells: int = MAX_CELLS) -> LearningSummary:
        """What this node would publish now: per expert and task kind, count and mean reward (best-attested cells first)."""
        with self._lock:
            own, seq = dict(self._own), self._own_seq
        report = to_report(self._identity.node_id, seq, self._clock_ms(), own, max_cells)
        return LearningSummary(
            node_id=self._identity.node_id,
            public_key=self._identity.public_key_raw,
            seq=report.seq,
            issued_ms=report.issued_ms,
            cells=tuple(
                LearningCell(expert_id=expert_id, task=task, n=cell.n, mean=cell.mean)
                for (expert_id, task), cell in report.cells.items()
            ),
        )

    def published(self) -> bytes:
        """The signed summary that rides in this node's hellos; empty when sharing is off or nothing is rated."""
        if not self.share or self._own_seq == 0:
            return b""
        cached = self._published
        if cached is not None and cached[0] == self._own_seq:
            return cached[1]
        max_cells = MAX_CELLS
        while True:
            summary = self.summary(max_cells)
            try:
                data = sign_summary(summary, self._identity)
                break
            except ValueError:
                # Over the byte cap (long expert ids): keep the best-attested cells that fit.
                max_cells //= 2
        self._published = (summary.seq, data)
        return data

    # ---- peers' summaries (event loop) ----------------------------------------------

    def accept(self, sender_node_id: str, data: bytes) -> bool:
        """Keep a peer's summary when it verifies, is its own and is newer; False when it was not kept."""
        if not data or not self.use or sender_node_id == self._identity.node_id:
            return False
        if self._raw.get(sender_node_id) == data:
            return False
        try:
            summary = verify_summary(data, now_ms=self._clock_ms())
        except WireError as exc:
            log.warning("dropped a learning summary from %s: %s", sender_node_id, exc)
            self._on_bad_summary(sender_node_id, str(exc))
            return False
        if summary.node_id != sender_node_id:
            # Relayed summaries would let one peer speak for many keys; only first-hand ones count.
            log.warning("dropped a learning summary of %s relayed by %s", summary.node_id, sender_node_id)
            self._on_bad_summary(sender_node_id, "relayed another node's learning summary")
            return False
        report = Report(
            reporter=summary.node_id,
            seq=summary.seq,
            issued_ms=summary.issued_ms,
            cells={(c.expert_id, c.task): ReportedCell(c.n, c.mean) for c in summary.cells},
        )
        with self._lock:
            known = self._reports.get(report.reporter)
            if known is not None and (report.seq, report.issued_ms) <= (known.seq, known.issued_ms):
                return False  # a replay of an older edition
            if known is None and len(self._reports) >= MAX_REPORTERS:
                oldest = min(self._reports.values(), key=lambda r: r.issued_ms)
                del self._reports[oldest.reporter]
                self._raw.pop(oldest.reporter, None)
            self._reports[report.reporter] = report
            self._raw[report.reporter] = data
            self._prior = None
        log.debug("learning summary %d from %s: %d cells", report.seq, report.reporter, len(report.cells))
        return True

    # ---- routing (router thread) ------------------------------------------------------

    def _current_prior(self) -> tuple[CommunityPrior, dict[CellKey, OwnCell], list[Report]]:
        with self._lock:
            own, reports, prior = self._own, list(self._reports.values()), self._prior
        if prior is None:
            prior = combine(reports, own, self._trust_of)
            with self._lock:
                self._prior = prior
        return prior, own, reports

    def apply(self, experts: Sequence[ExpertFeatures], task: Task) -> tuple[list[ExpertFeatures], CommunityUse | None]:
        """Candidates whose score for `task` carries the community prior (unchanged when there is none)."""
        if not self.use or not self._reports:
            return list(experts), None
        prior, own, reports = self._current_prior()
        return apply_prior(experts, task, prior, own, reports)

    def invalidate(self) -> None:
        """Recompute weights on the next decision (trust may have changed)."""
        with self._lock:
            self._prior = None

    def status(self) -> dict[str, Any]:
        """What is shared and how much each reporter weighs, for /v1/router/stats."""
        prior, own, reports = self._current_prior() if self.use else (None, self._own, [])
        rows = []
        for report in sorted(reports, key=lambda r: r.reporter):
            agreement = prior.agreements.get(report.reporter) if prior else None
            rows.append(
                {
                    "node": report.reporter,
                    "seq": report.seq,
                    "issued_ms": report.issued_ms,
                    "cells": len(report.cells),
                    "weight": round(prior.weights.get(report.reporter, 0.0), 4) if prior else 0.0,
                    "agreement": round(agreement.score, 4) if agreement else None,
                    "evidence": agreement.evidence if agreement else 0,
                }
            )
        return {
            "share": self.share,
            "use": self.use,
            "own_seq": self._own_seq,
            "own_cells": len(own),
            "reporters": rows,
        }
