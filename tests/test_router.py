"""Routing with `auto`: constraints, feedback errors, persistence across restarts and crashes, learning end to end."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import openai
import pytest

from tests.nodes import FAST, GEMMA3_ID, SMOLLM2_ID, RunningNode, get_json, model_ids, post_json, start_node, wait_for


def _ask(client: openai.OpenAI, text: str, **expertmesh) -> dict:
    response = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": text}],
        max_tokens=2,
        temperature=0,
        extra_body={"expertmesh": expertmesh} if expertmesh else None,
    )
    return response.model_extra["expertmesh"]


def _client(node: RunningNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.mark.model
def test_feedback_errors_and_decision_record(node: RunningNode) -> None:
    routing = _ask(_client(node), "What is 2+2?")
    feedback = node.url + "/v1/feedback"
    good = {"decision_id": routing["decision_id"], "token": routing["feedback_token"], "rating": "up"}
    assert (post_json(feedback, {**good, "token": "forged"}))[0] == 403
    assert (post_json(feedback, {**good, "decision_id": "0" * 32}))[0] == 404
    status, body = post_json(feedback, {**good, "reward": 0.5})
    assert status == 400 and "exactly one" in body["error"]["message"]
    assert (post_json(feedback, {**good, "rating": "sideways"}))[0] == 400
    status, body = post_json(feedback, good)
    assert status == 200 and body["recorded"] and body["reward"] == 1.0
    status, body = post_json(feedback, {**good, "rating": "down"})
    assert status == 409
    decision = get_json(node.url + f"/v1/decisions/{routing['decision_id']}")
    assert decision["reward"] == 1.0
    assert decision["served"]["expert"] == routing["expert"]
    assert decision["task"] == "arithmetic"
    assert get_json(node.url + "/v1/decisions/nope")["error"]["code"] == "not_found"


@pytest.mark.model
def test_request_constraints_limit_the_candidates(node: RunningNode) -> None:
    client = _client(node)
    for _ in range(3):
        assert _ask(client, "Hello there", approved=[GEMMA3_ID])["expert"] == GEMMA3_ID
        assert _ask(client, "Hello there", exclude=["gemma3"])["expert"] == SMOLLM2_ID
    only = _ask(client, "Hello there", approved=["smollm2-135m"], local_only=True)
    assert [c["expert"] for c in only["explanation"]["candidates"]] == [SMOLLM2_ID]
    with pytest.raises(openai.NotFoundError):
        _ask(client, "Hello", min_scores={"knowledge": 0.99})  # nothing judged that well yet
    with pytest.raises(openai.BadRequestError):
        _ask(client, "Hello", local_only="yes")


def _rate(node: RunningNode, routing: dict, rating: str) -> None:
    body = {"decision_id": routing["decision_id"], "token": routing["feedback_token"], "rating": rating}
    status, _ = post_json(node.url + "/v1/feedback", body)
    assert status == 200


@pytest.mark.model
def test_policy_survives_restart_kill_9_and_a_corrupt_model_file(tmp_path: Path) -> None:
    data = tmp_path / "node"
    first = start_node(data, "--model", "smollm2-135m", "--model", "gemma3-270m")
    try:
        for n in range(4):
            _rate(first, _ask(_client(first), f"What is {n} plus {n}?"), "up")
        assert get_json(first.url + "/v1/router/stats")["policy_version"] == 4
    finally:
        assert first.stop() == 0
    second = start_node(data, "--model", "smollm2-135m", "--model", "gemma3-270m")
    try:
        stats = get_json(second.url + "/v1/router/stats")
        assert stats["policy_version"] == 4 and stats["rated"] == 4
        # Acknowledged feedback, then a crash before any save: the ledger has it, the restart learns it.
        _rate(second, _ask(_client(second), "Translate 'cat' into French."), "down")
        os.kill(second.process.pid, signal.SIGKILL)
        second.process.wait(timeout=10)
    finally:
        second.stop()
    third = start_node(data, "--model", "smollm2-135m", "--model", "gemma3-270m")
    try:
        stats = get_json(third.url + "/v1/router/stats")
        assert stats["policy_version"] == 5 and stats["rated"] == 5
    finally:
        assert third.stop() == 0
    (data / "router.policy").write_bytes(b"this is not a model")
    fourth = start_node(data, "--model", "smollm2-135m", "--model", "gemma3-270m")
    try:
        assert get_json(fourth.url + "/v1/router/stats")["policy_version"] == 5  # rebuilt from the ledger
        assert "rebuilding it from the ledger" in fourth.log()
        assert _ask(_client(fourth), "What is 3 plus 4?")["decision_id"]
    finally:
        fourth.stop()


ARITHMETIC = ["What is {a} plus {b}?", "Compute {a} * {b}.", "What is {a} minus {b}?", "Calculate {a} + {b}."]
TRANSLATION = [
    "Translate 'house' into French.", "Translate 'good morning' to Spanish.",
    "How do you say 'dog' in German? Translate it.", "Translate 'thank you' into Italian.",
]
TRAINING_EVENTS = 60
CHECK_EVENTS = 20


@pytest.mark.model
def test_routing_follows_a_users_ratings_across_two_nodes(tmp_path: Path) -> None:
    """The user likes gemma3 (on B) for arithmetic and smollm2 (on A) for translation; routing from A follows."""
    a = start_node(tmp_path / "a", "--model", "smollm2-135m", "--spot-check-interval-s", "1", *FAST)
    b = start_node(tmp_path / "b", "--model", "gemma3-270m", "--peer", a.url, *FAST)
    try:
        wait_for(lambda: GEMMA3_ID in model_ids(a), what="A to list gemma3 on B")
        # An unverified remote expert gets a capped share of `auto` traffic (README: Trust): A first checks
        # B's expert with its own probes, then the user's ratings decide.
        wait_for(
            lambda: any(e["id"] == GEMMA3_ID and e["verified"] for e in get_json(a.url + "/v1/experts")["data"]),
            what="A to verify gemma3 on B", timeout_s=240,
        )
        client = _client(a)
        preferred = {"arithmetic": GEMMA3_ID, "translation": SMOLLM2_ID}
        followed = {"arithmetic": 0, "translation": 0}
        for event in range(TRAINING_EVENTS + CHECK_EVENTS):
            category = "arithmetic" if event % 2 == 0 else "translation"
            if category == "arithmetic":
                text = ARITHMETIC[event % 4].format(a=event + 3, b=event % 7 + 2)
            else:
                text = TRANSLATION[(event // 2) % 4]
            routing = _ask(client, text)
            assert routing["explanation"]["task"] == category
            liked = routing["expert"] == preferred[category]
            if event >= TRAINING_EVENTS:
                followed[category] += liked
            _rate(a, routing, "up" if liked else "down")
        share = {category: count / (CHECK_EVENTS / 2) for category, count in followed.items()}
        assert share["arithmetic"] >= 0.8 and share["translation"] >= 0.8, share
        served_by_b = get_json(a.url + "/v1/router/stats")["share_by_task"]["arithmetic"].get(GEMMA3_ID, 0)
        assert served_by_b > 0
    finally:
        a.stop()
        b.stop()


@pytest.mark.model
def test_cli_ask_rates_and_report_compares_policies(node: RunningNode) -> None:
    import subprocess
    import sys

    asked = subprocess.run(
        [sys.executable, "-m", "node", "ask", "What is 5 plus 6?", "--node", node.url, "--max-tokens", "4", "--rate", "down"],
        capture_output=True, text=True, timeout=120,
    )
    assert asked.returncode == 0, asked.stderr
    assert "rated down" in asked.stderr
    report = subprocess.run(
        [sys.executable, "-m", "node", "report", "--data-dir", str(node.data_dir)], capture_output=True, text=True, timeout=60
    )
    assert report.returncode == 0, report.stderr
    for row in ("router (logged)", "random", "judge-greedy", f"always {SMOLLM2_ID}", f"always {GEMMA3_ID}"):
        assert row in report.stdout
    stats = get_json(node.url + "/v1/router/stats")
    assert stats["rated"] >= 2 and stats["reward_over_time"] and stats["share_by_task"]["arithmetic"]


@pytest.mark.model
def test_a_choice_that_fails_before_answering_falls_back_and_the_ledger_says_so(tmp_path: Path) -> None:
    # A keeps a dead peer listed for a minute, so routing still picks it now and then.
    a = start_node(tmp_path / "a", "--model", "smollm2-135m", "--hello-interval-s", "1", "--peer-dead-after-s", "60")
    b = start_node(tmp_path / "b", "--model", "gemma3-270m", "--peer", a.url, *FAST)
    try:
        wait_for(lambda: GEMMA3_ID in model_ids(a), what="A to list gemma3 on B")
        os.kill(b.process.pid, signal.SIGKILL)
        b.process.wait(timeout=10)
        client = _client(a)
        for _ in range(40):
            routing = _ask(client, "What is 2 plus 2?")
            if "fallback" in routing:
                break
        assert routing.get("fallback", {}).get("from") == GEMMA3_ID, "the dead expert was never chosen in 40 tries"
        assert routing["expert"] == SMOLLM2_ID
        decision = get_json(a.url + f"/v1/decisions/{routing['decision_id']}")
        assert decision["status"] == "fallback"
        assert decision["chosen"]["expert"] == GEMMA3_ID and decision["served"]["expert"] == SMOLLM2_ID
        assert b.node_id in decision["fallback_reason"]
    finally:
        a.stop()
        b.stop()
