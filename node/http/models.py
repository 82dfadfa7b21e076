"""`/v1/models`: the local experts, `auto` and the experts on alive peers; resolving a request's model."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from node.errors import ModelNotFound
from node.keys import network_key, node_info_key, pool_key
from node.mesh.network import RemoteExpert
from node.serving.experts import ExpertPool, LocalExpert
from node.serving.specialist_serving import specialist_fields

AUTO_MODEL = "auto"


def resolve_expert(pool: ExpertPool, model: str) -> LocalExpert:
    """The local expert a request names; for `auto` (only text completions get here: they are not routed), the first."""
    expert = pool.first() if model == AUTO_MODEL else pool.get(model)
    if expert is None:
        known = ", ".join([AUTO_MODEL, *(e.spec.id for e in pool)])
        raise ModelNotFound(f"model {model!r} does not exist; known models: {known}", param="model")
    return expert


def resolve_target(app: web.Application, model: str) -> LocalExpert | list[RemoteExpert]:
    """A local expert when this node has it, else the alive peers hosting it (nearest first)."""
    pool = app[pool_key]
    if model == AUTO_MODEL or pool.get(model) is not None:
        return resolve_expert(pool, model)
    hosts = app[network_key].hosts_of(model)
    if not hosts:
        known = sorted({AUTO_MODEL, *(e.spec.id for e in pool), *(r.info.expert_id for r in app[network_key].remote_experts())})
        raise ModelNotFound(f"model {model!r} does not exist; known models: {', '.join(known)}", param="model")
    return hosts


def _model_entry(app: web.Application, expert: LocalExpert | None) -> dict[str, Any]:
    info = app[node_info_key]
    if expert is None:
        return {"id": AUTO_MODEL, "object": "model", "created": int(info.started_s), "owned_by": info.node_id}
    spec = expert.spec
    return {
        "id": spec.id,
        "object": "model",
        "created": int(info.started_s),
        "owned_by": info.node_id,
        "expertmesh": {
            "name": spec.name,
            "sha256": spec.sha256,
            "family": spec.family,
            "quantization": spec.quantization,
            "prompt_style": spec.prompt_style,
            "n_ctx": spec.n_ctx,
            "size_bytes": spec.size_bytes,
            "queue_depth": expert.queue_depth,
            "local": True,
            **specialist_fields(expert),
        },
    }


def _remote_entry(app: web.Application, hosts: list[RemoteExpert]) -> dict[str, Any]:
    info = hosts[0].info
    return {
        "id": info.expert_id,
        "object": "model",
        "created": int(app[node_info_key].started_s),
        "owned_by": hosts[0].peer.node_id,
        "expertmesh": {
            "name": info.name,
            "sha256": info.sha256,
            "family": info.family,
            "quantization": info.quantization,
            "prompt_style": info.prompt_style,
            "n_ctx": info.n_ctx,
            "queue_depth": info.queue_depth,
            "local": False,
            "nodes": [h.peer.node_id for h in hosts],
        },
    }


def _remote_by_expert(app: web.Application) -> dict[str, list[RemoteExpert]]:
    """Remote experts not hosted here, grouped by id (one listing entry each, nearest host first)."""
    local = {e.spec.id for e in app[pool_key]}
    grouped: dict[str, list[RemoteExpert]] = {}
    for remote in app[network_key].remote_experts():
        if remote.info.expert_id not in local:
            grouped.setdefault(remote.info.expert_id, []).append(remote)
    return grouped


async def list_models(request: web.Request) -> web.Response:
    """`GET /v1/models`: `auto`, the local experts, and every expert on an alive peer."""
    app = request.app
    data = [_model_entry(app, None), *(_model_entry(app, e) for e in app[pool_key])]
    data += [_remote_entry(app, hosts) for hosts in _remote_by_expert(app).values()]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """`GET /v1/models/{model}`."""
    app = request.app
    model = request.match_info["model"]
    target = resolve_target(app, model)
    if not isinstance(target, list):
        return web.json_response(_model_entry(app, None if model == AUTO_MODEL else target))
    return web.json_response(_remote_entry(app, target))
