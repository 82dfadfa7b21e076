"""Typed keys of the node's application state, shared by the user API, the peer API and the app factory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from node.config import Settings
from node.judging.service import Judging
from node.mesh.network import Network
from node.mesh.remote_expert import Experts
from node.metrics import NodeMetrics
from node.pipeline import QueryPipeline
from node.routing.router import Router
from node.serving.experts import ExpertPool, ServedExpert
from peers.client import PeerClient
from peers.identity import NodeIdentity

if TYPE_CHECKING:  # the mesh's services import these keys, so their classes are named for the type checker only
    from node.mesh.admission import Admissions
    from node.mesh.directory import DirectoryService
    from node.mesh.relay import RelayLinks, RelayServer


@dataclass(frozen=True)
class NodeInfo:
    """Who this node is, for responses and listings."""

    node_id: str
    started_s: float


identity_key = web.AppKey("identity", NodeIdentity)
settings_key = web.AppKey("settings", Settings)
pool_key = web.AppKey("pool", ExpertPool)
metrics_key = web.AppKey("metrics", NodeMetrics)
node_info_key = web.AppKey("node_info", NodeInfo)
network_key = web.AppKey("network", Network)
peer_client_key = web.AppKey("peer_client", PeerClient)
router_key = web.AppKey("router", Router)
judging_key = web.AppKey("judging", Judging)
experts_key = web.AppKey("experts", Experts)
pipeline_key = web.AppKey("pipeline", QueryPipeline)
# Bases loaded only because a specialist needs them: served through their specialists, closed with the node.
specialist_bases_key = web.AppKey("specialist_bases", list)
# Experts handed to create_app already loaded (tests, benchmarks), served instead of the configured models.
preloaded_experts_key = web.AppKey[Sequence[ServedExpert]]("preloaded_experts")
# The mesh's services: relaying, admissions by invite, the gossip directory.
relay_server_key: web.AppKey[RelayServer] = web.AppKey("relay_server")
relay_links_key: web.AppKey[RelayLinks] = web.AppKey("relay_links")
admissions_key: web.AppKey[Admissions] = web.AppKey("admissions")
directory_key: web.AppKey[DirectoryService] = web.AppKey("directory")
