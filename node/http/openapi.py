"""OpenAPI 3.1 description of the user API, built from the request models in node/http/schemas.py."""

from __future__ import annotations

import copy
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from node.http.schemas import (
    _MAX_STOP_CHARS,
    _MAX_STOPS,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
)

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
EVENT_STREAM = "text/event-stream"
REF_TEMPLATE = "#/components/schemas/{model}"

# The routing constraints of a request's `expertmesh` object, as node/routing/router.py parses them (null = absent).
_NAMES: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "maxItems": 256},
        {"type": "null"},
    ],
    "description": "node ids, expert ids, model names or families, or sha256 prefixes of 12+ hex digits",
}
_ROUTE_CONSTRAINTS: dict[str, Any] = {
    "type": "object",
    "description": "Per-request routing constraints; the node's own approved set always applies too.",
    "properties": {
        "approved": _NAMES,
        "exclude": _NAMES,
        "local_only": {"type": "boolean"},
        "verified_only": {"type": "boolean", "description": "only local experts and remote ones this node verified"},
        "max_latency_ms": {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}]},
        "min_scores": {
            "anyOf": [
                {
                    "type": "object",
                    "maxProperties": 32,
                    "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1},
                },
                {"type": "null"},
            ]
        },
    },
}
# What the `stop` validator enforces, which pydantic's generated schema cannot show.
_STOP: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1, "maxLength": _MAX_STOP_CHARS},
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": _MAX_STOP_CHARS},
            "maxItems": _MAX_STOPS,
        },
        {"type": "null"},
    ],
    "default": None,
    "title": "Stop",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(model=name)}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, Any], *, optional: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """A closed-world-friendly object: every property required unless named optional; more are allowed."""
    return {
        "type": "object",
        "properties": properties,
        "required": [name for name in properties if name not in optional],
        **extra,
    }


_STRING = {"type": "string"}
_INTEGER = {"type": "integer"}
_NUMBER = {"type": "number"}
_BOOLEAN = {"type": "boolean"}
_COUNT = {"type": "integer", "minimum": 0}


def _response_schemas() -> dict[str, Any]:
    """Hand-written response shapes (the handlers build plain dicts, so there is no model to derive them from)."""
    candidate = _object({"expert": _STRING, "node": _STRING, "local": _BOOLEAN, "probability": _NUMBER})
    routed_candidate = _object(
        {"expert": _STRING, "node": _STRING, "local": _BOOLEAN, "probability": _NUMBER, "verified": _BOOLEAN, "evidence": _STRING}
    )
    provenance = _object(
        {
            "expert": _STRING,
            "node": _STRING,
            "decision_id": _STRING,
            "feedback_token": _STRING,
            "probability": _NUMBER,
            "policy_version": _COUNT,
            "explanation": _object(
                {
                    "task": _STRING,
                    "candidates": {"type": "array", "items": routed_candidate},
                    "evidence": _STRING,
                    "top_features": {
                        "type": "array",
                        "items": {"type": "array", "prefixItems": [_STRING, _NUMBER], "minItems": 2, "maxItems": 2},
                    },
                    "community": _object(
                        {"reporters": _COUNT, "expected_reward": {"type": "object", "additionalProperties": _NUMBER}},
                        description="Present when other nodes' users' ratings weighed in the choice: from how many nodes.",
                    ),
                },
                optional=("community",),
            ),
            "fallback": _object({"from": _STRING, "reason": _STRING}),
        },
        optional=("decision_id", "feedback_token", "probability", "policy_version", "explanation", "fallback"),
        description="Who answered; with `model: auto` also the routing decision and how to rate it.",
    )
    usage = _object({"prompt_tokens": _COUNT, "completion_tokens": _COUNT, "total_tokens": _COUNT})
    finish_reason = {"type": "string", "enum": ["stop", "length"]}
    model_details = _object(
        {
            "name": _STRING,
            "sha256": _STRING,
            "family": _nullable(_STRING),
            "quantization": _nullable(_STRING),
            "prompt_style": {"type": "string", "enum": ["chat", "completion"]},
            "n_ctx": _COUNT,
            "size_bytes": _COUNT,
            "queue_depth": _COUNT,
            "local": _BOOLEAN,
            "nodes": {"type": "array", "items": _STRING},
        },
        optional=("family", "quantization", "size_bytes", "nodes"),
    )
    score = _object({"mean": _NUMBER, "ci_low": _NUMBER, "ci_high": _NUMBER, "n": _COUNT})
    card = _object(
        {
            "judge": _STRING,
            "owner": _STRING,
            "self_judged": _BOOLEAN,
            "expert": _STRING,
            "model_sha256": _STRING,
            "suite_version": _STRING,
            "sample": _STRING,
            "issued_ms": _INTEGER,
            "scores": {"type": "object", "additionalProperties": score},
            "performance": _object({"tokens_per_s": _NUMBER, "ttft_ms": _NUMBER, "n_ctx": _COUNT}),
        }
    )
    delta = {
        "type": "object",
        "properties": {"role": {"const": "assistant"}, "content": _STRING},
    }
    chunk_common = {
        "id": _STRING,
        "created": _INTEGER,
        "model": _STRING,
        "expertmesh": _ref("Provenance"),
        "usage": _ref("Usage"),
    }
    chunk_optional = ("usage",)
    return {
        "ChatCompletionChunk": _object(
            {
                **chunk_common,
                "object": {"const": "chat.completion.chunk"},
                "system_fingerprint": {"type": "null"},
                "choices": {
                    "type": "array",
                    "maxItems": 1,
                    "items": _object(
                        {"index": _COUNT, "delta": delta, "logprobs": {"type": "null"}, "finish_reason": _nullable(finish_reason)}
                    ),
                },
            },
            optional=chunk_optional,
            description="One server-sent event of a streamed chat completion; the usage chunk has no choices.",
        ),
        "TextCompletionChunk": _object(
            {
                **chunk_common,
                "object": {"const": "text_completion"},
                "choices": {
                    "type": "array",
                    "maxItems": 1,
                    "items": _object(
                        {"index": _COUNT, "text": _STRING, "logprobs": {"type": "null"}, "finish_reason": _nullable(finish_reason)}
                    ),
                },
            },
            optional=chunk_optional,
            description="One server-sent event of a streamed text completion; the usage chunk has no choices.",
        ),
        "Error": _object(
            {
                "error": _object(
                    {
                        "message": _STRING,
                        "type": _STRING,
                        "param": _nullable(_STRING),
                        "code": _nullable(_STRING),
                    }
                )
            },
            description="OpenAI's error body.",
        ),
        "Provenance": provenance,
        "Usage": usage,
        "ChatCompletion": _object(
            {
                "id": _STRING,
                "object": {"const": "chat.completion"},
                "created": _INTEGER,
                "model": _STRING,
                "system_fingerprint": {"type": "null"},
                "choices": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1,
                    "items": _object(
                        {
                            "index": _COUNT,
                            "message": _object({"role": {"const": "assistant"}, "content": _STRING}),
                            "logprobs": {"type": "null"},
                            "finish_reason": finish_reason,
                        }
                    ),
                },
                "usage": _ref("Usage"),
                "expertmesh": _ref("Provenance"),
            }
        ),
        "TextCompletion": _object(
            {
                "id": _STRING,
                "object": {"const": "text_completion"},
                "created": _INTEGER,
                "model": _STRING,
                "choices": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1,
                    "items": _object(
                        {"index": _COUNT, "text": _STRING, "logprobs": {"type": "null"}, "finish_reason": finish_reason}
                    ),
                },
                "usage": _ref("Usage"),
                "expertmesh": _ref("Provenance"),
            }
        ),
        "Model": _object(
            {
                "id": _STRING,
                "object": {"const": "model"},
                "created": _INTEGER,
                "owned_by": _STRING,
                "expertmesh": model_details,
            },
            optional=("expertmesh",),
            description="An expert, or `auto` (route) without details.",
        ),
        "ModelList": _object({"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}),
        "Feedback": _object(
            {
                "decision_id": _STRING,
                "reward": {"type": "number", "minimum": 0, "maximum": 1},
                "recorded": {"const": True},
                "policy_version": _COUNT,
            }
        ),
        "Decision": _object(
            {
                "decision_id": _STRING,
                "created_ms": _INTEGER,
                "task": _STRING,
                "policy_version": _COUNT,
                "status": {"type": "string", "enum": ["pending", "fallback", "rated"]},
                "chosen": candidate,
                "served": candidate,
                "fallback_reason": _nullable(_STRING),
                "candidates": {"type": "array", "minItems": 1, "items": candidate},
                "reward": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
            }
        ),
        "PeerList": _object(
            {
                "object": {"const": "list"},
                "node_id": _STRING,
                "data": {
                    "type": "array",
                    "items": _object(
                        {
                            "id": _STRING,
                            "url": _STRING,
                            "alive": _BOOLEAN,
                            "rtt_ms": _nullable(_NUMBER),
                            "reach": _object(
                                {
                                    "kind": {"type": "string", "enum": ["direct", "relayed"]},
                                    "via": _nullable(_STRING),
                                    "via_url": _nullable(_STRING),
                                }
                            ),
                            "last_seen_ms": _INTEGER,
                            "source": {"type": "string", "enum": ["mdns", "bootstrap", "exchange"]},
                            "experts": {"type": "array", "items": _STRING},
                        }
                    ),
                },
            }
        ),
        "ExpertList": _object(
            {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "items": _object(
                        {
                            "id": _STRING,
                            "node": _STRING,
                            "local": _BOOLEAN,
                            "model_sha256": _STRING,
                            "queue_depth": _COUNT,
                            "capacity": _COUNT,
                            "judging": _nullable(
                                _object(
                                    {
                                        "state": {"type": "string", "enum": ["unjudged", "judging", "judged", "failed"]},
                                        "done": _COUNT,
                                        "total": _COUNT,
                                        "error": _nullable(_STRING),
                                    }
                                )
                            ),
                            "judged": _BOOLEAN,
                            "scores": {"type": "object", "additionalProperties": _NUMBER},
                            "evidence": _STRING,
                            "verified": _BOOLEAN,
                            "cards": {"type": "array", "items": card},
                            "flags": {
                                "type": "array",
                                "items": _object(
                                    {
                                        "dimension": _STRING,
                                        "owner_score": _NUMBER,
                                        "independent_score": _NUMBER,
                                        "judge": _STRING,
                                    }
                                ),
                            },
                        }
                    ),
                },
            }
        ),
        "RouterStats": _object(
            {
                "decisions": _COUNT,
                "rated": _COUNT,
                "mean_reward": _nullable(_NUMBER),
                "policy_version": _COUNT,
                "reward_over_time": {
                    "type": "array",
                    "items": _object({"t_ms": _INTEGER, "reward": _NUMBER, "n": _COUNT}),
                },
                "share_by_expert": {"type": "object", "additionalProperties": _COUNT},
                "share_by_task": {
                    "type": "object",
                    "additionalProperties": {"type": "object", "additionalProperties": _COUNT},
                },
                "community": {"type": "object", "description": "Community learning: what is shared, each reporter's weight."},
            },
            optional=("community",),
        ),
        "Health": _object(
            {
                "status": {"const": "ok"},
                "node_id": _STRING,
                "uptime_s": _NUMBER,
                "experts": {
                    "type": "array",
                    "items": _object({"id": _STRING, "queue_depth": _COUNT, "capacity": _COUNT}),
                },
            }
        ),
    }


def _request_schemas() -> dict[str, Any]:
    """The request models' JSON schemas, with their nested `$defs` lifted into components."""
    schemas: dict[str, Any] = {}
    models: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest, FeedbackRequest)
    for model in models:
        schema = model.model_json_schema(ref_template=REF_TEMPLATE)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        schemas[name]["properties"]["stop"] = copy.deepcopy(_STOP)
    # Only chat completions are routed; a text completion runs on the expert it names and ignores `expertmesh`.
    schemas["ChatCompletionRequest"]["properties"]["expertmesh"] = _nullable(_ref("RouteConstraints")) | {"default": None}
    schemas["CompletionRequest"]["properties"]["expertmesh"]["description"] = "Ignored: text completions are not routed."
    schemas["RouteConstraints"] = copy.deepcopy(_ROUTE_CONSTRAINTS)
    return schemas


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": _ref("Error")}}}
    if headers:
        response["headers"] = headers
    return response


def _ok(description: str, schema_name: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": _ref(schema_name)}}}
    if headers:
        response["headers"] = headers
    return response


def _body(schema_name: str) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": _ref(schema_name)}}}


_ANSWERED_BY = {
    "X-Expertmesh-Expert": {"description": "The expert that answered.", "required": True, "schema": _STRING},
    "X-Expertmesh-Node": {"description": "The node that answered.", "required": True, "schema": _STRING},
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "required": True, "schema": {"type": "integer", "minimum": 1}}
}
_INVALID = _error("Invalid JSON or fields (`param` names the field), or a prompt longer than the context.")
_TOO_LARGE = _error("The request body is over the node's cap (1 MiB by default).")
_BUSY = _error("Every candidate expert's queue is full, or this client is over its rate limit.", _RETRY_AFTER)
_UNAUTHORIZED = _error("The node requires an API key (by default when it listens beyond loopback) and none or a wrong one was sent.")
_RATE_LIMITED = _error("This client is over its rate limit.", _RETRY_AFTER)
# Liveness and this document are open even on a node that requires an API key.
_OPEN_PATHS = ("/healthz",)


def _event(chunk: str) -> dict[str, Any]:
    """One server-sent event of a stream: a JSON chunk, an error that ends the stream early, or `[DONE]`."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": JSON,
                        "contentSchema": {"anyOf": [_ref(chunk), _ref("Error")]},
                    },
                ]
            }
        },
    }


def _generation(summary: str, description: str, request: str, response: str, *, unknown_model: str) -> dict[str, Any]:
    """The operation object of a chat or text completion."""
    return {
        "summary": summary,
        "description": description,
        "operationId": f"create{response}",
        "tags": ["generation"],
        "requestBody": _body(request),
        "responses": {
            "200": {
                "description": "The answer: one JSON object, or server-sent events ending with `data: [DONE]` when `stream` is true.",
                "headers": _ANSWERED_BY,
                "content": {
                    JSON: {"schema": _ref(response)},
                    EVENT_STREAM: {"schema": _event(f"{response}Chunk")},
                },
            },
            "400": _INVALID,
            "404": _error(unknown_model),
            "413": _TOO_LARGE,
            "429": _BUSY,
        },
    }


def _inline(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _network_join_paths() -> dict[str, Any]:
    """Invites, joining, admissions and the gossip directory (node/mesh/relay.py, node/mesh/directory.py)."""
    node_id_param = {"name": "node_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[a-z2-7]{1,64}$"}}
    invite = _object({"invite": _STRING, "expires_ms": _INTEGER, "one_time": _BOOLEAN, "relay": _BOOLEAN})
    admissions = _object({
        "object": {"const": "list"},
        "relay": _BOOLEAN,
        "tunnels": {"type": "array", "items": _STRING},
        "active_streams": _INTEGER,
        "relayed_bytes": _INTEGER,
        "data": {"type": "array", "items": _object(
            {"id": _STRING, "admitted_ms": _INTEGER, "revoked_ms": _nullable(_INTEGER), "tunnel": _BOOLEAN}
        )},
    })
    directory = _object({
        "object": {"const": "list"},
        "node_id": _STRING,
        "data": {"type": "array", "items": _object({
            "id": _STRING, "issued_ms": _INTEGER, "addresses": {"type": "array", "items": _STRING},
            "experts": {"type": "array", "items": _STRING}, "news": _BOOLEAN,
        })},
    })
    return {
        "/v1/invites": {
            "post": {
                "summary": "Create an invite to this node",
                "description": "A one-line invite, signed by this node, with an admission secret (one-time by default).",
                "operationId": "createInvite",
                "tags": ["network"],
                "requestBody": {"required": False, "content": {JSON: {"schema": {
                    "type": "object",
                    "properties": {
                        "ttl_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 365 * 86400},
                        "one_time": _BOOLEAN,
                    },
                }}}},
                "responses": {
                    "200": _inline("The invite.", invite),
                    "400": _error("Invalid fields."),
                    "413": _TOO_LARGE,
                    "500": _error("This node has no address to put in an invite yet."),
                },
            }
        },
        "/v1/join": {
            "post": {
                "summary": "Join with an invite",
                "description": "Redeem an invite at the node that issued it; a relaying inviter relays for this node from now on.",
                "operationId": "join",
                "tags": ["network"],
                "requestBody": {"required": True, "content": {JSON: {"schema": _object({"invite": _STRING})}}},
                "responses": {
                    "200": _inline("Joined.", _object({"joined": _STRING, "relayed": _BOOLEAN})),
                    "400": _error("Not an invite, or a forged or expired one."),
                    "403": _error("The inviter refused (used, expired or revoked)."),
                    "413": _TOO_LARGE,
                    "502": _error("The inviter cannot be reached."),
                },
            }
        },
        "/v1/admissions": {
            "get": {
                "summary": "List admitted nodes and relay tunnels",
                "operationId": "listAdmissions",
                "tags": ["network"],
                "responses": {"200": _inline("Nodes admitted by invite (revoked ones included), tunnels open now.", admissions)},
            }
        },
        "/v1/admissions/{node_id}/revoke": {
            "post": {
                "summary": "Revoke one node",
                "description": "Kept across restarts: no relay, no hellos, no invite for it from now on.",
                "operationId": "revokeNode",
                "tags": ["network"],
                "parameters": [node_id_param],
                "responses": {
                    "200": _inline("Revoked.", _object({"node_id": _STRING, "revoked": _BOOLEAN})),
                    "400": _error("Not a node id."),
                },
            }
        },
        "/v1/directory": {
            "get": {
                "summary": "List the gossip directory",
                "operationId": "listDirectory",
                "tags": ["network"],
                "responses": {"200": _inline("Node cards heard of by gossip, and this node's own.", directory)},
            }
        },
    }


def _paths() -> dict[str, Any]:
    chat = _generation(
        "Chat completion",
        "OpenAI's chat completion; `model` is an expert id or `auto` (route with the bandit).",
        "ChatCompletionRequest",
        "ChatCompletion",
        unknown_model="Unknown model (`model_not_found`), or no approved expert meets the `expertmesh` constraints.",
    )
    chat["responses"]["502"] = _error("Every peer hosting the expert failed before answering.")
    model_param = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    decision_param = {"name": "decision_id", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "/v1/chat/completions": {"post": chat},
        "/v1/completions": {
            "post": _generation(
                "Text completion",
                "The prompt goes to a local expert as it is, whatever its prompt style.",
                "CompletionRequest",
                "TextCompletion",
                unknown_model="Unknown model (`model_not_found`).",
            )
        },
        "/v1/models": {
            "get": {
                "summary": "List models",
                "operationId": "listModels",
                "tags": ["models"],
                "responses": {"200": _ok("`auto`, the local experts and every expert on an alive peer.", "ModelList")},
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "Get a model",
                "operationId": "getModel",
                "tags": ["models"],
                "parameters": [model_param],
                "responses": {"200": _ok("The model.", "Model"), "404": _error("Unknown model (`model_not_found`).")},
            }
        },
        "/v1/feedback": {
            "post": {
                "summary": "Rate a routed answer",
                "description": "`rating` (`up` = 1, `down` = 0) or `reward` in [0, 1], exactly one; stored, then learned.",
                "operationId": "createFeedback",
                "tags": ["routing"],
                "requestBody": _body("FeedbackRequest"),
                "responses": {
                    "200": _ok("The rating is stored.", "Feedback"),
                    "400": _error("Invalid fields, or both or neither of `rating` and `reward`."),
                    "403": _error("The token does not match the decision."),
                    "404": _error("Unknown decision."),
                    "409": _error("The decision was rated already."),
                    "413": _TOO_LARGE,
                },
            }
        },
        "/v1/decisions/{decision_id}": {
            "get": {
                "summary": "Get a routing decision",
                "operationId": "getDecision",
                "tags": ["routing"],
                "parameters": [decision_param],
                "responses": {
                    "200": _ok("The decision as recorded, with its reward.", "Decision"),
                    "404": _error("Unknown decision."),
                },
            }
        },
        **_network_join_paths(),
        "/v1/peers": {
            "get": {
                "summary": "List peers",
                "operationId": "listPeers",
                "tags": ["network"],
                "responses": {"200": _ok("The peers this node knows, alive or not.", "PeerList")},
            }
        },
        "/v1/experts": {
            "get": {
                "summary": "List experts with their capability cards",
                "operationId": "listExperts",
                "tags": ["judging"],
                "responses": {"200": _ok("Every known expert, local and remote.", "ExpertList")},
            }
        },
        "/v1/router/stats": {
            "get": {
                "summary": "Router statistics",
                "operationId": "getRouterStats",
                "tags": ["routing"],
                "responses": {"200": _ok("Reward over time and routing shares.", "RouterStats")},
            }
        },
        "/healthz": {
            "get": {
                "summary": "Health",
                "operationId": "getHealth",
                "tags": ["node"],
                "responses": {"200": _ok("Alive, with the experts loaded.", "Health")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "operationId": "getMetrics",
                "tags": ["node"],
                "responses": {
                    "200": {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}
                },
            }
        },
    }


def _with_access(paths: dict[str, Any]) -> dict[str, Any]:
    """Every operation can be rate-limited; all but the open ones need the API key when the node requires one."""
    for path, operations in paths.items():
        for operation in operations.values():
            responses = operation["responses"]
            responses.setdefault("429", _RATE_LIMITED)
            if path in _OPEN_PATHS:
                operation["security"] = []
            else:
                responses.setdefault("401", _UNAUTHORIZED)
    return paths


def _version() -> str:
    try:
        return version("expertmesh")
    except PackageNotFoundError:
        return "0+unknown"


def openapi_document() -> dict[str, Any]:
    """The user API as an OpenAPI 3.1 document (the loopback-only judge route and the msgpack peer API are left out)."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "expertmesh node API",
            "version": _version(),
            "description": "OpenAI-compatible API of an expertmesh node, with routing feedback and network views.",
        },
        "paths": _with_access(_paths()),
        "components": {
            "schemas": {**_request_schemas(), **_response_schemas()},
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The node's API key; required when the node listens beyond loopback (or is told to).",
                }
            },
        },
        # Either no credential (a loopback node) or the API key.
        "security": [{}, {"apiKey": []}],
    }


async def openapi_handler(request: web.Request) -> web.Response:
    """`GET /openapi.json`."""
    return web.json_response(openapi_document())
