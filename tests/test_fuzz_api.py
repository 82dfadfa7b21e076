"""Schemathesis against a real node: generated requests never get a 5xx, and every answer matches /openapi.json."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.nodes import SMOLLM2_ID, RunningNode, start_node

MAX_EXAMPLES = 25
MAX_TOKENS = 4  # generation is the only costly thing a request can ask for
REQUEST_TIMEOUT_S = 60
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")

OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("POST", "/v1/feedback"),
    ("GET", "/v1/decisions/{decision_id}"),
    ("GET", "/v1/peers"),
    ("GET", "/v1/experts"),
    ("GET", "/v1/router/stats"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
]
# Bodies are where invalid input can be made; the path parameters are free strings.
NEGATIVE_OPERATIONS = [op for op in OPERATIONS if op[0] == "POST"]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    # No shrinking: each step is a request to a model; a failure prints a curl line to reproduce it.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    running = start_node(tmp_path_factory.mktemp("fuzz"), "--model", "smollm2-135m", "--queue-size", "2")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def schema(fuzz_node: RunningNode) -> schemathesis.BaseSchema:
    """The node's own published document, as a client would read it."""
    return schemathesis.openapi.from_url(fuzz_node.url + "/openapi.json", timeout=REQUEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        yield http


def _cheap(body: Any, model: str | None, plain: bool) -> Any:
    """A generation body that asks for at most MAX_TOKENS, often names a real model, and streams at most half the time."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[field] = MAX_TOKENS
    if body.get("max_tokens") is None:  # absent or null: the node's default would be 512
        body["max_tokens"] = MAX_TOKENS
    if model is not None and isinstance(body.get("model"), str):
        body["model"] = model
    if plain and isinstance(body.get("stream"), bool):
        body["stream"] = False
    return body


def _fuzz(
    schema: schemathesis.BaseSchema,
    node: RunningNode,
    http: requests.Session,
    method: str,
    path: str,
    mode: GenerationMode,
) -> None:
    operation = schema[path][method]
    checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])

    @FUZZ_SETTINGS
    @given(
        case=operation.as_strategy(generation_mode=mode),
        model=st.sampled_from([None, "auto", SMOLLM2_ID]),
        plain=st.booleans(),
    )
    def run(case: schemathesis.Case, model: str | None, plain: bool) -> None:
        if path in GENERATION_PATHS:
            # Assigned, not edited in place, so schemathesis re-checks whether the body is still (in)valid.
            case.body = _cheap(case.body, model, plain)
        case.call_and_validate(base_url=node.url, session=http, checks=checks, timeout=REQUEST_TIMEOUT_S)

    run()


@pytest.mark.model
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_valid_requests_are_answered_as_documented(
    schema: schemathesis.BaseSchema, fuzz_node: RunningNode, session: requests.Session, method: str, path: str
) -> None:
    _fuzz(schema, fuzz_node, session, method, path, GenerationMode.POSITIVE)


@pytest.mark.model
@pytest.mark.parametrize(("method", "path"), NEGATIVE_OPERATIONS, ids=[f"{m} {p}" for m, p in NEGATIVE_OPERATIONS])
def test_invalid_bodies_are_rejected_as_documented(
    schema: schemathesis.BaseSchema, fuzz_node: RunningNode, session: requests.Session, method: str, path: str
) -> None:
    _fuzz(schema, fuzz_node, session, method, path, GenerationMode.NEGATIVE)


@pytest.mark.model
def test_the_node_is_healthy_after_the_fuzzing(fuzz_node: RunningNode, session: requests.Session) -> None:
    assert fuzz_node.process.poll() is None, fuzz_node.log()
    for _ in range(10):
        response = session.get(fuzz_node.url + "/healthz", timeout=REQUEST_TIMEOUT_S)
        if response.status_code != 429:
            break
        time.sleep(int(response.headers["Retry-After"]))
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok"
    # Every admitted request has ended: no slot is left held by a fuzzed request.
    assert [e["queue_depth"] for e in health["experts"]] == [0]
    assert "Traceback" not in fuzz_node.log()
