"""One `Expert` interface for local and remote experts, the local adapter, and typed trust evidence."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from bandit.features import ExpertFeatures, ExpertId, NodeId
from node.errors import InvalidRequest, NodeError
from node.metrics import NodeMetrics
from node.serving.experts import ChatMessage, Delta, Finished, GenerationEvent, GenerationParams, ServedExpert
from node.serving.specialist_serving import specialist_fields
from peers.client import PeerError, PeerProtocolError, PeerRejected, PeerTimedOut


class TrustEvidence(enum.Enum):
    """What a peer did that lowers this node's trust in it (the values are `peers.trust.PENALTIES` keys)."""

    MISSING_EXPERT = "missing_expert"
    GARBAGE = "garbage"
    BAD_CARD = "bad_card"
    SPEED_LIE = "speed_lie"
    MODEL_MISMATCH = "model_mismatch"
    SCORE_LIE = "score_lie"
    TIMEOUT = "timeout"
    BROKE_STREAM = "broke_stream"
    BAD_SUMMARY = "bad_summary"


def classify_peer_failure(exc: BaseException, *, mid_stream: bool) -> TrustEvidence | None:
    """The evidence a failed peer call is against the peer, or None when it may be an accident of the network.

    The one rule for answers, probes and spot checks alike: an expert it advertised and then denied,
    bytes that are not the protocol, and silence after it accepted the request count against it; a
    connection that breaks counts only once it was streaming (before, the peer may simply be down).
    """
    if isinstance(exc, PeerRejected):
        return TrustEvidence.MISSING_EXPERT if exc.status == 404 else None
    if isinstance(exc, PeerProtocolError):
        return TrustEvidence.GARBAGE
    if isinstance(exc, PeerTimedOut):
        return TrustEvidence.TIMEOUT
    if mid_stream and isinstance(exc, (PeerError, StopAsyncIteration)):
        return TrustEvidence.BROKE_STREAM
    return None


@dataclass(frozen=True)
class ExpertCard:
    """Who an expert is: the same fields whether it runs here or on a peer."""

    expert_id: str
    name: str
    sha256: str
    family: str | None
    params: str | None
    quantization: str | None
    prompt_style: str
    n_ctx: int
    size_bytes: int | None = None  # known for local files only
    base_sha256: str = ""  # a specialist's base model (empty for a plain model)
    definition_digest: str = ""  # a specialist's definition (empty for a plain model)
    claimed_tokens_per_s: float | None = None  # what a peer's card claims; None for a local expert


@dataclass(frozen=True)
class Load:
    """An expert's live load, as last known."""

    queue_depth: int
    capacity: int
    running: int
    waiting: int
    tokens_per_s: float | None
    latency_ms: float | None  # a local expert's mean request time; a peer's round-trip time


def card_view(card: ExpertCard) -> dict[str, Any]:
    """The fields of an expert's `/v1/models` entry that come from its card, local or remote."""
    return {
        "name": card.name,
        "sha256": card.sha256,
        "family": card.family,
        "quantization": card.quantization,
        "prompt_style": card.prompt_style,
        "n_ctx": card.n_ctx,
    }


def card_features(card: ExpertCard, load: Load, node_id: str, *, local: bool, scores: Mapping[str, float]) -> ExpertFeatures:
    """What the bandit sees of an expert, local or remote: its card, its load, its judged scores."""
    return ExpertFeatures(
        expert_id=ExpertId(card.expert_id),
        node_id=NodeId(node_id),
        family=card.family or "unknown",
        params=card.params or "unknown",
        quantization=card.quantization or "unknown",
        scores=scores,
        latency_ms_avg=load.latency_ms,
        queue_depth=load.queue_depth,
        local=local,
        running=load.running,
        waiting=load.waiting,
        tokens_per_s=load.tokens_per_s,
        # Only specialists have them: for a plain model these would repeat its id, which doubles its learning rate.
        base=card.base_sha256[:12],
        definition=card.definition_digest[:12],
    )


@dataclass(frozen=True)
class Prepared:
    """A prompt made ready for one expert (tokenized for a local one) before it takes a place."""

    messages: tuple[ChatMessage, ...] = ()
    tokens: tuple[int, ...] = ()
    stops: tuple[str, ...] = ()


# A chat, or (local experts only) a raw completion prompt.
Prompt = Sequence[ChatMessage] | str


@runtime_checkable
class Expert(Protocol):
    """An expert that may answer: identity, load, what the bandit and the API see, admission and generation."""

    @property
    def card(self) -> ExpertCard:
        """Identity and model card."""
        ...

    @property
    def node_id(self) -> str:
        """The node hosting it."""
        ...

    @property
    def local(self) -> bool:
        """Whether it runs on this node."""
        ...

    def load(self) -> Load:
        """Live load."""
        ...

    def features(self, scores: Mapping[str, float]) -> ExpertFeatures:
        """What the bandit sees of it, with the judged scores this node believes."""
        ...

    def view(self) -> dict[str, Any]:
        """Its `expertmesh` fields in the model listings."""
        ...

    async def prepare(self, prompt: Prompt) -> Prepared:
        """Make a prompt ready (tokenize it); bad prompts fail here, before a place is taken."""
        ...

    def admit(self) -> AbstractAsyncContextManager[None]:
        """Hold a place for one request (429 at once when full); the place comes back however the block ends."""
        ...

    def generate(self, prepared: Prepared, params: GenerationParams) -> AsyncIterator[GenerationEvent]:
        """Stream one answer; only inside `admit()`. Peer failures become `NodeError`s (and trust evidence)."""
        ...


async def run(expert: Expert, prepared: Prepared, params: GenerationParams) -> AsyncGenerator[GenerationEvent, None]:
    """One admitted answer as events; closing (or cancelling) the iterator frees the place."""
    async with expert.admit():
        async for event in expert.generate(prepared, params):
            yield event


class Metered:
    """Time to first token and token counts of one answer, recorded as its events pass."""

    def __init__(self, metrics: NodeMetrics | None, expert_id: str) -> None:
        self._metrics = metrics
        self._expert_id = expert_id
        self._started_s = time.perf_counter()
        self._first = True

    def see(self, event: GenerationEvent) -> None:
        """Record what one event tells."""
        if self._metrics is None:
            return
        if self._first and isinstance(event, Delta):
            self._first = False
            self._metrics.time_to_first_token.labels(self._expert_id).observe(time.perf_counter() - self._started_s)
        if isinstance(event, Finished):
            self._metrics.tokens.labels(self._expert_id, "prompt").inc(event.prompt_tokens)
            self._metrics.tokens.labels(self._expert_id, "completion").inc(event.completion_tokens)


class Local:
    """A model loaded here (plain or specialist) as an `Expert`."""

    def __init__(self, expert: ServedExpert, node_id: str, metrics: NodeMetrics | None = None) -> None:
        self.expert = expert
        self._node_id = node_id
        self._metrics = metrics
        spec = expert.spec
        self._card = ExpertCard(
            expert_id=spec.id,
            name=spec.name,
            sha256=spec.sha256,
            family=spec.family,
            params=spec.params,
            quantization=spec.quantization,
            prompt_style=spec.prompt_style,
            n_ctx=spec.n_ctx,
            size_bytes=spec.size_bytes,
            base_sha256=getattr(expert, "base_sha256", ""),
            definition_digest=getattr(expert, "definition_digest", ""),
        )

    @property
    def card(self) -> ExpertCard:
        """Identity and model card."""
        return self._card

    @property
    def node_id(self) -> str:
        """This node."""
        return self._node_id

    @property
    def local(self) -> bool:
        """Always: it runs here."""
        return True

    def load(self) -> Load:
        """Queue and slot counts, measured speed and mean request time."""
        e = self.expert
        average_s = e.average_request_s()
        return Load(
            queue_depth=e.queue_depth,
            capacity=e.capacity,
            running=e.running,
            waiting=e.waiting,
            tokens_per_s=e.tokens_per_s() or None,
            latency_ms=None if average_s is None else average_s * 1000,
        )

    def features(self, scores: Mapping[str, float]) -> ExpertFeatures:
        """What the bandit sees of it."""
        return card_features(self._card, self.load(), self._node_id, local=True, scores=scores)

    def view(self) -> dict[str, Any]:
        """Its `expertmesh` fields in `/v1/models`."""
        return {
            **card_view(self._card),
            "size_bytes": self._card.size_bytes,
            "queue_depth": self.expert.queue_depth,
            "local": True,
            **specialist_fields(self.expert),
        }

    async def prepare(self, prompt: Prompt) -> Prepared:
        """Tokenize off the event loop (a long conversation takes a while); an empty text prompt is refused."""
        if isinstance(prompt, str):
            tokens = await asyncio.to_thread(self.expert.tokenize_text, prompt)
            if not tokens:  # refused before taking a queue place (generate checks it again for chat)
                raise InvalidRequest("the prompt is empty", param="prompt")
            return Prepared(tokens=tuple(tokens))
        tokens, stops = await asyncio.to_thread(self.expert.tokenize_chat, list(prompt))
        return Prepared(messages=tuple(prompt), tokens=tuple(tokens), stops=tuple(stops))

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """A place in the expert's slots or queue, refused at once (429) when full, given back at the end."""
        try:
            self.expert.admit()
        except NodeError:
            if self._metrics is not None:
                self._metrics.rejected.labels(self._card.expert_id).inc()
            raise
        try:
            yield
        finally:
            self.expert.release()

    async def generate(self, prepared: Prepared, params: GenerationParams) -> AsyncIterator[GenerationEvent]:
        """Stream from the worker; a chat answer from a completion transcript starts at its first non-space."""
        meter = Metered(self._metrics, self._card.expert_id)
        events = self.expert.generate(list(prepared.tokens), prepared.stops, params)
        # The transcript ends with "A:", so the model answers " Paris"; a chat client asked for "Paris". A raw
        # text prompt (`/v1/completions`) keeps every character: there the client wrote the prompt.
        leading_space = bool(prepared.messages) and self._card.prompt_style == "completion"
        try:
            async for event in events:
                meter.see(event)
                if leading_space and isinstance(event, Delta):
                    text = event.text.lstrip()
                    if not text:
                        continue
                    leading_space, event = False, Delta(text)
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]
