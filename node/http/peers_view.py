"""`/v1/peers`: the peers this node knows, with their trust and evidence."""

from __future__ import annotations

from aiohttp import web

from node.http.schemas import Evidence, Peer, PeerList, Reach, json_response
from node.keys import network_key
from node.mesh.network import Network
from node.mesh.relay import reach_of
from peers.identity import NodeId
from peers.table import PeerState


def _peer_entry(network: Network, peer: PeerState, alive: set[NodeId]) -> Peer:
    trust = network.trust_of(peer.node_id)
    return Peer(
        id=peer.node_id,
        url=peer.url,
        alive=peer.node_id in alive,
        rtt_ms=None if peer.rtt_ms is None else round(peer.rtt_ms, 2),
        reach=Reach.model_validate(reach_of(network, peer.url)),
        last_seen_ms=peer.last_seen_ms,
        source=peer.source,
        experts=[e.expert_id for e in peer.card.experts] if peer.card else [],
        trust=round(trust.score, 3),
        distrusted=trust.distrusted,
        evidence=[Evidence(kind=e.kind, detail=e.detail, at_ms=e.at_ms) for e in trust.evidence],
    )


async def list_peers(request: web.Request) -> web.Response:
    """`GET /v1/peers`: the peers this node knows, alive or not."""
    network = request.app[network_key]
    alive = {p.node_id for p in network.alive_peers()}
    data = [_peer_entry(network, peer, alive) for peer in network.table.peers.values() if peer.node_id != network.node_id]
    data.sort(key=lambda p: (not p.alive, p.id))
    return json_response(PeerList(object="list", node_id=network.node_id, data=data))
