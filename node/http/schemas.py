"""Request shapes of the user API, validated strictly; unknown fields are ignored as OpenAI clients send many."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from node.errors import InvalidRequest

_MAX_STOPS = 4
_MAX_STOP_CHARS = 200
_MAX_MESSAGES = 512


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class TextPart(_Strict):
    """A text part of a multi-part message content."""

    type: Literal["text"]
    text: str


class Message(_Strict):
    """One chat message; content is text or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The message's text, parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    """OpenAI's stream options."""

    include_usage: bool = False


class _Sampling(_Strict):
    """Fields common to chat and text completions."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    expertmesh: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None  # checked by node.serving.structured, which names the bad field

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > _MAX_STOPS:
            raise ValueError(f"at most {_MAX_STOPS} stop sequences")
        if any(len(s) == 0 or len(s) > _MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be 1..{_MAX_STOP_CHARS} characters")
        return value

    def stop_list(self) -> tuple[str, ...]:
        """Stop sequences as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions` body."""

    messages: Annotated[list[Message], Field(min_length=1, max_length=_MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionRequest(_Sampling):
    """`POST /v1/completions` body: one prompt."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def prompt_text(self) -> str:
        """The single prompt."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class FeedbackRequest(_Strict):
    """`POST /v1/feedback` body: a thumbs up or down, or a reward in [0, 1]."""

    decision_id: Annotated[str, Field(min_length=1, max_length=64)]
    token: Annotated[str, Field(min_length=1, max_length=256)]
    rating: Literal["up", "down"] | None = None
    reward: Annotated[float, Field(ge=0.0, le=1.0)] | None = None

    @model_validator(mode="after")
    def _one_of_rating_or_reward(self) -> "FeedbackRequest":
        if (self.rating is None) == (self.reward is None):
            raise ValueError("give exactly one of 'rating' (up or down) and 'reward' (0..1)")
        return self


class JudgeRequest(_Strict):
    """`POST /v1/judge` body."""

    expert: Annotated[str, Field(min_length=1, max_length=256)] | None = None  # None: every local expert
    peer: Annotated[str, Field(min_length=1, max_length=64)] | None = None  # a peer's node id
    dimensions: Annotated[list[str], Field(min_length=1, max_length=16)] | None = None
    items_per_dimension: Annotated[int, Field(ge=1, le=1000)] | None = None
    force: bool = False


Request = TypeVar("Request", bound=BaseModel)

_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def _is_union_tag(part: str | int) -> bool:
    """Pydantic puts the tried union member (`str`, `list[TextPart]`) in error paths; users name fields only."""
    return isinstance(part, str) and (part in _TYPE_TAGS or not part.replace("_", "a").isalnum())


def parse_body(body: bytes, shape: type[Request]) -> Request:
    """Decode a JSON body into `shape`, or raise InvalidRequest naming the first bad field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidRequest("request body is nested too deeply") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return shape.model_validate(data)
    except RecursionError as exc:
        raise InvalidRequest("request body is nested too deeply") from exc
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"] if not _is_union_tag(part)) or None
        raise InvalidRequest(f"invalid field {param!r}: {error['msg']}", param=param) from exc
