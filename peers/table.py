"""Peer table: pure state updated by events (address learned, hello ok or failed, goodbye, tick)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from peers.identity import NodeId
from peers.wire import NodeCard, PeerAddress

PeerSource = Literal["mdns", "bootstrap", "exchange"]

# Addresses gossiped by peers are the cheapest to forge, so they rank below the ones
# this node found itself (mDNS) or was configured with (bootstrap).
_SOURCE_RANK: Mapping[str, int] = {"exchange": 0, "mdns": 1, "bootstrap": 1}
_MAX_SELF_URLS = 32


@dataclass(frozen=True)
class TablePolicy:
    """Timings and caps of the peer table."""

    dead_after_ms: int = 15_000
    hello_interval_ms: int = 5_000
    backoff_base_ms: int = 1_000
    backoff_max_ms: int = 60_000
    drop_after_ms: int = 600_000
    max_peers: int = 256
    max_unverified: int = 256
    rtt_new_weight: float = 0.3


@dataclass(frozen=True)
class PeerState:
    """A node whose card this node has verified at least once."""

    node_id: NodeId
    url: str
    card: NodeCard | None
    rtt_ms: float | None
    last_seen_ms: int
    failures: int
    next_attempt_ms: int
    source: PeerSource
    verified: bool


@dataclass(frozen=True)
class PendingAddress:
    """An address learned but not yet answered by a verified hello."""

    source: PeerSource
    learned_ms: int
    failures: int = 0
    next_attempt_ms: int = 0
    node_id: NodeId | None = None  # claimed by whoever told us; not trusted


@dataclass(frozen=True)
class PeerTable:
    """Verified peers by node id, addresses still to verify, and this node's own id and urls."""

    peers: Mapping[NodeId, PeerState] = field(default_factory=dict)
    unverified: Mapping[str, PendingAddress] = field(default_factory=dict)
    self_id: NodeId | None = None
    self_urls: frozenset[str] = frozenset()


@dataclass(frozen=True)
class AddressLearned:
    """An address was announced (mDNS), configured (bootstrap) or gossiped (exchange)."""

    url: str
    source: PeerSource
    now_ms: int
    node_id: NodeId | None = None


@dataclass(frozen=True)
class HelloSucceeded:
    """A hello to `url` returned a verified card."""

    url: str
    card: NodeCard
    rtt_ms: float
    now_ms: int
    source: PeerSource


@dataclass(frozen=True)
class HelloFailed:
    """A hello to `url` failed: unreachable, timed out, or an invalid card."""

    url: str
    now_ms: int


@dataclass(frozen=True)
class ServiceRemoved:
    """mDNS said goodbye for a node."""

    node_id: NodeId
    now_ms: int


@dataclass(frozen=True)
class Tick:
    """Time passed; expire what has been silent too long."""

    now_ms: int


PeerEvent = AddressLearned | HelloSucceeded | HelloFailed | ServiceRemoved | Tick


def apply(table: PeerTable, event: PeerEvent, policy: TablePolicy) -> PeerTable:
    """The table after `event`; the same object when the event changes nothing."""
    match event:
        case AddressLearned():
            return _address_learned(table, event, policy)
        case HelloSucceeded():
            return _hello_succeeded(table, event, policy)
        case HelloFailed():
            return _hello_failed(table, event, policy)
        case ServiceRemoved():
            return _service_removed(table, event)
        case Tick():
            return _tick(table, event, policy)
    raise TypeError(f"not a peer table event: {event!r}")


# ---- queries ------------------------------------------------------------------------


def is_alive(peer: PeerState, now_ms: int, policy: TablePolicy) -> bool:
    """Verified and heard from within `dead_after_ms`."""
    return peer.verified and now_ms - peer.last_seen_ms <= policy.dead_after_ms


def alive_peers(table: PeerTable, now_ms: int, policy: TablePolicy) -> list[PeerState]:
    """Alive peers, ordered by node id."""
    return sorted((p for p in table.peers.values() if is_alive(p, now_ms, policy)), key=lambda p: p.node_id)


def due_for_hello(table: PeerTable, now_ms: int, policy: TablePolicy) -> list[str]:
    """Urls to hello now: addresses to verify and peers whose interval or backoff has passed."""
    due = [(p.next_attempt_ms, url) for url, p in table.unverified.items() if now_ms >= p.next_attempt_ms]
    due += [(p.next_attempt_ms, p.url) for p in table.peers.values() if now_ms >= p.next_attempt_ms]
    return [url for _, url in sorted(due)]


def exchange_list(table: PeerTable, now_ms: int, policy: TablePolicy, limit: int) -> list[PeerAddress]:
    """Up to `limit` alive peers to share with others, most recently seen first."""
    alive = sorted(alive_peers(table, now_ms, policy), key=lambda p: (-p.last_seen_ms, p.node_id))
    return [PeerAddress(node_id=p.node_id, url=p.url) for p in alive[: max(limit, 0)]]


def backoff_ms(failures: int, policy: TablePolicy) -> int:
    """Delay before the next attempt after `failures` consecutive failures."""
    if failures <= 0:
        return 0
    return min(policy.backoff_max_ms, policy.backoff_base_ms * 2 ** min(failures - 1, 62))


# ---- event handlers -----------------------------------------------------------------


def _peer_at(table: PeerTable, url: str) -> PeerState | None:
    """The peer last verified at `url`, if any."""
    return next((p for p in table.peers.values() if p.url == url), None)


def _address_learned(table: PeerTable, event: AddressLearned, policy: TablePolicy) -> PeerTable:
    url = event.url
    if url in table.self_urls or (event.node_id is not None and event.node_id == table.self_id):
        return table
    pending = table.unverified.get(url)
    if pending is not None:
        source = event.source if _SOURCE_RANK[event.source] > _SOURCE_RANK[pending.source] else pending.source
        # Hearing of an address again keeps it from expiring but never resets its backoff.
        refreshed = dataclasses.replace(
            pending,
            source=source,
            learned_ms=max(pending.learned_ms, event.now_ms),
            node_id=event.node_id if event.node_id is not None else pending.node_id,
        )
        return dataclasses.replace(table, unverified={**table.unverified, url: refreshed})
    full = len(table.unverified) >= policy.max_unverified
    if full and _SOURCE_RANK[event.source] == 0:
        return table
    if _peer_at(table, url) is not None:
        return table
    if event.node_id is not None:
        known = table.peers.get(event.node_id)
        if known is not None and is_alive(known, event.now_ms, policy):
            return table
    unverified = dict(table.unverified)
    if full:
        victim = _oldest_gossiped(unverified)
        if victim is None:
            return table
        del unverified[victim]
    unverified[url] = PendingAddress(
        source=event.source, learned_ms=event.now_ms, next_attempt_ms=event.now_ms, node_id=event.node_id
    )
    return dataclasses.replace(table, unverified=unverified)


def _oldest_gossiped(unverified: Mapping[str, PendingAddress]) -> str | None:
    """The longest-held address learned only by exchange, to make room for a better one."""
    gossiped = [(p.learned_ms, url) for url, p in unverified.items() if _SOURCE_RANK[p.source] == 0]
    return min(gossiped)[1] if gossiped else None


def _hello_succeeded(table: PeerTable, event: HelloSucceeded, policy: TablePolicy) -> PeerTable:
    card, url, now_ms = event.card, event.url, event.now_ms
    node_id = card.node_id
    # The node is verified now, so other addresses claimed for it need no hello.
    unverified = {
        u: p for u, p in table.unverified.items() if u != url and (p.node_id is None or p.node_id != node_id)
    }
    if node_id == table.self_id:
        self_urls = table.self_urls
        if len(self_urls) < _MAX_SELF_URLS:
            self_urls = self_urls | {url}
        return dataclasses.replace(table, unverified=unverified, self_urls=self_urls)
    # Whoever answered at this url before has moved or changed its key: the url is this node's now.
    peers = {n: p for n, p in table.peers.items() if p.url != url or n == node_id}
    previous = peers.get(node_id)
    if previous is None and len(peers) >= policy.max_peers:
        victim = _dead_victim(peers, now_ms, policy)
        if victim is None:
            return dataclasses.replace(table, unverified=unverified)
        del peers[victim]
    rtt_ms = event.rtt_ms
    if previous is not None and previous.rtt_ms is not None:
        rtt_ms = previous.rtt_ms + policy.rtt_new_weight * (event.rtt_ms - previous.rtt_ms)
    peers[node_id] = PeerState(
        node_id=node_id,
        url=url,
        card=card,
        rtt_ms=rtt_ms,
        last_seen_ms=now_ms,
        failures=0,
        next_attempt_ms=now_ms + policy.hello_interval_ms,
        source=event.source,
        verified=True,
    )
    return dataclasses.replace(table, peers=peers, unverified=unverified)


def _dead_victim(peers: Mapping[NodeId, PeerState], now_ms: int, policy: TablePolicy) -> NodeId | None:
    """The longest-silent peer that is not alive, to make room for a live one."""
    dead = [(p.last_seen_ms, n) for n, p in peers.items() if not is_alive(p, now_ms, policy)]
    return min(dead)[1] if dead else None


def _hello_failed(table: PeerTable, event: HelloFailed, policy: TablePolicy) -> PeerTable:
    pending = table.unverified.get(event.url)
    if pending is not None:
        failures = pending.failures + 1
        retried = dataclasses.replace(
            pending, failures=failures, next_attempt_ms=event.now_ms + backoff_ms(failures, policy)
        )
        return dataclasses.replace(table, unverified={**table.unverified, event.url: retried})
    peer = _peer_at(table, event.url)
    if peer is None:
        return table
    failures = peer.failures + 1
    retried_peer = dataclasses.replace(
        peer, failures=failures, next_attempt_ms=event.now_ms + backoff_ms(failures, policy)
    )
    return dataclasses.replace(table, peers={**table.peers, peer.node_id: retried_peer})


def _service_removed(table: PeerTable, event: ServiceRemoved) -> PeerTable:
    unverified = {u: p for u, p in table.unverified.items() if p.node_id != event.node_id}
    peers = table.peers
    peer = peers.get(event.node_id)
    if peer is not None and peer.verified:
        # Not alive until a hello verifies it again; the usual hellos find out whether it is gone.
        peers = {**peers, event.node_id: dataclasses.replace(peer, verified=False)}
    if peers is table.peers and len(unverified) == len(table.unverified):
        return table
    return dataclasses.replace(table, peers=peers, unverified=unverified)


def _tick(table: PeerTable, event: Tick, policy: TablePolicy) -> PeerTable:
    horizon_ms = event.now_ms - policy.drop_after_ms
    peers = {n: p for n, p in table.peers.items() if p.last_seen_ms >= horizon_ms}
    unverified = {u: p for u, p in table.unverified.items() if p.learned_ms >= horizon_ms}
    if len(peers) == len(table.peers) and len(unverified) == len(table.unverified):
        return table
    return dataclasses.replace(table, peers=peers, unverified=unverified)
