"""In-process test doubles for the `Expert` seam: experts, a peer client and a trust recorder; no models, no sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from bandit.features import ExpertFeatures, ExpertId, NodeId
from node.errors import ExpertBusy, InvalidRequest, NodeError
from node.serving.expert import ExpertCard, Load, Prepared, Prompt, TrustEvidence
from node.serving.experts import Delta, Finished, GenerationEvent, GenerationParams


class FakeExpert:
    """An `Expert` that answers "<id> says: <last user message>" a word at a time, or fails as told."""

    def __init__(
        self,
        expert_id: str,
        *,
        node_id: str = "node-a",
        local: bool = True,
        capacity: int = 2,
        fail: NodeError | None = None,
        answers_left: int | None = None,
        hang_after_first: bool = False,
        sha256: str | None = None,
    ) -> None:
        self._card = ExpertCard(
            expert_id=expert_id,
            name=expert_id.split("@")[0],
            sha256=sha256 or (expert_id.encode().hex() * 64)[:64],
            family="fake",
            params="1M",
            quantization="f32",
            prompt_style="chat",
            n_ctx=512,
        )
        self._node_id = node_id
        self._local = local
        self.capacity = capacity
        self.fail = fail  # raised before the first event
        self.answers_left = answers_left  # after this many answers it fails as unavailable
        self.hang_after_first = hang_after_first  # stream one word, then wait until cancelled
        self.held = 0  # places taken and not given back
        self.asked: list[str] = []  # the last user message of every answer started

    @property
    def card(self) -> ExpertCard:
        return self._card

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def local(self) -> bool:
        return self._local

    def load(self) -> Load:
        return Load(self.held, self.capacity, self.held, 0, None, None)

    def features(self, scores: Mapping[str, float]) -> ExpertFeatures:
        return ExpertFeatures(
            expert_id=ExpertId(self._card.expert_id),
            node_id=NodeId(self._node_id),
            family="fake",
            params="1M",
            quantization="f32",
            scores=scores,
            latency_ms_avg=None,
            queue_depth=self.held,
            local=self._local,
        )

    def view(self) -> dict[str, Any]:
        return {"name": self._card.name, "local": self._local, "queue_depth": self.held}

    async def prepare(self, prompt: Prompt) -> Prepared:
        if isinstance(prompt, str):
            raise InvalidRequest("the fake answers chats only", param="prompt")
        return Prepared(messages=tuple(prompt))

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self.held >= self.capacity:
            raise ExpertBusy(f"{self._card.expert_id} is busy", retry_after_s=1)
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1

    async def generate(self, prepared: Prepared, params: GenerationParams) -> AsyncIterator[GenerationEvent]:
        from node.errors import PeerUnavailable

        if self.fail is not None:
            raise self.fail
        if self.answers_left is not None:
            if self.answers_left <= 0:
                raise PeerUnavailable(f"{self._card.expert_id} has no answers left")
            self.answers_left -= 1
        question = next(m.content for m in reversed(prepared.messages) if m.role == "user")
        self.asked.append(question)
        words = f"{self._card.expert_id} says: {question}".split(" ")
        for index, word in enumerate(words[: params.max_tokens]):
            yield Delta(word if index == 0 else " " + word)
            if self.hang_after_first:
                await asyncio.Event().wait()
        yield Finished("stop", len(question.split()), min(len(words), params.max_tokens))


class TrustRecorder:
    """The part of `Network` the remote adapter reports to, recording what it is told."""

    node_id = "node-self"

    def __init__(self) -> None:
        self.evidence: list[tuple[str, TrustEvidence]] = []
        self.good: list[str] = []

    def note_misbehaviour(self, node_id: str, evidence: TrustEvidence, detail: str) -> None:
        self.evidence.append((node_id, evidence))

    def check_speed(self, node_id: str, *_args: Any, **_kwargs: Any) -> None:
        self.good.append(node_id)


class FakePeerClient:
    """A peer client whose `generate` raises `error` (before any frame, or after `frames`) or sends `frames`."""

    def __init__(self, frames: list[Any] | None = None, error: BaseException | None = None) -> None:
        self.frames = frames or []
        self.error = error

    async def generate(self, url: str, request: Any, *, expected_key: bytes | None = None) -> AsyncIterator[Any]:
        for frame in self.frames:
            yield frame
        if self.error is not None:
            raise self.error
