"""Which peers this node hellos: a bounded neighbour set, not every peer (peers/directory.py's hello_set).

A node hellos `max_neighbours` peers chosen by rendezvous hashing over every node it knows (its
peer table and the signed cards of the gossip directory), plus the few it talks to for routing
(peers that served it, and directory nodes it probes on demand). Everyone else is known from
the directory and counts as alive for routing only on fresh evidence: our own hello, or a signed
hello from it (it picked us as a neighbour). So per-node hello traffic stays flat as N grows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from peers.directory import DirectoryPolicy, hello_set
from peers.identity import NodeId
from peers.table import PeerState, PeerTable, TablePolicy
from peers.wire import NodeCard

log = logging.getLogger(__name__)

FAILING_AFTER = 3  # consecutive failed hellos after which a peer gives its neighbour slot to the next one
ACTIVE_MS = 120_000  # a peer that served us (or that we probed for routing) stays helloed this long
PROBE_EVERY_MS = 60_000  # a directory node is probed on demand at most this often
PROBES_PER_CALL = 2  # directory nodes probed per routing look-up
MAX_CARDS = 100_000


class Neighbours:
    """The bounded hello set, liveness evidence beyond our own hellos, and the directory's cards."""

    def __init__(self, self_id: str, table_policy: TablePolicy, policy: DirectoryPolicy | None = None) -> None:
        self.self_id = self_id
        self._table_policy = table_policy
        self.policy = policy or DirectoryPolicy()
        self.max_active = self.policy.max_neighbours
        self.heard_ms: dict[str, int] = {}  # node -> when its signed hello last reached us
        self.active_ms: dict[str, int] = {}  # node -> when it last served us or was probed for routing
        self._probed_ms: dict[str, int] = {}
        self.cards: dict[str, NodeCard] = {}  # verified cards from the directory, by node

    # ---- evidence ------------------------------------------------------------------------

    def heard(self, node_id: str, now_ms: int) -> None:
        """A verified peer's signed hello arrived: it is alive, though we do not hello it."""
        self.heard_ms[node_id] = now_ms

    def served(self, node_id: str, now_ms: int) -> None:
        """A peer served a request of ours: keep it in the hello set for a while."""
        self.active_ms[node_id] = now_ms

    def card_learned(self, card: NodeCard) -> None:
        """A verified card from the directory makes its node known for routing and for neighbour choice."""
        if card.node_id == self.self_id:
            return
        known = self.cards.get(card.node_id)
        if known is None and len(self.cards) >= MAX_CARDS:
            return
        if known is None or known.issued_ms < card.issued_ms:
            self.cards[card.node_id] = card

    # ---- queries -------------------------------------------------------------------------

    def routable(self, peer: PeerState, now_ms: int) -> bool:
        """Verified, and heard from within the dead-peer time (our hello, or its own while ours do not fail)."""
        if not peer.verified:
            return False
        # Its hello proves it lives, not that we reach it (it may be behind NAT): a failing hello of ours wins.
        last = peer.last_seen_ms if peer.failures else max(peer.last_seen_ms, self.heard_ms.get(peer.node_id, -1))
        return now_ms - last <= self._table_policy.dead_after_ms

    def chosen(self, table: PeerTable, now_ms: int, refused: Callable[[str], bool]) -> set[str]:
        """The node ids to hello now."""
        failing = {n for n, p in table.peers.items() if p.failures >= FAILING_AFTER}
        candidates = [n for n in {*table.peers, *self.cards} if n not in failing and not refused(n)]
        horizon = now_ms - ACTIVE_MS
        active = sorted((t, n) for n, t in self.active_ms.items() if t >= horizon and not refused(n))
        self.active_ms = {n: t for t, n in active}
        bootstrap = [n for n, p in table.peers.items() if p.source in ("bootstrap", "mdns")]
        alive = sum(1 for p in table.peers.values() if self.routable(p, now_ms))
        return hello_set(
            self.self_id, candidates, self.policy.max_neighbours,
            active=[n for _, n in reversed(active)], max_active=self.max_active,
            bootstrap=bootstrap, alive_count=alive,
        )

    def filter_due(self, due: Iterable[str], table: PeerTable, chosen: set[str], now_ms: int) -> list[str]:
        """The due urls worth a hello: chosen peers, and new addresses while they can still matter."""
        by_url = {p.url: p.node_id for p in table.peers.values()}
        alive = sum(1 for p in table.peers.values() if self.routable(p, now_ms))
        keep = []
        for url in due:
            node_id = by_url.get(url)
            if node_id is not None:
                if node_id in chosen:
                    keep.append(url)
                continue
            pending = table.unverified.get(url)
            if pending is None:
                continue
            # An address somebody gossiped is verified only for a chosen node, for a node the
            # directory does not know yet, or while this node is still finding its first neighbours.
            if (
                pending.source in ("bootstrap", "mdns")
                or pending.node_id is None
                or pending.node_id in chosen
                or (pending.node_id not in self.cards and pending.node_id not in table.peers)
                or alive < self.policy.max_neighbours
            ):
                keep.append(url)
        return keep

    def addresses_to_learn(
        self, table: PeerTable, chosen: set[str], dialable: Callable[[str], str | None]
    ) -> list[tuple[str, NodeId]]:
        """(url, node id) of chosen nodes known only from their directory card, to verify by hello."""
        out: list[tuple[str, NodeId]] = []
        for node_id in chosen:
            if node_id in table.peers or node_id not in self.cards:
                continue
            if any(p.node_id == node_id for p in table.unverified.values()):
                continue
            for address in self.cards[node_id].addresses[:4]:
                url = dialable(address)
                if url is not None:
                    out.append((url, NodeId(node_id)))
                    break
        return out

    def probes(self, table: PeerTable, now_ms: int, refused: Callable[[str], bool]) -> list[str]:
        """Directory nodes with experts that are not alive here: probe a few on demand (they join the active set)."""
        picked: list[str] = []
        for node_id, card in self.cards.items():
            if len(picked) >= PROBES_PER_CALL:
                break
            if not card.experts or refused(node_id) or now_ms - self._probed_ms.get(node_id, -PROBE_EVERY_MS) < PROBE_EVERY_MS:
                continue
            peer = table.peers.get(NodeId(node_id))
            if peer is not None and self.routable(peer, now_ms):
                continue
            self._probed_ms[node_id] = now_ms
            self.active_ms[node_id] = now_ms
            picked.append(node_id)
        return picked


def alive_peers(table: PeerTable, neighbours: Neighbours, now_ms: int) -> list[PeerState]:
    """Peers alive for routing, by node id."""
    return sorted((p for p in table.peers.values() if neighbours.routable(p, now_ms)), key=lambda p: p.node_id)

