"""Execute: start an answer on the first of several experts that starts answering (failover), then stream it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from node.errors import NodeError
from node.serving.expert import Expert, Prompt, run
from node.serving.experts import GenerationEvent, GenerationParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """One expert that could not start answering, and why."""

    expert: Expert
    error: NodeError

    def describe(self) -> str:
        """`expert on node: message`, for fallback reasons and errors."""
        return f"{self.expert.card.expert_id} on {self.expert.node_id}: {self.error.message}"


class Exhausted(Exception):
    """No expert in the list started answering."""

    def __init__(self, failures: Sequence[Failure]) -> None:
        super().__init__("; ".join(f.describe() for f in failures))
        self.failures = tuple(failures)


@dataclass(frozen=True)
class Started:
    """An answer whose first event has arrived, on the `position`-th expert tried."""

    expert: Expert
    position: int
    events: AsyncIterator[GenerationEvent]  # from the first event on; closing it frees the expert's place
    failures: tuple[Failure, ...]


async def _from_first(first: GenerationEvent, rest: AsyncIterator[GenerationEvent]) -> AsyncIterator[GenerationEvent]:
    """The first event, then the rest; closing this closes the rest (and so frees the place)."""
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def first_answering(experts: Sequence[Expert], prompt: Prompt, params: GenerationParams) -> Started:
    """Try the experts in order until one produces its first event; raise `Exhausted` when none does.

    An expert that fails before its first event frees its place at once (the admission context ends
    with the failed stream), so the next one is tried with nothing held.
    """
    failures: list[Failure] = []
    for position, expert in enumerate(experts):
        try:
            prepared = await expert.prepare(prompt)
            events = run(expert, prepared, params)
            first = await events.__anext__()
        except NodeError as exc:
            log.info("%s on %s failed before answering: %s", expert.card.expert_id, expert.node_id, exc.message)
            failures.append(Failure(expert, exc))
            continue
        return Started(expert, position, _from_first(first, events), tuple(failures))
    raise Exhausted(failures)
