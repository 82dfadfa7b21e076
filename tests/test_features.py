"""Query and expert features, and their VW text form."""

from __future__ import annotations

import math

import pytest

from bandit.features import (
    MAX_WORDS,
    ExpertFeatures,
    ExpertId,
    NodeId,
    QueryFeatures,
    Task,
    action_line,
    context_line,
    detect_lang,
    detect_script,
    query_features,
    sanitize,
)


def _expert(**overrides: object) -> ExpertFeatures:
    fields: dict[str, object] = {
        "expert_id": ExpertId("smol-135m"),
        "node_id": NodeId("node-a"),
        "family": "smollm",
        "params": "135M",
        "quantization": "q4_k_m",
        "scores": {"knowledge": 0.62, "arithmetic": 0.1},
        "latency_ms_avg": 250.0,
        "queue_depth": 2,
        "local": True,
    }
    fields.update(overrides)
    return ExpertFeatures(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "task"),
    [
        ("What is 12*7?", Task.ARITHMETIC),
        ("compute 345 + 12", Task.ARITHMETIC),
        ("Calculate the product of 3 and 9", Task.ARITHMETIC),
        ("How much is 81 divided by 9?", Task.ARITHMETIC),
        ("Translate 'good night' into French", Task.TRANSLATION),
        ("How do you say thank you in German?", Task.TRANSLATION),
        ("Say hello in Spanish", Task.TRANSLATION),
        ("Classify the sentiment of: I loved it", Task.CLASSIFICATION),
        ("Is this review positive or negative? 'meh'", Task.CLASSIFICATION),
        ("List three fruits", Task.INSTRUCTION),
        ("Answer in JSON with keys name and age", Task.INSTRUCTION),
        ("Write exactly five words about the sea", Task.INSTRUCTION),
        ("Give me a bulleted list of chores", Task.INSTRUCTION),
        ("```python\nprint(1)\n```", Task.CODE),
        ("def add(a, b): return a + b  # why does this fail", Task.CODE),
        ("Write a JavaScript function that reverses a string", Task.CODE),
        ("Who wrote Hamlet?", Task.KNOWLEDGE),
        ("Why is the sky blue", Task.KNOWLEDGE),
        ("Explain photosynthesis", Task.KNOWLEDGE),
        ("hey there, nice to meet you", Task.CHAT),
    ],
)
def test_task_detection(text: str, task: Task) -> None:
    assert query_features(text).task is task


@pytest.mark.parametrize(
    ("text", "script"),
    [
        ("hello world", "latin"),
        ("Привет, как дела", "cyrillic"),
        ("日本の首都はどこですか", "cjk"),
        ("ما هي عاصمة فرنسا", "arabic"),
        ("Γειά σου κόσμε", "other"),
        ("12 + 7 = ?", "other"),
    ],
)
def test_script_detection(text: str, script: str) -> None:
    assert detect_script(text) == script


@pytest.mark.parametrize(
    ("text", "lang"),
    [
        ("what is the capital of France", "en"),
        ("quelle est la capitale de la France et pourquoi", "fr"),
        ("wer ist der Präsident und was ist das", "de"),
        ("cuál es la capital de España y por qué", "es"),
        ("xyzzy plugh", "other"),
    ],
)
def test_language_hint(text: str, lang: str) -> None:
    assert detect_lang(query_features(text).words) == lang


def test_words_are_lowercased_and_capped() -> None:
    text = " ".join(f"Word{i}" for i in range(100))
    q = query_features(text)
    assert len(q.words) == MAX_WORDS
    assert q.words[0] == "word0"
    assert q.length == "long"
    assert query_features("Hi there").length == "short"


def test_context_line_has_namespaces() -> None:
    q = query_features("What is 12*7?")
    line = context_line(q)
    assert line.startswith("shared |q ")
    assert "w=12" in line and "w=what" in line
    assert "|t task=arithmetic len=short script=latin lang=en" in line


def test_action_line_has_identity_scores_load_and_task_score() -> None:
    line = action_line(_expert(), Task.KNOWLEDGE)
    assert line.startswith("|a id=smol-135m node=node-a fam=smollm size=135M quant=q4_k_m local")
    assert "|s arithmetic:0.1 knowledge:0.62" in line
    assert "|l lat:" in line and "queue:" in line
    assert line.endswith("|s task_score:0.62")
    assert "task_score" not in action_line(_expert(), Task.TRANSLATION)
    assert "remote" in action_line(_expert(local=False))


def test_action_line_is_sanitized_and_finite() -> None:
    odd = _expert(
        expert_id=ExpertId("my model|v2:latest"),
        family="fam ily",
        scores={"know ledge": 0.5, "bad": math.nan, "huge": 7.0},
        latency_ms_avg=math.inf,
    )
    line = action_line(odd)
    identity = line.split("|")[1]
    assert "id=my_model_v2_latest" in identity
    assert "fam=fam_ily" in identity
    assert "know_ledge:0.5" in line and "huge:1" in line
    assert "nan" not in line and "inf" not in line
    assert "lat_unknown" in line
    assert sanitize("  ") == "_"


def test_features_round_trip_through_dicts() -> None:
    q = query_features("Translate 'cat' into French")
    assert QueryFeatures.from_dict(q.to_dict()) == q
    e = _expert()
    assert ExpertFeatures.from_dict(e.to_dict()) == e


def test_expert_scores_are_a_frozen_copy() -> None:
    scores = {"knowledge": 0.5}
    e = _expert(scores=scores)
    scores["knowledge"] = 0.9
    assert e.scores["knowledge"] == 0.5
    with pytest.raises(TypeError):
        e.scores["knowledge"] = 0.1
