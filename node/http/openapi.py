"""OpenAPI 3.1 description of the user API, generated from the request and response models in node/http/schemas.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from node.http import schemas as s

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
EVENT_STREAM = "text/event-stream"
REF_TEMPLATE = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Op:
    """One operation: its shapes come from the models; the rest is what a reader needs to know."""

    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    ok: str  # the 200 answer's description
    response: type[BaseModel] | None = None  # None: `ok_schema` says it
    body: type[BaseModel] | None = None
    body_required: bool = True
    errors: dict[int, str] = field(default_factory=dict)
    description: str | None = None
    params: tuple[str, ...] = ()  # path parameters
    stream: type[BaseModel] | None = None  # the chunk model when `stream: true` answers with server-sent events
    open: bool = False  # no API key needed, even on a node that requires one


_INVALID = "Invalid JSON or fields (`param` names the field), or a prompt longer than the context."
_TOO_LARGE = "The request body is over the node's cap (1 MiB by default)."
_BUSY = "Every candidate expert's queue is full, or this client is over its rate limit."
_UNAUTHORIZED = "The node requires an API key (by default when it listens beyond loopback) and none or a wrong one was sent."
_RATE_LIMITED = "This client is over its rate limit."

OPERATIONS = (
    Op("post", "/v1/chat/completions", "createChatCompletion", "Chat completion", "generation",
       "The answer: one JSON object, or server-sent events ending with `data: [DONE]` when `stream` is true.",
       s.ChatCompletion, s.ChatCompletionRequest, stream=s.ChatCompletionChunk,
       description="OpenAI's chat completion; `model` is an expert id or `auto` (route with the bandit).",
       errors={400: _INVALID, 404: "Unknown model (`model_not_found`), or no approved expert meets the `expertmesh` "
               "constraints.", 413: _TOO_LARGE, 429: _BUSY, 502: "Every peer hosting the expert failed before answering."}),
    Op("post", "/v1/completions", "createTextCompletion", "Text completion", "generation",
       "The answer: one JSON object, or server-sent events ending with `data: [DONE]` when `stream` is true.",
       s.TextCompletion, s.CompletionRequest, stream=s.TextCompletionChunk,
       description="The prompt goes to a local expert as it is, whatever its prompt style.",
       errors={400: _INVALID, 404: "Unknown model (`model_not_found`).", 413: _TOO_LARGE, 429: _BUSY}),
    Op("get", "/v1/models", "listModels", "List models", "models",
       "`auto`, the local experts and every expert on an alive peer.", s.ModelList),
    Op("get", "/v1/models/{model}", "getModel", "Get a model", "models", "The model.", s.Model,
       params=("model",), errors={404: "Unknown model (`model_not_found`)."}),
    Op("post", "/v1/feedback", "createFeedback", "Rate a routed answer", "routing", "The rating is stored.",
       s.Feedback, s.FeedbackRequest,
       description="`rating` (`up` = 1, `down` = 0) or `reward` in [0, 1], exactly one; stored, then learned.",
       errors={400: "Invalid fields, or both or neither of `rating` and `reward`.",
               403: "The token does not match the decision.", 404: "Unknown decision.",
               409: "The decision was rated already.", 413: _TOO_LARGE}),
    Op("get", "/v1/decisions/{decision_id}", "getDecision", "Get a routing decision", "routing",
       "The decision as recorded, with its reward.", s.Decision, params=("decision_id",),
       errors={404: "Unknown decision."}),
    Op("post", "/v1/invites", "createInvite", "Create an invite to this node", "network", "The invite.", s.Invite,
       s.InviteRequest, body_required=False,
       description="A one-line invite, signed by this node, with an admission secret (one-time by default).",
       errors={400: "Invalid fields.", 413: _TOO_LARGE, 500: "This node has no address to put in an invite yet."}),
    Op("post", "/v1/join", "join", "Join with an invite", "network", "Joined.", s.Joined, s.JoinRequest,
       description="Redeem an invite at the node that issued it; a relaying inviter relays for this node from now on.",
       errors={400: "Not an invite, or a forged or expired one.", 403: "The inviter refused (used, expired or revoked).",
               413: _TOO_LARGE, 502: "The inviter cannot be reached."}),
    Op("get", "/v1/admissions", "listAdmissions", "List admitted nodes and relay tunnels", "network",
       "Nodes admitted by invite (revoked ones included), tunnels open now.", s.AdmissionList),
    Op("post", "/v1/admissions/{node_id}/revoke", "revokeNode", "Revoke one node", "network", "Revoked.", s.Revoked,
       params=("node_id",), description="Kept across restarts: no relay, no hellos, no invite for it from now on.",
       errors={400: "Not a node id."}),
    Op("get", "/v1/directory", "listDirectory", "List the gossip directory", "network",
       "Node cards heard of by gossip, and this node's own.", s.DirectoryList),
    Op("get", "/v1/peers", "listPeers", "List peers", "network", "The peers this node knows, alive or not.", s.PeerList),
    Op("get", "/v1/experts", "listExperts", "List experts with their capability cards", "judging",
       "Every known expert, local and remote.", s.ExpertList),
    Op("get", "/v1/router/stats", "getRouterStats", "Router statistics", "routing",
       "Reward over time and routing shares.", s.RouterStats),
    Op("get", "/healthz", "getHealth", "Health", "node", "Alive, with the experts loaded.", s.Health, open=True),
    Op("get", "/metrics", "getMetrics", "Prometheus metrics", "node", "Prometheus text format."),
)

_PATH_PARAMS: dict[str, dict[str, Any]] = {
    "model": {"type": "string"},
    "decision_id": {"type": "string"},
    "node_id": {"type": "string", "pattern": "^[a-z2-7]{1,64}$"},
}
_ANSWERED_BY = {
    "X-Expertmesh-Expert": {"description": "The expert that answered.", "required": True, "schema": {"type": "string"}},
    "X-Expertmesh-Node": {"description": "The node that answered.", "required": True, "schema": {"type": "string"}},
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "required": True, "schema": {"type": "integer", "minimum": 1}}
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event of a stream: a JSON chunk, an error that ends the stream early, or `[DONE]`."""
    data = {"type": "string", "contentMediaType": JSON, "contentSchema": {"anyOf": [_ref(chunk), _ref(s.Error)]}}
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [{"const": "[DONE]"}, data]}}}


def _operation(op: Op) -> dict[str, Any]:
    """The OpenAPI operation object of one table row."""
    if op.response is not None:
        ok: dict[str, Any] = {"description": op.ok, "content": _json(_ref(op.response))}
    else:
        ok = {"description": op.ok, "content": {"text/plain": {"schema": {"type": "string"}}}}
    if op.stream is not None:
        ok["headers"] = _ANSWERED_BY
        ok["content"][EVENT_STREAM] = {"schema": _event(op.stream)}
    responses: dict[str, Any] = {"200": ok}
    for status, description in sorted({**op.errors, 429: op.errors.get(429, _RATE_LIMITED)}.items()):
        error: dict[str, Any] = {"description": description, "content": _json(_ref(s.Error))}
        if status == 429:
            error["headers"] = _RETRY_AFTER
        responses[str(status)] = error
    if not op.open:
        responses["401"] = {"description": _UNAUTHORIZED, "content": _json(_ref(s.Error))}
    operation: dict[str, Any] = {"summary": op.summary, "operationId": op.operation_id, "tags": [op.tag]}
    if op.description:
        operation["description"] = op.description
    if op.params:
        operation["parameters"] = [{"name": p, "in": "path", "required": True, "schema": _PATH_PARAMS[p]} for p in op.params]
    if op.body is not None:
        operation["requestBody"] = {"required": op.body_required, "content": _json(_ref(op.body))}
    operation["responses"] = responses
    if op.open:
        operation["security"] = []
    return operation


def _components() -> dict[str, Any]:
    """Every model's JSON schema, nested models lifted into components."""
    named = {op.response for op in OPERATIONS} | {op.body for op in OPERATIONS} | {op.stream for op in OPERATIONS}
    models: set[type[BaseModel]] = {m for m in named if m is not None} | {s.Error}
    ordered = sorted(models, key=lambda m: m.__name__)
    _, top = models_json_schema([(m, "validation") for m in ordered], ref_template=REF_TEMPLATE)
    return top.get("$defs", {})


def _version() -> str:
    try:
        return version("expertmesh")
    except PackageNotFoundError:
        return "0+unknown"


def openapi_document() -> dict[str, Any]:
    """The user API as an OpenAPI 3.1 document (the loopback-only judge route and the msgpack peer API are left out)."""
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "expertmesh node API",
            "version": _version(),
            "description": "OpenAI-compatible API of an expertmesh node, with routing feedback and network views.",
        },
        "paths": paths,
        "components": {
            "schemas": _components(),
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
