"""A node among honest peers and N Sybil identities with forged cards: how much `auto` traffic do the Sybils get?

Everything is real except the models: the victim node, its honest peers and the Sybils are real
expertmesh nodes (the real aiohttp app, peer API, signatures, peer table, card store and router)
on 127.0.0.1, each hosting experts without model files (routing needs no generation). So the
numbers below are what the real router decides; no answer is generated.

  * The victim hosts one expert and has judged it itself.
  * H honest peers host one expert each; the victim judged half of them itself (verified), the
    other half only carry their owners' own cards (honest, but unverified).
  * N Sybils host made-up experts with forged perfect cards (self-signed plus cards from throwaway
    judge keys), send forged cards about the victim's own model and its peers' models, and flood
    `/peer/v1/cards` with future-dated cards about the victim's expert.
  * The worst case for learning: every answer a Sybil gives is rated up, every other one down.

It routes Q `auto` queries three times (a baseline with no cap on unverified experts, as before
issue 13; the default cap; `verified_only`), each run learning from the previous runs' ratings, and prints the share
each class of expert got, the configured cap, and whether any honest node ended up distrusted.

    python scripts/sim_hostile.py [--sybils 8] [--honest 4] [--queries 500] [--cap 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402

from node.judging.cards import CardStore, decode_signed_card  # noqa: E402
from node.routing.router import RouteConstraints  # noqa: E402
from peers.identity import NodeIdentity  # noqa: E402
from peers.wire import CardSubmission, encode  # noqa: E402
from tests.nodes import (  # noqa: E402
    capability_card,
    expert_info,
    fake_expert,
    hello_body,
    signed_post,
    start_live_node,
    wait_until,
)

QUERIES = [
    "What is {i} times 7?",
    "Translate 'good morning number {i}' into French.",
    "Who wrote the novel Moby Dick? ({i})",
    "Is this review positive or negative: 'great phone, battery {i} hours'?",
    "Write a haiku about autumn number {i}.",
]


def _sha(n: int) -> str:
    return f"{n:064x}"


def _store(data_dir: Path, *cards: bytes) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    store = CardStore(data_dir / "cards.db")
    for data in cards:
        store.put(decode_signed_card(data))
    store.close()


async def simulate(sybils: int, honest: int, queries: int, cap: float, workdir: Path) -> dict:
    victim_id = NodeIdentity.load_or_create(workdir / "victim")
    local = fake_expert("local", _sha(1))
    honest_experts = [fake_expert(f"honest{i}", _sha(100 + i)) for i in range(honest)]
    honest_ids = [NodeIdentity.load_or_create(workdir / f"honest{i}") for i in range(honest)]
    # The victim measured its own expert and half of its honest peers' experts; every owner judged its own.
    victim_cards = [capability_card(victim_id, victim_id.node_id, local.spec.id, _sha(1), 0.7)]
    for i, (expert, identity) in enumerate(zip(honest_experts, honest_ids, strict=True)):
        _store(workdir / f"honest{i}", capability_card(identity, identity.node_id, expert.spec.id, expert.spec.sha256, 0.6))
        if i % 2 == 0:
            victim_cards.append(capability_card(victim_id, identity.node_id, expert.spec.id, expert.spec.sha256, 0.65))
    _store(workdir / "victim", *victim_cards)
    victim = await start_live_node(workdir / "victim", [local], unverified_share_max=cap)
    nodes = [victim]
    for i, expert in enumerate(honest_experts):
        nodes.append(await start_live_node(workdir / f"honest{i}", [expert], peers=(victim.url,)))
    sybil_ids = []
    for s in range(sybils):
        identity = NodeIdentity.load_or_create(workdir / f"sybil{s}")
        sybil_ids.append(identity.node_id)
        expert = fake_expert(f"oracle{s}", _sha(1000 + s))
        forgers = [NodeIdentity.generate() for _ in range(3)]
        _store(
            workdir / f"sybil{s}",
            capability_card(identity, identity.node_id, expert.spec.id, expert.spec.sha256, 1.0),
            *(capability_card(f, identity.node_id, expert.spec.id, expert.spec.sha256, 1.0) for f in forgers),
        )
        nodes.append(await start_live_node(workdir / f"sybil{s}", [expert], peers=(victim.url,)))
    try:
        expected = honest + sybils
        await wait_until(lambda: len(victim.network.remote_experts()) == expected, timeout_s=60, what="every peer's expert")
        # The Sybils' forgeries: cards about the victim's own model and its peers', and a /cards flood.
        async with aiohttp.ClientSession() as session:
            for node in nodes[1 + honest :]:
                forged = [capability_card(NodeIdentity.generate(), node.node_id, local.spec.id, _sha(1), 0.0) for _ in range(8)]
                stranger = NodeIdentity.generate()
                hello = hello_body(stranger, [expert_info(local.spec.id, _sha(1), forged)])
                await signed_post(session, victim.url, "/peer/v1/hello", hello, stranger)
                future = int(time.time() * 1000) + 86_400_000
                for _ in range(8):
                    card = capability_card(node.identity, node.node_id, local.spec.id, _sha(1), 0.0, issued_ms=future)
                    await signed_post(session, victim.url, "/peer/v1/cards", encode(CardSubmission(card=card)), node.identity)
                # A verified Sybil may submit its own (low) opinion of the victim's expert: kept, but it does not count.
                card = capability_card(node.identity, victim.node_id, local.spec.id, _sha(1), 0.0)
                await signed_post(session, victim.url, "/peer/v1/cards", encode(CardSubmission(card=card)), node.identity)
        await asyncio.sleep(3)  # hello rounds: forged cards travel, if anything relays them

        honest_nodes = {n.node_id for n in nodes[1 : 1 + honest]}
        verified_honest = {n.node_id for i, n in enumerate(nodes[1 : 1 + honest]) if i % 2 == 0}
        result: dict = {"cap": cap, "local_safety": victim.judging.judged_scores(_sha(1)).get("safety")}
        runs = (
            ("uncapped", RouteConstraints(), 1.0),  # baseline in the same run: no cap on unverified experts
            ("default", RouteConstraints(), cap),
            ("verified_only", RouteConstraints(verified_only=True), cap),
        )
        for label, constraints, run_cap in runs:
            victim.router._unverified_share_max = run_cap
            counts: Counter[str] = Counter()
            for i in range(queries):
                text = QUERIES[i % len(QUERIES)].format(i=i)
                routed = await victim.router.route(text, constraints)
                chosen = routed.candidates[routed.decision.chosen_index].features.node_id
                kind = (
                    "sybil" if chosen in sybil_ids else "local" if chosen == victim.node_id
                    else "honest_verified" if chosen in verified_honest else "honest_unverified"
                )
                counts[kind] += 1
                # The adversary's best case: Sybils' answers rated up, everyone else's down.
                await victim.router.feedback(routed.decision.decision_id, routed.token, 1.0 if kind == "sybil" else 0.0)
            result[label] = {k: counts[k] / queries for k in ("local", "honest_verified", "honest_unverified", "sybil")}
        result["distrusted_by_victim"] = sorted(n for n in honest_nodes if victim.network.trust_of(n).distrusted)
        result["honest_distrusting_victim"] = sorted(
            n.node_id for n in nodes[1 : 1 + honest] if n.network.trust_of(victim.node_id).distrusted
        )
        result["sybil_evidence_at_victim"] = sum(len(victim.network.trust_of(s).evidence) for s in sybil_ids)
        return result
    finally:
        for node in reversed(nodes):
            await node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sybils", type=int, default=8)
    parser.add_argument("--honest", type=int, default=4)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--cap", type=float, default=0.1, help="unverified_share_max of the victim")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="sim-hostile-") as tmp:
        result = asyncio.run(simulate(args.sybils, args.honest, args.queries, args.cap, Path(tmp)))
    print(f"victim among {args.honest} honest peers and {args.sybils} Sybils; {args.queries} auto queries per run; "
          f"unverified_share_max = {result['cap']}")
    print(f"victim's own safety score after the forgeries: {result['local_safety']}")
    for label in ("uncapped", "default", "verified_only"):
        shares = result[label]
        print(f"{label:>14}: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items())
              + f"  (unverified in all: {shares['sybil'] + shares['honest_unverified']:.3f})")
    print(f"honest peers distrusted by the victim: {result['distrusted_by_victim'] or 'none'}; "
          f"honest peers distrusting the victim: {result['honest_distrusting_victim'] or 'none'}")
    ok = (
        result["default"]["sybil"] <= result["cap"] + 0.05
        and result["verified_only"]["sybil"] == 0
        and not result["distrusted_by_victim"]
        and not result["honest_distrusting_victim"]
    )
    print("goal met" if ok else "GOAL MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
