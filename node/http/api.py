"""The user API's routes, in one place; the handlers live in one module per resource."""

from __future__ import annotations

from aiohttp import web

from node.http import openapi
from node.http.chat import (  # noqa: F401 - re-exported: the peer API reads the sampling defaults here
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    chat_completions,
    completions,
)
from node.http.feedback import feedback, get_decision, router_stats
from node.http.health import healthz, metrics
from node.http.judge import judge, list_experts
from node.http.middleware import (  # noqa: F401 - re-exported: the app factory and the peer guard use them
    error_body,
    error_middleware,
    error_response,
    metrics_middleware,
    read_body,
)
from node.http.models import AUTO_MODEL, get_model, list_models, resolve_expert  # noqa: F401
from node.http.peers_view import list_peers
from node.keys import (  # noqa: F401 - re-exported: the app factory and the peer API read state through api
    NodeInfo,
    judging_key,
    metrics_key,
    network_key,
    node_info_key,
    peer_client_key,
    pool_key,
    router_key,
    settings_key,
)


def add_routes(app: web.Application) -> None:
    """Mount the user API."""
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/v1/peers", list_peers)
    app.router.add_post("/v1/feedback", feedback)
    app.router.add_get("/v1/decisions/{decision_id}", get_decision)
    app.router.add_get("/v1/router/stats", router_stats)
    app.router.add_get("/v1/experts", list_experts)
    app.router.add_post("/v1/judge", judge)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi.openapi_handler)
    app.router.add_get("/metrics", metrics)
