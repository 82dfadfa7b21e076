"""User API shapes: the `expertmesh` options become the router's constraints; bad ones are a 400 naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from node.errors import InvalidRequest
from node.http.openapi import openapi_document
from node.http.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from node.routing.router import RouteConstraints


def _chat(**body: Any) -> bytes:
    return json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}], **body}).encode()


def test_options_become_route_constraints() -> None:
    options = {"approved": ["a", "b"], "exclude": "c", "local_only": True, "max_latency_ms": 50,
               "min_scores": {"knowledge": 0.5}, "decompose": True, "from_a_newer_client": 1}
    request = parse_body(_chat(expertmesh=options), ChatCompletionRequest)
    assert request.options().constraints() == RouteConstraints(
        approved=("a", "b"), exclude=("c",), local_only=True, max_latency_ms=50.0, min_scores={"knowledge": 0.5}
    )
    assert request.options().decompose is True
    plain = parse_body(_chat(), ChatCompletionRequest)
    assert plain.options().constraints() == RouteConstraints() and plain.options().decompose is None


@pytest.mark.parametrize(
    "options, param",
    [
        ({"approved": 5}, "expertmesh.approved"),
        ({"approved": ["x"] * 257}, "expertmesh.approved"),
        ({"local_only": "yes"}, "expertmesh.local_only"),
        ({"verified_only": 1}, "expertmesh.verified_only"),
        ({"max_latency_ms": -1}, "expertmesh.max_latency_ms"),
        ({"max_latency_ms": True}, "expertmesh.max_latency_ms"),
        ({"min_scores": {"knowledge": 2}}, "expertmesh.min_scores.knowledge"),
        ({"min_scores": {f"d{i}": 0.1 for i in range(33)}}, "expertmesh.min_scores"),
        ({"decompose": "true"}, "expertmesh.decompose"),
        ([1], "expertmesh"),
    ],
)
def test_bad_options_are_400_naming_the_field(options: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_body(_chat(expertmesh=options), ChatCompletionRequest)
    assert raised.value.param == param and raised.value.status == 400


def test_text_completions_ignore_options_but_check_stops() -> None:
    body = {"model": "m", "prompt": "p", "expertmesh": {"local_only": "yes"}}
    assert parse_body(json.dumps(body).encode(), CompletionRequest).expertmesh == {"local_only": "yes"}
    for stop, param in [(["a"] * 5, "stop"), (["ok", ""], "stop.1"), ("x" * 201, "stop")]:
        with pytest.raises(InvalidRequest) as raised:
            parse_body(json.dumps({**body, "stop": stop}).encode(), CompletionRequest)
        assert raised.value.param == param


def test_openapi_components_are_the_models_schemas() -> None:
    document = openapi_document()
    components = document["components"]["schemas"]
    assert components["ChatCompletionRequest"]["properties"]["expertmesh"]["anyOf"][0] == {
        "$ref": "#/components/schemas/ExpertmeshOptions"
    }
    assert components["ExpertmeshOptions"]["properties"]["min_scores"]["anyOf"][0]["maxProperties"] == 32
    assert "maxItems" in json.dumps(components["ChatCompletionRequest"]["properties"]["stop"])
    # Every $ref resolves, and every operation answers errors with the Error model.
    text = json.dumps(document)
    for name in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
        assert name in components, name
    for path, operations in document["paths"].items():
        for operation in operations.values():
            assert operation["responses"]["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
            assert ("401" in operation["responses"]) == (path != "/healthz")
