"""The OpenAI-compatible API of a real node with real models, through the official client and aiohttp."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from tests.nodes import GEMMA3_ID, SMOLLM2_ID, RunningNode

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def client(node: RunningNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def test_chat_completion_with_the_official_client(client: openai.OpenAI, node: RunningNode) -> None:
    response = client.chat.completions.create(
        model=SMOLLM2_ID,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        max_tokens=16,
        temperature=0,
        seed=1,
    )
    choice = response.choices[0]
    assert response.model == SMOLLM2_ID
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < response.usage.completion_tokens <= 16
    assert response.usage.prompt_tokens > 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.model_extra["expertmesh"] == {"expert": SMOLLM2_ID, "node": node.node_id}


def test_length_limit_reports_length_and_exact_usage(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=SMOLLM2_ID,
        messages=[{"role": "user", "content": "Write a long story about a dragon and a knight."}],
        max_tokens=6,
        temperature=0,
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 6


def test_streaming_chat_ends_with_finish_reason_and_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=SMOLLM2_ID,
        messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert text.strip()
    assert finish in (["stop"], ["length"])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(usage) == 1 and 0 < usage[0].completion_tokens <= 12
    assert all(c.model == SMOLLM2_ID for c in chunks)


def test_stream_and_plain_give_the_same_text_at_temperature_zero(client: openai.OpenAI) -> None:
    request: dict[str, Any] = dict(
        model=SMOLLM2_ID,
        messages=[{"role": "user", "content": "Say hello to Ana."}],
        max_tokens=10,
        temperature=0,
        seed=7,
    )
    plain = client.chat.completions.create(**request).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**request, stream=True))
    assert plain == streamed


def test_stop_sequence_cuts_the_answer(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=SMOLLM2_ID,
        messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
        max_tokens=40,
        temperature=0,
        stop=[","],
    )
    assert "," not in response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"


def test_base_model_answers_as_completion_style_expert(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=GEMMA3_ID,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    content = response.choices[0].message.content
    assert "Paris" in content
    assert not content[0].isspace(), content  # the model's space after "A:" is the transcript's, not the answer's
    # The Q/A prompt's stop sequences end the answer before the model invents the next question.
    assert "Q:" not in content
    assert response.choices[0].finish_reason == "stop"


def test_text_completions_stream_and_plain(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=GEMMA3_ID, prompt="Q: What is 2+2?\nA:", max_tokens=8, temperature=0, stop=["\n"])
    assert "4" in plain.choices[0].text
    assert plain.usage.completion_tokens <= 8
    streamed = client.completions.create(
        model=GEMMA3_ID, prompt="Q: What is 2+2?\nA:", max_tokens=8, temperature=0, stop=["\n"], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text


def test_models_lists_auto_and_every_expert(client: openai.OpenAI, node: RunningNode) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"auto", SMOLLM2_ID, GEMMA3_ID}
    assert all(m.owned_by == node.node_id for m in models.values())
    assert models[SMOLLM2_ID].model_extra["expertmesh"]["prompt_style"] == "chat"
    assert models[GEMMA3_ID].model_extra["expertmesh"]["prompt_style"] == "completion"
    assert client.models.retrieve(GEMMA3_ID).id == GEMMA3_ID


def test_auto_is_routed_and_explained(client: openai.OpenAI, node: RunningNode) -> None:
    response = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    routing = response.model_extra["expertmesh"]
    assert response.model in (SMOLLM2_ID, GEMMA3_ID)
    assert routing["expert"] == response.model and routing["node"] == node.node_id
    assert routing["decision_id"] and routing["feedback_token"]
    assert 0 < routing["probability"] <= 1
    candidates = routing["explanation"]["candidates"]
    assert {c["expert"] for c in candidates} == {SMOLLM2_ID, GEMMA3_ID}
    assert abs(sum(c["probability"] for c in candidates) - 1) < 1e-3
    assert routing["explanation"]["task"]


def test_unknown_model_is_a_404_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="nope@123", messages=[{"role": "user", "content": "Hi"}])
    assert raised.value.body["code"] == "model_not_found"


BAD_BODIES = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": SMOLLM2_ID}).encode(), 400, "messages"),
    (json.dumps({"model": SMOLLM2_ID, "messages": []}).encode(), 400, "messages"),
    (json.dumps({"model": SMOLLM2_ID, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "messages.0.role"),
    (json.dumps({"model": SMOLLM2_ID, "messages": [{"role": "user", "content": 5}]}).encode(), 400, "messages.0.content"),
    (json.dumps({"model": SMOLLM2_ID, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"model": SMOLLM2_ID, "messages": [{"role": "user", "content": "x"}], "temperature": 3}).encode(), 400, "temperature"),
    (json.dumps({"model": SMOLLM2_ID, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": SMOLLM2_ID, "messages": [{"role": "user", "content": "x"}], "max_tokens": True}).encode(), 400, "max_tokens"),
    (json.dumps({"model": SMOLLM2_ID, "messages": [{"role": "user", "content": "x"}], "n": 2}).encode(), 400, "n"),
    (json.dumps({"model": SMOLLM2_ID, "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "stop"),
    (json.dumps({"model": SMOLLM2_ID, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"model": 12, "messages": [{"role": "user", "content": "x"}]}).encode(), 400, "model"),
    (json.dumps({"model": "missing@000", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_BODIES)
async def test_bad_chat_requests_get_openai_errors(node: RunningNode, body: bytes, status: int, param: str | None) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            node.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == status
            error = (await response.json())["error"]
    assert error["message"]
    assert error["type"] in ("invalid_request_error",)
    if param is not None:
        assert error["param"] == param


async def test_bad_completion_request_names_the_field(node: RunningNode) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(node.url + "/v1/completions", json={"model": GEMMA3_ID, "prompt": ["a", "b"]}) as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"].startswith("prompt")


async def test_oversized_body_is_413(node: RunningNode) -> None:
    huge = json.dumps({"model": SMOLLM2_ID, "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    async with aiohttp.ClientSession() as session:
        async with session.post(node.url + "/v1/chat/completions", data=huge) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "payload_too_large"


async def test_prompt_longer_than_the_context_is_400(node: RunningNode) -> None:
    long_text = "word " * 3000  # well past n_ctx=2048 tokens, under the body cap
    async with aiohttp.ClientSession() as session:
        async with session.post(
            node.url + "/v1/chat/completions",
            json={"model": SMOLLM2_ID, "messages": [{"role": "user", "content": long_text}]},
        ) as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"] == "messages"


async def test_wrong_method_and_unknown_path_get_error_bodies(node: RunningNode) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(node.url + "/v1/chat/completions") as response:
            assert response.status == 405
            assert "error" in await response.json()
        async with session.get(node.url + "/v1/nothing-here") as response:
            assert response.status == 404
            assert "error" in await response.json()


async def test_health_and_metrics(node: RunningNode, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=SMOLLM2_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    async with aiohttp.ClientSession() as session:
        async with session.get(node.url + "/healthz") as response:
            health = await response.json()
        async with session.get(node.url + "/metrics") as response:
            assert response.status == 200
            text = await response.text()
    assert health["status"] == "ok" and health["node_id"] == node.node_id
    assert {e["id"] for e in health["experts"]} == {SMOLLM2_ID, GEMMA3_ID}
    assert 'expertmesh_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert f'expertmesh_tokens_total{{expert="{SMOLLM2_ID}",kind="completion"}}' in text
    assert "expertmesh_request_latency_seconds_bucket" in text
    assert f'expertmesh_time_to_first_token_seconds_count{{expert="{SMOLLM2_ID}"}}' in text
    assert f'expertmesh_queue_depth{{expert="{SMOLLM2_ID}"}} 0.0' in text, [line for line in text.splitlines() if "queue" in line]
