"""Structured output: GBNF grammars checked and compiled, JSON schemas and OpenAI `response_format` turned into grammars."""

from __future__ import annotations

import functools
import json
import logging
import re
from typing import Any

from node.errors import InvalidRequest
from node.serving.gbnf import GbnfError, check_gbnf

log = logging.getLogger(__name__)

MAX_SCHEMA_CHARS = 16000  # what a response_format schema may weigh as JSON text
MAX_GRAMMAR_CHARS = 64000  # a grammar built from an allowed schema stays well under this
MAX_SCHEMA_COUNT = 1000  # minLength/maxLength/minItems/maxItems: the converter writes each count out
MAX_SCHEMA_BOUND = 1e18  # minimum/maximum
MAX_PATTERN_EXPANSION = 4096  # product of a pattern's {m,n} counts
_CONVERTER_ERRORS = (ValueError, KeyError, TypeError, IndexError, AssertionError, RecursionError, NotImplementedError)


class GrammarError(InvalidRequest):
    """A grammar or schema that cannot constrain generation."""

    code = "invalid_grammar"


@functools.lru_cache(maxsize=64)
def compiled_grammar(gbnf: str):
    """llama-cpp-python's grammar object for checked GBNF text (cached; its sampler is made per call)."""
    from llama_cpp.llama_grammar import LlamaGrammar

    # llama-cpp-python passes the text on unparsed and llama.cpp answers a bad grammar with a null sampler:
    # check it here, so a bad grammar is a clear error and never a crash.
    try:
        check_gbnf(gbnf)
    except GbnfError as exc:
        raise GrammarError(f"not a valid GBNF grammar: {exc}") from exc
    return LlamaGrammar.from_string(gbnf, verbose=False)


def check_grammar(gbnf: str) -> None:
    """GrammarError unless llama.cpp parses `gbnf` and it has a `root` rule."""
    if len(gbnf) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"a grammar may be at most {MAX_GRAMMAR_CHARS} characters")
    compiled_grammar(gbnf)


def check_schema(schema: Any, param: str) -> None:
    """GrammarError naming the bad part when `schema` is not a valid JSON Schema."""
    import jsonschema

    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object", param=param)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = ".".join(str(p) for p in exc.path)
        raise GrammarError(
            f"invalid JSON schema{' at ' + where if where else ''}: {exc.message}",
            param=f"{param}.{where}" if where else param,
        ) from exc


_COUNT_KEYS = ("minLength", "maxLength", "minItems", "maxItems")
_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_PATTERN_COUNT_RE = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def _check_schema_cost(schema: Any, param: str) -> None:
    """Refuse what would make the converter fetch a URL or write an enormous grammar (it expands counts in full)."""
    stack: list[tuple[Any, str]] = [(schema, param)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, list):
            stack.extend((v, f"{path}.{i}") for i, v in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        ref = node.get("$ref")
        if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
            raise GrammarError("only local references ($ref starting with #) are allowed", param=f"{path}.$ref")
        for key in _COUNT_KEYS:
            value = node.get(key)
            if isinstance(value, int) and value > MAX_SCHEMA_COUNT:
                raise GrammarError(f"{key} may be at most {MAX_SCHEMA_COUNT} here", param=f"{path}.{key}")
        for key in _BOUND_KEYS:
            value = node.get(key)
            if isinstance(value, (int, float)) and abs(value) > MAX_SCHEMA_BOUND:
                raise GrammarError(f"{key} may be at most {MAX_SCHEMA_BOUND:g} in size here", param=f"{path}.{key}")
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            # Each counted repetition multiplies the grammar's size; bound the product.
            product = 1
            for low, high in _PATTERN_COUNT_RE.findall(pattern):
                product *= max(int(low), int(high or 0), 1)
                if product > MAX_PATTERN_EXPANSION:
                    raise GrammarError("this pattern's counted repetitions are too large for a grammar", param=f"{path}.pattern")
        stack.extend((v, f"{path}.{k}") for k, v in node.items() if isinstance(v, (dict, list)))


def schema_grammar(schema: Any, param: str = "json_schema") -> str:
    """GBNF that only admits JSON documents valid under `schema` (llama-cpp-python's converter)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        raise GrammarError(f"a JSON schema may be at most {MAX_SCHEMA_CHARS} characters", param=param)
    check_schema(schema, param)
    _check_schema_cost(schema, param)
    try:
        gbnf = json_schema_to_gbnf(text)
    except _CONVERTER_ERRORS as exc:
        raise GrammarError(f"this JSON schema cannot be turned into a grammar: {exc}", param=param) from exc
    try:
        check_grammar(gbnf)
    except GrammarError as exc:
        raise GrammarError(f"this JSON schema gives no usable grammar: {exc.message}", param=param) from exc
    return gbnf


# `json_object` asks for any JSON object: a schema of one free object.
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


def response_format_grammar(response_format: Any) -> str | None:
    """The grammar an OpenAI `response_format` asks for; None for plain text; GrammarError naming the field."""
    param = "response_format"
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GrammarError("response_format must be an object", param=param)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return schema_grammar(JSON_OBJECT_SCHEMA, param)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise GrammarError("response_format.json_schema must be an object", param=f"{param}.json_schema")
        name = spec.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            raise GrammarError("response_format.json_schema.name must be a string of 1..64 characters", param=f"{param}.json_schema.name")
        if "schema" not in spec:
            raise GrammarError("response_format.json_schema.schema is required", param=f"{param}.json_schema.schema")
        return schema_grammar(spec["schema"], f"{param}.json_schema.schema")
    raise GrammarError(
        f"response_format.type must be text, json_object or json_schema, got {str(kind)[:40]!r}", param=f"{param}.type"
    )


def forwarded_grammar(response_format_json: str | None) -> str | None:
    """The grammar for a peer's forwarded `response_format` (JSON text), rebuilt and checked here."""
    if response_format_json is None:
        return None
    try:
        response_format = json.loads(response_format_json)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"response_format is not JSON: {exc}", param="response_format") from exc
    return response_format_grammar(response_format)
