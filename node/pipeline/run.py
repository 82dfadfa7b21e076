"""The query pipeline the HTTP layer calls once: plan -> route -> execute (with failover) -> record."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from node.errors import ExpertBusy, InvalidRequest, ModelNotFound, NodeError, PeerUnavailable
from node.judging.runner import ask
from node.pipeline.execute import Exhausted, Started, Stream, first_answering
from node.pipeline.query import AUTO_MODEL, Answer, Event, PartServed, Query, served
from node.routing.decompose import (
    PART_SEPARATOR,
    Part,
    Plan,
    compose_header,
    parse_proposal,
    plan,
    proposal_prompt,
)
from node.routing.router import MAX_ROUTING_CHARS, RouteConstraints, Routed, Router, routing_text
from node.serving.expert import Expert
from node.serving.experts import ChatMessage, Delta, Finished, FinishReason, GenerationParams

log = logging.getLogger(__name__)

PROPOSAL_MAX_TOKENS = 128


class ExpertSource(Protocol):
    """What the pipeline needs to find experts by name (`node.mesh.remote_expert.Experts` is one)."""

    def local_named(self, expert_id: str) -> Expert | None: ...
    def local(self) -> Sequence[Expert]: ...
    def hosts_of(self, expert_id: str) -> Sequence[Expert]: ...
    def remote(self) -> Sequence[Expert]: ...


def _may_hide_several_requests(text: str) -> bool:
    """Cheap signs that rules may have missed a split, before paying for an expert's proposal."""
    return len(text) > 40 and (text.count("?") + text.count(".") + text.count("!") >= 2 or " and " in text)


class QueryPipeline:
    """Answers queries: every dependency comes through the constructor, nothing reads the app."""

    def __init__(
        self,
        router: Router,
        experts: ExpertSource,
        *,
        proposer_min_score: float,
    ) -> None:
        self._router = router
        self._experts = experts
        self._proposer_min_score = proposer_min_score

    # ---- the one entry point ---------------------------------------------------------------

    async def answer(self, query: Query) -> Answer:
        """Start answering a query; returns once the first event is ready (a failure before it is a plain error)."""
        if query.model != AUTO_MODEL or isinstance(query.prompt, str):
            return await self._named(query)
        # One structured answer cannot be several parts under headings.
        enabled = query.decompose and query.params.grammar is None
        query_plan = await self.plan(query.routing_text, enabled=enabled, constraints=query.constraints)
        if query_plan.compound:
            return await self._decomposed(query_plan, list(query.prompt), query.params, query.constraints)
        routed = await self._router.route(query.routing_text, query.constraints)
        started, provenance = await self._start_routed(routed, query.prompt, query.params)
        return Answer(started.expert.card.expert_id, started.expert.node_id, provenance, started.events)

    # ---- resolve ---------------------------------------------------------------------------

    def resolve(self, model: str) -> list[Expert]:
        """The local expert a query names (the first for `auto`), else the alive peers hosting it, nearest first."""
        if model == AUTO_MODEL:
            first = list(self._experts.local())[:1]
            if not first:
                raise ModelNotFound(f"model {model!r} does not exist; known models: {AUTO_MODEL}", param="model")
            return first
        local = self._experts.local_named(model)
        if local is not None:
            return [local]
        hosts = list(self._experts.hosts_of(model))
        if not hosts:
            known = sorted({AUTO_MODEL, *(e.card.expert_id for e in self._experts.local()), *(e.card.expert_id for e in self._experts.remote())})
            raise ModelNotFound(f"model {model!r} does not exist; known models: {', '.join(known)}", param="model")
        return hosts

    async def _named(self, query: Query) -> Answer:
        """A query for one named expert: on this node, or on the first peer hosting it that answers."""
        experts = self.resolve(query.model)
        try:
            started = await first_answering(experts, query.prompt, query.params, final=InvalidRequest)
        except Exhausted as exc:
            raise self._named_failure(experts, exc) from None
        expert = started.expert
        return Answer(expert.card.expert_id, expert.node_id, {"expert": expert.card.expert_id, "node": expert.node_id}, started.events)

    @staticmethod
    def _named_failure(experts: Sequence[Expert], exc: Exhausted) -> Exception:
        """The error of a named expert no host could start: its own when one, busy when all were, else unavailable."""
        errors = [f.error for f in exc.failures]
        if len(experts) == 1 and experts[0].local:
            return errors[0]
        refused = next((e for e in errors if isinstance(e, InvalidRequest)), None)
        if refused is not None:
            return refused
        expert_id = experts[0].card.expert_id
        busy = [e for e in errors if isinstance(e, ExpertBusy)]
        if len(busy) == len(errors):
            return ExpertBusy(f"every peer hosting {expert_id} is busy", retry_after_s=min(e.retry_after_s or 1 for e in busy))
        return PeerUnavailable(f"no peer hosting {expert_id} answered: {'; '.join(f'{f.expert.node_id}: {f.error.message}' for f in exc.failures)}")

    # ---- plan --------------------------------------------------------------------------------

    def _split_proposer(self, constraints: RouteConstraints) -> Expert | None:
        """The approved local instruct expert whose judged instruction-following is good enough to propose splits."""
        best: tuple[float, Expert] | None = None
        for candidate in self._router.candidates(constraints):
            expert = candidate.expert
            score = candidate.features.scores.get("instruction")
            if not expert.local or expert.card.prompt_style != "chat" or score is None or score < self._proposer_min_score:
                continue
            if best is None or score > best[0]:
                best = (score, expert)
        return None if best is None else best[1]

    async def plan(self, text: str, *, enabled: bool, constraints: RouteConstraints) -> Plan:
        """Split by rules first; when they find one request, a good enough instruct expert may propose a split."""
        if len(text) > MAX_ROUTING_CHARS:
            # A very long message is answered whole: splitting it would cost seconds and help nobody, and
            # regexes over a megabyte hold the GIL even in a thread. Its one part is read from its start and end.
            return plan(routing_text(text), enabled=False)
        query_plan = await asyncio.to_thread(plan, text, enabled=enabled)
        if not enabled or query_plan.compound or not _may_hide_several_requests(text):
            return query_plan
        proposer = self._split_proposer(constraints)
        if proposer is None:
            return query_plan
        log.info("asked %s to propose a split", proposer.card.expert_id)
        try:
            reply = await ask(proposer, proposal_prompt(text), max_tokens=PROPOSAL_MAX_TOKENS)
        except NodeError as exc:
            log.info("no split proposal from %s: %s", proposer.card.expert_id, exc.message)
            return query_plan
        parts = parse_proposal(reply.text, text)
        if parts is None or len(parts) < 2:
            log.info("kept the rules' plan: %s proposed no faithful split", proposer.card.expert_id)
            return query_plan
        return Plan(tuple(parts), True)

    # ---- route, execute, record ----------------------------------------------------------

    async def _start_routed(
        self, routed: Routed, prompt: Sequence[ChatMessage], params: GenerationParams
    ) -> tuple[Started, dict[str, Any]]:
        """Start the routed choice; when it fails before its first token the next candidate answers (recorded)."""
        decision = routed.decision
        experts = [routed.candidates[i].expert for i in routed.order]
        try:
            started = await first_answering(experts, prompt, params)
        except Exhausted as exc:
            errors = [f.error for f in exc.failures]
            if all(isinstance(e, ExpertBusy) for e in errors):
                raise errors[0] from None
            if isinstance(errors[0], InvalidRequest):
                # Refused as malformed before anything was answered: no decision to learn from, none kept.
                await self._router.forget(decision.decision_id)
                raise errors[0] from None
            raise PeerUnavailable(f"no candidate could answer: {exc}") from None
        expert = started.expert
        provenance: dict[str, Any] = {
            "expert": expert.card.expert_id,
            "node": expert.node_id,
            "decision_id": decision.decision_id,
            "feedback_token": routed.token,
            "probability": round(decision.chosen_probability, 4),
            "policy_version": decision.policy_version,
            "explanation": routed.explanation,
        }
        index = routed.order[started.position]
        if index != decision.chosen_index:
            reason = "; ".join(f.describe() for f in started.failures)
            await self._router.record_fallback(decision.decision_id, index, reason)
            provenance["fallback"] = {"from": routed.candidates[decision.chosen_index].features.expert_id, "reason": reason}
        return started, provenance

    async def _decomposed(
        self, query_plan: Plan, messages: list[ChatMessage], params: GenerationParams, constraints: RouteConstraints
    ) -> Answer:
        """Route each part of a compound query on its own; the parts are answered one after another, under headings."""
        routed_parts = [(part, await self._router.route(part.request(), constraints)) for part in query_plan.parts]
        group_id, token = await self._router.record_group([r.decision.decision_id for _, r in routed_parts])
        parts_view = [
            {
                "index": part.index,
                "text": part.text,
                "task": part.task,
                "decision_id": routed.decision.decision_id,
                "feedback_token": routed.token,
                "probability": round(routed.decision.chosen_probability, 4),
                "expert": routed.candidates[routed.decision.chosen_index].features.expert_id,
                "node": routed.candidates[routed.decision.chosen_index].features.node_id,
                "explanation": routed.explanation,
            }
            for part, routed in routed_parts
        ]
        base = {"expert": "", "node": "", "decomposed": True, "decision_id": group_id, "feedback_token": token, "parts": parts_view}
        first, first_served = await self._start_part(routed_parts[0], 0, messages, params)
        provenance = served(base, first_served)
        events = Stream(self._parts(routed_parts, first, messages, params), first.events)
        return Answer(first_served.expert_id, first_served.node_id, provenance, events)

    async def _start_part(
        self, part_routed: tuple[Part, Routed], position: int, messages: list[ChatMessage], params: GenerationParams
    ) -> tuple[Started, PartServed]:
        part, routed = part_routed
        part_messages = [*messages[:-1], ChatMessage("user", part.request())]
        started, provenance = await self._start_routed(routed, part_messages, params)
        return started, PartServed(position, provenance["expert"], provenance["node"], provenance.get("fallback"))

    async def _parts(
        self, routed_parts: list[tuple[Part, Routed]], first: Started, messages: list[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[Event]:
        """Each part's answer in turn, under a heading naming its expert; usage summed over the parts."""
        prompt_tokens = completion_tokens = 0
        finish_reason: FinishReason = "stop"
        started: Started | None = first
        for position, (part, _routed) in enumerate(routed_parts):
            part_served: PartServed | None = None
            if started is None:
                started, part_served = await self._start_part(routed_parts[position], position, messages, params)
            events = started.events
            try:
                if part_served is not None:
                    yield part_served
                separator = PART_SEPARATOR if position else ""
                yield Delta(separator + compose_header(part, started.expert.card.expert_id, started.expert.node_id) + "\n")
                async for event in events:
                    if isinstance(event, Finished):
                        prompt_tokens += event.prompt_tokens
                        completion_tokens += event.completion_tokens
                        finish_reason = event.finish_reason
                        break
                    yield event
            finally:
                await events.aclose()
            started = None
        yield Finished(finish_reason, prompt_tokens, completion_tokens)

