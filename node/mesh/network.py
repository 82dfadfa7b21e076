"""The node's view of the network: the peer table, kept fresh by hellos, peer exchange and mDNS."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from node.config import Settings
from node.errors import Forbidden
from node.mesh.neighbours import Neighbours
from node.mesh.neighbours import alive_peers as routable_peers
from node.mesh.peer_store import PeerStore, RememberedPeer
from node.mesh.punch import PUNCHED
from node.serving.expert import TrustEvidence
from node.serving.experts import ExpertPool
from peers import table as peer_table
from peers.addresses import dialable_origin, is_loopback_host
from peers.client import PeerClient, PeerError
from peers.identity import NodeId, NodeIdentity
from peers.relay import is_relayed
from peers.table import PeerSource, PeerState, PeerTable, TablePolicy
from peers.trust import Trust, penalize, reward
from peers.wire import (
    ExpertInfo,
    Hello,
    HelloReply,
    NodeCard,
    PeersReply,
    SignedCard,
    WireError,
    card_digest,
    sign_card,
    verify_card,
)

if TYPE_CHECKING:
    from peers.mdns import MdnsService  # imported when mDNS starts: zeroconf is loaded only then

log = logging.getLogger(__name__)

TICK_S = 1.0
EXCHANGE_INTERVAL_S = 10.0
EXCHANGE_LIMIT = 32
MAX_HELLOS_IN_FLIGHT = 16
# Hellos to addresses nobody verified yet may use only these many slots: the rest stay free for
# known peers, so a flood of unresponsive (tarpit) addresses cannot make live peers look dead.
MAX_UNVERIFIED_HELLOS_IN_FLIGHT = 6
MAX_ADDRESSES_PER_CARD = 4  # addresses taken from one peer's card; a card listing more is suspicious anyway
# A peer delivering under a third of the speed it claims is lying, not merely loaded.
SPEED_LIE_FACTOR = 3.0
MIN_TOKENS_FOR_SPEED_CHECK = 8
DIRECT_RETRY_MS = 60_000  # how often a relayed peer's direct addresses are tried again


def stable_digest(card: NodeCard) -> str:
    """Digest of what a card says that matters to peers (not its clock or queue depths), for mDNS TXT."""
    steady = dataclasses.replace(
        card,
        issued_ms=0,
        card_digest="",
        experts=tuple(dataclasses.replace(e, queue_depth=0) for e in card.experts),
    )
    return card_digest(steady)


class CardKeeper(Protocol):
    """What the judge does for the network: the cards our hello carries, and keeping those a peer's carries."""

    def hello_cards(self, expert_id: str) -> Sequence[bytes]: ...
    def claimed_tokens_per_s(self, expert_id: str) -> float | None: ...
    def accept_node_card(self, card: NodeCard) -> Awaitable[None]: ...


class LearningExchange(Protocol):
    """What community learning does for the network: our signed summary, and peers' summaries taken in."""

    def published(self) -> bytes: ...
    def accept(self, node_id: str, data: bytes) -> object: ...


@dataclass(frozen=True)
class RemoteExpert:
    """An expert hosted by an alive peer."""

    info: ExpertInfo
    peer: PeerState


class Network:
    """Owns the peer table and the tasks that keep it current; the only writer of the table."""

    def __init__(
        self,
        settings: Settings,
        identity: NodeIdentity,
        pool: ExpertPool,
        client: PeerClient,
        store: PeerStore,
        *,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._settings = settings
        self._identity = identity
        self._pool = pool
        self._client = client
        self._store = store
        self._clock_ms = clock_ms
        # The judge and community learning need this network to exist, and it needs them: they are
        # attached once built (`attach`), through the typed interfaces below, never patched in.
        self._cards: CardKeeper | None = None
        self._learning: LearningExchange | None = None
        # Attached by the relay module (`attach`): nodes revoked here, whose hellos are refused and experts never used.
        self._refused: Callable[[str], bool] = lambda _node_id: False
        # Attached by the relay module (`attach`): try a hole-punched path to a peer reached through a relay.
        self._punch: Callable[[str], None] = lambda _url: None
        self.trust: dict[str, Trust] = {}
        self.policy = TablePolicy(
            dead_after_ms=int(settings.peer_dead_after_s * 1000),
            hello_interval_ms=int(settings.hello_interval_s * 1000),
        )
        self.table = PeerTable(self_id=identity.node_id)
        # Whom to hello: a bounded neighbour set, the rest known from the directory (node/mesh/neighbours.py).
        self.neighbours = Neighbours(identity.node_id, self.policy)
        self.urls: tuple[str, ...] = ()
        self._tasks: set[asyncio.Task] = set()
        self._in_flight: set[str] = set()
        self._direct_tried_ms: dict[str, int] = {}
        self._unverified_in_flight: set[str] = set()
        self._allow_loopback = is_loopback_host(settings.host)
        self._loop_task: asyncio.Task | None = None
        self._mdns: MdnsService | None = None
        self._db = asyncio.Lock()

    def attach(
        self,
        *,
        cards: CardKeeper | None = None,
        learning: LearningExchange | None = None,
        refused: Callable[[str], bool] | None = None,
        punch: Callable[[str], None] | None = None,
    ) -> None:
        """Connect the judge (cards in hellos, peers' cards kept), community learning (summaries in hellos),
        the relay module's revocations (`refused`) and its hole punching (`punch`, given a relayed URL)."""
        if cards is not None:
            self._cards = cards
        if learning is not None:
            self._learning = learning
        if refused is not None:
            self._refused = refused
        if punch is not None:
            self._punch = punch

    def is_refused(self, node_id: str) -> bool:
        """Whether this node revoked `node_id` (its hellos are refused, its experts never used)."""
        return self._refused(node_id)

    # ---- our own card ---------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self._identity.node_id

    @property
    def identity(self) -> NodeIdentity:
        """This node's key, for modules that sign their own peer requests."""
        return self._identity

    def card(self) -> NodeCard:
        """This node's current card (unsigned)."""
        experts = tuple(
            ExpertInfo(
                expert_id=e.spec.id,
                name=e.spec.name,
                family=e.spec.family,
                params=e.spec.params,
                quantization=e.spec.quantization,
                sha256=e.spec.sha256,
                prompt_style=e.spec.prompt_style,
                n_ctx=e.spec.n_ctx,
                queue_depth=e.queue_depth,
                queue_size=e.capacity - 1,
                tokens_per_s=None if self._cards is None else self._cards.claimed_tokens_per_s(e.spec.id),
                cards=() if self._cards is None else tuple(self._cards.hello_cards(e.spec.id)),
                parallel=e.parallel,
                # Specialists say which base and definition they are, so a peer can fetch and adopt them.
                base_sha256=getattr(e, "base_sha256", ""),
                definition_digest=getattr(e, "definition_digest", ""),
                description=getattr(getattr(e, "definition", None), "description", "")[:300],
            )
            for e in self._pool
        )
        return NodeCard(
            node_id=self._identity.node_id,
            public_key=self._identity.public_key_raw,
            addresses=self.urls,
            experts=experts,
            issued_ms=self._clock_ms(),
        )

    def signed_card(self) -> SignedCard:
        """This node's current card, signed."""
        return sign_card(self.card(), self._identity)

    # ---- lifecycle --------------------------------------------------------------------

    async def start(self, urls: Sequence[str]) -> None:
        """Go live at `urls`: load remembered peers, add bootstrap peers, start mDNS and the hello loop."""
        self.urls = tuple(urls)
        now = self._clock_ms()
        remembered = await asyncio.get_running_loop().run_in_executor(None, self._store.load)
        for peer in remembered:
            url = peer.url if peer.source == "bootstrap" else self.dialable(peer.url)
            if url is not None:
                self._apply(peer_table.AddressLearned(url, _source(peer.source), now, peer.node_id))
        for url in self._settings.peers:
            self._apply(peer_table.AddressLearned(url.rstrip("/"), "bootstrap", now))
        if self._settings.mdns:
            await self._start_mdns()
        self._loop_task = asyncio.create_task(self._run(), name="peer-loop")
        log.info(
            "network: %d bootstrap peers, %d remembered, mDNS %s",
            len(self._settings.peers),
            len(remembered),
            "on" if self._settings.mdns else "off",
        )

    async def close(self) -> None:
        """Say goodbye on mDNS and stop every task."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *( [self._loop_task] if self._loop_task else []), return_exceptions=True)
        if self._mdns is not None:
            await self._mdns.close()

    async def _start_mdns(self) -> None:
        from urllib.parse import urlsplit

        from peers.mdns import Advertisement, MdnsService

        first = urlsplit(self.urls[0]) if self.urls else None
        advertisement = Advertisement(
            node_id=self._identity.node_id,
            port=first.port if first and first.port else self._settings.port,
            addresses=[host for u in self.urls if (host := urlsplit(u).hostname)],
            card_digest=stable_digest(self.card()),
        )
        # A node that only listens on loopback has nothing to offer the LAN: it announces itself on loopback only.
        interfaces = list(self._settings.mdns_interfaces) or (
            ["127.0.0.1"] if is_loopback_host(self._settings.host) else "all"
        )
        self._mdns = MdnsService(advertisement, self._on_mdns_event, interfaces=interfaces)
        await self._mdns.start()

    # ---- events -----------------------------------------------------------------------

    def _apply(self, event: peer_table.PeerEvent) -> None:
        self.table = peer_table.apply(self.table, event, self.policy)

    def _on_mdns_event(self, event) -> None:
        """Turn an mDNS event into table events; a changed card digest triggers a hello at once."""
        from peers.mdns import PeerFound, PeerGone

        now = self._clock_ms()
        if isinstance(event, PeerFound):
            known = self.table.peers.get(NodeId(event.node_id))
            urls = [u for u in (self.dialable(u) for u in event.urls) if u is not None]
            for url in urls:
                self._apply(peer_table.AddressLearned(url, "mdns", now, NodeId(event.node_id)))
            if known is not None and known.card is not None and stable_digest(known.card) != event.card_digest:
                self._hello_soon(known.url)
            elif known is None:
                for url in urls[:1]:
                    self._hello_soon(url)
        elif isinstance(event, PeerGone):
            self._apply(peer_table.ServiceRemoved(NodeId(event.node_id), now))

    def dialable(self, url: str) -> str | None:
        """The origin to dial for a learned address, or None when it must not be dialled (see peers.addresses)."""
        return dialable_origin(url, allow_loopback=self._allow_loopback)

    def on_hello(self, hello: Hello) -> HelloReply:
        """A peer said hello: check its card, learn its addresses (verified by our own hello), answer with ours.

        The capability cards a hello carries are kept only from a peer this node has already
        verified by its own hello: an unverified sender's word is stored nowhere.
        """
        card = verify_card(hello.card)
        now = self._clock_ms()
        if self.is_refused(card.node_id):
            raise Forbidden(f"node {card.node_id} was revoked here")
        if card.node_id != self._identity.node_id:
            known = self.table.peers.get(card.node_id)
            if known is not None and known.card is not None and known.card.public_key == card.public_key and known.verified:
                self.neighbours.heard(card.node_id, now)  # it picked us as a neighbour: alive, though we may not hello it
            if known is not None and known.card is not None and known.card.public_key == card.public_key and self.is_verified_peer(card.node_id):
                # Cards and learning summaries count only from a peer this node's own hello verified.
                self._peer_card(card)
                self._peer_learning(card.node_id, hello.learning)
            urls = [u for u in (self.dialable(a) for a in card.addresses[:MAX_ADDRESSES_PER_CARD]) if u is not None]
            for url in urls:
                if known is None or known.url != url:
                    self._apply(peer_table.AddressLearned(url, "exchange", now, card.node_id))
            if known is None:
                for url in urls[:1]:
                    self._hello_soon(url)
        return HelloReply(card=self.signed_card(), echo_sent_ms=hello.sent_ms, learning=self._published())

    def is_verified_peer(self, node_id: str) -> bool:
        """Whether `node_id` answered this node's own hello recently and is not distrusted."""
        peer = self.table.peers.get(NodeId(node_id))
        return (
            peer is not None
            and self.neighbours.routable(peer, self._clock_ms())
            and not self.trust_of(node_id).distrusted
        )

    def exchange_reply(self, max_peers: int) -> PeersReply:
        """The peers we know to be alive, for peer exchange."""
        limit = min(max_peers, EXCHANGE_LIMIT)
        # A node revoked here is not passed on: its address would only spread the admission we took back.
        listed = peer_table.exchange_list(self.table, self._clock_ms(), self.policy, limit + len(self.table.peers))
        return PeersReply(peers=tuple([p for p in listed if not self.is_refused(p.node_id)][:limit]))

    # ---- queries ----------------------------------------------------------------------

    def alive_peers(self) -> list[PeerState]:
        """Verified peers heard from recently (revoked ones left out)."""
        return [p for p in routable_peers(self.table, self.neighbours, self._clock_ms()) if not self.is_refused(p.node_id)]

    def learn_address(self, url: str) -> None:
        """Add an address to verify, as if configured (an invite's, joined at run time)."""
        self._apply(peer_table.AddressLearned(url, "bootstrap", self._clock_ms()))
        self._hello_soon(url)

    def note_misbehaviour(self, node_id: str, evidence: TrustEvidence | str, detail: str) -> None:
        """Lower a peer's trust for what it did; a distrusted peer's experts are no longer offered."""
        kind = TrustEvidence(evidence)  # an unknown kind is a bug here, not a milder penalty
        before = self.trust.get(node_id, Trust())
        after = penalize(before, kind.value, detail, self._clock_ms())
        self.trust[node_id] = after
        log.warning("peer %s: %s (%s); trust %.2f", node_id, kind.value, detail, after.score)
        if after.distrusted and not before.distrusted:
            log.warning("peer %s is distrusted: its experts are no longer used", node_id)

    def check_speed(self, node_id: str, expert_id: str, claimed: float | None, completion_tokens: int, decode_s: float, *, via: str) -> None:
        """Compare a peer's delivered tokens/s with its card's claim: far below it is a lie, else good service."""
        if claimed and completion_tokens >= MIN_TOKENS_FOR_SPEED_CHECK and decode_s > 0:
            measured = (completion_tokens - 1) / decode_s
            if measured * SPEED_LIE_FACTOR < claimed:
                detail = f"{via}: {expert_id} claims {claimed:.0f} tokens/s, delivered {measured:.1f}"
                self.note_misbehaviour(node_id, TrustEvidence.SPEED_LIE, detail)
                return
        self.note_good_service(node_id)

    def note_good_service(self, node_id: str) -> None:
        """A request served well restores a little trust."""
        self.neighbours.served(node_id, self._clock_ms())
        if node_id in self.trust:
            self.trust[node_id] = reward(self.trust[node_id])

    def trust_of(self, node_id: str) -> Trust:
        """A peer's trust (full for a peer never caught misbehaving)."""
        return self.trust.get(node_id, Trust())

    def remote_experts(self) -> list[RemoteExpert]:
        """Every expert on every alive, trusted peer, nearest peer first (a few directory nodes are probed for next time)."""
        for node_id in self.neighbours.probes(self.table, self._clock_ms(), self.is_refused):
            self._probe(node_id)
        peers = sorted(
            (p for p in self.alive_peers() if not self.trust_of(p.node_id).distrusted),
            key=lambda p: (p.rtt_ms is None, p.rtt_ms or 0.0),
        )
        return [RemoteExpert(info, peer) for peer in peers if peer.card for info in peer.card.experts]

    def hosts_of(self, expert_id: str) -> list[RemoteExpert]:
        """Alive peers hosting `expert_id`, nearest first."""
        return [r for r in self.remote_experts() if r.info.expert_id == expert_id]

    # ---- background work --------------------------------------------------------------

    async def _run(self) -> None:
        last_exchange_s = 0.0
        while True:
            now = self._clock_ms()
            self._apply(peer_table.Tick(now))
            chosen = self.neighbours.chosen(self.table, now, self.is_refused)
            for url, node_id in self.neighbours.addresses_to_learn(self.table, chosen, self.dialable):
                self._apply(peer_table.AddressLearned(url, "exchange", now, node_id))
            due = self.neighbours.filter_due(peer_table.due_for_hello(self.table, now, self.policy), self.table, chosen, now)
            verified_urls = {p.url for p in self.table.peers.values() if p.verified}
            # Known peers first: their slots are reserved, and their liveness is what users see.
            for url in sorted(due, key=lambda u: u not in verified_urls):
                self._hello_soon(url)
            if time.monotonic() - last_exchange_s >= EXCHANGE_INTERVAL_S:
                last_exchange_s = time.monotonic()
                alive = self.alive_peers()
                if alive:
                    self._spawn(self._exchange(random.choice(alive).url))
            await asyncio.sleep(TICK_S)

    def _probe(self, node_id: str) -> None:
        """Hello a node known from the directory now, so it is alive for the next routing decision."""
        peer = self.table.peers.get(NodeId(node_id))
        card = peer.card if peer is not None and peer.card is not None else self.neighbours.cards.get(node_id)
        urls = [peer.url] if peer is not None else [u for u in map(self.dialable, card.addresses[:MAX_ADDRESSES_PER_CARD]) if u] if card else []
        for url in urls[:1]:
            if peer is None:
                self._apply(peer_table.AddressLearned(url, "exchange", self._clock_ms(), NodeId(node_id)))
            self._hello_soon(url)

    def _peer_card(self, card: NodeCard) -> None:
        """Hand a verified peer card to whoever keeps its capability cards."""
        if self._cards is not None and any(e.cards for e in card.experts):
            self._spawn(self._cards.accept_node_card(card))

    def _published(self) -> bytes:
        """This node's signed learning summary for hellos (empty when not sharing)."""
        return b"" if self._learning is None else self._learning.published()

    def _peer_learning(self, node_id: str, data: bytes) -> None:
        """A verified peer's learning summary, for community learning."""
        if self._learning is not None:
            self._learning.accept(node_id, data)

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _hello_soon(self, url: str) -> None:
        if url in self._in_flight or len(self._in_flight) >= MAX_HELLOS_IN_FLIGHT or url in self.urls:
            return
        known = any(p.url == url and p.verified for p in self.table.peers.values())
        if not known:
            if len(self._unverified_in_flight) >= MAX_UNVERIFIED_HELLOS_IN_FLIGHT:
                return
            self._unverified_in_flight.add(url)
        self._in_flight.add(url)
        self._spawn(self._hello(url))

    def _source_of(self, url: str) -> PeerSource:
        pending = self.table.unverified.get(url)
        if pending is not None:
            return pending.source
        for peer in self.table.peers.values():
            if peer.url == url:
                return peer.source
        return "exchange"

    async def _hello(self, url: str) -> None:
        try:
            source = self._source_of(url)
            started_s = time.perf_counter()
            try:
                hello = Hello(card=self.signed_card(), sent_ms=self._clock_ms(), learning=self._published())
                reply = await self._client.hello(url, hello)
                card = verify_card(reply.card)
            except (PeerError, WireError) as exc:
                log.debug("hello to %s failed: %s", url, exc)
                self._apply(peer_table.HelloFailed(url, self._clock_ms()))
                self._try_other_addresses(url)
                return
            rtt_ms = (time.perf_counter() - started_s) * 1000
            now = self._clock_ms()
            was_alive = card.node_id in {p.node_id for p in self.alive_peers()}
            self._apply(peer_table.HelloSucceeded(url, card, rtt_ms, now, source))
            if card.node_id == self._identity.node_id:
                return
            self._try_direct(url, card, now)
            self._peer_card(card)
            self._peer_learning(card.node_id, reply.learning)
            if not was_alive:
                log.info("peer %s at %s (%d experts, rtt %.1f ms)", card.node_id, url, len(card.experts), rtt_ms)
                # A new acquaintance is asked whom it knows, so a network forms in seconds, not exchange rounds.
                self._spawn(self._exchange(url))
            if url in PUNCHED:
                return  # a punched path is a loopback port of this run: the relayed address is what to remember
            remembered = RememberedPeer(url, card.node_id, source, now)
            async with self._db:
                await asyncio.get_running_loop().run_in_executor(None, self._store.remember, remembered)
        finally:
            self._in_flight.discard(url)
            self._unverified_in_flight.discard(url)

    def _try_direct(self, url: str, card: NodeCard, now_ms: int) -> None:
        """Reached through a relay: now and then try the peer's direct addresses, which win when they answer."""
        if not is_relayed(url) or now_ms - self._direct_tried_ms.get(card.node_id, -DIRECT_RETRY_MS) < DIRECT_RETRY_MS:
            return
        self._direct_tried_ms[card.node_id] = now_ms
        self._punch(url)
        for other in card.addresses[:MAX_ADDRESSES_PER_CARD]:
            target = self.dialable(other)
            if target is not None and not is_relayed(target):
                self._hello_soon(target)

    def _try_other_addresses(self, url: str) -> None:
        """A peer stopped answering at `url`: hello the other addresses its card lists (another relay, say)."""
        peer = next((p for p in self.table.peers.values() if p.url == url), None)
        if peer is not None and peer.card is not None:
            for other in peer.card.addresses[:MAX_ADDRESSES_PER_CARD]:
                target = self.dialable(other)
                if target is not None and target != url:
                    self._hello_soon(target)

    async def _exchange(self, url: str) -> None:
        peer = next((p for p in self.table.peers.values() if p.url == url), None)
        expected = peer.card.public_key if peer is not None and peer.card is not None else None
        try:
            reply = await self._client.peers(url, EXCHANGE_LIMIT, expected_key=expected)
        except PeerError as exc:
            log.debug("peer exchange with %s failed: %s", url, exc)
            return
        now = self._clock_ms()
        known_urls = {p.url for p in self.table.peers.values()}
        for address in reply.peers[:EXCHANGE_LIMIT]:
            origin = self.dialable(address.url)
            if origin is None or address.node_id == self._identity.node_id or origin in known_urls:
                continue
            # A gossiped address is only used after our own hello verifies it.
            self._apply(peer_table.AddressLearned(origin, "exchange", now, address.node_id))


def _source(value: str) -> PeerSource:
    return value if value in ("mdns", "bootstrap", "exchange") else "exchange"  # type: ignore[return-value]
