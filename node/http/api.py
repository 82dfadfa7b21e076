"""The user API's routes, in one place; the handlers live in one module per resource."""

from __future__ import annotations

from aiohttp import web

from node.http import openapi
from node.http.chat import chat_completions, completions
from node.http.feedback import feedback, get_decision, router_stats
from node.http.health import healthz, metrics
from node.http.judge import judge, list_experts
from node.http.models import get_model, list_models
from node.http.peers_view import list_peers


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
