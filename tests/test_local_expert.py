"""The `Local` adapter's own rules on a served expert's stream (no model: a scripted worker)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from node.serving.expert import Local, Prepared
from node.serving.experts import ChatMessage, Delta, ExpertId, ExpertSpec, Finished, GenerationEvent, GenerationParams


class ScriptedExpert:
    """A served expert whose worker streams the given pieces of text, then stops."""

    def __init__(self, prompt_style: str, pieces: Sequence[str]) -> None:
        self.spec = ExpertSpec(
            id=ExpertId("scripted@000000000000"), name="scripted", path=Path("scripted.gguf"), sha256="0" * 64,
            size_bytes=1, family=None, quantization=None, prompt_style=prompt_style,  # type: ignore[arg-type]
            n_ctx=512,
        )
        self.pieces = pieces

    async def generate(
        self, prompt_tokens: list[int], style_stops: Sequence[str], params: GenerationParams
    ) -> AsyncIterator[GenerationEvent]:
        for piece in self.pieces:
            yield Delta(piece)
        yield Finished("stop", len(prompt_tokens), len(self.pieces))


def _text(style: str, pieces: Sequence[str], prepared: Prepared) -> str:
    async def run() -> str:
        local = Local(ScriptedExpert(style, pieces), "node")  # type: ignore[arg-type]
        events = [e async for e in local.generate(prepared, GenerationParams(max_tokens=8))]
        assert isinstance(events[-1], Finished)
        return "".join(e.text for e in events if isinstance(e, Delta))

    return asyncio.run(run())


CHAT = Prepared(messages=(ChatMessage("user", "Capital of France?"),), tokens=(1, 2, 3))
RAW = Prepared(tokens=(1, 2, 3))


@pytest.mark.parametrize("pieces", [[" Paris", " is it."], [" ", "\n", " Paris", " is it."], ["Paris", " is it."]])
def test_a_completion_transcript_answers_a_chat_from_its_first_non_space(pieces: list[str]) -> None:
    assert _text("completion", pieces, CHAT) == "Paris is it."


def test_a_raw_prompt_and_a_chat_template_keep_every_character() -> None:
    assert _text("completion", [" Paris", " is it."], RAW) == " Paris is it."
    assert _text("chat", [" Paris", " is it."], CHAT) == " Paris is it."
