"""Peer table: liveness, backoff, expiry, caps, goodbyes, queries."""

from __future__ import annotations

from functools import reduce

from peers.identity import NodeId, NodeIdentity
from peers.table import (
    AddressLearned,
    HelloFailed,
    HelloSucceeded,
    PeerEvent,
    PeerTable,
    ServiceRemoved,
    TablePolicy,
    Tick,
    alive_peers,
    apply,
    backoff_ms,
    due_for_hello,
    exchange_list,
)
from peers.wire import NodeCard, PeerAddress

POLICY = TablePolicy()
URL_A = "http://192.168.1.10:8080"
URL_B = "http://192.168.1.11:8080"
SELF = NodeIdentity.generate()


def _card(identity: NodeIdentity, url: str = URL_A) -> NodeCard:
    return NodeCard(
        node_id=identity.node_id, public_key=identity.public_key_raw, addresses=(url,), experts=(), issued_ms=0
    )


def _run(*events: PeerEvent, table: PeerTable | None = None, policy: TablePolicy = POLICY) -> PeerTable:
    start = table if table is not None else PeerTable(self_id=SELF.node_id)
    return reduce(lambda t, e: apply(t, e, policy), events, start)


def _ok(identity: NodeIdentity, now_ms: int, url: str = URL_A, rtt_ms: float = 10.0) -> HelloSucceeded:
    return HelloSucceeded(url=url, card=_card(identity, url), rtt_ms=rtt_ms, now_ms=now_ms, source="mdns")


def _alive_ids(table: PeerTable, now_ms: int) -> list[NodeId]:
    return [p.node_id for p in alive_peers(table, now_ms, POLICY)]


def test_learn_hello_alive_silent_dead_hello_alive_again() -> None:
    peer = NodeIdentity.generate()
    table = _run(AddressLearned(url=URL_A, source="mdns", now_ms=0))
    assert due_for_hello(table, 0, POLICY) == [URL_A]
    assert _alive_ids(table, 0) == []

    table = _run(_ok(peer, now_ms=100), table=table)
    assert _alive_ids(table, 100) == [peer.node_id]
    assert table.unverified == {}
    assert due_for_hello(table, 100, POLICY) == []
    assert due_for_hello(table, 100 + POLICY.hello_interval_ms, POLICY) == [URL_A]

    assert _alive_ids(table, 100 + POLICY.dead_after_ms) == [peer.node_id]
    assert _alive_ids(table, 101 + POLICY.dead_after_ms) == []

    later = 50_000
    table = _run(Tick(later), _ok(peer, now_ms=later), table=table)
    assert _alive_ids(table, later) == [peer.node_id]
    assert table.peers[peer.node_id].failures == 0


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_ms(n, POLICY) for n in range(1, 10)] == [
        1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000
    ]
    assert backoff_ms(10_000, POLICY) == POLICY.backoff_max_ms

    table = _run(AddressLearned(url=URL_A, source="bootstrap", now_ms=0))
    now_ms = 0
    for failures, expected_delay_ms in enumerate([1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000], 1):
        assert due_for_hello(table, now_ms, POLICY) == [URL_A]
        table = _run(HelloFailed(url=URL_A, now_ms=now_ms), table=table)
        pending = table.unverified[URL_A]
        assert pending.failures == failures
        assert pending.next_attempt_ms == now_ms + expected_delay_ms
        assert due_for_hello(table, now_ms + expected_delay_ms - 1, POLICY) == []
        now_ms += expected_delay_ms


def test_verified_peer_backs_off_and_recovers() -> None:
    peer = NodeIdentity.generate()
    table = _run(_ok(peer, now_ms=0), HelloFailed(url=URL_A, now_ms=5_000), HelloFailed(url=URL_A, now_ms=6_000))
    state = table.peers[peer.node_id]
    assert (state.failures, state.next_attempt_ms) == (2, 8_000)
    assert _alive_ids(table, 6_000) == [peer.node_id]  # alive until dead_after_ms of silence
    table = _run(_ok(peer, now_ms=8_000), table=table)
    assert table.peers[peer.node_id].failures == 0


def test_dropped_after_drop_after_ms_without_success() -> None:
    peer = NodeIdentity.generate()
    table = _run(_ok(peer, now_ms=0), AddressLearned(url=URL_B, source="exchange", now_ms=0))
    table = _run(Tick(POLICY.drop_after_ms), table=table)
    assert peer.node_id in table.peers and URL_B in table.unverified
    table = _run(Tick(POLICY.drop_after_ms + 1), table=table)
    assert table.peers == {} and table.unverified == {}
    assert due_for_hello(table, POLICY.drop_after_ms + 1, POLICY) == []


def test_tick_that_changes_nothing_returns_the_same_table() -> None:
    table = _run(_ok(NodeIdentity.generate(), now_ms=0))
    assert apply(table, Tick(1_000), POLICY) is table


def test_flood_of_addresses_keeps_unverified_at_cap() -> None:
    flood = (
        AddressLearned(url=f"http://10.{i // 256}.{i % 256}.1:8080", source="exchange", now_ms=i) for i in range(10_000)
    )
    table = _run(*flood)
    assert len(table.unverified) == POLICY.max_unverified
    # A flood of gossip does not lock out what this node finds on its own LAN.
    table = _run(AddressLearned(url=URL_A, source="mdns", now_ms=10_000), table=table)
    assert len(table.unverified) == POLICY.max_unverified
    assert table.unverified[URL_A].source == "mdns"


def test_peer_cap_evicts_only_dead_peers() -> None:
    policy = TablePolicy(max_peers=2)
    a, b, c = (NodeIdentity.generate() for _ in range(3))
    table = _run(_ok(a, 0, "http://a:1"), _ok(b, 0, "http://b:1"), policy=policy)
    full = _run(_ok(c, 1_000, "http://c:1"), table=table, policy=policy)
    assert set(full.peers) == {a.node_id, b.node_id}
    table = _run(_ok(b, 20_000, "http://b:1"), _ok(c, 20_000, "http://c:1"), table=table, policy=policy)
    assert set(table.peers) == {b.node_id, c.node_id}


def test_service_removed_marks_not_alive_until_a_hello_succeeds() -> None:
    peer = NodeIdentity.generate()
    table = _run(_ok(peer, now_ms=0), ServiceRemoved(node_id=peer.node_id, now_ms=1_000))
    assert _alive_ids(table, 1_000) == []
    assert peer.node_id in table.peers
    assert exchange_list(table, 1_000, POLICY, limit=10) == []
    table = _run(_ok(peer, now_ms=6_000), table=table)
    assert _alive_ids(table, 6_000) == [peer.node_id]


def test_service_removed_drops_addresses_claimed_for_that_node() -> None:
    peer = NodeIdentity.generate()
    table = _run(AddressLearned(url=URL_A, source="mdns", now_ms=0, node_id=peer.node_id))
    assert _run(ServiceRemoved(node_id=peer.node_id, now_ms=1), table=table).unverified == {}
    assert apply(table, ServiceRemoved(node_id=NodeId("unknown"), now_ms=1), POLICY) is table


def test_new_node_at_a_known_url_replaces_the_old_one() -> None:
    old, new = NodeIdentity.generate(), NodeIdentity.generate()
    table = _run(_ok(old, now_ms=0), _ok(new, now_ms=1_000))
    assert list(table.peers) == [new.node_id]
    assert table.peers[new.node_id].url == URL_A


def test_peer_that_moved_gets_its_new_url() -> None:
    peer = NodeIdentity.generate()
    table = _run(_ok(peer, now_ms=0, url=URL_A))
    # While alive at its old url, an unverified claim of a new one is not worth a hello.
    assert _run(AddressLearned(url=URL_B, source="exchange", now_ms=1, node_id=peer.node_id), table=table) == table
    table = _run(AddressLearned(url=URL_B, source="mdns", now_ms=20_000, node_id=peer.node_id), table=table)
    assert URL_B in table.unverified
    table = _run(_ok(peer, now_ms=20_100, url=URL_B), table=table)
    assert table.peers[peer.node_id].url == URL_B and table.unverified == {}


def test_known_url_and_own_addresses_are_not_relearned() -> None:
    peer = NodeIdentity.generate()
    table = _run(_ok(peer, now_ms=0))
    assert apply(table, AddressLearned(url=URL_A, source="exchange", now_ms=1), POLICY) is table
    assert apply(table, AddressLearned(url=URL_B, source="exchange", now_ms=1, node_id=SELF.node_id), POLICY) is table
    # A hello that reaches this very node remembers the url as its own.
    table = _run(AddressLearned(url=URL_B, source="exchange", now_ms=2), _ok(SELF, now_ms=3, url=URL_B), table=table)
    assert URL_B in table.self_urls and SELF.node_id not in table.peers and table.unverified == {}
    assert apply(table, AddressLearned(url=URL_B, source="mdns", now_ms=4), POLICY) is table


def test_relearning_keeps_backoff_but_upgrades_source() -> None:
    table = _run(AddressLearned(url=URL_A, source="exchange", now_ms=0), HelloFailed(url=URL_A, now_ms=0))
    table = _run(AddressLearned(url=URL_A, source="bootstrap", now_ms=500), table=table)
    pending = table.unverified[URL_A]
    assert (pending.failures, pending.next_attempt_ms) == (1, 1_000)
    assert (pending.source, pending.learned_ms) == ("bootstrap", 500)


def test_rtt_is_smoothed() -> None:
    peer = NodeIdentity.generate()
    table = _run(_ok(peer, 0, rtt_ms=10.0), _ok(peer, 5_000, rtt_ms=20.0))
    assert table.peers[peer.node_id].rtt_ms == 10.0 + POLICY.rtt_new_weight * 10.0


def test_exchange_list_has_only_alive_verified_peers_most_recent_first() -> None:
    a, b, c = (NodeIdentity.generate() for _ in range(3))
    table = _run(
        _ok(a, 0, "http://a:1"),
        _ok(b, 10_000, "http://b:1"),
        _ok(c, 12_000, "http://c:1"),
        AddressLearned(url=URL_A, source="mdns", now_ms=12_000),
    )
    now_ms = 16_000  # a has been silent longer than dead_after_ms
    assert exchange_list(table, now_ms, POLICY, limit=10) == [
        PeerAddress(node_id=c.node_id, url="http://c:1"),
        PeerAddress(node_id=b.node_id, url="http://b:1"),
    ]
    assert exchange_list(table, now_ms, POLICY, limit=1) == [PeerAddress(node_id=c.node_id, url="http://c:1")]


def test_unknown_hello_failure_changes_nothing() -> None:
    table = _run(AddressLearned(url=URL_A, source="mdns", now_ms=0))
    assert apply(table, HelloFailed(url=URL_B, now_ms=1), POLICY) is table
