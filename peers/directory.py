"""Directory of node cards spread by gossip over a bounded neighbour set (pure: no sockets, no clock).

Beyond a few hundred nodes, hello-ing every peer every few seconds is O(N) per node. Here a
node keeps hellos to `max_neighbours` peers only, chosen by rendezvous hashing (stable, spread
evenly, not chosen by the peers themselves), and learns about everyone else from a directory:
signed cards passed on by push-pull rumour mongering (Demers et al., 1987). A card is "hot"
after it arrives with news; each gossip exchange carries at most `max_cards_per_message` hot
cards, and a node stops pushing a card once `stop_after` partners already knew it. Per-node
messages are fixed by the policy, independent of N; a new card reaches everyone in O(log N)
rounds. Every `anti_entropy_every` rounds a node also compares a digest of its directory with
one neighbour and pulls what it missed, so news the rumours missed still arrives.
Cards are opaque here: `verify` (passed in) checks a card's signature before it counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DirectoryPolicy:
    """Sizes and rhythms of the directory."""

    max_neighbours: int = 8
    gossip_interval_ms: int = 2_000
    hello_interval_ms: int = 5_000
    max_cards_per_message: int = 16
    stop_after: int = 4  # partners that already knew a hot card before we stop pushing it
    max_pushes: int = 24  # a card is pushed at most this often, so news never piles up
    # Rumours can die out before reaching a few nodes; a periodic digest comparison with one
    # neighbour (anti-entropy) repairs that, sending versions and cards only when digests differ.
    anti_entropy_every: int = 15  # gossip rounds
    max_entries: int = 100_000


@dataclass(frozen=True)
class Entry:
    """One node's latest verified card."""

    node_id: str
    version: int  # the card's issued_ms: a newer card replaces an older one
    card: Any


@dataclass(frozen=True)
class Directory:
    """A node's directory: the newest card of every node it has heard of, and which are still news.

    `hot` maps the node id of each card still worth pushing to (partners that already knew it, pushes).
    """

    self_id: str
    entries: Mapping[str, Entry] = field(default_factory=dict)
    hot: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    summary: int = 0  # XOR of every entry's hash, kept up to date: the digest anti-entropy compares


def _entry_hash(node_id: str, version: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{node_id}:{version}".encode()).digest()[:16], "big")


def make_directory(self_id: str, entries: Mapping[str, Entry]) -> Directory:
    """A directory holding `entries` (none of them news)."""
    summary = 0
    for entry in entries.values():
        summary ^= _entry_hash(entry.node_id, entry.version)
    return Directory(self_id, dict(entries), {}, summary)


def _swap(summary: int, old: Entry | None, new: Entry) -> int:
    """The summary after `new` replaces `old`."""
    if old is not None:
        summary ^= _entry_hash(old.node_id, old.version)
    return summary ^ _entry_hash(new.node_id, new.version)


@dataclass(frozen=True)
class CardNews:
    """A card as gossip carries it."""

    node_id: str
    version: int
    card: Any


def rendezvous_neighbours(self_id: str, candidates: list[str], k: int) -> list[str]:
    """The `k` candidates with the highest hash of (self, candidate): stable, even, hard to steer."""
    def score(other: str) -> bytes:
        return hashlib.sha256(f"{self_id}|{other}".encode()).digest()

    return sorted((c for c in candidates if c != self_id), key=score, reverse=True)[:k]


def neighbours(directory: Directory, policy: DirectoryPolicy) -> list[str]:
    """This node's bounded neighbour set, from the nodes its directory knows."""
    return rendezvous_neighbours(directory.self_id, list(directory.entries), policy.max_neighbours)


def learn(
    directory: Directory, news: CardNews, policy: DirectoryPolicy, verify: Callable[[CardNews], bool]
) -> tuple[Directory, bool]:
    """Take a card if it is newer than ours and verifies; (directory, whether it was news)."""
    current = directory.entries.get(news.node_id)
    if current is not None and current.version >= news.version:
        return directory, False
    if current is None and len(directory.entries) >= policy.max_entries:
        return directory, False
    if not verify(news):  # checked only when it would change something: a replayed card costs nothing
        return directory, False
    entry = Entry(news.node_id, news.version, news.card)
    entries = {**directory.entries, news.node_id: entry}
    summary = _swap(directory.summary, current, entry)
    return dataclasses.replace(directory, entries=entries, hot={**directory.hot, news.node_id: (0, 0)}, summary=summary), True


def issue(directory: Directory, version: int, card: Any) -> Directory:
    """This node re-issued its own card: news to push from now on."""
    entry = Entry(directory.self_id, version, card)
    return dataclasses.replace(
        directory,
        entries={**directory.entries, directory.self_id: entry},
        hot={**directory.hot, directory.self_id: (0, 0)},
        summary=_swap(directory.summary, directory.entries.get(directory.self_id), entry),
    )


def outgoing(directory: Directory, policy: DirectoryPolicy) -> list[CardNews]:
    """The hot cards to push in one message, least pushed first, at most `max_cards_per_message`."""
    order = sorted(directory.hot.items(), key=lambda item: (item[1][1], item[0]))[: policy.max_cards_per_message]
    return [CardNews(n, (e := directory.entries[n]).version, e.card) for n, _ in order]


def receive(
    directory: Directory, cards: list[CardNews], policy: DirectoryPolicy, verify: Callable[[CardNews], bool]
) -> tuple[Directory, list[str]]:
    """Merge a partner's cards; (directory, ids of the cards we already had: the partner's feedback)."""
    known: list[str] = []
    entries: dict[str, Entry] | None = None
    hot: dict[str, tuple[int, int]] | None = None
    summary = directory.summary
    for news in cards[: policy.max_cards_per_message]:
        current = (entries or directory.entries).get(news.node_id)
        if current is not None and current.version >= news.version:
            known.append(news.node_id)
            continue
        if current is None and len(entries or directory.entries) >= policy.max_entries:
            continue
        if not verify(news):
            continue
        # One copy per message, however many cards in it are news.
        entries = entries if entries is not None else dict(directory.entries)
        hot = hot if hot is not None else dict(directory.hot)
        entry = Entry(news.node_id, news.version, news.card)
        summary = _swap(summary, current, entry)
        entries[news.node_id] = entry
        hot[news.node_id] = (0, 0)
    if entries is None or hot is None:  # both are copied together, at the first news
        return directory, known
    return dataclasses.replace(directory, entries=entries, hot=hot, summary=summary), known


def feedback(directory: Directory, sent: list[CardNews], already_known: list[str], policy: DirectoryPolicy) -> Directory:
    """After a push: every push, and each partner that already had the card, count toward going cold."""
    if not sent:
        return directory
    hot = dict(directory.hot)
    known = set(already_known)
    for news in sent:
        entry = directory.entries.get(news.node_id)
        if news.node_id not in hot or entry is None or entry.version != news.version:
            continue
        known_by, pushes = hot[news.node_id]
        known_by, pushes = known_by + (news.node_id in known), pushes + 1
        if known_by >= policy.stop_after or pushes >= policy.max_pushes:
            del hot[news.node_id]
        else:
            hot[news.node_id] = (known_by, pushes)
    return dataclasses.replace(directory, hot=hot)


def pick_partner(directory: Directory, policy: DirectoryPolicy, rng: random.Random) -> str | None:
    """The neighbour to gossip with this round."""
    chosen = neighbours(directory, policy)
    return rng.choice(chosen) if chosen else None


def directory_digest(directory: Directory) -> bytes:
    """A digest of which card version this node holds for every node: equal digests, nothing to repair."""
    return directory.summary.to_bytes(16, "big")


def versions(directory: Directory) -> dict[str, int]:
    """The version this node holds of every card (sent when digests differ)."""
    return {n: e.version for n, e in directory.entries.items()}


def newer_than(directory: Directory, theirs: Mapping[str, int], policy: DirectoryPolicy) -> list[CardNews]:
    """Cards we hold that are newer than a partner's (or that it lacks), newest first, at most one message's worth."""
    newer = [e for n, e in directory.entries.items() if theirs.get(n, -1) < e.version]
    newer.sort(key=lambda e: (-e.version, e.node_id))
    return [CardNews(e.node_id, e.version, e.card) for e in newer[: policy.max_cards_per_message]]


def hello_set(
    self_id: str,
    candidates: list[str],
    max_neighbours: int,
    *,
    active: Sequence[str] = (),
    max_active: int = 8,
    bootstrap: Sequence[str] = (),
    alive_count: int | None = None,
) -> set[str]:
    """The nodes a node hellos: `max_neighbours` by rendezvous, plus up to `max_active` it talks to for routing.

    `candidates` are the nodes it could pick (known and not failing); `bootstrap` nodes (configured
    or found on the LAN) are helloed as well only while fewer than `max_neighbours` peers are alive,
    so one public node everybody joins through is not helloed by the whole network for ever.
    """
    chosen = set(rendezvous_neighbours(self_id, candidates, max_neighbours))
    chosen.update(list(active)[:max_active])
    if alive_count is not None and alive_count < max_neighbours:
        chosen.update(bootstrap)
    chosen.discard(self_id)
    return chosen
