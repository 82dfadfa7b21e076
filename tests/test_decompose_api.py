"""Decomposed routing through a real node: each part routed and rated on its own, one composed answer."""

from __future__ import annotations

import openai
import pytest

from tests.nodes import RunningNode, get_json, post_json

pytestmark = pytest.mark.model

COMPOUND = "Translate 'cat' into French. What is 12 plus 7?"


def _client(node: RunningNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def _ask(node: RunningNode, text: str, **options):
    return _client(node).chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": text}],
        max_tokens=8,
        temperature=0,
        extra_body={"expertmesh": options},
    )


def test_a_compound_query_is_split_routed_per_part_and_composed(node: RunningNode) -> None:
    response = _ask(node, COMPOUND, decompose=True)
    routing = response.model_extra["expertmesh"]
    assert routing["decomposed"] is True
    parts = routing["parts"]
    assert [p["task"] for p in parts] == ["translation", "arithmetic"]
    assert [p["text"] for p in parts] == ["Translate 'cat' into French.", "What is 12 plus 7?"]
    assert len({p["decision_id"] for p in parts} | {routing["decision_id"]}) == 3
    content = response.choices[0].message.content
    assert content.index("**1. Translate 'cat' into French.**") < content.index("**2. What is 12 plus 7?**")
    for part in parts:
        assert part["expert"].split("@")[0] in content
    assert response.usage.completion_tokens > 0

    # Feedback can target a part, then the whole (which rates the parts not rated yet).
    first = parts[0]
    assert post_json(node.url + "/v1/feedback", {"decision_id": first["decision_id"], "token": first["feedback_token"], "rating": "up"})[0] == 200
    whole = {"decision_id": routing["decision_id"], "token": routing["feedback_token"], "rating": "down"}
    assert post_json(node.url + "/v1/feedback", {**whole, "token": "forged"})[0] == 403
    assert post_json(node.url + "/v1/feedback", whole)[0] == 200
    assert post_json(node.url + "/v1/feedback", whole)[0] == 409
    assert get_json(node.url + f"/v1/decisions/{first['decision_id']}")["reward"] == 1.0
    assert get_json(node.url + f"/v1/decisions/{parts[1]['decision_id']}")["reward"] == 0.0


def test_a_decomposed_answer_streams_part_by_part(node: RunningNode) -> None:
    stream = _client(node).chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": COMPOUND}],
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body={"expertmesh": {"decompose": True}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("**1. Translate 'cat' into French.**") and "\n\n**2. What is 12 plus 7?**" in text
    assert chunks[-1].model_extra["expertmesh"]["parts"][1]["task"] == "arithmetic"


def test_decomposition_is_opt_in_and_validated(node: RunningNode) -> None:
    assert "parts" not in _ask(node, COMPOUND).model_extra["expertmesh"]  # the node's default is off
    single = _ask(node, "What is 12 plus 7?", decompose=True).model_extra["expertmesh"]
    assert "parts" not in single and single["decision_id"]
    with pytest.raises(openai.BadRequestError):
        _ask(node, COMPOUND, decompose="yes")


def test_an_instruct_expert_good_enough_by_its_card_may_propose_a_split(tmp_path) -> None:
    from tests.nodes import start_node, wait_for

    # Any judged instruction score qualifies here, so the (weak) local expert is asked.
    node = start_node(
        tmp_path / "node", "--model", "smollm2-135m", "--judge-items", "1", judge=True,
        env={"EXPERTMESH_DECOMPOSE_PROPOSER_MIN_SCORE": "0"},
    )
    try:
        wait_for(lambda: bool(get_json(node.url + "/v1/experts")["data"][0]["scores"]), timeout_s=120, what="a card")
        response = _ask(node, "Summarize the news and list the key points for me.", decompose=True)
        assert response.choices[0].message.content
        log = node.log()
        assert "asked smollm2-135m@b179c9523d0e to propose a split" in log
        routing = response.model_extra["expertmesh"]
        # Either the proposal was faithful and used, or the rules' single part stands; both are answered.
        assert ("parts" in routing) or ("kept the rules' plan" in log)
    finally:
        node.stop()
