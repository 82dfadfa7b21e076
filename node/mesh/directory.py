"""The node's gossip directory: signed node cards pushed and pulled with neighbours (peers/directory.py).

The node keeps a directory of every node card it hears of, gossips it with a neighbour picked
from its alive peers, and lists it at `GET /v1/directory`. Every verified card that is news is
handed to the network (node/mesh/neighbours.py), which hellos only a bounded neighbour set and
knows everyone else from these cards.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, TypeVar

import aiohttp
from aiohttp import web
from pydantic import Field

from node import keys
from node.errors import InvalidRequest
from node.peer_request import peer_body
from peers import auth
from peers import directory as pure
from peers.client import PEER_PATH
from peers.identity import node_id_from_public_key
from peers.wire import (
    CONTENT_TYPE,
    Bool,
    Bytes,
    Int,
    Items,
    NodeCard,
    SignedCard,
    Str,
    WireError,
    WireMessage,
    decode,
    encode,
    verify_card,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=WireMessage)

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


# Versions ride in a peer request, capped at 256 KiB by the peer guard: about 2,500 nodes' worth;
# beyond that anti-entropy compares the first 2,500 ids only (rumours still carry every card).
MAX_SYNC_IDS = 2_500
MAX_SYNC_BYTES = 1 << 20


@dataclass(frozen=True)
class Sync(WireMessage):
    """Anti-entropy: our directory's digest; then (when the partner's differs) our versions and what it lacks."""

    TYPE: ClassVar[str] = "gossip_sync"
    digest: Annotated[Bytes, Field(max_length=32)] = b""
    ids: Annotated[tuple[Annotated[Str, Field(max_length=64)], ...], Items(MAX_SYNC_IDS)] = ()
    versions: Annotated[tuple[Int, ...], Items(MAX_SYNC_IDS)] = ()
    cards: Annotated[tuple[Annotated[Bytes, Field(max_length=MAX_CARD_BYTES)], ...], Items(16)] = ()


@dataclass(frozen=True)
class SyncReply(WireMessage):
    """Anti-entropy answer: whether digests match, else our versions (first step) or the cards the asker lacks."""

    TYPE: ClassVar[str] = "gossip_sync_reply"
    same: Bool = False
    ids: Annotated[tuple[Annotated[Str, Field(max_length=64)], ...], Items(MAX_SYNC_IDS)] = ()
    versions: Annotated[tuple[Int, ...], Items(MAX_SYNC_IDS)] = ()
    cards: Annotated[tuple[Annotated[Bytes, Field(max_length=MAX_CARD_BYTES)], ...], Items(32)] = ()


def _versions(directory: pure.Directory) -> tuple[tuple[str, ...], tuple[int, ...]]:
    items = sorted(pure.versions(directory).items())[:MAX_SYNC_IDS]
    return tuple(n for n, _ in items), tuple(v for _, v in items)


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
        self.repairs = 0  # cards that arrived by anti-entropy, not by rumour
        self._offset = self._rng.randrange(self.policy.anti_entropy_every)  # nodes compare digests at different rounds
        # Told of every verified card that was news here (the network's neighbour choice and routing use them).
        self.on_card: Callable[[NodeCard], None] = lambda _card: None

    def _receive(self, cards: Sequence[bytes]) -> tuple[list[str], int]:
        """Merge gossiped cards; hand each one that was news on; (the ids we already had, how many were news)."""
        news = [n for n in (_news(c) for c in cards) if n is not None]
        self.state, known = pure.receive(self.state, news, self.policy, _verify)
        gained = 0
        for item in news:
            entry = self.state.entries.get(item.node_id)
            if entry is not None and entry.version == item.version and entry.card is item.card and item.node_id not in known:
                gained += 1
                self.on_card(decode(item.card, SignedCard, max_bytes=MAX_CARD_BYTES).card)
        return known, gained

    def issue_own(self) -> None:
        """Put our current card in the directory as news."""
        signed = self._own_card()
        self.state = pure.issue(self.state, signed.card.issued_ms, encode(signed))

    def on_gossip(self, message: Gossip) -> GossipReply:
        """A neighbour pushed: merge, answer with our hot cards and what we already had."""
        pull = pure.outgoing(self.state, self.policy)
        known, _ = self._receive(message.cards)
        return GossipReply(cards=tuple(n.card for n in pull), known=tuple(known))

    def on_sync(self, message: Sync) -> SyncReply:
        """Anti-entropy from a neighbour: equal digests end it; else versions, then the cards it lacks."""
        if message.digest == pure.directory_digest(self.state) and not message.ids:
            return SyncReply(same=True)
        if not message.ids:
            ids, versions = _versions(self.state)
            return SyncReply(same=False, ids=ids, versions=versions)
        self.repairs += self._receive(message.cards)[1]
        theirs = dict(zip(message.ids, message.versions, strict=False))
        return SyncReply(cards=tuple(n.card for n in pure.newer_than(self.state, theirs, self.policy)))

    async def _post(self, url: str, route: str, message: WireMessage, reply: type[WireMessage], cap: int):
        body = encode(message)
        async with self._session.post(
            f"{url.rstrip('/')}{PEER_PATH}/{route}", data=body,
            headers={"Content-Type": CONTENT_TYPE, **self._sign(f"{PEER_PATH}/{route}", body)},
            timeout=aiohttp.ClientTimeout(total=5),
        ) as response:
            if response.status != 200:
                raise WireError(response.status, f"{route} refused")
            return decode(await response.content.read(cap + 1), reply, max_bytes=cap)

    async def sync_once(self, url: str) -> int:
        """Anti-entropy with the neighbour at `url`: digests, then versions and cards both ways; cards gained."""
        first = await self._post(url, "gossip-sync", Sync(digest=pure.directory_digest(self.state)), SyncReply, MAX_SYNC_BYTES)
        if first.same:
            return 0
        theirs = dict(zip(first.ids, first.versions, strict=False))
        for_partner = pure.newer_than(self.state, theirs, self.policy)
        ids, versions = _versions(self.state)
        message = Sync(digest=pure.directory_digest(self.state), ids=ids, versions=versions, cards=tuple(n.card for n in for_partner))
        second = await self._post(url, "gossip-sync", message, SyncReply, MAX_SYNC_BYTES)
        gained = self._receive(second.cards)[1]
        self.repairs += gained
        return gained

    async def gossip_once(self) -> bool:
        """One round: push-pull with a neighbour among the alive peers; False when there was none."""
        partners = self._partners()
        chosen = pure.rendezvous_neighbours(self.state.self_id, list(partners), self.policy.max_neighbours)
        if not chosen:
            return False
        partner = self._rng.choice(chosen)
        push = pure.outgoing(self.state, self.policy)
        try:
            reply = await self._post(
                partners[partner], "gossip", Gossip(cards=tuple(n.card for n in push)), GossipReply, MAX_GOSSIP_BYTES
            )
        except (TimeoutError, aiohttp.ClientError, OSError, WireError) as exc:
            log.debug("gossip with %s failed: %s", partner, exc)
            return False
        self._receive(reply.cards)
        self.state = pure.feedback(self.state, push, list(reply.known), self.policy)
        if (self.rounds + self._offset) % self.policy.anti_entropy_every == 0:
            # Rumours can die out before reaching everyone: now and then compare whole directories (peers/directory.py).
            other = self._rng.choice(chosen)
            try:
                await self.sync_once(partners[other])
            except (TimeoutError, aiohttp.ClientError, OSError, WireError) as exc:
                log.debug("anti-entropy with %s failed: %s", other, exc)
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


from node.keys import directory_key  # noqa: E402 (it names the class above)


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
        service.on_card = network.neighbours.card_learned
        app[directory_key] = service
        try:
            yield
        finally:
            await service.close()


async def _read(request: web.Request, shape: type[M], cap: int) -> M:
    """A peer request's body (read once by the peer guard) decoded as `shape`; a bad one is a 400."""
    body = await peer_body(request, cap)
    try:
        return decode(body, shape, max_bytes=cap)
    except WireError as exc:
        raise InvalidRequest(str(exc)) from exc


async def _gossip_route(request: web.Request) -> web.Response:
    """`POST /peer/v1/gossip`: push-pull of signed node cards."""
    message = await _read(request, Gossip, MAX_GOSSIP_BYTES)
    reply = request.config_dict[directory_key].on_gossip(message)
    return web.Response(body=encode(reply), content_type=CONTENT_TYPE)


async def _sync_route(request: web.Request) -> web.Response:
    """`POST /peer/v1/gossip-sync`: anti-entropy between neighbours (digest, versions, missing cards)."""
    message = await _read(request, Sync, MAX_SYNC_BYTES)
    reply = request.config_dict[directory_key].on_sync(message)
    return web.Response(body=encode(reply), content_type=CONTENT_TYPE)


async def _listing(request: web.Request) -> web.Response:
    """`GET /v1/directory`: the node cards this node has heard of by gossip (and its own)."""
    service = request.app[directory_key]
    return web.json_response({"object": "list", "node_id": service.state.self_id, "data": service.listing()})


def add_routes(app: web.Application, peer_app: web.Application) -> None:
    """Mount the gossip routes on the peer sub-app (at PEER_PATH) and the listing on the node app."""
    peer_app.router.add_post("/gossip", _gossip_route)
    peer_app.router.add_post("/gossip-sync", _sync_route)
    app.router.add_get("/v1/directory", _listing)
