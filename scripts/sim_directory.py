"""Simulate the gossip directory (peers/directory.py) at 100 to 1,000 nodes, in process, no sockets.

Prints, per network size: messages each node sends and answers per minute, cards it receives per
minute, and the seconds a newly issued card takes to reach 99% of the nodes; beside it the
all-pairs hellos the peer table sent before the neighbour set (every peer every 5 s), measured by
the same counting. The protocol is the node's own: the same pure functions (peers/directory.py)
with the node's policy, the hello set the node computes (node/mesh/neighbours.py via hello_set),
gossip with one neighbour per round and anti-entropy every `anti_entropy_every` rounds as
node/mesh/directory.py does, and the node's peer exchange (node/mesh/network.py, one request
every EXCHANGE_INTERVAL_S) counted in. Cards are real Ed25519-signed bytes, verified on arrival.

    python scripts/sim_directory.py [--sizes 100,200,500,1000] [--seed 1]
"""

from __future__ import annotations

import argparse
import functools
import logging
import random
import statistics
import struct
import time
from dataclasses import dataclass

from node.mesh.directory import REISSUE_EVERY_ROUNDS
from node.mesh.network import EXCHANGE_INTERVAL_S
from peers.directory import (
    CardNews,
    Directory,
    DirectoryPolicy,
    Entry,
    directory_digest,
    feedback,
    hello_set,
    issue,
    make_directory,
    newer_than,
    outgoing,
    receive,
    versions,
)
from peers.identity import NodeIdentity, node_id_from_public_key, verify_signature

log = logging.getLogger("sim_directory")

REFRESH_PERIOD_S = REISSUE_EVERY_ROUNDS * DirectoryPolicy().gossip_interval_ms / 1000  # the node re-issues its card this often
WARMUP_ROUNDS = 30
PROBES = 5
PROBE_GAP_ROUNDS = 15
MAX_ROUNDS_PER_PROBE = 200


@dataclass
class SimNode:
    """One simulated node: its key, directory, cached neighbours and counters."""

    identity: NodeIdentity
    directory: Directory
    neighbours: list[str]
    offset: int = 0  # when in the anti-entropy cycle this node compares digests
    sent: int = 0
    cards_in: int = 0
    repairs: int = 0


def _card(identity: NodeIdentity, version: int) -> bytes:
    body = identity.node_id.encode() + struct.pack(">Q", version)
    return identity.public_key_raw + identity.sign(body) + body


def _verify(news: CardNews) -> bool:
    return _verify_bytes(news.node_id, news.version, news.card)


@functools.lru_cache(maxsize=1 << 16)
def _verify_bytes(node_id: str, version: int, card: bytes) -> bool:
    """A real Ed25519 check; the same bytes give the same answer at every simulated node, so it runs once per card."""
    public_key, signature, body = card[:32], card[32:96], card[96:]
    return (
        node_id_from_public_key(public_key) == node_id
        and body == node_id.encode() + struct.pack(">Q", version)
        and verify_signature(public_key, body, signature)
    )


def _anti_entropy(node: SimNode, partner: SimNode, policy: DirectoryPolicy) -> None:
    """Compare digests; when they differ, swap versions and pull what each side missed."""
    node.sent += 1
    partner.sent += 1
    if directory_digest(node.directory) == directory_digest(partner.directory):
        return
    node.sent += 1
    partner.sent += 1
    for_partner = newer_than(node.directory, versions(partner.directory), policy)
    for_node = newer_than(partner.directory, versions(node.directory), policy)
    partner.directory, _ = receive(partner.directory, for_partner, policy, _verify)
    node.directory, _ = receive(node.directory, for_node, policy, _verify)
    partner.cards_in += len(for_partner)
    node.cards_in += len(for_node)
    node.repairs += len(for_node)
    partner.repairs += len(for_partner)


def _issue(node: SimNode, version: int) -> None:
    """The node re-issues its own card: news it pushes from now on."""
    node.directory = issue(node.directory, version, _card(node.identity, version))


def simulate(n_nodes: int, policy: DirectoryPolicy, seed: int) -> dict[str, float]:
    """Run one network of `n_nodes` and return its per-node traffic and spread times."""
    rng = random.Random(seed)
    identities = [NodeIdentity.generate() for _ in range(n_nodes)]
    cards: dict[str, Entry] = {i.node_id: Entry(i.node_id, 1, _card(i, 1)) for i in identities}
    nodes: dict[str, SimNode] = {}
    for identity in identities:
        directory = make_directory(identity.node_id, cards)  # a converged directory: everyone knows everyone
        # Whom the node hellos: the node's own rule (node/mesh/neighbours.py), with every peer alive and
        # none serving it (no routing traffic here), so bootstrap peers are no longer pinned.
        chosen = sorted(hello_set(identity.node_id, list(cards), policy.max_neighbours, alive_count=n_nodes - 1))
        nodes[identity.node_id] = SimNode(identity, directory, chosen, offset=rng.randrange(policy.anti_entropy_every))
    ids = list(nodes)
    # Hellos go to the neighbour set; each is answered, so a node also answers its in-neighbours.
    in_degree = {n: 0 for n in ids}
    for node in nodes.values():
        for other in node.neighbours:
            in_degree[other] += 1
    round_s = policy.gossip_interval_ms / 1000
    version = 2
    spread_rounds: list[int] = []
    probe: tuple[str, int] | None = None
    probe_started = 0
    rounds = 0
    probes_done = 0
    while probes_done < PROBES:
        rounds += 1
        for node in nodes.values():
            if rng.random() < round_s / REFRESH_PERIOD_S:
                version += 1
                _issue(node, version)
        if probe is None and rounds >= WARMUP_ROUNDS + probes_done * PROBE_GAP_ROUNDS:
            origin = nodes[rng.choice(ids)]
            version += 1
            _issue(origin, version)
            probe, probe_started = (origin.identity.node_id, version), rounds
        order = ids[:]
        rng.shuffle(order)
        for node_id in order:
            node = nodes[node_id]
            # The node gossips with one of the rendezvous top `max_neighbours` of its alive peers: its out-neighbours.
            partner = nodes[rng.choice(node.neighbours)]
            push = outgoing(node.directory, policy)
            pull = outgoing(partner.directory, policy)
            partner.directory, known_by_partner = receive(partner.directory, push, policy, _verify)
            node.directory, known_by_node = receive(node.directory, pull, policy, _verify)
            node.directory = feedback(node.directory, push, known_by_partner, policy)
            partner.directory = feedback(partner.directory, pull, known_by_node, policy)
            node.sent += 1
            partner.sent += 1  # its reply
            partner.cards_in += len(push)
            node.cards_in += len(pull)
            if (rounds + node.offset) % policy.anti_entropy_every == 0:
                _anti_entropy(node, nodes[rng.choice(node.neighbours)], policy)
        if probe is not None:
            origin_id, probe_version = probe
            have = sum(1 for n in nodes.values() if (e := n.directory.entries.get(origin_id)) and e.version >= probe_version)
            if have >= 0.99 * n_nodes or rounds - probe_started >= MAX_ROUNDS_PER_PROBE:
                spread_rounds.append(rounds - probe_started)
                probe = None
                probes_done += 1
    minutes = rounds * round_s / 60
    hellos_per_min = 60_000 / policy.hello_interval_ms
    gossip_per_node_min = statistics.mean(n.sent for n in nodes.values()) / minutes
    hello_per_node_min = statistics.mean(len(n.neighbours) + in_degree[i] for i, n in nodes.items()) * hellos_per_min
    # Peer exchange: one request every EXCHANGE_INTERVAL_S to a random alive peer, answered by it.
    hello_per_node_min += 2 * 60 / EXCHANGE_INTERVAL_S
    return {
        "nodes": n_nodes,
        "gossip_msgs_per_node_min": gossip_per_node_min,
        "hello_msgs_per_node_min": hello_per_node_min,
        "msgs_per_node_min": gossip_per_node_min + hello_per_node_min,
        "max_msgs_per_node_min": max(
            n.sent / minutes + (len(n.neighbours) + in_degree[i]) * hellos_per_min + 2 * 60 / EXCHANGE_INTERVAL_S for i, n in nodes.items()
        ),
        "cards_in_per_node_min": statistics.mean(n.cards_in for n in nodes.values()) / minutes,
        "spread_99_s_median": statistics.median(spread_rounds) * round_s,
        "spread_99_s_max": max(spread_rounds) * round_s,
        "all_pairs_msgs_per_node_min": 2 * (n_nodes - 1) * hellos_per_min,
        "repairs_per_node_min": statistics.mean(n.repairs for n in nodes.values()) / minutes,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,200,500,1000")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    policy = DirectoryPolicy()
    log.info(
        "policy: %d neighbours, gossip every %.0f s (<= %d cards), hellos every %.0f s, stop after %d partners knew a card",
        policy.max_neighbours, policy.gossip_interval_ms / 1000, policy.max_cards_per_message,
        policy.hello_interval_ms / 1000, policy.stop_after,
    )
    log.info(
        "%6s %14s %14s %14s %14s %12s %16s %14s %18s",
        "nodes", "msgs/node/min", "max/node/min", "gossip/min", "cards in/min", "repairs/min", "to 99% (median)", "to 99% (max)",
        "all-pairs msgs/min",
    )
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        started = time.perf_counter()
        r = simulate(size, policy, args.seed)
        results.append(r)
        log.info(
            "%6d %14.1f %14.1f %14.1f %14.1f %12.2f %15.0fs %13.0fs %18.0f   (%.0f s to simulate)",
            r["nodes"], r["msgs_per_node_min"], r["max_msgs_per_node_min"], r["gossip_msgs_per_node_min"],
            r["cards_in_per_node_min"], r["repairs_per_node_min"], r["spread_99_s_median"], r["spread_99_s_max"], r["all_pairs_msgs_per_node_min"],
            time.perf_counter() - started,
        )
    first, last = results[0], results[-1]
    log.info(
        "from %d to %d nodes: messages per node x%.2f (all-pairs hellos x%.1f), cards in per node x%.2f, time to 99%% x%.2f",
        first["nodes"], last["nodes"], last["msgs_per_node_min"] / first["msgs_per_node_min"],
        last["all_pairs_msgs_per_node_min"] / first["all_pairs_msgs_per_node_min"],
        last["cards_in_per_node_min"] / first["cards_in_per_node_min"],
        last["spread_99_s_median"] / first["spread_99_s_median"],
    )


if __name__ == "__main__":
    main()
