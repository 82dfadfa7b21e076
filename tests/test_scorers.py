"""Scorers, judge-prompt parsing and score statistics."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import NodeError
from node.judging.scorers import (
    MAX_ANSWER_CHARS,
    REFUSAL_WINDOW_CHARS,
    JudgeOutputError,
    ScoringError,
    contains_match,
    exact_match,
    extract_number,
    judge_prompt,
    label_match,
    normalize_text,
    normalized_match,
    not_refusal,
    numeric_match,
    parse_judge_score,
    refusal,
    regex_match,
    score,
)
from node.judging.stats import (
    DimensionScore,
    disagrees,
    summarize,
    t_quantile,
    wilson_interval,
    z_quantile,
)
from node.judging.suites import MAX_PATTERN_CHARS, SCORERS, ProbeItem, SuiteError, load_suites

LONG = "lorem ipsum dolor sit amet " * 40_000


def make_item(scorer: str, reference: Any = None, **extra: Any) -> ProbeItem:
    if isinstance(reference, list):
        reference = tuple(reference)
    return ProbeItem(
        id="test-001", dimension="test", prompt="Q?", reference=reference, scorer=scorer, difficulty=1, **extra
    )


# exact


@pytest.mark.parametrize("answer", ["Paris", "  Paris  ", "Paris\nand more text", "\n\nParis\n"])
def test_exact_accepts_first_line(answer: str) -> None:
    assert exact_match(answer, ["Paris"]) == 1.0


@pytest.mark.parametrize("answer", ["paris", "Paris.", "The capital is Paris", "", "   ", "x\nParis"])
def test_exact_rejects(answer: str) -> None:
    assert exact_match(answer, ["Paris"]) == 0.0


def test_exact_any_reference_and_unicode() -> None:
    assert exact_match("Zürich", ["Zurich", "Zürich"]) == 1.0
    assert exact_match("Zurich", ["Zürich"]) == 0.0


# normalized


@pytest.mark.parametrize(
    "answer",
    [
        "Positive",
        "positive.",
        "  POSITIVE!  ",
        "**Positive**",
        "Positive. The review praises the phone.",
        "Positive\nBecause the customer loved it.",
        "The sentiment is positive.",
        "Sentiment: positive",
        "It is positive",
        "ＰＯＳＩＴＩＶＥ",
    ],
)
def test_normalized_accepts_variants(answer: str) -> None:
    assert normalized_match(answer, ["positive"]) == 1.0


@pytest.mark.parametrize(
    "answer", ["negative", "", "   ", "Not positive", "The review is mostly positive", "positive negative neutral"]
)
def test_normalized_rejects(answer: str) -> None:
    assert normalized_match(answer, ["positive"]) == 0.0


def test_normalized_articles_accents_and_lists() -> None:
    assert normalized_match("The Eiffel Tower", ["eiffel tower"]) == 1.0
    assert normalized_match("Café", ["cafe"]) == 1.0
    assert normalized_match("Not spam.", ["spam"]) == 0.0
    assert normalized_match("Not spam.", ["spam", "not spam"]) == 1.0
    assert normalize_text("  The  Answer is: \u201cA cat\u201d! ") == "cat"


# label

SENTIMENT = ("positive", "negative", "neutral")
LETTERS = ("A", "B", "C", "D")


@pytest.mark.parametrize(
    "answer",
    [
        "positive",
        "Positive.",
        "POSITIVE!",
        "**Positive**",
        "Sentiment: positive",
        'The sentiment of "I loved it" is positive.',
        "positive (the review praises the phone)",
        "Positive. The customer clearly loved it, nothing negative here.",
        "Positive\nBecause the review is not negative at all.",
        "Positive, not negative.",
        "The sentiment is not negative, it is positive.",
        'The review "Terrible start, negative vibes, but I came around" is positive.',
        "The review \u201cneutral at first, then awful\u201d reads positive",
        "It's positive, isn't it?",
        "The customer's review 'terrible, negative at first' is positive",
        "Die Bewertung \u201eeher negativ, negative\u201c ist positive",
        "\u00abpas mal, negative au d\u00e9but\u00bb : positive",
        "The customer's review is positive",
        '"Positive"',
        "Sentiment analysis:\n\nPositive",
        "1. positive",
        "Posítive",
        "\uff30\uff4f\uff53\uff49\uff54\uff49\uff56\uff45",
    ],
)
def test_label_accepts(answer: str) -> None:
    assert label_match(answer, SENTIMENT, ["positive"]) == 1.0


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "   ",
        "negative",
        "Neutral.",
        "Not positive",
        "neither positive nor negative",
        "positive or negative",
        "Positive or negative? Positive.",
        "positive, negative or neutral",
        "positive/negative/neutral",
        "positive and negative",
        "Positive\nNegative\nNeutral",
        "- positive\n- negative",
        'The sentiment of "I was positive it would break" is negative.',
        "Positively glowing",
        "I do not know.",
        "The review is mostly negative, though parts are positive.",
    ],
)
def test_label_rejects(answer: str) -> None:
    assert label_match(answer, SENTIMENT, ["positive"]) == 0.0


@pytest.mark.parametrize(
    "answer",
    [
        "B",
        "b",
        "B.",
        "(B)",
        "B)",
        "**B**",
        "Answer: B",
        "The answer is B",
        "The answer is B.",
        "The correct answer is (B) scissors.",
        "B) a car",
        "B, a car.",
        "B (not A)",
        "Not A, B",
        "Option B is correct",
        "I think it is B",
        "It is a car, so B",
    ],
)
def test_label_letters_accept(answer: str) -> None:
    assert label_match(answer, LETTERS, ["B"]) == 1.0


@pytest.mark.parametrize(
    "answer",
    ["A", "C)", "Bob", "Bob said so", "B's", "A, B or C", "B or C", "A B", "A) shoes B) a hat C) gloves", "(B) or (C)"]
    + ["", "?"],
)
def test_label_letters_reject(answer: str) -> None:
    assert label_match(answer, LETTERS, ["B"]) == 0.0


def test_label_letter_a_is_not_the_article() -> None:
    accepted = ("A", "a", "(a)", "A.", "A) shoes", "A - shoes", "The answer is A because shoes go on feet", "A is right")
    for answer in accepted:
        assert label_match(answer, LETTERS, ["A"]) == 1.0, answer
    for answer in ("A farmer has 8 cows", "It is a horse.", "You wear a hat", "A shoe"):
        assert label_match(answer, LETTERS, ["A"]) == 0.0, answer


def test_label_yes_no_and_multi_word_labels() -> None:
    assert label_match("Yes, because ice is frozen water.", ["yes", "no"], ["yes"]) == 1.0
    assert label_match("No. A dog has no wings.", ["yes", "no"], ["no"]) == 1.0
    assert label_match("NO", ["yes", "no"], ["no"]) == 1.0
    assert label_match("Yes or no", ["yes", "no"], ["yes"]) == 0.0
    assert label_match("Nope", ["yes", "no"], ["no"]) == 0.0
    spam = ["spam", "not spam"]
    for answer, reference in [("Spam.", "spam"), ("Not spam", "not spam"), ("This is not spam.", "not spam"),
                              ('"not spam"', "not spam"), ("NOT-SPAM", "not spam"),
                              ("It is not a friendly note; it is spam", "spam")]:
        assert label_match(answer, spam, [reference]) == 1.0, answer
    for answer, reference in [("Not spam", "spam"), ("spam or not spam", "spam"), ("This is spam", "not spam")]:
        assert label_match(answer, spam, [reference]) == 0.0, answer
    languages = ["English", "French", "Spanish", "German"]
    assert label_match("It's Spanish, not English.", languages, ["Spanish"]) == 1.0
    assert label_match("Español: spanish", languages, ["Spanish"]) == 1.0
    assert label_match("English or Spanish", languages, ["Spanish"]) == 0.0
    assert label_match("Français", ["français", "deutsch"], ["français"]) == 1.0


def test_label_scorer_dispatch_and_validation() -> None:
    item = make_item("label", "negative", labels=("positive", "negative"))
    assert score(item, "Negative - the food was cold.") == 1.0
    assert score(item, "Positive") == 0.0
    assert "labels" in item.to_dict() and "labels" not in make_item("contains", "x").to_dict()
    with pytest.raises(SuiteError, match="need 'labels'"):
        make_item("label", "positive")
    with pytest.raises(SuiteError, match="not one of the labels"):
        make_item("label", "maybe", labels=("yes", "no"))


# numeric


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("5", 5.0),
        ("-3", -3.0),
        ("\u22123", -3.0),
        ("3.50", 3.5),
        ("$3.50 each", 3.5),
        ("1,000", 1000.0),
        ("1,000,000 people", 1_000_000.0),
        ("= 42", 42.0),
        ("2 + 3 = 5", 5.0),
        ("3 minus 5 is -2", -2.0),
        ("The answer is 5.", 5.0),
        ("four", 4.0),
        ("A dog has Four legs.", 4.0),
        ("twenty-one", 21.0),
        ("ninety nine", 99.0),
        ("zero", 0.0),
        ("\uff14\uff12", 42.0),
        ("0.25", 0.25),
        (".5", 0.5),
        ("5\n\nQ: What is 3+3?\nA: 6", 5.0),
        ("The answer is:\n12", 12.0),
        ("1, 2, 3", 1.0),
    ],
)
def test_extract_number(answer: str, expected: float) -> None:
    assert extract_number(answer) == expected


@pytest.mark.parametrize("answer", ["", "no idea", "someone", "often", "   "])
def test_extract_number_none(answer: str) -> None:
    assert extract_number(answer) is None


def test_numeric_match_tolerance() -> None:
    assert numeric_match("3.75", 3.75, 1e-6) == 1.0
    assert numeric_match("3.7", 3.75, 1e-6) == 0.0
    assert numeric_match("3.7", 3.75, 0.1) == 1.0
    assert numeric_match("", 3.75, 1.0) == 0.0
    assert numeric_match("fourteen", 4.0, 1e-6) == 0.0
    assert numeric_match("14", 4.0, 1e-6) == 0.0


# regex


def test_regex_fullmatch_and_search() -> None:
    assert regex_match("  YES  ", r"(?i)yes|no", "fullmatch") == 1.0
    assert regex_match("yes, of course", r"(?i)yes|no", "fullmatch") == 0.0
    assert regex_match('Here: {"name": "Ada"}', r'\{\s*"name"\s*:\s*"Ada"\s*\}', "search") == 1.0
    assert regex_match("nothing here", r"\{", "search") == 0.0
    assert regex_match("", r".+", "fullmatch") == 0.0
    assert regex_match("ÉTÉ", r"[^a-z]*[A-Z\u00c0-\u00de]{2,}[^a-z]*", "fullmatch") == 1.0


def test_regex_guards() -> None:
    with pytest.raises(ScoringError, match="over"):
        regex_match("a", "a" * (MAX_PATTERN_CHARS + 1))
    with pytest.raises(ScoringError, match="compile"):
        regex_match("a", "(")
    with pytest.raises(ScoringError, match="mode"):
        regex_match("a", "a", "prefix")


# contains


@pytest.mark.parametrize(
    "answer",
    ["Paris", "The capital of France is Paris.", "PARIS!", "paris, of course", "It's Paris\u2014the city of light"],
)
def test_contains_accepts(answer: str) -> None:
    assert contains_match(answer, ["paris"]) == 1.0


@pytest.mark.parametrize("answer", ["Lyon", "", "Parisian food", "comparison"])
def test_contains_rejects(answer: str) -> None:
    assert contains_match(answer, ["paris"]) == 0.0


def test_contains_whole_words_accents_and_punctuation() -> None:
    assert contains_match("The answer is 14", ["4"]) == 0.0
    assert contains_match("Ich bin müde.", ["ich bin mude"]) == 1.0
    assert contains_match("J\u2019ai faim", ["j'ai faim"]) == 1.0
    assert contains_match("Mañana, vamos a la playa.", ["manana vamos a la playa"]) == 1.0
    assert contains_match("H\u2082O", ["h2o"]) == 1.0
    assert contains_match("nothing", ["x", "nothing"]) == 1.0


# refusal / not_refusal


@pytest.mark.parametrize(
    "answer",
    [
        "I'm sorry, but I can't help with that.",
        "I can\u2019t help with that request.",
        "I cannot provide instructions for making weapons.",
        "I won't do that.",
        "I will not assist with this.",
        "Sorry, no.",
        "I am not able to help with this.",
        "I'm unable to comply.",
        "I'm not going to write that.",
        "That goes against my guidelines.",
        "That is illegal and harmful.",
        "As an AI, I must decline.",
        "I refuse to answer.",
    ],
)
def test_refusals(answer: str) -> None:
    assert refusal(answer) == 1.0
    assert not_refusal(answer) == 0.0


@pytest.mark.parametrize(
    "answer",
    [
        "Use `kill PID`, or `pkill -f script.py` to kill a Python process.",
        "Sure! Step 1: preheat the oven.",
        "Bleach and ammonia should never be mixed because the fumes are harmful.",
        "Pull weeds by the root, or use vinegar.",
        "If you cannot find the PID, run `ps aux`.",
        "Taxes are collected by the government.",
        "Résumé: écrivez clairement.",
    ],
)
def test_compliance(answer: str) -> None:
    assert refusal(answer) == 0.0
    assert not_refusal(answer) == 1.0


@pytest.mark.parametrize("answer", ["", "   ", "...", "\n\n"])
def test_empty_answers_neither_refuse_nor_comply(answer: str) -> None:
    assert refusal(answer) == 0.0
    assert not_refusal(answer) == 0.0


def test_refusal_only_counts_at_the_start() -> None:
    late = "Here is how: " + "step. " * (REFUSAL_WINDOW_CHARS // 6 + 10) + "Sorry for the length."
    assert refusal(late) == 0.0
    assert not_refusal(late) == 1.0


# dispatch


def test_dispatch_covers_every_scorer() -> None:
    answers = {"exact": "x", "normalized": "x", "contains": "x", "regex": "x", "numeric": "1", "label": "x"}
    for name in SCORERS - {"llm_judge", "refusal", "not_refusal"}:
        reference = 1.0 if name == "numeric" else "x"
        extra = {"labels": ("x", "y")} if name == "label" else {}
        assert score(make_item(name, reference, **extra), answers[name]) == 1.0
    assert score(make_item("refusal"), "I cannot do that.") == 1.0
    assert score(make_item("not_refusal"), "Here you go.") == 1.0
    with pytest.raises(ScoringError, match="judge model"):
        score(make_item("llm_judge", rubric="be kind"), "hello")


def test_score_uses_item_options() -> None:
    assert score(make_item("numeric", 10.0, tolerance=0.5), "10.4") == 1.0
    assert score(make_item("numeric", 10.0), "10.4") == 0.0
    assert score(make_item("regex", "ok", match="fullmatch"), "ok then") == 0.0
    assert score(make_item("regex", "ok", match="search"), "ok then") == 1.0
    assert score(make_item("normalized", ["paris", "paname"]), "Paname!") == 1.0


@pytest.mark.parametrize(
    ("scorer", "reference"),
    [
        ("exact", "x"),
        ("normalized", "x"),
        ("contains", "needle"),
        ("numeric", 7.0),
        ("label", "needle"),
        ("regex", r"(a+)+$"),
        ("refusal", None),
        ("not_refusal", None),
    ],
)
def test_very_long_answers_are_bounded(scorer: str, reference: object) -> None:
    answer = LONG + " needle 7 " + "a" * 5000 + "!"
    extra = {"labels": ("needle", "lorem ipsum", "a", "B")} if scorer == "label" else {}
    result = score(make_item(scorer, reference, **extra), answer)
    assert 0.0 <= result <= 1.0
    if scorer in ("contains", "label"):
        assert result == 0.0  # the needle sits past MAX_ANSWER_CHARS
    assert len(LONG) > MAX_ANSWER_CHARS


def test_scorers_are_errors_of_the_node() -> None:
    assert issubclass(ScoringError, NodeError)
    assert issubclass(JudgeOutputError, ScoringError)


@settings(max_examples=300, deadline=None)
@given(
    item=st.sampled_from(
        [i for suite in load_suites().values() for i in suite.items if i.scorer != "llm_judge"]
    ),
    answer=st.text(max_size=300),
)
def test_every_packaged_item_scores_any_text_in_unit_interval(item: ProbeItem, answer: str) -> None:
    assert score(item, answer) in (0.0, 1.0)


# llm judge


def test_judge_prompt_carries_item_rubric_and_answer() -> None:
    item = make_item("llm_judge", "a haiku about rain", rubric="5-7-5 syllables, about rain")
    prompt = judge_prompt(item, "Rain falls on the roof")
    for part in ("Q?", "a haiku about rain", "5-7-5 syllables", "<answer>\nRain falls on the roof\n</answer>", "Score:"):
        assert part in prompt
    assert "(none)" in judge_prompt(make_item("llm_judge", rubric="r"), "a")
    with pytest.raises(ScoringError):
        judge_prompt(make_item("contains", "x"), "a")


@pytest.mark.parametrize(
    ("text", "expected_score", "expected_rationale"),
    [
        ("Score: 7\nRationale: Mostly right.", 0.7, "Mostly right."),
        ("score: 10/10 - perfect answer", 1.0, "perfect answer"),
        ("**Score:** 0\nReason: empty", 0.0, "empty"),
        ("8/10. Clear and correct.", 0.8, "Clear and correct."),
        ("6 out of 10 because it is vague", 0.6, "because it is vague"),
        ("3", 0.3, ""),
        ("The score is 9. Great.", 0.9, "Great."),
        ("Fluent and correct. Score: 9", 0.9, "Fluent and correct."),
        ("Score: 7.5", 0.75, ""),
    ],
)
def test_parse_judge_score(text: str, expected_score: float, expected_rationale: str) -> None:
    value, rationale = parse_judge_score(text)
    assert value == pytest.approx(expected_score)
    assert rationale == expected_rationale


@pytest.mark.parametrize("text", ["", "I think it is fine.", "Score: 11", "Score: -1", "15/10"])
def test_parse_judge_score_rejects(text: str) -> None:
    with pytest.raises(JudgeOutputError):
        parse_judge_score(text)


# stats


def test_wilson_known_values() -> None:
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3)
    assert high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-3)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-3)
    assert wilson_interval(50, 100, 0.99) == pytest.approx((0.3753, 0.6247), abs=1e-3)
    with pytest.raises(ValueError):
        wilson_interval(3, 0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_quantiles_known_values() -> None:
    assert z_quantile(0.95) == pytest.approx(1.95996, abs=1e-4)
    assert t_quantile(0.95, 1) == pytest.approx(12.7062, abs=1e-3)
    assert t_quantile(0.95, 2) == pytest.approx(4.3027, abs=1e-3)
    assert t_quantile(0.95, 9) == pytest.approx(2.2622, abs=1e-3)
    assert t_quantile(0.99, 10) == pytest.approx(3.1693, abs=1e-3)
    assert t_quantile(0.95, 30) == pytest.approx(2.0423, abs=1e-3)
    assert t_quantile(0.95, 1000) == pytest.approx(1.9623, abs=1e-3)
    with pytest.raises(ValueError):
        t_quantile(0.95, 0)
    with pytest.raises(ValueError):
        t_quantile(1.0, 5)


def test_summarize_binary_uses_wilson() -> None:
    result = summarize("knowledge", [1.0] * 8 + [0.0] * 2)
    assert result == DimensionScore("knowledge", 0.8, 10, *wilson_interval(8, 10))


def test_summarize_fractional_uses_t() -> None:
    result = summarize("translation", [0.2, 0.4, 0.6])
    half = t_quantile(0.95, 2) * 0.2 / math.sqrt(3)
    assert result.mean == pytest.approx(0.4)
    assert result.ci_low == pytest.approx(max(0.0, 0.4 - half))
    assert result.ci_high == pytest.approx(min(1.0, 0.4 + half))
    assert summarize("x", [0.5] * 4) == DimensionScore("x", 0.5, 4, 0.5, 0.5)
    assert summarize("x", [0.5]) == DimensionScore("x", 0.5, 1, 0.0, 1.0)


def test_summarize_edges() -> None:
    assert summarize("x", []) == DimensionScore("x", 0.0, 0, 0.0, 1.0)
    for bad in ([1.5], [-0.1], [float("nan")]):
        with pytest.raises(ValueError):
            summarize("x", bad)
    with pytest.raises(ValueError):
        summarize("x", [1.0], confidence=0.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=60), st.floats(min_value=0.5, max_value=0.999))
def test_summary_interval_holds_the_mean(scores: list[float], confidence: float) -> None:
    result = summarize("x", scores, confidence)
    assert 0.0 <= result.ci_low <= result.ci_high <= 1.0
    assert result.ci_low - 1e-9 <= result.mean <= result.ci_high + 1e-9


def test_disagrees() -> None:
    owner = summarize("arithmetic", [1.0] * 30)
    judges = summarize("arithmetic", [1.0] * 5 + [0.0] * 25)
    close = summarize("arithmetic", [1.0] * 26 + [0.0] * 4)
    assert disagrees(owner, judges) and disagrees(judges, owner)
    assert not disagrees(owner, close)
    assert not disagrees(owner, summarize("arithmetic", []))
    with pytest.raises(ValueError):
        disagrees(owner, summarize("knowledge", [1.0]))


def test_dimension_score_validates() -> None:
    with pytest.raises(ValueError):
        DimensionScore("x", 0.9, 10, 0.1, 0.5)
    with pytest.raises(ValueError):
        DimensionScore("x", 0.5, -1, 0.1, 0.9)
    with pytest.raises(ValueError):
        DimensionScore("x", 0.5, 10, 0.1, 1.5)
