"""A specialist served on a shared base model: its own id, prompt, sampling and constraint; the base's weights and queue."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from node.errors import CatalogError
from node.serving import catalog
from node.serving.experts import (
    COMPLETION_STOPS,
    ChatMessage,
    ExpertId,
    GenerationEvent,
    GenerationParams,
    LocalExpert,
    completion_prompt,
)
from node.serving.specialists import (
    Definition,
    DefinitionError,
    definition_digest,
    expert_digest,
    specialist_id,
)

log = logging.getLogger(__name__)


class SpecialistExpert:
    """One definition on a loaded base: same surface as a LocalExpert, so it is judged, advertised and routed alike."""

    def __init__(self, definition: Definition, base: LocalExpert, source: str = "") -> None:
        base_style = base.spec.prompt_style
        if definition.prompt_style == "chat" and base_style != "chat":
            raise DefinitionError(
                f"{source or definition.name}: field 'prompt_style': 'chat' needs a base with a chat template; "
                f"{base.spec.name} has none (use 'completion')",
                param="prompt_style",
            )
        self.definition = definition
        self.source = source
        self.base = base
        self.base_sha256 = base.spec.sha256
        self.definition_digest = definition_digest(definition)
        self._grammar = definition.constraint_grammar()
        self._stops = tuple(definition.sampling.stop)
        # `sha256` is what cards and scores are keyed by: for a specialist, the digest of base + definition.
        self.spec = dataclasses.replace(
            base.spec,
            id=ExpertId(specialist_id(definition, self.base_sha256)),
            name=definition.name,
            sha256=expert_digest(definition, self.base_sha256),
            prompt_style=definition.prompt_style,
        )

    @property
    def constrained(self) -> bool:
        """Whether every answer is held to a grammar or JSON schema."""
        return self._grammar is not None

    # The base's worker process runs every sibling, so admission and load are the base's.
    @property
    def queue_depth(self) -> int:
        """Requests running or waiting on the shared base."""
        return self.base.queue_depth

    @property
    def capacity(self) -> int:
        """Most requests the shared base admits at once."""
        return self.base.capacity

    @property
    def running(self) -> int:
        """Requests holding a slot of the shared base."""
        return self.base.running

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot of the shared base."""
        return self.base.waiting

    @property
    def parallel(self) -> int:
        """The shared base's sequence slots."""
        return self.base.parallel

    @property
    def restarts(self) -> int:
        """Restarts of the shared base's worker process."""
        return self.base.restarts

    @property
    def worker_pid(self) -> int | None:
        """The shared base's worker process."""
        return self.base.worker_pid

    @property
    def safe_cpu_kernels(self) -> bool:
        """Whether the shared base runs without repacked CPU kernels."""
        return self.base.safe_cpu_kernels

    def tokens_per_s(self) -> float:
        """Tokens per second of the shared base, all slots and siblings together."""
        return self.base.tokens_per_s()

    def average_request_s(self) -> float | None:
        """Mean duration of the shared base's last requests."""
        return self.base.average_request_s()

    def retry_after_s(self) -> int:
        """The shared base's hint for a refused client."""
        return self.base.retry_after_s()

    def admit(self) -> None:
        """Take a place in the shared base's queue or refuse at once with 429."""
        self.base.admit()

    def release(self) -> None:
        """Give back a place taken by `admit`."""
        self.base.release()

    def close(self) -> None:
        """Nothing of its own to free: the base is closed by whoever loaded it."""

    def framed(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        """The conversation as the specialist sends it: its system prompt and examples first."""
        system_texts = [self.definition.system] if self.definition.system else []
        system_texts += [m.content for m in messages if m.role in ("system", "developer") and m.content]
        framed = [ChatMessage("system", "\n\n".join(system_texts))] if system_texts else []
        for example in self.definition.examples:
            framed += [ChatMessage("user", example.user), ChatMessage("assistant", example.assistant)]
        framed += [m for m in messages if m.role not in ("system", "developer")]
        return framed

    def tokenize_chat(self, messages: Sequence[ChatMessage]) -> tuple[list[int], tuple[str, ...]]:
        """Prompt tokens and stops for a conversation, framed by the definition in its prompt style."""
        framed = self.framed(messages)
        if self.definition.prompt_style == "chat":
            tokens, stops = self.base.tokenize_chat(framed)
        else:
            tokens, stops = self.base.tokenize_text(completion_prompt(framed)), COMPLETION_STOPS
        return tokens, tuple(dict.fromkeys([*stops, *self._stops]))

    def tokenize_text(self, prompt: str) -> list[int]:
        """Prompt tokens for a raw completion prompt (no framing: the client wrote the whole prompt)."""
        return self.base.tokenize_text(prompt)

    def params_for(self, params: GenerationParams) -> GenerationParams:
        """The request's settings under the definition: its sampling, its max_tokens as a cap and its constraint.

        A request that brings its own constraint (`response_format`) replaces the definition's, and with it the
        definition's max_tokens cap, which was sized for the definition's own output.
        """
        sampling = self.definition.sampling
        if params.grammar is not None:
            return dataclasses.replace(params, temperature=sampling.temperature, top_p=sampling.top_p)
        return dataclasses.replace(
            params,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=min(params.max_tokens, sampling.max_tokens),
            grammar=self._grammar,
        )

    async def generate(
        self, prompt_tokens: list[int], style_stops: Sequence[str], params: GenerationParams
    ) -> AsyncIterator[GenerationEvent]:
        """Stream a generation on the shared base under the definition's settings."""
        async for event in self.base.generate(prompt_tokens, style_stops, self.params_for(params)):
            yield event


LoadBase = Callable[[catalog.ModelFile], LocalExpert]


def build_specialists(
    definitions: Sequence[tuple[Definition, str]],
    loaded: Sequence[LocalExpert],
    load_base: LoadBase,
    models_dir: Path,
) -> tuple[list[SpecialistExpert], list[LocalExpert]]:
    """Specialists on shared bases: a base already loaded is reused; one missing is loaded once (and returned, unserved)."""
    by_sha = {expert.spec.sha256: expert for expert in loaded}
    extra: list[LocalExpert] = []
    specialists: list[SpecialistExpert] = []
    seen: set[str] = {expert.spec.id for expert in loaded}
    for definition, source in definitions:
        try:
            model = catalog.resolve(definition.base, models_dir, progress=True)
        except CatalogError as exc:
            raise DefinitionError(f"{source}: field 'base': {exc.message}", param="base") from exc
        base = by_sha.get(model.sha256)
        if base is None:
            base = load_base(model)
            by_sha[model.sha256] = base
            extra.append(base)
        specialist = SpecialistExpert(definition, base, source)
        if specialist.spec.id in seen:
            log.warning("specialist %s (%s) is configured twice; serving it once", specialist.spec.id, source)
            continue
        seen.add(specialist.spec.id)
        specialists.append(specialist)
        log.info("specialist %s on %s (%s)", specialist.spec.id, base.spec.id, source)
    return specialists, extra


def specialist_fields(expert: object) -> dict[str, object]:
    """What a listing shows of a specialist (base, digest, purpose); empty for a plain model."""
    if not isinstance(expert, SpecialistExpert):
        return {}
    definition = expert.definition
    return {
        "specialist": {
            "base": expert.base.spec.id,
            "base_sha256": expert.base_sha256,
            "definition_digest": expert.definition_digest,
            "version": definition.version,
            "author": definition.author,
            "description": definition.description,
            "constrained": expert.constrained,
        }
    }
