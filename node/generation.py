"""Generations: one answer on a local expert, forwarded to a peer, routed with failover, or decomposed in parts."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, AsyncIterator

from aiohttp import web

from node.errors import ExpertBusy, InvalidRequest, NodeError, PeerUnavailable
from node.judging.runner import ask_expert
from node.keys import (
    metrics_key,
    network_key,
    node_info_key,
    peer_client_key,
    router_key,
    settings_key,
)
from node.mesh.network import RemoteExpert
from node.routing.decompose import (
    PART_SEPARATOR,
    Plan,
    compose_header,
    parse_proposal,
    plan,
    proposal_prompt,
)
from node.routing.router import MAX_ROUTING_CHARS, Routed, routing_text
from node.serving.experts import (
    ChatMessage,
    Delta,
    Finished,
    GenerationEvent,
    GenerationParams,
    LocalExpert,
)
from peers.client import PeerError, PeerProtocolError, PeerRejected, PeerTimedOut
from peers.wire import ChatMessage as WireChatMessage
from peers.wire import GenerateRequest

log = logging.getLogger(__name__)


class Generation:
    """One admitted request on one expert, local or remote: events out, metrics in, the slot freed at the end."""

    def __init__(
        self,
        app: web.Application,
        expert_id: str,
        node_id: str,
        events: AsyncIterator[GenerationEvent],
        release=None,
        *,
        record_metrics: bool = True,
    ) -> None:
        self._metrics = app[metrics_key] if record_metrics else None
        self.extra: dict[str, Any] = {}  # routing details added to the provenance
        self.expert_id = expert_id
        self.node_id = node_id  # a forwarded generation learns it when a peer starts answering
        self._events = events
        self._release = release
        self._started_s = time.perf_counter()
        self._first = True

    def attach(self, events: AsyncIterator[GenerationEvent]) -> None:
        """Set the events, for generations whose event source needs the generation itself."""
        self._events = events

    def provenance(self) -> dict[str, Any]:
        """Which expert on which node answered (and, when routed, why and how to rate it)."""
        return {"expert": self.expert_id, "node": self.node_id, **self.extra}

    async def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        try:
            async for event in self._events:
                if self._metrics is None:
                    yield event
                    continue
                if self._first and isinstance(event, Delta):
                    self._first = False
                    self._metrics.time_to_first_token.labels(self.expert_id).observe(
                        time.perf_counter() - self._started_s
                    )
                if isinstance(event, Finished):
                    self._metrics.tokens.labels(self.expert_id, "prompt").inc(event.prompt_tokens)
                    self._metrics.tokens.labels(self.expert_id, "completion").inc(event.completion_tokens)
                yield event
        finally:
            try:
                await self._events.aclose()
            finally:
                # Even when cancelled while the worker winds down, the queue slot must come back.
                if self._release is not None:
                    self._release()
                    self._release = None


def start_generation(
    app: web.Application, expert: LocalExpert, prompt_tokens: list[int], stops: tuple[str, ...], params: GenerationParams
) -> Generation:
    """Admit a request on a local expert (429 at once when its queue is full) and start generating."""
    try:
        expert.admit()
    except NodeError:
        app[metrics_key].rejected.labels(expert.spec.id).inc()
        raise
    events = expert.generate(prompt_tokens, stops, params)
    return Generation(app, expert.spec.id, app[node_info_key].node_id, events, release=expert.release)


def forward_generation(
    app: web.Application, hosts: list[RemoteExpert], messages: list[ChatMessage], params: GenerationParams
) -> Generation:
    """Forward a chat to the peers hosting its expert; the next one is tried while nothing was sent yet."""
    expert_id = hosts[0].info.expert_id
    request = GenerateRequest(
        request_id=uuid.uuid4().hex,
        expert_id=expert_id,
        messages=tuple(WireChatMessage(role=m.role, content=m.content) for m in messages),
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        stop=params.stop,
        seed=params.seed,
        origin_node=app[node_info_key].node_id,
        hops=1,
        response_format=params.response_format,
    )
    generation = Generation(app, expert_id, "", _no_events())
    generation.attach(_remote_events(app, hosts, request, generation))
    return generation


async def _no_events() -> AsyncIterator[GenerationEvent]:
    """An empty placeholder until a generation's real events are attached."""
    return
    yield


async def _remote_events(
    app: web.Application, hosts: list[RemoteExpert], request: GenerateRequest, generation: Generation | None
) -> AsyncIterator[GenerationEvent]:
    """Frames from the first peer that starts answering, as generation events; misbehaviour lowers trust."""
    client, network = app[peer_client_key], app[network_key]
    failures: list[str] = []
    busy_retry_s: list[int] = []
    for host in hosts:
        node_id = host.peer.node_id
        frames = client.generate(
            host.peer.url, request, expected_key=host.peer.card.public_key if host.peer.card else None
        ).__aiter__()
        try:
            try:
                frame = await frames.__anext__()
            except PeerRejected as exc:
                if exc.status == 429:
                    busy_retry_s.append(exc.retry_after_s or 1)
                elif exc.status == 404:
                    network.note_misbehaviour(node_id, "missing_expert", f"advertised {request.expert_id}, then: {exc}")
                elif 400 <= exc.status < 500:
                    raise InvalidRequest(f"peer {node_id} refused the request: {exc}") from exc
                failures.append(f"{node_id}: {exc}")
                continue
            except PeerProtocolError as exc:
                network.note_misbehaviour(node_id, "garbage", str(exc))
                failures.append(f"{node_id}: {exc}")
                continue
            except (PeerError, StopAsyncIteration) as exc:
                log.info("peer %s did not answer for %s (%s); trying the next host", node_id, request.expert_id, exc)
                failures.append(f"{node_id}: {exc}")
                continue
            if generation is not None:
                generation.node_id = node_id
            first_s = time.perf_counter()
            while True:
                if frame.kind == "delta":
                    yield Delta(frame.text)
                elif frame.kind == "done":
                    network.check_speed(
                        node_id, host.info.expert_id, host.info.tokens_per_s, frame.completion_tokens,
                        time.perf_counter() - first_s, via="forwarded answer",
                    )
                    yield Finished(frame.finish_reason or "stop", frame.prompt_tokens, frame.completion_tokens)
                    return
                else:
                    raise PeerUnavailable(f"peer {node_id} failed mid-answer: {frame.error}")
                try:
                    frame = await frames.__anext__()
                except PeerTimedOut as exc:
                    network.note_misbehaviour(node_id, "timeout", str(exc))
                    raise PeerUnavailable(f"peer {node_id} failed mid-answer: {exc}") from exc
                except PeerProtocolError as exc:
                    network.note_misbehaviour(node_id, "garbage", str(exc))
                    raise PeerUnavailable(f"peer {node_id} failed mid-answer: {exc}") from exc
                except (PeerError, StopAsyncIteration) as exc:
                    network.note_misbehaviour(node_id, "broke_stream", str(exc))
                    raise PeerUnavailable(f"peer {node_id} failed mid-answer: {exc}") from exc
        finally:
            await frames.aclose()
    if busy_retry_s and len(busy_retry_s) == len(hosts):
        raise ExpertBusy(f"every peer hosting {request.expert_id} is busy", retry_after_s=min(busy_retry_s))
    raise PeerUnavailable(f"no peer hosting {request.expert_id} answered: {'; '.join(failures)}")


def routed_generation(
    app: web.Application, routed: Routed, messages: list[ChatMessage], params: GenerationParams
) -> Generation:
    """Answer with the routed choice; when it fails before its first token the next candidate answers."""
    chosen = routed.candidates[routed.decision.chosen_index].features
    generation = Generation(app, chosen.expert_id, chosen.node_id, _no_events(), record_metrics=False)
    generation.extra = {
        "decision_id": routed.decision.decision_id,
        "feedback_token": routed.token,
        "probability": round(routed.decision.chosen_probability, 4),
        "policy_version": routed.decision.policy_version,
        "explanation": routed.explanation,
    }
    generation.attach(_routed_events(app, routed, messages, params, generation))
    return generation


async def _routed_events(
    app: web.Application, routed: Routed, messages: list[ChatMessage], params: GenerationParams, outer: Generation
) -> AsyncIterator[GenerationEvent]:
    """Events of the first candidate, in the routed order, that starts answering."""
    failures: list[str] = []
    first_error: NodeError | None = None
    busy = 0
    for index in routed.order:
        candidate = routed.candidates[index]
        try:
            if candidate.local is not None:
                prompt_tokens, stops = await asyncio.to_thread(candidate.local.tokenize_chat, messages)
                inner = start_generation(app, candidate.local, prompt_tokens, stops, params)
            else:
                inner = forward_generation(app, [candidate.remote], messages, params)
            events = inner.__aiter__()
            first = await events.__anext__()
        except NodeError as exc:
            log.info("candidate %s on %s failed before answering: %s", candidate.features.expert_id, candidate.features.node_id, exc.message)
            failures.append(f"{candidate.features.expert_id} on {candidate.features.node_id}: {exc.message}")
            first_error = first_error or exc
            busy += isinstance(exc, ExpertBusy)
            continue
        if index != routed.decision.chosen_index:
            reason = "; ".join(failures)
            await app[router_key].record_fallback(routed.decision.decision_id, index, reason)
            outer.extra["fallback"] = {"from": routed.candidates[routed.decision.chosen_index].features.expert_id, "reason": reason}
        outer.expert_id, outer.node_id = inner.expert_id, inner.node_id
        try:
            yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()
        return
    if busy == len(routed.order):
        raise first_error
    if isinstance(first_error, InvalidRequest):
        # Refused as malformed before anything was answered: no decision to learn from, none kept.
        await app[router_key].forget(routed.decision.decision_id)
        raise first_error
    raise PeerUnavailable(f"no candidate could answer: {'; '.join(failures)}")


async def decomposed_generation(
    app: web.Application, query_plan: Plan, messages: list[ChatMessage], params: GenerationParams, constraints
) -> Generation:
    """Route each part of a compound query on its own and answer them one after another, each under a heading."""
    router = app[router_key]
    routed_parts = [(part, await router.route(part.request(), constraints)) for part in query_plan.parts]
    group_id, token = await router.record_group([r.decision.decision_id for _, r in routed_parts])
    generation = Generation(app, "", "", _no_events(), record_metrics=False)
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
    generation.extra = {"decomposed": True, "decision_id": group_id, "feedback_token": token, "parts": parts_view}
    generation.attach(_decomposed_events(app, routed_parts, parts_view, messages, params, generation))
    return generation


async def _decomposed_events(
    app: web.Application, routed_parts, parts_view, messages: list[ChatMessage], params: GenerationParams, outer: Generation
) -> AsyncIterator[GenerationEvent]:
    """Each part's answer in turn, under a heading naming its expert; usage summed over the parts."""
    prompt_tokens = completion_tokens = 0
    finish_reason = "stop"
    served: list[tuple[str, str]] = []
    for position, (part, routed) in enumerate(routed_parts):
        part_messages = [*messages[:-1], ChatMessage("user", part.request())]
        inner = routed_generation(app, routed, part_messages, params)
        events = inner.__aiter__()
        try:
            first = await events.__anext__()
            served.append((inner.expert_id, inner.node_id))
            parts_view[position].update(expert=inner.expert_id, node=inner.node_id)
            if "fallback" in inner.extra:
                parts_view[position]["fallback"] = inner.extra["fallback"]
            outer.expert_id = "+".join(dict.fromkeys(e for e, _ in served))
            outer.node_id = "+".join(dict.fromkeys(n for _, n in served))
            separator = PART_SEPARATOR if position else ""
            yield Delta(separator + compose_header(part, inner.expert_id, inner.node_id) + "\n")
            event = first
            while True:
                if isinstance(event, Finished):
                    prompt_tokens += event.prompt_tokens
                    completion_tokens += event.completion_tokens
                    finish_reason = event.finish_reason
                    break
                yield event
                event = await events.__anext__()
        finally:
            await events.aclose()
    yield Finished(finish_reason, prompt_tokens, completion_tokens)


PROPOSAL_MAX_TOKENS = 128


def _may_hide_several_requests(text: str) -> bool:
    """Cheap signs that rules may have missed a split, before paying for an expert's proposal."""
    return len(text) > 40 and (text.count("?") + text.count(".") + text.count("!") >= 2 or " and " in text)


def _split_proposer(app: web.Application, constraints) -> LocalExpert | None:
    """The approved local instruct expert whose judged instruction-following is good enough to propose splits."""
    threshold = app[settings_key].decompose_proposer_min_score
    best: tuple[float, LocalExpert] | None = None
    for candidate in app[router_key].candidates(constraints):
        expert = candidate.local
        score = candidate.features.scores.get("instruction")
        if expert is None or expert.spec.prompt_style != "chat" or score is None or score < threshold:
            continue
        if best is None or score > best[0]:
            best = (score, expert)
    return None if best is None else best[1]


async def plan_query(app: web.Application, text: str, *, enabled: bool, constraints) -> Plan:
    """Split by rules first; when they find one request, a good enough instruct expert may propose a split."""
    if len(text) > MAX_ROUTING_CHARS:
        # A very long message is answered whole: splitting it would cost seconds and help nobody, and
        # regexes over a megabyte hold the GIL even in a thread. Its one part is read from its start and end.
        return plan(routing_text(text), enabled=False)
    query_plan = await asyncio.to_thread(plan, text, enabled=enabled)
    if not enabled or query_plan.compound or not _may_hide_several_requests(text):
        return query_plan
    proposer = _split_proposer(app, constraints)
    if proposer is None:
        return query_plan
    log.info("asked %s to propose a split", proposer.spec.id)
    try:
        reply = await ask_expert(proposer, proposal_prompt(text), max_tokens=PROPOSAL_MAX_TOKENS)
    except NodeError as exc:
        log.info("no split proposal from %s: %s", proposer.spec.id, exc.message)
        return query_plan
    parts = parse_proposal(reply.text, text)
    if parts is None or len(parts) < 2:
        log.info("kept the rules' plan: %s proposed no faithful split", proposer.spec.id)
        return query_plan
    return Plan(tuple(parts), True)
