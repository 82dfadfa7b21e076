"""Request bodies into pydantic models: strict, unknown fields ignored, the first bad field named in a 400."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from node.errors import InvalidRequest


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


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
        errors = exc.errors()
        # In a union (`stop`: text or list) the member of the input's own type says what is wrong, not the others.
        error = next((e for e in errors if not e["type"].endswith("_type")), errors[0])
        param = ".".join(str(part) for part in error["loc"] if not _is_union_tag(part)) or None
        raise InvalidRequest(f"invalid field {param!r}: {error['msg']}", param=param) from exc
