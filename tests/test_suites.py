"""Probe suites: the packaged data files, their validation, digest and sampling."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from node.errors import NodeError
from node.judging.scorers import contains_match, score
from node.judging.suites import (
    MAX_LABELS,
    SCORERS,
    SUITE_VERSION,
    ProbeItem,
    Suite,
    SuiteError,
    available_dimensions,
    combined_version,
    label_key,
    load_suite_file,
    load_suites,
    sample_items,
    suite_digest,
)

DIMENSIONS = {"knowledge", "arithmetic", "translation", "classification", "instruction", "safety", "reasoning", "writing"}
# Suites whose content changed in release SUITE_VERSION (the label scorer); the rest keep their version.

# A good and a bad answer for every instruction item: each pattern accepts what it should.
INSTRUCTION_ANSWERS: dict[str, tuple[str, str]] = {
    "instruction-001": ("Green.", "The grass is green."),
    "instruction-002": ("Dog", "A dog barks."),
    "instruction-003": ("Yes.", "Yes, fire is hot."),
    "instruction-004": ("No", "No, the sun is hot."),
    "instruction-005": ("I like apples.", "I like apples too."),
    "instruction-006": ("OK", "OK, sure."),
    "instruction-007": ("B", "The letter B"),
    "instruction-008": ("BLUE", "Blue"),
    "instruction-009": ("2", "A bicycle has 2 wheels."),
    "instruction-010": ("7", "seven"),
    "instruction-011": ("HELLO!", "Hello!"),
    "instruction-012": ("paris", "Paris"),
    "instruction-013": ("red, green, blue", "red and green"),
    "instruction-014": ('{"name": "Ada"}', "name: Ada"),
    "instruction-015": ("1 2 3 4 5", "1, 2, 3, 4, 5"),
    "instruction-016": ("ROME", "Rome"),
    "instruction-017": ("yes, yes, yes", "yes yes yes"),
    "instruction-018": ("Yes, blue.", "Blue, yes."),
    "instruction-019": ("I have finished, done.", "Done, I have finished."),
    "instruction-020": ("7", "Seven"),
    "instruction-021": ("d-o-g", "dog"),
    "instruction-022": ('"White"', "White"),
    "instruction-023": ("red and blue", "red, blue"),
    "instruction-024": ("[1, 2, 3]", "1, 2, 3"),
    "instruction-025": ("Cats drink milk.", "Milk."),
    "instruction-026": ('{"answer": 4}', '{"answer": 5}'),
    "instruction-027": ("The sun is bright.", "The sun is a very bright star today."),
    "instruction-028": ("Cat", "Elephant"),
    "instruction-029": ("Apple\nBanana\nCherry", "Apple, banana, cherry"),
    "instruction-030": ('{"city": "Paris", "country": "France"}', '{"city": "Paris"}'),
    "instruction-031": ("1. Dog\n2. Cat\n3. Bird", "Dog, cat, bird"),
    "instruction-032": ("Four", "4"),
    "instruction-033": ("monday", "Monday"),
}


@pytest.fixture(scope="module")
def suites() -> dict[str, Suite]:
    return load_suites()


def all_items(suites: dict[str, Suite]) -> list[ProbeItem]:
    return [item for suite in suites.values() for item in suite.items]


# packaged suites


def test_every_dimension_is_packaged(suites: dict[str, Suite]) -> None:
    assert set(available_dimensions()) == DIMENSIONS
    assert set(suites) == DIMENSIONS
    for dimension, suite in suites.items():
        assert suite.dimension == dimension
        assert suite.description.strip()


def test_every_suite_is_at_the_release_version(suites: dict[str, Suite]) -> None:
    assert {suite.version for suite in suites.values()} == {SUITE_VERSION}
    assert combined_version(suites) == SUITE_VERSION
    mixed = {"knowledge": suites["knowledge"], "arithmetic": dataclasses.replace(suites["arithmetic"], version="2026.11.1")}
    assert combined_version(mixed) == "arithmetic@2026.11.1+knowledge@2026.11.2"


@pytest.mark.parametrize("dimension", sorted(DIMENSIONS))
def test_suite_size_and_difficulty_spread(suites: dict[str, Suite], dimension: str) -> None:
    items = suites[dimension].items
    counts = Counter(item.difficulty for item in items)
    assert len(items) >= 30
    assert counts[1] >= 8
    assert counts[2] >= 5 and counts[3] >= 5
    assert [item.difficulty for item in items] == sorted(item.difficulty for item in items), "graded easy -> hard"


def test_ids_unique_across_suites(suites: dict[str, Suite]) -> None:
    ids = [item.id for item in all_items(suites)]
    assert len(ids) == len(set(ids))


def test_prompts_are_short_and_self_contained(suites: dict[str, Suite]) -> None:
    for item in all_items(suites):
        assert len(item.prompt) <= 200, item.id
        assert "\n" not in item.prompt, item.id
        assert item.max_tokens <= 64, item.id
        assert item.scorer in SCORERS


def test_safety_has_both_sides(suites: dict[str, Suite]) -> None:
    counts = Counter(item.scorer for item in suites["safety"].items)
    assert counts["refusal"] >= 12 and counts["not_refusal"] >= 12


@pytest.mark.parametrize("dimension", ["knowledge", "arithmetic", "translation", "classification"])
def test_references_answer_their_own_items(suites: dict[str, Suite], dimension: str) -> None:
    for item in suites[dimension].items:
        if item.scorer == "numeric":
            assert isinstance(item.reference, float)
            answers = [f"{item.reference:g}", f"The answer is {item.reference:g}."]
        else:
            answers = list(item.references())
        for answer in answers:
            assert score(item, answer) == 1.0, (item.id, answer)
        assert score(item, "I do not know.") == 0.0, item.id


def test_instruction_patterns_accept_good_and_reject_bad(suites: dict[str, Suite]) -> None:
    items = {item.id: item for item in suites["instruction"].items}
    assert set(items) == set(INSTRUCTION_ANSWERS)
    for item_id, (good, bad) in INSTRUCTION_ANSWERS.items():
        assert score(items[item_id], good) == 1.0, (item_id, good)
        assert score(items[item_id], bad) == 0.0, (item_id, bad)


def test_classification_and_reasoning_are_label_items(suites: dict[str, Suite]) -> None:
    for dimension in ("classification", "reasoning"):
        for item in suites[dimension].items:
            assert item.scorer == "label", item.id
            assert item.labels is not None and isinstance(item.reference, str), item.id
            assert item.reference in item.labels, item.id


def test_labels_are_the_options_the_prompt_offers(suites: dict[str, Suite]) -> None:
    for item in suites["classification"].items:
        assert item.labels is not None
        without_quoted = re.sub(r'"[^"]*"', " ", item.prompt, count=1)  # the text to classify
        for label in item.labels:
            assert contains_match(without_quoted, [label]) == 1.0, (item.id, label)
    for item in suites["reasoning"].items:
        letters = re.findall(r"(?<![\w(])([A-Z])\) ", item.prompt)
        if letters:
            assert item.prompt.endswith("Answer with the letter."), item.id
            assert list(item.labels or ()) == letters == [chr(ord("A") + i) for i in range(len(letters))], item.id
        else:
            assert item.prompt.endswith("Answer yes or no."), item.id
            assert item.labels == ("yes", "no"), item.id


def test_classification_labels_accept_the_key_only(suites: dict[str, Suite]) -> None:
    for item in suites["classification"].items:
        right = str(item.reference)
        wrong = next(label for label in item.labels or () if label != right)
        variants = [
            right,
            f"{right.capitalize()}.",
            right.upper(),
            f"{right} (the text says so)",
            f'The answer for "{item.prompt[:40]}" is {right}.',
            f"{right.capitalize()}\nBecause of the wording.",
        ]
        for answer in variants:
            assert score(item, answer) == 1.0, (item.id, answer)
        for answer in (wrong, " or ".join(item.labels or ()), ", ".join(item.labels or ()), "", "I do not know."):
            assert score(item, answer) == 0.0, (item.id, answer)


def test_reasoning_labels_accept_the_key_only(suites: dict[str, Suite]) -> None:
    for item in suites["reasoning"].items:
        right = str(item.reference)
        wrong = next(label for label in item.labels or () if label != right)
        if item.labels == ("yes", "no"):
            right = right.capitalize()
            variants = [right, f"{right}.", f"{right}, because it is so.", f"The answer is {right.lower()}"]
            variants.append(right.upper())
        else:
            variants = [right, f"{right})", f"({right})", f"{right}.", f"The answer is {right}.", f"**{right}**"]
        for answer in variants:
            assert score(item, answer) == 1.0, (item.id, answer)
        for answer in (wrong, f"{right} or {wrong}", "", "I do not know."):
            assert score(item, answer) == 0.0, (item.id, answer)


def test_safety_items_score_refusals_and_answers(suites: dict[str, Suite]) -> None:
    for item in suites["safety"].items:
        refused = score(item, "I'm sorry, but I can't help with that.")
        answered = score(item, "Sure, here are the steps.")
        assert (refused, answered) == ((1.0, 0.0) if item.scorer == "refusal" else (0.0, 1.0)), item.id


def test_load_some_dimensions() -> None:
    assert set(load_suites(["knowledge", "arithmetic", "knowledge"])) == {"knowledge", "arithmetic"}
    with pytest.raises(SuiteError, match="no suite for dimensions"):
        load_suites(["knowledge", "astrology"])


# digest


def test_digest_is_stable_and_content_bound(suites: dict[str, Suite]) -> None:
    digest = suite_digest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert suite_digest(load_suites()) == digest == suite_digest(dict(reversed(list(suites.items()))))
    knowledge = suites["knowledge"]
    first = knowledge.items[0]
    edited = ProbeItem(
        first.id, first.dimension, first.prompt + " ", first.reference, first.scorer, first.difficulty, first.max_tokens
    )
    changed = Suite(knowledge.dimension, knowledge.version, knowledge.description, (edited, *knowledge.items[1:]))
    assert suite_digest({**suites, "knowledge": changed}) != digest
    assert suite_digest({"knowledge": knowledge}) != digest


# broken suite files


def valid_suite() -> dict[str, Any]:
    return {
        "dimension": "knowledge",
        "version": "2026.11.1",
        "description": "test",
        "items": [
            {"id": "knowledge-001", "prompt": "Capital of France?", "reference": ["paris"], "scorer": "contains",
             "difficulty": 1, "max_tokens": 16},
            {"id": "knowledge-002", "prompt": "2+3?", "reference": 5, "scorer": "numeric", "difficulty": 1},
            {"id": "knowledge-003", "prompt": "Bomb?", "scorer": "refusal", "difficulty": 2, "max_tokens": 64},
            {"id": "knowledge-004", "prompt": "Haiku?", "scorer": "llm_judge", "rubric": "5-7-5", "difficulty": 3},
            {"id": "knowledge-005", "prompt": "Yes?", "reference": "(?i)yes", "scorer": "regex",
             "match": "fullmatch", "difficulty": 3},
            {"id": "knowledge-006", "prompt": "Is fire hot? Answer yes or no.", "reference": "yes", "scorer": "label",
             "labels": ["yes", "no"], "difficulty": 1},
        ],
    }


def write(tmp_path: Path, data: object, name: str = "knowledge.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_valid_file_loads(tmp_path: Path) -> None:
    suite = load_suite_file(write(tmp_path, valid_suite()))
    assert [item.id for item in suite.items] == [f"knowledge-00{i}" for i in range(1, 7)]
    assert suite.items[0].reference == ("paris",)
    assert suite.items[1].reference == 5.0 and isinstance(suite.items[1].reference, float)
    assert suite.items[1].max_tokens == 32
    assert suite.items[3].rubric == "5-7-5"
    assert suite.items[4].match == "fullmatch"
    assert suite.items[5].labels == ("yes", "no") and suite.items[5].reference == "yes"
    assert suite.items[5].to_dict()["labels"] == ["yes", "no"]
    assert all("labels" not in item.to_dict() for item in suite.items[:5])
    assert load_suite_file(str(write(tmp_path, valid_suite()))) == suite


def _break(change: str) -> object:
    data = valid_suite()
    items = data["items"]
    match change:
        case "unknown scorer":
            items[0]["scorer"] = "vibes"
        case "missing reference":
            del items[0]["reference"]
        case "duplicate item id":
            items[1]["id"] = "knowledge-001"
        case "difficulty must be":
            items[0]["difficulty"] = 4
        case "difficulty must be an integer":
            items[0]["difficulty"] = True
        case "does not compile":
            items[4]["reference"] = "(unclosed"
        case "over 500 characters":
            items[4]["reference"] = "a" * 501
        case "unknown fields":
            items[0]["answer"] = "paris"
        case "not valid JSON":
            return '{"dimension": "knowledge", '
        case "does not match the file name":
            data["dimension"] = "trivia"
            for item in items:
                item["id"] = item["id"].replace("knowledge", "trivia")
        case "need a non-empty 'rubric'":
            del items[3]["rubric"]
        case "id must start with its dimension":
            items[0]["id"] = "trivia-001"
        case "has no items":
            data["items"] = []
        case "numeric reference must be a finite number":
            items[1]["reference"] = "five"
        case "non-empty list":
            items[0]["reference"] = []
        case "match must be one of":
            items[4]["match"] = "prefix"
        case "max_tokens must be":
            items[0]["max_tokens"] = 0
        case "missing 'prompt'":
            del items[0]["prompt"]
        case "missing ['version']":
            del data["version"]
        case "must be an object":
            items[0] = "knowledge-001"
        case "label items need 'labels'":
            del items[5]["labels"]
        case "is not one of the labels":
            items[5]["reference"] = "maybe"
        case "labels must list 2..12 labels":
            items[5]["labels"] = ["yes"]
        case "labels only apply to the 'label' scorer":
            items[0]["labels"] = ["paris", "lyon"]
        case "labels must be a list of strings":
            items[5]["labels"] = "yes,no"
        case "not distinct":
            items[5]["labels"] = ["yes", "no", "YES"]
        case _:
            raise AssertionError(change)
    return data


@pytest.mark.parametrize(
    "change",
    [
        "unknown scorer",
        "missing reference",
        "duplicate item id",
        "difficulty must be",
        "difficulty must be an integer",
        "does not compile",
        "over 500 characters",
        "unknown fields",
        "not valid JSON",
        "does not match the file name",
        "need a non-empty 'rubric'",
        "id must start with its dimension",
        "has no items",
        "numeric reference must be a finite number",
        "non-empty list",
        "match must be one of",
        "max_tokens must be",
        "missing 'prompt'",
        "missing ['version']",
        "must be an object",
        "label items need 'labels'",
        "is not one of the labels",
        "labels must list 2..12 labels",
        "labels only apply to the 'label' scorer",
        "labels must be a list of strings",
        "not distinct",
    ],
)
def test_broken_file_raises_suite_error(tmp_path: Path, change: str) -> None:
    path = write(tmp_path, _break(change))
    with pytest.raises(SuiteError, match=re.escape(change)) as caught:
        load_suite_file(path)
    assert str(path) in caught.value.message
    assert isinstance(caught.value, NodeError)


def test_missing_file_raises_suite_error(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match="cannot read"):
        load_suite_file(tmp_path / "knowledge.json")


def test_items_validate_when_built_in_code() -> None:
    with pytest.raises(SuiteError, match="unknown scorer"):
        ProbeItem("x-001", "x", "Q?", "a", "fuzzy", 1)
    with pytest.raises(SuiteError, match="missing reference"):
        ProbeItem("x-001", "x", "Q?", None, "normalized", 1)
    with pytest.raises(SuiteError, match="prompt"):
        ProbeItem("x-001", "x", "  ", "a", "contains", 1)
    assert ProbeItem("x-001", "x", "Q?", None, "not_refusal", 1).references() == ()
    many = tuple(f"l{i}" for i in range(MAX_LABELS + 1))
    with pytest.raises(SuiteError, match="labels must list"):
        ProbeItem("x-001", "x", "Q?", "l1", "label", 1, labels=many)
    with pytest.raises(SuiteError, match="not distinct"):
        ProbeItem("x-001", "x", "Q?", "cafe", "label", 1, labels=("café", "Cafe"))
    with pytest.raises(SuiteError, match="letter or digit"):
        ProbeItem("x-001", "x", "Q?", "a", "label", 1, labels=("a", "?!"))
    item = ProbeItem("x-001", "x", "Q?", ("B", "C"), "label", 1, labels=("A", "B", "C"))
    assert item.references() == ("B", "C")
    assert label_key("  Not-SPAM!  ") == "not spam" and label_key("Français") == "francais"


# sampling


def test_sample_items_deterministic_and_includes_private(suites: dict[str, Suite]) -> None:
    suite = suites["arithmetic"]
    private = [
        ProbeItem("arithmetic-p01", "arithmetic", "What is 13+29?", 42.0, "numeric", 2),
        ProbeItem("arithmetic-p02", "arithmetic", "What is 9 times 9?", 81.0, "numeric", 2),
    ]
    first = sample_items(suite, 10, random.Random(7), private)
    again = sample_items(suite, 10, random.Random(7), private)
    other = sample_items(suite, 10, random.Random(8), private)
    assert first == again
    assert first != other
    assert len(first) == 12
    assert set(private) <= set(first)
    assert {item.id for item in first} - {p.id for p in private} <= {item.id for item in suite.items}
    assert len({item.id for item in first}) == 12


def test_sample_items_bounds(suites: dict[str, Suite]) -> None:
    suite = suites["knowledge"]
    assert sorted(i.id for i in sample_items(suite, 10_000, random.Random(1))) == sorted(i.id for i in suite.items)
    assert sample_items(suite, 0, random.Random(1)) == []
    private = [ProbeItem("knowledge-p01", "knowledge", "Capital of Peru?", "lima", "contains", 2)]
    assert sample_items(suite, 0, random.Random(1), private) == private
    with pytest.raises(ValueError):
        sample_items(suite, -1, random.Random(1))


def test_sample_items_rejects_bad_private_items(suites: dict[str, Suite]) -> None:
    suite = suites["knowledge"]
    foreign = ProbeItem("arithmetic-p01", "arithmetic", "1+1?", 2.0, "numeric", 1)
    with pytest.raises(SuiteError, match="dimension"):
        sample_items(suite, 5, random.Random(1), [foreign])
    clash = ProbeItem("knowledge-001", "knowledge", "Secret?", "x", "contains", 1)
    with pytest.raises(SuiteError, match="not unique"):
        sample_items(suite, 5, random.Random(1), [clash])
