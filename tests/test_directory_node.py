"""The node's gossip directory on loopback: signed cards travel a chain of nodes; forged ones stop at the first."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import aiohttp
from aiohttp import web

from node.http.middleware import error_middleware
from node.mesh.directory import DirectoryService, Gossip, _gossip_route, directory_key
from peers.client import PEER_PATH
from peers.identity import NodeIdentity
from peers.wire import NodeCard, encode, sign_card


def _urls_of(urls: dict[str, str], ids: Sequence[str]) -> dict[str, str]:
    """The URLs of some nodes."""
    return {x: urls[x] for x in ids}


def _card_maker(identity: NodeIdentity, url_box: list[str]):
    def make():
        card = NodeCard(node_id=identity.node_id, public_key=identity.public_key_raw, addresses=tuple(url_box),
                        experts=(), issued_ms=1_000 + len(url_box))
        return sign_card(card, identity)
    return make


async def _serve(service: DirectoryService, route: str, handler) -> tuple[web.AppRunner, str]:
    """One directory service's peer route on a loopback port: its runner and URL."""
    app = web.Application(middlewares=[error_middleware])
    app[directory_key] = service
    app.router.add_post(f"{PEER_PATH}/{route}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_cards_travel_along_a_chain_and_forgeries_do_not() -> None:
    identities = [NodeIdentity.generate() for _ in range(3)]
    urls: dict[str, str] = {}
    services: dict[str, DirectoryService] = {}
    runners = []
    async with aiohttp.ClientSession() as session:
        # A chain a - b - c: each only knows its neighbours in the chain.
        chain = [i.node_id for i in identities]
        for index, identity in enumerate(identities):
            box: list[str] = []
            neighbours = [chain[j] for j in (index - 1, index + 1) if 0 <= j < len(chain)]
            service = DirectoryService(identity.node_id, _card_maker(identity, box),
                                       partial(_urls_of, urls, neighbours), session)
            runner, urls[identity.node_id] = await _serve(service, "gossip", _gossip_route)
            runners.append(runner)
            box.append(urls[identity.node_id])
            services[identity.node_id] = service
        for service in services.values():
            service.issue_own()
        for _ in range(6):
            for service in services.values():
                assert await service.gossip_once()
        a, b, c = (services[n] for n in chain)
        assert set(a.state.entries) == set(chain) and set(c.state.entries) == set(chain)
        assert [row["addresses"] for row in a.listing() if row["id"] == chain[2]] == [[urls[chain[2]]]]

        # A forged card (c's identity, altered address) pushed straight to b is not taken.
        forged_card = dataclasses.replace(sign_card(dataclasses.replace(
            c._own_card().card, issued_ms=9_999), identities[2]).card, addresses=("http://evil.example:1",))
        forged = encode(dataclasses.replace(sign_card(c._own_card().card, identities[2]), card=forged_card))
        async with session.post(urls[chain[1]] + f"{PEER_PATH}/gossip", data=encode(Gossip(cards=(forged,)))) as response:
            assert response.status == 200
        assert b.state.entries[chain[2]].version != 9_999
        async with session.post(urls[chain[1]] + f"{PEER_PATH}/gossip", data=b"\x81\xa1v\x01") as response:
            assert response.status == 400
    for runner in runners:
        await runner.cleanup()


async def test_anti_entropy_repairs_what_rumours_missed_and_costs_one_exchange_when_in_sync() -> None:
    from node.mesh.directory import _sync_route
    from peers import directory as pure

    a_id, b_id = NodeIdentity.generate(), NodeIdentity.generate()
    others = [NodeIdentity.generate() for _ in range(5)]
    services, urls, runners = {}, {}, []
    async with aiohttp.ClientSession() as session:
        for identity in (a_id, b_id):
            box: list[str] = []
            service = DirectoryService(identity.node_id, _card_maker(identity, box), lambda: {}, session)
            runner, urls[identity.node_id] = await _serve(service, "gossip-sync", _sync_route)
            runners.append(runner)
            box.append(urls[identity.node_id])
            services[identity.node_id] = service
        a, b = services[a_id.node_id], services[b_id.node_id]
        learned: list[str] = []
        b.on_card = lambda card: learned.append(card.node_id)
        # A holds five cards that are no longer news (rumours about them died out before reaching B).
        entries: dict[str, pure.Entry] = {}
        for other in others:
            signed = _card_maker(other, ["http://127.0.0.1:1"])()
            entries[other.node_id] = pure.Entry(other.node_id, signed.card.issued_ms, encode(signed))
        a.state = pure.make_directory(a_id.node_id, entries)
        a.issue_own()
        b.issue_own()
        assert await a.sync_once(urls[b_id.node_id]) == 1  # A gained B's card
        assert set(b.state.entries) == {a_id.node_id, b_id.node_id, *(o.node_id for o in others)}
        assert sorted(learned) == sorted([a_id.node_id, *(o.node_id for o in others)])
        assert pure.directory_digest(a.state) == pure.directory_digest(b.state)
        assert await a.sync_once(urls[b_id.node_id]) == 0
    for runner in runners:
        await runner.cleanup()
