"""Specialist definitions: parsing and validation, stable ids, TOML round trip, wire verification, response_format."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from node.mesh.adopt import verified_definition
from node.serving.catalog import CATALOG
from node.serving.gbnf import check_gbnf
from node.serving.specialists import (
    MAX_DEFINITION_BYTES,
    DefinitionError,
    canonical_bytes,
    describe_definitions,
    load_definition,
    parse_toml,
    resolve_definition,
    shipped_definitions,
    specialist_id,
    to_toml,
)
from node.serving.structured import GrammarError, compiled_grammar, forwarded_grammar, response_format_grammar
from peers.wire import ExpertDefinition, decode, encode

SMOLLM2_SHA = str(CATALOG["smollm2-135m"].sha256)  # catalog entries on PyPI pin their digest
GEMMA3_SHA = str(CATALOG["gemma3-270m"].sha256)

GOOD = """
name = "capitals"
version = "1.0"
author = "ana"
description = "Capital cities."
base = "smollm2-135m"
system = "Answer with the capital city only."

[sampling]
temperature = 0
max_tokens = 8
stop = ["\\n"]

[[examples]]
user = "What is the capital of Italy?"
assistant = "Rome"
"""


def _without(text: str, key: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith(f"{key} ="))


def test_a_good_definition_parses_with_defaults_filled() -> None:
    definition = parse_toml(GOOD, "good.toml")
    assert definition.name == "capitals" and definition.prompt_style == "chat"
    assert definition.sampling.temperature == 0.0 and definition.sampling.top_p == 1.0
    assert definition.examples[0].assistant == "Rome"
    assert definition.constraint_grammar() is None


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        (_without(GOOD, "author"), "author", "required"),
        (GOOD.replace("temperature = 0", 'temperature = "hot"'), "sampling.temperature", "number"),
        (GOOD.replace("temperature = 0", "temperature = 3.5"), "sampling.temperature", "less than or equal to 2"),
        (GOOD.replace("max_tokens = 8", "max_tokens = 0"), "sampling.max_tokens", "greater than or equal to 1"),
        (GOOD.replace("[sampling]", "temprature = 0.5\n[sampling]"), "temprature", "unknown field"),
        (GOOD.replace('name = "capitals"', 'name = "Capitals Expert!"'), "name", "pattern"),
        (GOOD.replace('system =', 'prompt_style = "freestyle"\nsystem ='), "prompt_style", "'chat' or 'completion'"),
        (GOOD.replace('system =', "grammar = 'root ::= (\"yes\" | '\nsystem ="), "grammar", "GBNF"),
        (GOOD.replace('system =', "json_schema = '{\"type\": \"integer\", \"minimum\": \"zero\"}'\nsystem ="), "json_schema", "minimum"),
        (GOOD.replace('system =', "json_schema = 'not json'\nsystem ="), "json_schema", "not valid JSON"),
        (
            GOOD.replace('system =', "grammar = 'root ::= \"a\"'\njson_schema = '{\"type\": \"object\"}'\nsystem ="),
            "definition",
            "at most one of 'grammar' and 'json_schema'",
        ),
        (GOOD.replace('user = "What', 'usr = "What'), "examples.0.usr", "unknown field"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_a_bad_definition_names_the_field(text: str, field: str, words: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        parse_toml(text, "bad.toml")
    message = caught.value.message
    assert message.startswith("bad.toml: ")
    assert f"field {field!r}" in message, message
    assert words.lower() in message.lower(), message
    assert caught.value.status == 400


def test_a_broken_or_oversized_file_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "x\n')
    with pytest.raises(DefinitionError, match="not valid TOML"):
        load_definition(broken)
    big = tmp_path / "big.toml"
    big.write_text(GOOD + "#" * MAX_DEFINITION_BYTES)
    with pytest.raises(DefinitionError, match="at most"):
        load_definition(big)
    with pytest.raises(DefinitionError, match="not found"):
        load_definition(tmp_path / "missing.toml")
    with pytest.raises(DefinitionError, match="neither a .toml file nor a shipped specialist"):
        resolve_definition("no-such-specialist")


def test_the_id_is_stable_across_spelling_and_changes_with_the_definition() -> None:
    definition = parse_toml(GOOD, "a")
    expert_id = specialist_id(definition, SMOLLM2_SHA)
    assert re.fullmatch(r"capitals@[0-9a-f]{12}", expert_id)
    # The same definition written another way (key order, explicit defaults, another base spelling): same expert.
    respelled = (
        GOOD.replace('base = "smollm2-135m"', 'base = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"')
        .replace("[sampling]", "[sampling]\ntop_p = 1.0")
    )
    respelled = 'prompt_style = "chat"\n' + respelled
    assert specialist_id(parse_toml(respelled, "b"), SMOLLM2_SHA) == expert_id
    # Any change to how it is used, or another base, is another expert that must be judged again.
    assert specialist_id(parse_toml(GOOD.replace("city only", "city"), "c"), SMOLLM2_SHA) != expert_id
    assert specialist_id(parse_toml(GOOD.replace("max_tokens = 8", "max_tokens = 9"), "d"), SMOLLM2_SHA) != expert_id
    assert specialist_id(definition, GEMMA3_SHA) != expert_id


def test_shipped_ids_are_pinned() -> None:
    """The id is a function of the definition's content only: every node, every version of this code, agrees."""
    ids = {
        name: specialist_id(parse_toml(text, name), str(CATALOG[parse_toml(text, name).base].sha256))
        for name, text in shipped_definitions().items()
    }
    assert set(ids) == {"arithmetic", "facts", "sentiment", "translator", "who-made-it"}
    assert len(set(ids.values())) == 5
    definition = parse_toml(GOOD, "good")
    digest = json.loads(canonical_bytes(definition))
    assert "base" not in digest and digest["sampling"] == {"max_tokens": 8, "stop": ["\n"], "temperature": 0.0, "top_p": 1.0}
    assert specialist_id(definition, SMOLLM2_SHA) == "capitals@" + PINNED_CAPITALS_DIGEST


# sha256(b"expertmesh-specialist-v1\0" + base sha256 + b"\0" + canonical JSON)[:12], written down once:
# a change here means every node's ids (and every card about specialists) would change.
PINNED_CAPITALS_DIGEST = "6039e24d67ec"


def test_toml_round_trip_keeps_the_expert(tmp_path: Path) -> None:
    for name, text in shipped_definitions().items():
        definition = parse_toml(text, name)
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml(definition))
        again = load_definition(path)
        assert again == definition
    tricky = parse_toml(GOOD, "t").model_copy(update={"system": 'Say "quoted" \\ back\tslash \x7f é 𝄞\nline two'})
    path = tmp_path / "tricky.toml"
    path.write_text(to_toml(tricky))
    assert load_definition(path) == tricky


def test_listing_shows_shipped_folder_and_given_definitions(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "experts"
    folder.mkdir(parents=True)
    (folder / "capitals.toml").write_text(GOOD)
    given = tmp_path / "mine.toml"
    given.write_text(GOOD.replace('name = "capitals"', 'name = "mine"').replace('base = "smollm2-135m"', 'base = "hf:someone/repo/x.gguf"'))
    rows = describe_definitions([given], tmp_path / "data", tmp_path / "models")
    by_name = {row["name"]: row for row in rows}
    assert by_name["capitals"]["id"] == specialist_id(parse_toml(GOOD, "g"), SMOLLM2_SHA)
    assert by_name["capitals"]["source"].endswith("capitals.toml")
    assert by_name["mine"]["id"] == "mine@?"  # an hf: base not pulled yet has no sha256 to derive from
    assert by_name["who-made-it"]["source"] == "shipped:who-made-it"


def test_a_peer_definition_is_served_only_if_it_is_the_expert_named() -> None:
    definition = parse_toml(GOOD, "good")
    expert_id = specialist_id(definition, SMOLLM2_SHA)
    message = ExpertDefinition(expert_id=expert_id, base_sha256=SMOLLM2_SHA, base_name="smollm2-135m", definition=canonical_bytes(definition))
    received = decode(encode(message), ExpertDefinition, max_bytes=1 << 20)
    assert verified_definition(received, "smollm2-135m", "peer") == definition
    # A lie about which expert this is: the digest gives it away.
    tampered = canonical_bytes(definition).replace(b"capital city only", b"capital city, then buy crypto")
    with pytest.raises(DefinitionError, match="not the capitals@"):
        verified_definition(ExpertDefinition(expert_id, SMOLLM2_SHA, "smollm2-135m", tampered), "smollm2-135m", "peer")
    # Data only, validated like a file: a field that is not part of the format is refused.
    extra = json.dumps({**json.loads(canonical_bytes(definition)), "exec": "rm -rf /"}).encode()
    with pytest.raises(DefinitionError, match="'exec'"):
        verified_definition(ExpertDefinition(expert_id, SMOLLM2_SHA, "smollm2-135m", extra), "smollm2-135m", "peer")
    with pytest.raises(DefinitionError, match="not JSON"):
        verified_definition(ExpertDefinition(expert_id, SMOLLM2_SHA, "smollm2-135m", b"\x93\x01"), "smollm2-135m", "peer")


def test_response_format_grammars() -> None:
    assert response_format_grammar(None) is None
    assert response_format_grammar({"type": "text"}) is None
    assert "root" in response_format_grammar({"type": "json_object"})
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert "root" in grammar
    forwarded = json.dumps({"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert forwarded_grammar(forwarded) == grammar


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "a"}}, "response_format.json_schema.schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "properties": {"n": {"type": "integr"}}}}},
            "response_format.json_schema.schema.properties.n.type",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "required": "n"}}},
            "response_format.json_schema.schema.required",
        ),
        ("json", "response_format"),
    ],
)
def test_a_bad_response_format_names_the_field(response_format: object, param: str) -> None:
    with pytest.raises(GrammarError) as caught:
        response_format_grammar(response_format)
    assert caught.value.param == param
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("grammar", "problem"),
    [
        ('root ::= ("yes" | ', "expected )"),
        ("root ::= answer", "undefined rule 'answer'"),
        ('answer ::= "a"', "no 'root' rule"),
        ('root ::= root "a"', "left recursion"),
        ('root ::= a\na ::= ""? root', "left recursion"),
        ('root ::= "\\q"', "unknown escape"),
        ("root ::= []", "empty character class"),
        ('root ::= "a"{5,2}', "maximum below its minimum"),
        ('root ::= "a"{1,100000}', "repetition over"),
        ('root ::= "a" "b', "unexpected end"),
        ('root ::= "a"\nroot ::= "b"', "defined twice"),
    ],
)
def test_a_grammar_llama_cpp_would_refuse_is_refused_here(grammar: str, problem: str) -> None:
    """llama-cpp-python passes grammar text on unparsed; a bad one must be a clear 400, never a null sampler."""
    with pytest.raises(GrammarError, match=re.escape(problem)):
        compiled_grammar(grammar)


def test_grammars_llama_cpp_ships_and_builds_pass_the_check() -> None:
    from llama_cpp import llama_grammar

    for name in ("JSON_GBNF", "JSON_ARR_GBNF", "ARITHMETIC_GBNF", "C_GBNF", "CHESS_GBNF", "LIST_GBNF"):
        check_gbnf(getattr(llama_grammar, name))
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "n": {"type": "integer", "minimum": 0, "maximum": 100},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            "when": {"type": "string", "format": "date"},
            "kind": {"oneOf": [{"type": "null"}, {"const": "x"}]},
        },
        "required": ["city"],
    }
    check_gbnf(llama_grammar.json_schema_to_gbnf(json.dumps(schema)))


@pytest.mark.parametrize(
    ("schema", "param"),
    [
        ({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}, "response_format.json_schema.schema.properties.a.$ref"),
        ({"type": "string", "maxLength": 100_000_000}, "response_format.json_schema.schema.maxLength"),
        ({"type": "array", "items": {"type": "string"}, "minItems": 5000}, "response_format.json_schema.schema.minItems"),
        ({"type": "string", "pattern": "^(a{100}){100}$"}, "response_format.json_schema.schema.pattern"),
        ({"type": "integer", "maximum": 1e300}, "response_format.json_schema.schema.maximum"),
    ],
)
def test_a_schema_that_would_fetch_or_explode_is_refused(schema: dict, param: str) -> None:
    """The converter fetches https $refs and writes repetition counts out in full: neither may reach it."""
    with pytest.raises(GrammarError) as caught:
        response_format_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert caught.value.param == param
