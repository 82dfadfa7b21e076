"""`/v1/models`: `auto`, the local experts and the experts on alive peers, each as its `Expert.view()`."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from node.errors import ModelNotFound
from node.http.schemas import Model, ModelDetails, ModelList, json_response
from node.keys import experts_key, node_info_key, pipeline_key
from node.pipeline.query import AUTO_MODEL
from node.serving.expert import Expert
from node.serving.experts import ExpertPool, ServedExpert

__all__ = ["AUTO_MODEL", "get_model", "list_models", "resolve_expert"]


def resolve_expert(pool: ExpertPool, model: str) -> ServedExpert:
    """The local expert a request names; for `auto`, the first."""
    expert = pool.first() if model == AUTO_MODEL else pool.get(model)
    if expert is None:
        known = ", ".join([AUTO_MODEL, *(e.spec.id for e in pool)])
        raise ModelNotFound(f"model {model!r} does not exist; known models: {known}", param="model")
    return expert


def _auto_entry(app: web.Application) -> Model:
    info = app[node_info_key]
    return Model(id=AUTO_MODEL, object="model", created=int(info.started_s), owned_by=info.node_id)


def _entry(app: web.Application, hosts: Sequence[Expert]) -> Model:
    """One listing entry: a local expert, or a remote one with every node hosting it (nearest first)."""
    first = hosts[0]
    view = first.view()
    if not first.local:
        view["nodes"] = [h.node_id for h in hosts]
    return Model(
        id=first.card.expert_id,
        object="model",
        created=int(app[node_info_key].started_s),
        owned_by=first.node_id,
        expertmesh=ModelDetails.model_validate(view),
    )


async def list_models(request: web.Request) -> web.Response:
    """`GET /v1/models`: `auto`, the local experts, and every expert on an alive peer."""
    app = request.app
    experts = app[experts_key]
    local = experts.local()
    local_ids = {e.card.expert_id for e in local}
    grouped: dict[str, list[Expert]] = {}
    for remote in experts.remote():
        if remote.card.expert_id not in local_ids:  # hosted here too: listed once, as local
            grouped.setdefault(remote.card.expert_id, []).append(remote)
    data = [_auto_entry(app), *(_entry(app, [e]) for e in local), *(_entry(app, hosts) for hosts in grouped.values())]
    return json_response(ModelList(object="list", data=data))


async def get_model(request: web.Request) -> web.Response:
    """`GET /v1/models/{model}`."""
    model = request.match_info["model"]
    hosts = request.app[pipeline_key].resolve(model)
    return json_response(_auto_entry(request.app) if model == AUTO_MODEL else _entry(request.app, hosts))
