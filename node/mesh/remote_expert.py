"""Experts on peers as `Expert`s (answers through the peer client), and the list of every expert this node may use."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from bandit.features import ExpertFeatures
from node.errors import ExpertBusy, InvalidRequest, PeerUnavailable
from node.mesh.network import Network, RemoteExpert
from node.metrics import NodeMetrics
from node.serving.expert import (
    Expert,
    ExpertCard,
    Load,
    Local,
    Metered,
    Prepared,
    Prompt,
    card_features,
    card_view,
    classify_peer_failure,
)
from node.serving.experts import Delta, ExpertPool, Finished, FinishReason, GenerationEvent, GenerationParams
from peers.client import PeerClient, PeerError, PeerRejected
from peers.identity import NodeId as PeerNodeId
from peers.wire import ChatMessage as WireChatMessage
from peers.wire import GenerateRequest

log = logging.getLogger(__name__)


class Remote:
    """One expert on one alive peer as an `Expert`: its card from the peer's hello, answers over the peer API."""

    def __init__(
        self,
        remote: RemoteExpert,
        client: PeerClient,
        network: Network,
        metrics: NodeMetrics | None = None,
        *,
        via: str = "forwarded answer",
    ) -> None:
        self.remote = remote
        self._via = via  # what the evidence says this node was doing: a forwarded answer, a spot check...
        self._client = client
        self._network = network
        self._metrics = metrics
        info = remote.info
        self._card = ExpertCard(
            expert_id=info.expert_id,
            name=info.name,
            sha256=info.sha256,
            family=info.family,
            params=info.params,
            quantization=info.quantization,
            prompt_style=info.prompt_style,
            n_ctx=info.n_ctx,
            base_sha256=info.base_sha256,
            definition_digest=info.definition_digest,
            claimed_tokens_per_s=info.tokens_per_s,
        )

    @property
    def card(self) -> ExpertCard:
        """Identity and model card, as the peer's verified hello card says."""
        return self._card

    @property
    def node_id(self) -> str:
        """The peer hosting it."""
        return self.remote.peer.node_id

    @property
    def local(self) -> bool:
        """Never: it runs on a peer."""
        return False

    def load(self) -> Load:
        """The queue depth the peer's last card said, and the round-trip time to it."""
        info = self.remote.info
        return Load(
            queue_depth=info.queue_depth,
            capacity=info.queue_size + 1,
            running=min(info.queue_depth, info.parallel),
            waiting=max(0, info.queue_depth - info.parallel),
            tokens_per_s=info.tokens_per_s,
            latency_ms=self.remote.peer.rtt_ms,
        )

    def features(self, scores: Mapping[str, float]) -> ExpertFeatures:
        """What the bandit sees of it."""
        return card_features(self._card, self.load(), self.node_id, local=False, scores=scores)

    def view(self) -> dict[str, Any]:
        """Its `expertmesh` fields in `/v1/models` (the listing adds every host's node id)."""
        return {
            **card_view(self._card),
            "queue_depth": self.remote.info.queue_depth,
            "local": False,
        }

    async def prepare(self, prompt: Prompt) -> Prepared:
        """A chat travels as messages; a raw completion prompt runs on local experts only."""
        if isinstance(prompt, str):
            raise InvalidRequest(
                f"{self._card.expert_id} is on another node; text completions run on local experts only (use chat completions)",
                param="model",
            )
        return Prepared(messages=tuple(prompt))

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Nothing to hold here: the peer admits or refuses (429) when asked."""
        yield

    async def generate(self, prepared: Prepared, params: GenerationParams) -> AsyncIterator[GenerationEvent]:
        """Frames from the peer as events; its misbehaviour becomes trust evidence, its failures node errors."""
        node_id, expert_id = self.node_id, self._card.expert_id
        request = GenerateRequest(
            request_id=uuid.uuid4().hex,
            expert_id=expert_id,
            messages=tuple(WireChatMessage(role=m.role, content=m.content) for m in prepared.messages),
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=params.stop,
            seed=params.seed,
            origin_node=PeerNodeId(self._network.node_id),
            hops=1,
            response_format=params.response_format,
        )
        peer = self.remote.peer
        frames = self._client.generate(
            peer.url, request, expected_key=peer.card.public_key if peer.card else None
        ).__aiter__()
        meter = Metered(self._metrics, expert_id)
        try:
            try:
                frame = await frames.__anext__()
            except (PeerError, StopAsyncIteration) as exc:
                self._note(exc, mid_stream=False)
                if isinstance(exc, PeerRejected) and exc.status == 429:
                    raise ExpertBusy(f"peer {node_id} is busy: {exc}", retry_after_s=exc.retry_after_s or 1) from exc
                if isinstance(exc, PeerRejected) and exc.status != 404 and 400 <= exc.status < 500:
                    raise InvalidRequest(f"peer {node_id} refused the request: {exc}") from exc
                log.info("peer %s did not answer for %s (%s)", node_id, expert_id, exc)
                raise PeerUnavailable(f"peer {node_id} did not answer: {exc}") from exc
            first_s = time.perf_counter()
            while True:
                if frame.kind == "delta":
                    event: GenerationEvent = Delta(frame.text)
                elif frame.kind == "done":
                    self._network.check_speed(
                        node_id, expert_id, self._card.claimed_tokens_per_s, frame.completion_tokens,
                        time.perf_counter() - first_s, via=self._via,
                    )
                    # The API knows "stop" and "length"; a peer's anything else (or nothing) ends as a stop.
                    reason: FinishReason = "length" if frame.finish_reason == "length" else "stop"
                    event = Finished(reason, frame.prompt_tokens, frame.completion_tokens)
                else:
                    raise PeerUnavailable(f"peer {node_id} failed mid-answer: {frame.error}")
                meter.see(event)
                yield event
                if isinstance(event, Finished):
                    return
                try:
                    frame = await frames.__anext__()
                except (PeerError, StopAsyncIteration) as exc:
                    self._note(exc, mid_stream=True)
                    raise PeerUnavailable(f"peer {node_id} failed mid-answer: {exc}") from exc
        finally:
            await frames.aclose()  # type: ignore[attr-defined]

    def _note(self, exc: BaseException, *, mid_stream: bool) -> None:
        """Record a failure as trust evidence when it is evidence."""
        evidence = classify_peer_failure(exc, mid_stream=mid_stream)
        if evidence is not None:
            self._network.note_misbehaviour(self.node_id, evidence, f"{self._via}: {self._card.expert_id}: {exc}")


class Experts:
    """Every expert this node may use, local and on alive trusted peers, as `Expert`s."""

    def __init__(self, pool: ExpertPool, network: Network, client: PeerClient, metrics: NodeMetrics | None = None) -> None:
        self._pool = pool
        self._network = network
        self._client = client
        self._metrics = metrics

    def local(self) -> list[Expert]:
        """The experts loaded here."""
        return [Local(e, self._network.node_id, self._metrics) for e in self._pool]

    def local_named(self, expert_id: str) -> Local | None:
        """A local expert by id."""
        expert = self._pool.get(expert_id)
        return None if expert is None else Local(expert, self._network.node_id, self._metrics)

    def remote(self) -> list[Remote]:
        """Every expert on every alive, trusted peer, nearest peer first."""
        return [self.wrap(r) for r in self._network.remote_experts()]

    def hosts_of(self, expert_id: str) -> list[Remote]:
        """The alive peers hosting `expert_id`, nearest first."""
        return [self.wrap(r) for r in self._network.hosts_of(expert_id)]

    def wrap(self, remote: RemoteExpert) -> Remote:
        """One peer's expert as an `Expert`."""
        return Remote(remote, self._client, self._network, self._metrics)

    def all(self) -> list[Expert]:
        """Local experts first, then the remote ones."""
        return [*self.local(), *self.remote()]
