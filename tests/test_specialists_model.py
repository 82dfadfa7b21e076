"""Specialists on real models: shared weights (by RSS), grammar-held answers, response_format, adopt between two nodes."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from node.serving import catalog
from node.serving.experts import ChatMessage, Delta, GenerationParams, load_expert
from node.serving.specialist_serving import build_specialists
from node.serving.specialists import EXPERTS_DIRNAME, resolve_definition, specialist_id
from tests.nodes import SMOLLM2_ID, child_pids, safe_cpu_kernels, start_node

pytestmark = pytest.mark.model


def _rss_bytes() -> int:
    """RSS of this process and its descendants: each model's weights live in its worker process."""
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        children = [pid for pid in child_pids(frontier.pop()) if pid not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _answer(expert: Any, prompt: str, max_tokens: int = 8, grammar: str | None = None) -> str:
    async def run() -> str:
        tokens, stops = expert.tokenize_chat([ChatMessage("user", prompt)])
        params = GenerationParams(max_tokens=max_tokens, temperature=0.0, seed=0, grammar=grammar)
        expert.admit()
        try:
            texts = [e.text async for e in expert.generate(tokens, stops, params) if isinstance(e, Delta)]
        finally:
            expert.release()
        return "".join(texts)

    return asyncio.run(run())


# A prompt longer than any specialist's framed prompt below, so buffers for long prompts are in use before measuring.
WARM_UP = "Please read this and say hello. " + "The quick brown fox jumps over the lazy dog. " * 20


def test_two_definitions_on_one_base_cost_no_second_model() -> None:
    models_dir = catalog.default_models_dir()
    model = catalog.resolve("smollm2-135m", models_dir, progress=False)

    def load(m: catalog.ModelFile):
        return load_expert(m, n_ctx=256, n_threads=1, n_gpu_layers=0, queue_size=1, safe_cpu_kernels=safe_cpu_kernels())

    definitions = [resolve_definition("facts"), resolve_definition("arithmetic")]  # parsing is not what is measured
    base = load(model)
    # Every weight page, the long-prompt buffers and a grammar's sampler in use once, before measuring.
    _answer(base, WARM_UP)
    _answer(base, "Say yes.", grammar='root ::= "yes" | "no"')
    before = _rss_bytes()
    specialists, extra = build_specialists(definitions, [base], load, models_dir)
    for specialist in specialists:
        _answer(specialist, 'Translate "cat" into French.')
    with_specialists = _rss_bytes()
    # The baseline, measured in the same process: the same base loaded a second time.
    second = load(model)
    _answer(second, WARM_UP)
    with_second_model = _rss_bytes()
    try:
        assert extra == [] and all(s.base is base for s in specialists)
        assert len({s.spec.id for s in specialists} | {base.spec.id}) == 3
        second_model_cost = with_second_model - with_specialists
        specialists_cost = with_specialists - before
        assert second_model_cost > 0.5 * model.size_bytes, (second_model_cost, model.size_bytes)
        assert specialists_cost < 0.1 * second_model_cost, (specialists_cost, second_model_cost)
    finally:
        second.close()
        base.close()


def test_a_grammar_holds_the_answer_and_the_definition_frames_the_prompt() -> None:
    models_dir = catalog.default_models_dir()
    model = catalog.resolve("gemma3-270m", models_dir, progress=False)  # the shipped sentiment specialist's base
    base = load_expert(model, n_ctx=512, n_threads=1, n_gpu_layers=0, queue_size=1, safe_cpu_kernels=safe_cpu_kernels())
    try:
        definition, _ = resolve_definition("sentiment")
        assert definition.prompt_style == "completion" and definition.grammar is not None
        (sentiment,), _ = build_specialists([(definition, "shipped:sentiment")], [base], None, models_dir)  # type: ignore[arg-type]  # the base is loaded
        assert sentiment.spec.id == specialist_id(definition, base.spec.sha256)
        # Held to its two labels whatever it is asked, and right on plain reviews.
        assert _answer(sentiment, "I love this phone, it works perfectly.") == " positive"
        assert _answer(sentiment, "This is the worst meal I have ever eaten.") == " negative"
        assert _answer(sentiment, "Tell me a story.") in (" positive", " negative")
        framed = sentiment.framed([ChatMessage("system", "Be brief."), ChatMessage("user", "Great film!")])
        assert framed[0].role == "system" and framed[0].content.startswith(definition.system) and framed[0].content.endswith("Be brief.")
        assert framed[1:-1] == [
            message for example in definition.examples
            for message in (ChatMessage("user", example.user), ChatMessage("assistant", example.assistant))
        ]
        assert framed[-1] == ChatMessage("user", "Great film!")
    finally:
        base.close()


# ---- two nodes on loopback ----------------------------------------------------------------


def _request(url: str, body: dict | None = None, timeout_s: float = 120.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _wait_for_model(url: str, expert_id: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, listing = _request(f"{url}/v1/models")
        for entry in listing["data"]:
            if entry["id"] == expert_id:
                return entry
        time.sleep(0.5)
    raise AssertionError(f"{expert_id} never listed at {url}")


SENTIMENT_SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["positive", "negative"]}},
    "required": ["label"],
    "additionalProperties": False,
}


def test_adopt_and_response_format_between_two_nodes(tmp_path: Path) -> None:
    a = start_node(
        tmp_path / "a", "--model", "smollm2-135m", "--expert", "arithmetic", "--expert", "facts", "--threads", "1",
        "--hello-interval-s", "1",
    )
    b = None
    try:
        b = start_node(tmp_path / "b", "--model", "smollm2-135m", "--peer", a.url, "--threads", "1", "--hello-interval-s", "1")
        arithmetic_id = specialist_id(resolve_definition("arithmetic")[0], str(catalog.CATALOG["smollm2-135m"].sha256))
        facts_id = specialist_id(resolve_definition("facts")[0], str(catalog.CATALOG["smollm2-135m"].sha256))
        entry = _wait_for_model(b.url, facts_id)
        assert entry["expertmesh"]["local"] is False
        _wait_for_model(b.url, arithmetic_id)

        # response_format, forwarded: B does not host the arithmetic specialist, A builds the grammar itself.
        status, body = _request(
            f"{b.url}/v1/chat/completions",
            {
                "model": arithmetic_id,
                "messages": [{"role": "user", "content": "I love this phone, it works perfectly."}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "sentiment", "schema": SENTIMENT_SCHEMA}},
                "max_tokens": 32,
            },
        )
        assert status == 200, body
        assert body["expertmesh"]["node"] == a.node_id
        assert json.loads(body["choices"][0]["message"]["content"])["label"] in ("positive", "negative")

        # response_format on a local plain model: any JSON object, and it parses.
        status, body = _request(
            f"{a.url}/v1/chat/completions",
            {
                "model": SMOLLM2_ID,
                "messages": [{"role": "user", "content": "Give the capital of France as JSON with a key city."}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": {
                    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
                    "additionalProperties": False,
                }}},
                "max_tokens": 40,
                "temperature": 0,
            },
        )
        assert status == 200, body
        assert isinstance(json.loads(body["choices"][0]["message"]["content"])["city"], str)

        # An invalid schema is the client's error, named.
        status, body = _request(
            f"{a.url}/v1/chat/completions",
            {
                "model": "auto",
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"n": {"type": "integr"}}}},
                },
            },
        )
        assert status == 400 and body["error"]["param"] == "response_format.json_schema.schema.properties.n.type", body

        # Adopt: look first, then serve it here from B's own copy of the base.
        status, body = _request(f"{b.url}/v1/experts/adopt", {"expert": facts_id, "dry_run": True})
        assert status == 200 and body["served"] is False and body["from_node"] == a.node_id, body
        assert body["definition"]["name"] == "facts" and body["base"] == "smollm2-135m"
        status, body = _request(f"{b.url}/v1/experts/adopt", {"expert": facts_id})
        assert status == 200 and body["served"] is True, body
        assert Path(body["path"]).parent == b.data_dir / EXPERTS_DIRNAME
        entry = _wait_for_model(b.url, facts_id)
        assert entry["expertmesh"]["local"] is True and entry["owned_by"] == b.node_id
        status, body = _request(
            f"{b.url}/v1/chat/completions",
            {"model": facts_id, "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16},
        )
        assert status == 200 and body["expertmesh"]["node"] == b.node_id, body
        status, body = _request(f"{b.url}/v1/experts/adopt", {"expert": facts_id})
        assert status == 409, body
        status, body = _request(f"{b.url}/v1/experts/adopt", {"expert": SMOLLM2_ID})
        assert status == 409, body  # already here (and a plain model has no definition to adopt anyway)
        status, body = _request(f"{b.url}/v1/experts/adopt", {"expert": "nobody@000000000000"})
        assert status == 404, body

        # Adopted means kept: after a restart B serves it from its experts folder, with the same id.
        assert b.stop() == 0
        b = start_node(tmp_path / "b", "--model", "smollm2-135m", "--threads", "1")
        entry = _wait_for_model(b.url, facts_id, timeout_s=5)
        assert entry["expertmesh"]["local"] is True
    finally:
        if b is not None:
            b.stop()
        a.stop()
