"""Sharing specialists: a definition as wire data, and adopting a peer's specialist onto this node."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

from aiohttp import web
from pydantic import Field

from node.errors import Conflict, Forbidden, ModelNotFound, NodeError, PeerUnavailable
from node.keys import network_key, peer_client_key, pool_key, settings_key, specialist_bases_key
from node.serving import catalog
from node.serving.experts import LocalExpert, load_expert
from node.serving.specialist_serving import SpecialistExpert
from node.serving.specialists import (
    DEFINITION_SUFFIX,
    EXPERTS_DIRNAME,
    Definition,
    DefinitionError,
    canonical_bytes,
    parse_definition,
    specialist_id,
    to_toml,
)
from node.validation import _Strict, parse_body
from peers.client import PeerError
from peers.wire import ExpertDefinition

log = logging.getLogger(__name__)


class AdoptRequest(_Strict):
    """`POST /v1/experts/adopt` body."""

    expert: Annotated[str, Field(min_length=1, max_length=128)]
    dry_run: bool = False  # fetch and verify only: show the definition without serving it


def definition_message(expert: Any) -> ExpertDefinition | None:
    """The wire form of a served specialist's definition; None for a plain model."""
    if not isinstance(expert, SpecialistExpert):
        return None
    return ExpertDefinition(
        expert_id=expert.spec.id,
        base_sha256=expert.base_sha256,
        base_name=expert.base.spec.name,
        definition=canonical_bytes(expert.definition),
    )


def verified_definition(message: ExpertDefinition, base_ref: str, source: str) -> Definition:
    """The definition a peer sent, validated as data, and only if it is the expert its id names."""
    try:
        data = json.loads(message.definition.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DefinitionError(f"{source}: the definition is not JSON: {exc}") from exc
    if not isinstance(data, dict) or "base" in data:
        raise DefinitionError(f"{source}: the definition must be a table without 'base' (its sha256 names the base)")
    definition = parse_definition({**data, "base": base_ref}, source)
    computed = specialist_id(definition, message.base_sha256)
    if computed != message.expert_id:
        raise DefinitionError(
            f"{source}: the definition is expert {computed}, not the {message.expert_id} it was sent as", param="expert_id"
        )
    return definition


def _local_base(app: web.Application, sha256: str) -> LocalExpert | None:
    """A loaded model with this sha256 (served or loaded for specialists)."""
    for expert in [*app[pool_key], *app[specialist_bases_key]]:
        if not isinstance(expert, SpecialistExpert) and expert.spec.sha256 == sha256:
            return expert
    return None


def _base_file(models_dir: Path, sha256: str) -> tuple[str, catalog.ModelFile | None]:
    """How a definition should name this base here, and the file when it is already on disk."""
    for model in catalog.list_models(models_dir):
        if model.sha256 == sha256:
            return (model.name if model.name in catalog.CATALOG else str(model.path)), model
    for entry in catalog.CATALOG.values():
        if entry.sha256 == sha256:
            return entry.name, None  # not pulled yet, but the catalog can fetch and verify it
    raise Conflict(f"the base model (sha256 {sha256[:12]}…) is not on this node and not in its catalog")


async def _fetch(app: web.Application, expert_id: str) -> tuple[ExpertDefinition, str]:
    """The definition from the first alive peer hosting the expert that hands over a verifiable one."""
    hosts = app[network_key].hosts_of(expert_id)
    if not hosts:
        raise ModelNotFound(f"no alive peer hosts expert {expert_id!r}", param="expert")
    failures: list[str] = []
    for host in hosts:
        try:
            message = await app[peer_client_key].definition(host.peer.url, expert_id)
        except PeerError as exc:
            failures.append(f"{host.peer.node_id}: {exc}")
            continue
        if message.expert_id != expert_id or message.base_sha256 != host.info.base_sha256:
            app[network_key].note_misbehaviour(host.peer.node_id, "garbage", f"sent a definition that is not {expert_id}")
            failures.append(f"{host.peer.node_id}: sent another expert's definition")
            continue
        return message, host.peer.node_id
    raise PeerUnavailable(f"no peer handed over the definition of {expert_id}: {'; '.join(failures)}")


def _write_definition(data_dir: Path, definition: Definition, expert_id: str) -> Path:
    """Save an adopted definition into the experts folder (atomically), so it is served after a restart too."""
    folder = data_dir / EXPERTS_DIRNAME
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{expert_id.replace('@', '-')}{DEFINITION_SUFFIX}"
    tmp = folder / f".{path.name}.tmp"
    tmp.write_text(to_toml(definition), encoding="utf-8")
    os.replace(tmp, path)
    return path


async def adopt(app: web.Application, expert_id: str, *, dry_run: bool = False) -> dict[str, Any]:
    """Fetch a peer's specialist, verify its id against its definition, and serve it on our copy of the base."""
    if app[pool_key].get(expert_id) is not None:
        raise Conflict(f"expert {expert_id} is already served here", param="expert")
    message, node_id = await _fetch(app, expert_id)
    settings = app[settings_key]
    base_ref, base_file = await asyncio.to_thread(_base_file, settings.models_dir, message.base_sha256)
    definition = verified_definition(message, base_ref, f"definition of {expert_id} from {node_id}")
    view: dict[str, Any] = {
        "id": expert_id,
        "from_node": node_id,
        "base": base_ref,
        "definition": definition.model_dump(mode="json", exclude_none=True),
        "served": False,
        "path": None,
    }
    if dry_run:
        return view
    base = _local_base(app, message.base_sha256)
    if base is None:
        model = base_file if base_file is not None else await asyncio.to_thread(
            catalog.resolve, base_ref, settings.models_dir, progress=False
        )
        base = await asyncio.to_thread(
            load_expert,
            model,
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_gpu_layers=settings.n_gpu_layers,
            queue_size=settings.queue_size,
        )
        app[specialist_bases_key].append(base)
    specialist = SpecialistExpert(definition, base, f"adopted from {node_id}")
    if specialist.spec.id != expert_id:  # the base here hashes the same, so this is a bug, not a peer's lie
        raise NodeError(f"adopted {expert_id} came out as {specialist.spec.id}")
    path = await asyncio.to_thread(_write_definition, settings.data_dir, definition, expert_id)
    app[pool_key].add(specialist)
    log.info("adopted %s from %s on base %s (saved to %s)", expert_id, node_id, base.spec.id, path)
    return {**view, "served": True, "path": str(path)}


async def adopt_handler(request: web.Request) -> web.Response:
    """`POST /v1/experts/adopt`: adopt a peer's specialist (loopback only: it writes files and loads models)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    host = peer[0] if peer else ""
    if not (host.startswith("127.") or host == "::1"):
        raise Forbidden("adopting an expert can only be asked from this machine")
    body = parse_body(await request.read(), AdoptRequest)
    try:
        return web.json_response(await adopt(request.app, body.expert, dry_run=body.dry_run))
    except DefinitionError as exc:
        # The peer's definition is at fault, not this request: say so with a bad-gateway status.
        raise PeerUnavailable(exc.message) from exc


def add_routes(app: web.Application) -> None:
    """Mount the adopt endpoint of the user API."""
    app.router.add_post("/v1/experts/adopt", adopt_handler)

