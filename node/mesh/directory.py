"""The node's gossip directory: signed node cards pushed and pulled with neighbours (peers/directory.py).

A first, minimal use of the pure protocol: the node keeps a directory of every node card it
hears of, gossips it with a neighbour picked from its alive peers, and lists it at
`GET /v1/directory`. Its peer table still hellos every peer; moving liveness onto the bounded
neighbour set is the next step (see the README's "Beyond a few hundred peers").
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Annotated, AsyncIterator, Callable, ClassVar

import aiohttp
from aiohttp import web
from pydantic import Field

from node import keys
from node.errors import InvalidRequest
from node.http.peer_guard import peer_body
from peers import auth
from peers import directory as pure
from peers.client import PEER_PATH
from peers.identity import node_id_from_public_key
from peers.wire import CONTENT_TYPE, Bytes, Items, SignedCard, Str, WireError, WireMessage, decode, encode, verify_card

log = logging.getLogger(__name__)

MAX_GOSSIP_BYTES = 128 << 10
MAX_CARD_BYTES = 64 << 10
REISSUE_EVERY_ROUNDS = 300  # our own card goes out again every ten minutes at the default pace


@dataclass(frozen=True)
class Gossip(WireMessage):
    """Push: our hot cards (encoded signed cards)."""

    TYPE: ClassVar[str] = "gossip"
    cards: Annotated[tuple[Annotated[Bytes, Field(max_length=MAX_CARD_BYTES)], ...], Items(32)] = ()


@dataclass(frozen=True)
class GossipReply(WireMessage):
    """Pull: the partner's hot cards, and which of ours it already had."""

    TYPE: ClassVar[str] = "gossip_reply"
    cards: Annotated[tuple[Annotated[Bytes, Field(max_length=MAX_CARD_BYTES)], ...], Items(32)] = ()
    known: Annotated[tuple[Annotated[Str, Field(max_length=64)], ...], Items(32)] = ()


def _verify(news: pure.CardNews) -> bool:
    """A gossiped card counts only if it decodes, verifies, and is what it claims to be."""
    try:
        card = verify_card(decode(news.card, SignedCard, max_bytes=MAX_CARD_BYTES))
    except WireError:
        return False
    return card.node_id == news.node_id and card.issued_ms == news.version


def _news(raw: bytes) -> pure.CardNews | None:
    """The (id, version) a gossiped card claims, read without trusting it (verified on learning)."""
    try:
        signed = decode(raw, SignedCard, max_bytes=MAX_CARD_BYTES)
    except WireError:
        return None
    if node_id_from_public_key(signed.card.public_key) != signed.card.node_id:
        return None
    return pure.CardNews(signed.card.node_id, signed.card.issued_ms, raw)


class DirectoryService:
    """Holds this node's directory and gossips it with one neighbour per round."""

    def __init__(
        self,
        self_id: str,
        own_card: Callable[[], SignedCard],
        partners: Callable[[], dict[str, str]],
        session: aiohttp.ClientSession,
        policy: pure.DirectoryPolicy | None = None,
        *,
        rng: random.Random | None = None,
        sign: Callable[[str, bytes], dict[str, str]] = lambda _path, _body: {},
    ) -> None:
        self._sign = sign  # signed peer-request headers (peers/auth.py), as every peer route demands
        self._own_card = own_card
        self._partners = partners  # alive peers: node id -> url
        self._session = session
        self.policy = policy or pure.DirectoryPolicy()
        self.state = pure.Directory(self_id)
        self._rng = rng or random.Random()
        self._task: asyncio.Task | None = None
        self.rounds = 0

    def issue_own(self) -> None:
        """Put our current card in the directory as news."""
        signed = self._own_card()
        self.state = pure.issue(self.state, signed.card.issued_ms, encode(signed))

    def on_gossip(self, message: Gossip) -> GossipReply:
        """A neighbour pushed: merge, answer with our hot cards and what we already had."""
        pull = pure.outgoing(self.state, self.policy)
        news = [n for n in (_news(c) for c in message.cards) if n is not None]
        self.state, known = pure.receive(self.state, news, self.policy, _verify)
        return GossipReply(cards=tuple(n.card for n in pull), known=tuple(known))

    async def gossip_once(self) -> bool:
        """One round: push-pull with a neighbour among the alive peers; False when there was none."""
        partners = self._partners()
        chosen = pure.rendezvous_neighbours(self.state.self_id, list(partners), self.policy.max_neighbours)
        if not chosen:
            return False
        partner = self._rng.choice(chosen)
        push = pure.outgoing(self.state, self.policy)
        body = encode(Gossip(cards=tuple(n.card for n in push)))
        try:
            async with self._session.post(
                f"{partners[partner].rstrip('/')}{PEER_PATH}/gossip", data=body,
                headers={"Content-Type": CONTENT_TYPE, **self._sign(f"{PEER_PATH}/gossip", body)},
                timeout=aiohttp.ClientTimeout(total=5),
            ) as response:
                if response.status != 200:
                    return False
                reply = decode(await response.content.read(MAX_GOSSIP_BYTES + 1), GossipReply, max_bytes=MAX_GOSSIP_BYTES)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, WireError) as exc:
            log.debug("gossip with %s failed: %s", partner, exc)
            return False
        news = [n for n in (_news(c) for c in reply.cards) if n is not None]
        self.state, _ = pure.receive(self.state, news, self.policy, _verify)
        self.state = pure.feedback(self.state, push, list(reply.known), self.policy)
        return True

    async def run(self) -> None:
        while True:
            if self.rounds % REISSUE_EVERY_ROUNDS == 0:
                self.issue_own()
            self.rounds += 1
            await self.gossip_once()
            await asyncio.sleep(self.policy.gossip_interval_ms / 1000)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="directory-gossip")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def listing(self) -> list[dict]:
        """Every node in the directory, as the user API shows it."""
        rows = []
        for entry in sorted(self.state.entries.values(), key=lambda e: e.node_id):
            card = decode(entry.card, SignedCard, max_bytes=MAX_CARD_BYTES).card
            rows.append({
                "id": card.node_id, "issued_ms": card.issued_ms, "addresses": list(card.addresses),
                "experts": [e.expert_id for e in card.experts], "news": entry.node_id in self.state.hot,
            })
        return rows


directory_key = web.AppKey("directory", DirectoryService)


async def directory_ctx(app: web.Application) -> AsyncIterator[None]:
    """The directory service, gossiping once the network is live."""
    network = app[keys.network_key]

    def partners() -> dict[str, str]:
        return {p.node_id: p.url for p in network.alive_peers()}

    async with aiohttp.ClientSession() as session:
        settings = app[keys.settings_key]
        secret = settings.community_secret.encode() if settings.community_secret else None
        identity = network.identity

        def sign(path: str, body: bytes) -> dict[str, str]:
            return auth.sign_request(identity, "POST", path, body, secret=secret)

        service = DirectoryService(network.node_id, network.signed_card, partners, session, sign=sign)
        app[directory_key] = service
        try:
            yield
        finally:
            await service.close()


async def _gossip_route(request: web.Request) -> web.Response:
    """`POST /peer/v1/gossip`: push-pull of signed node cards."""
    body = await peer_body(request, MAX_GOSSIP_BYTES)
    try:
        message = decode(body, Gossip, max_bytes=MAX_GOSSIP_BYTES)
    except WireError as exc:
        raise InvalidRequest(str(exc)) from exc
    reply = request.config_dict[directory_key].on_gossip(message)
    return web.Response(body=encode(reply), content_type=CONTENT_TYPE)


async def _listing(request: web.Request) -> web.Response:
    """`GET /v1/directory`: the node cards this node has heard of by gossip (and its own)."""
    service = request.app[directory_key]
    return web.json_response({"object": "list", "node_id": service.state.self_id, "data": service.listing()})


def add_routes(app: web.Application, peer_app: web.Application) -> None:
    """Mount the gossip route on the peer sub-app (at PEER_PATH) and the listing on the node app."""
    peer_app.router.add_post("/gossip", _gossip_route)
    app.router.add_get("/v1/directory", _listing)
