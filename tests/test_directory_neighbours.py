"""The bounded hello set: a node hellos a few neighbours, knows the rest from directory cards and their own hellos."""

from __future__ import annotations

from node.mesh.neighbours import ACTIVE_MS, Neighbours
from peers import table as peer_table
from peers.identity import NodeId, NodeIdentity
from peers.table import PeerTable, TablePolicy
from peers.wire import ExpertInfo, NodeCard

POLICY = TablePolicy()


def _card(identity: NodeIdentity, port: int, experts: int = 0) -> NodeCard:
    infos = tuple(
        ExpertInfo(
            expert_id=f"e{port}-{i}", name="m", family="f", params="1", quantization="q", sha256="0" * 64,
            prompt_style="chat", n_ctx=512, queue_depth=0, queue_size=1, tokens_per_s=None,
        )
        for i in range(experts)
    )
    return NodeCard(node_id=identity.node_id, public_key=identity.public_key_raw,
                    addresses=(f"http://127.0.0.1:{port}",), experts=infos, issued_ms=1)


def _table(self_id: NodeId, cards: list[NodeCard], now: int) -> PeerTable:
    table = PeerTable(self_id=self_id)
    for card in cards:
        table = peer_table.apply(table, peer_table.HelloSucceeded(card.addresses[0], card, 1.0, now, "exchange"), POLICY)
    return table


def test_sixty_known_peers_get_eight_hellos_and_the_choice_is_stable() -> None:
    me = NodeIdentity.generate()
    cards = [_card(NodeIdentity.generate(), 20_000 + i) for i in range(60)]
    now = 1_000_000
    table = _table(me.node_id, cards, now - POLICY.hello_interval_ms)
    neighbours = Neighbours(me.node_id, POLICY)
    chosen = neighbours.chosen(table, now, lambda _n: False)
    assert len(chosen) == 8
    assert neighbours.chosen(table, now + 1, lambda _n: False) == chosen
    due = peer_table.due_for_hello(table, now, POLICY)
    assert len(due) == 60
    kept = neighbours.filter_due(due, table, chosen, now)
    assert {table.peers[n].url for n in chosen} == set(kept)


def test_a_failing_neighbour_gives_its_slot_away_and_a_served_peer_is_helloed_too() -> None:
    me = NodeIdentity.generate()
    cards = [_card(NodeIdentity.generate(), 20_000 + i) for i in range(30)]
    now = 1_000_000
    table = _table(me.node_id, cards, now)
    neighbours = Neighbours(me.node_id, POLICY)
    chosen = neighbours.chosen(table, now, lambda _n: False)
    victim = sorted(chosen)[0]
    for _ in range(3):
        table = peer_table.apply(table, peer_table.HelloFailed(table.peers[victim].url, now), POLICY)
    after = neighbours.chosen(table, now, lambda _n: False)
    assert victim not in after and len(after) == 8
    outsider = next(c.node_id for c in cards if c.node_id not in after)
    neighbours.served(outsider, now)
    assert outsider in neighbours.chosen(table, now, lambda _n: False)
    assert outsider not in neighbours.chosen(table, now + ACTIVE_MS + 1, lambda _n: False)


def test_liveness_from_a_peers_own_hello_and_peers_known_only_from_the_directory() -> None:
    me = NodeIdentity.generate()
    cards = [_card(NodeIdentity.generate(), 20_000 + i, experts=1) for i in range(20)]
    now = 1_000_000
    table = _table(me.node_id, cards[:10], now)
    neighbours = Neighbours(me.node_id, POLICY)
    later = now + POLICY.dead_after_ms + 1
    peer = table.peers[cards[0].node_id]
    assert not neighbours.routable(peer, later)
    neighbours.heard(peer.node_id, later)  # its signed hello reached us
    assert neighbours.routable(peer, later)
    # ... but when our own hello to it fails, we cannot reach it, whatever it sends us.
    failed = peer_table.apply(table, peer_table.HelloFailed(peer.url, later), POLICY).peers[peer.node_id]
    assert not neighbours.routable(failed, later)
    for card in cards[10:]:
        neighbours.card_learned(card)
    chosen = neighbours.chosen(table, later, lambda _n: False)
    from_directory = [n for n in chosen if n not in table.peers]
    learned = neighbours.addresses_to_learn(table, chosen, lambda u: u)
    assert sorted(n for _, n in learned) == sorted(from_directory)
    # On demand, a few directory nodes with experts are probed, each at most once a minute.
    first = neighbours.probes(table, later, lambda _n: False)
    assert 0 < len(first) <= 2
    assert not set(first) & set(neighbours.probes(table, later, lambda _n: False))
    assert set(first) <= neighbours.chosen(table, later, lambda _n: False)
