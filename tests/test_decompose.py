"""Splitting compound queries into parts, composing the parts' answers, checking an expert's proposed split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bandit.features import Task
from node.routing.decompose import (
    HEADING_MAX_CHARS,
    MAX_SPLIT_CHARS,
    PART_SEPARATOR,
    Part,
    compose,
    compose_header,
    parse_proposal,
    plan,
    proposal_prompt,
    split_query,
)

SPLITS: list[tuple[str, list[str]]] = [
    ("Translate X into French. What is 12*7?", ["Translate X into French.", "What is 12*7?"]),
    ("translate 'cat' into German and compute 15 times 3", ["translate 'cat' into German", "compute 15 times 3"]),
    ("What is the capital of Peru, and what is 7+8?", ["What is the capital of Peru", "what is 7+8?"]),
    ("What's the capital of Peru, and what's 7+8?", ["What's the capital of Peru", "what's 7+8?"]),
    ("Who is the president of France and what is 2+2", ["Who is the president of France", "what is 2+2"]),
    ("Can you translate 'cat' into German and compute 15*3?", ["Can you translate 'cat' into German", "compute 15*3?"]),
    ("Calculate 2+2, then tell me the capital of France", ["Calculate 2+2", "tell me the capital of France"]),
    ("List the planets; what is 9*9?", ["List the planets", "what is 9*9?"]),
    ("What is 7+8? Also, who wrote Hamlet?", ["What is 7+8?", "Also, who wrote Hamlet?"]),
    ("What is 2.5 times 4? Also what is 3.5 + 1?", ["What is 2.5 times 4?", "Also what is 3.5 + 1?"]),
    (
        "Translate “good morning” into Spanish and then tell me what 3 times 4 is",
        ["Translate “good morning” into Spanish", "tell me what 3 times 4 is"],
    ),
    ("Do you know who wrote Hamlet? What is 2+2?", ["Do you know who wrote Hamlet?", "What is 2+2?"]),
    ("Traduis 'chat' en allemand et calcule 15*3", ["Traduis 'chat' en allemand", "calcule 15*3"]),
    # Context before a request joins it; context after the last request joins the last.
    ("I'm learning French. Translate 'cat' into French. What is 3*4?", ["I'm learning French. Translate 'cat' into French.", "What is 3*4?"]),
    ("Translate 'cat' into French. What is 3*4? I'm learning French.", ["Translate 'cat' into French.", "What is 3*4? I'm learning French."]),
    ("I have two questions. What is 2+2? Who painted the Mona Lisa?", ["I have two questions. What is 2+2?", "Who painted the Mona Lisa?"]),
    # Lists: the markers and a framing line stay out of the parts.
    ("1. Translate 'cat' into German\n2. What is 15 times 3?", ["Translate 'cat' into German", "What is 15 times 3?"]),
    ("- Summarize the plot of Hamlet\n- List three Shakespeare comedies", ["Summarize the plot of Hamlet", "List three Shakespeare comedies"]),
    ("Answer these questions:\n1. What is 2+2?\n2. Who wrote Hamlet?", ["What is 2+2?", "Who wrote Hamlet?"]),
    ("1. translate 'cat' into German 2. compute 15*3", ["translate 'cat' into German", "compute 15*3"]),
    ("Please do two things: 1) translate 'cat' into German 2) compute 15*3.", ["translate 'cat' into German", "compute 15*3."]),
    ("Translate 'cat' into German\nTranslate 'dog' into French", ["Translate 'cat' into German", "Translate 'dog' into French"]),
    (
        "Translate 'cat' into German.\n\nWhat is the river that flows through Paris?",
        ["Translate 'cat' into German.", "What is the river that flows through Paris?"],
    ),
    (
        "Fix this code:\n```python\ndef f(x):\n    return x and y\n```\nWhat is 2+2?",
        ["Fix this code:\n```python\ndef f(x):\n    return x and y\n```", "What is 2+2?"],
    ),
    ("Is 7 prime and is Lima in Peru?", ["Is 7 prime", "is Lima in Peru?"]),
]

NO_SPLITS: list[str] = [
    "translate 'salt and pepper' into French",
    "what is 3 and 4 added together?",
    "translate salt and pepper into French",
    "Translate 'I am tired. What time is it?' into German",
    "Who wrote Hamlet and when was it written?",
    "Explain how and why birds migrate",
    "Tell me who won and what the score was",
    "Write a haiku about autumn and translate it into Japanese",
    "Compute 15 times 3 and then add 4",
    "What is the difference between a list and what Python calls a tuple?",
    "Summarize the article and list the key points",
    "Explain recursion and give an example",
    "Name three rivers and their lengths",
    "Give me a list of fruits and vegetables",
    "Hello there! How are you?",
    "Dr. Smith said hi. What is 2+2?",
    "What is 12*7? Explain your reasoning.",
    "Write a poem about cats. Make it rhyme.",
    "What is the capital of Peru, and is it big?",
    "What is 2+2? Have a nice day.",
    "Translate into French:\n1. cat\n2. dog",
    "Summarize this:\n- apples are red\n- bananas are yellow",
    "Translate the following into French:\nThe cat is on the table. What a nice day.",
    'What does "carpe diem" mean and how do you say it in Spanish?',
    "e.g. translate 'cat' into German",
    "",
    "   ",
]


def _assert_well_formed(text: str, parts: list[Part]) -> None:
    assert parts, "always at least one part"
    previous_end = 0
    for index, part in enumerate(parts):
        assert part.index == index
        start, end = part.span
        assert previous_end <= start <= end <= len(text)
        assert text[start:end] == part.text
        assert part.task in {t.value for t in Task}
        previous_end = end


@pytest.mark.parametrize(("text", "expected"), SPLITS, ids=[t[:40] for t, _ in SPLITS])
def test_compound_queries_are_split(text: str, expected: list[str]) -> None:
    parts = split_query(text)
    assert [p.text for p in parts] == expected
    _assert_well_formed(text, parts)


@pytest.mark.parametrize("text", NO_SPLITS, ids=[t[:40] for t in NO_SPLITS])
def test_single_requests_stay_whole(text: str) -> None:
    parts = split_query(text)
    assert parts == [Part(index=0, text=text, task=parts[0].task, span=(0, len(text)))]
    _assert_well_formed(text, parts)


def test_parts_carry_their_own_task() -> None:
    parts = split_query("translate 'cat' into German and compute 15 times 3")
    assert [p.task for p in parts] == [Task.TRANSLATION.value, Task.ARITHMETIC.value]
    parts = split_query("What is the capital of Peru, and what is 7+8?")
    assert [p.task for p in parts] == [Task.KNOWLEDGE.value, Task.ARITHMETIC.value]
    parts = split_query("Classify 'I love this movie' as positive or negative. Then translate 'movie' into French.")
    assert [p.task for p in parts] == [Task.CLASSIFICATION.value, Task.TRANSLATION.value]
    # A single part's task is the whole query's.
    assert split_query("Translate 'cat' into German")[0].task == Task.TRANSLATION.value


def test_spans_point_into_the_original_text() -> None:
    text = "1. Translate 'cat' into German\n2. What is 15 times 3?"
    first, second = split_query(text)
    assert first.span == (3, 30) and second.span == (34, 53)
    assert text[slice(*second.span)] == "What is 15 times 3?"


def test_the_tail_beyond_max_parts_is_merged() -> None:
    text = "What is 1+1? What is 2+2? What is 3+3? What is 4+4? What is 5+5?"
    parts = split_query(text)
    assert [p.text for p in parts] == ["What is 1+1?", "What is 2+2?", "What is 3+3?", "What is 4+4? What is 5+5?"]
    two = split_query(text, max_parts=2)
    assert [p.text for p in two] == ["What is 1+1?", "What is 2+2? What is 3+3? What is 4+4? What is 5+5?"]
    _assert_well_formed(text, two)
    assert split_query(text, max_parts=1) == [Part(0, text, Task.ARITHMETIC.value, (0, len(text)))]
    chained = "What is 7+8 and what is 9-3 and what is 2*2 and what is 1+1 and what is 5/5?"
    assert split_query(chained)[-1].text == "what is 1+1 and what is 5/5?"
    with pytest.raises(ValueError):
        split_query(text, max_parts=0)


def test_long_texts_are_not_split() -> None:
    text = "What is 2+2? Who wrote Hamlet? " + "Some pasted text. " * (MAX_SPLIT_CHARS // 18)
    assert len(split_query(text)) == 1


def test_plan_splits_only_when_enabled() -> None:
    text = "translate 'cat' into German and compute 15 times 3"
    on = plan(text, enabled=True)
    assert on.compound and len(on.parts) == 2
    off = plan(text, enabled=False)
    assert not off.compound and off.parts == (Part(0, text, Task.TRANSLATION.value, (0, len(text))),)
    single = plan("What is 2+2?", enabled=True)
    assert not single.compound and len(single.parts) == 1
    assert len(plan("What is 1+1? What is 2+2? What is 3+3?", enabled=True, max_parts=2).parts) == 2


def test_compose_names_every_expert_and_node_in_part_order() -> None:
    first, second = split_query("translate 'cat' into German and compute 15 times 3")
    answer = compose(
        [
            (second, "45\n", "smollm2-135m@b179c9523d0e", "nodebbbbbbbbbbbbbbbb"),
            (first, " Katze", "gemma3-270m@a5fd0123abcd", "nodeaaaaaaaaaaaaaaaa"),
        ]
    )
    assert answer == (
        "**1. Translate 'cat' into German** — *gemma3-270m@a5fd… on node nodeaaaa…*\nKatze"
        + PART_SEPARATOR
        + "**2. Compute 15 times 3** — *smollm2-135m@b179… on node nodebbbb…*\n45"
    )
    # Streaming part by part gives the same text.
    streamed = PART_SEPARATOR.join(
        [
            compose_header(first, "gemma3-270m@a5fd0123abcd", "nodeaaaaaaaaaaaaaaaa") + "\nKatze",
            compose_header(second, "smollm2-135m@b179c9523d0e", "nodebbbbbbbbbbbbbbbb") + "\n45",
        ]
    )
    assert streamed == answer


def test_compose_keeps_headings_short_and_plain() -> None:
    part = Part(index=2, text="what is 12*7 and _why_\n" + "so " * 60, task="arithmetic", span=(0, 0))
    header = compose_header(part, "tiny", "n1")
    heading = header.split("** — ", 1)[0].removeprefix("**3. ")
    assert heading.startswith("What is 12\\*7 and \\_why\\_ so")
    assert heading.endswith("…") and "\n" not in header
    assert len(heading.replace("\\", "")) <= HEADING_MAX_CHARS
    assert header.endswith("— *tiny on node n1*")
    assert "*(no answer)*" in compose([(part, "  ", "tiny", "n1")])


def test_proposal_prompt_holds_the_message() -> None:
    prompt = proposal_prompt("What is 2+2? Who wrote Hamlet?")
    assert prompt.endswith("What is 2+2? Who wrote Hamlet?") and '"1."' in prompt


def test_a_faithful_proposal_is_accepted() -> None:
    text = "translate 'cat' into German and compute 15 times 3"
    parts = parse_proposal("Sure, here they are:\n1. Translate 'cat' into German.\n2. compute 15 times 3", text)
    assert parts is not None
    assert [p.text for p in parts] == ["translate 'cat' into German", "compute 15 times 3"]
    assert [p.task for p in parts] == [Task.TRANSLATION.value, Task.ARITHMETIC.value]
    _assert_well_formed(text, parts)
    # Light rewording is located by its first and last words.
    reworded = parse_proposal("1. translate cat to German\n2. compute 15 times 3", text)
    assert reworded is not None and reworded[0].text == "translate 'cat' into German"
    # One line: the query is a single request.
    assert parse_proposal(f"1. {text}", text) == [Part(0, text, Task.TRANSLATION.value, (0, len(text)))]


@pytest.mark.parametrize(
    "reply",
    [
        "1. Write a poem about the sea\n2. What is the capital of Peru?",
        "1. Translate 'cat' into German\n2. Compute 99 divided by 7",
        "1. compute 15 times 3\n2. translate 'cat' into German",  # out of order: spans would overlap
        "1. translate\n2. compute",  # most of the message dropped
        "I cannot split this.",
        "",
    ],
)
def test_an_unfaithful_proposal_is_rejected(reply: str) -> None:
    assert parse_proposal(reply, "translate 'cat' into German and compute 15 times 3") is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "What is 2+2?", "translate 'cat' into German", " and ", ", then ", "; ", ". ", "\n", "\n\n",
                "1. ", "2) ", "- ", "I'm learning French", "'", '"', "```", ":", "it", "Explain", "who", "x",
            ]
        ),
        max_size=16,
    )
)
def test_any_text_gives_well_formed_parts(pieces: list[str]) -> None:
    text = "".join(pieces)
    for max_parts in (1, 2, 4):
        parts = split_query(text, max_parts=max_parts)
        assert len(parts) <= max_parts
        _assert_well_formed(text, parts)


@pytest.mark.parametrize(
    ("text", "n_parts"),
    [
        ("My dog is sick. What should I do? Should I call a vet?", 1),
        # Two whole questions are two requests, even of one task: a small model answers only the first (issue 15).
        ("What is photosynthesis? What is gravity?", 2),
        ("1. What is photosynthesis?\n2. What is gravity?", 2),
        ("How many legs does a spider have and how many does an ant have?", 1),
        ("Explain recursion. Tell me more.", 1),
    ],
)
def test_a_later_part_must_stand_alone_unless_numbered(text: str, n_parts: int) -> None:
    assert len(split_query(text)) == n_parts


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "What is the capital of France? What is the chemical symbol for gold?",
            ["What is the capital of France?", "What is the chemical symbol for gold?"],
        ),
        (
            "What is the capital of France? Also, what is the chemical symbol for gold?",
            ["What is the capital of France?", "Also, what is the chemical symbol for gold?"],
        ),
        ("Who wrote Hamlet? And how many legs does a spider have?", ["Who wrote Hamlet?", "And how many legs does a spider have?"]),
        (
            "Give me the capital of Peru and the boiling point of water in Celsius.",
            ["Give me the capital of Peru", "Give me the boiling point of water in Celsius."],
        ),
        ("Who painted the Mona Lisa? Who wrote Hamlet?", ["Who painted the Mona Lisa?", "Who wrote Hamlet?"]),
    ],
)
def test_every_request_of_a_plain_compound_gets_its_own_part(text: str, expected: list[str]) -> None:
    """Issue 15's compound queries: one part per request, each askable on its own."""
    parts = split_query(text)
    assert [p.request() for p in parts] == expected
    _assert_well_formed(text, parts)


def test_a_shared_lead_is_put_back_only_for_asking() -> None:
    text = "Give me the capital of Peru and the boiling point of water in Celsius."
    first, second = split_query(text)
    assert second.text == "the boiling point of water in Celsius." and second.lead == "Give me "
    assert first.lead == "" and first.request() == first.text
