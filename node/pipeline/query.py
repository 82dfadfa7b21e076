"""The pipeline's typed input and output: a query, and the answer the HTTP layer renders."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from node.routing.router import RouteConstraints
from node.serving.expert import Prompt
from node.serving.experts import ChatMessage, GenerationEvent, GenerationParams

AUTO_MODEL = "auto"


@dataclass(frozen=True)
class Query:
    """What a client asked: a chat (or a raw text prompt), for `auto` or a named expert, with its options."""

    model: str
    prompt: Prompt  # chat messages, or a raw completion prompt (local experts only)
    params: GenerationParams
    constraints: RouteConstraints = field(default_factory=RouteConstraints)
    decompose: bool = False  # may an `auto` chat be split into parts

    @property
    def routing_text(self) -> str:
        """What the router reads of a conversation: the last user message."""
        if isinstance(self.prompt, str):
            return self.prompt
        messages: list[ChatMessage] = list(self.prompt)
        return next((m.content for m in reversed(messages) if m.role == "user"), messages[-1].content)


@dataclass(frozen=True)
class PartServed:
    """In a decomposed answer's stream: the next part is answered by this expert (before its heading)."""

    index: int
    expert_id: str
    node_id: str
    fallback: Mapping[str, str] | None = None


Event = GenerationEvent | PartServed


@dataclass(frozen=True)
class Answer:
    """An answer that has started: who answers (known before the first event is sent) and its events."""

    expert_id: str
    node_id: str
    provenance: Mapping[str, Any]  # the `expertmesh` object of every response
    events: AsyncIterator[Event]  # the first event is ready; close it to free the expert's place


def served(provenance: Mapping[str, Any], event: PartServed) -> dict[str, Any]:
    """A decomposed answer's provenance once another part has an expert: the part's entry and the joined ids."""
    parts = [dict(p) for p in provenance["parts"]]
    parts[event.index].update(expert=event.expert_id, node=event.node_id)
    if event.fallback is not None:
        parts[event.index]["fallback"] = dict(event.fallback)
    answered = parts[: event.index + 1]
    return {
        **provenance,
        "expert": "+".join(dict.fromkeys(p["expert"] for p in answered)),
        "node": "+".join(dict.fromkeys(p["node"] for p in answered)),
        "parts": parts,
    }
