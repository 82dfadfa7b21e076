"""Execute: start an answer on the first of several experts that starts answering (failover), then stream it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from node.errors import NodeError
from node.serving.expert import Expert, Prompt, run
from node.serving.experts import GenerationParams

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
    events: Stream  # from the first event on; closing it frees the expert's place
    failures: tuple[Failure, ...]


class Stream:
    """An answer's events that owns the iterators holding places: closing it closes them, even if never iterated.

    (An async generator closed before its first step never runs its `finally`, so one alone could leak a place.)
    """

    def __init__(self, events: AsyncIterator[Any], *owned: AsyncIterator[Any], first: Any = None) -> None:
        self._events = events
        self._owned = (events, *owned)
        self._first = first

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Close every owned iterator (each gives its place back); closing twice is harmless."""
        self._first = None
        for events in self._owned:
            await events.aclose()  # type: ignore[attr-defined]


async def first_answering(
    experts: Sequence[Expert], prompt: Prompt, params: GenerationParams, *, final: type[NodeError] | None = None
) -> Started:
    """Try the experts in order until one produces its first event; raise `Exhausted` when none does.

    A failure of type `final` ends the search at once (a peer refusing the request as malformed
    would be refused by the next host of the same expert too).

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
            if final is not None and isinstance(exc, final):
                break
            continue
        return Started(expert, position, Stream(events, first=first), tuple(failures))
    raise Exhausted(failures)
