"""The gossip directory (pure): newer verified cards win, forged ones never count, news reaches everyone."""

from __future__ import annotations

import random

import pytest

from peers.directory import (
    CardNews,
    Directory,
    DirectoryPolicy,
    Entry,
    directory_digest,
    feedback,
    issue,
    learn,
    make_directory,
    neighbours,
    newer_than,
    outgoing,
    receive,
    rendezvous_neighbours,
    versions,
)

POLICY = DirectoryPolicy(max_neighbours=4)


def _verify(news: CardNews) -> bool:
    return news.card == f"signed:{news.node_id}:{news.version}"


def _news(node_id: str, version: int, card: str | None = None) -> CardNews:
    return CardNews(node_id, version, card if card is not None else f"signed:{node_id}:{version}")


def test_a_newer_verified_card_replaces_an_older_one_and_a_forged_one_never_counts() -> None:
    d = Directory("me")
    d, fresh = learn(d, _news("a", 1), POLICY, _verify)
    assert fresh and d.entries["a"].version == 1 and "a" in d.hot
    d2, fresh = learn(d, _news("a", 1), POLICY, _verify)
    assert not fresh and d2 is d  # a replay costs nothing, not even a verification
    d3, fresh = learn(d, _news("a", 5, card="forged"), POLICY, _verify)
    assert not fresh and d3.entries["a"].version == 1
    d4, fresh = learn(d, _news("a", 2), POLICY, _verify)
    assert fresh and d4.entries["a"].version == 2


def test_a_hot_card_goes_cold_after_enough_partners_knew_it() -> None:
    d = issue(Directory("me"), 7, "signed:me:7")
    for _ in range(POLICY.stop_after):
        sent = outgoing(d, POLICY)
        assert [n.node_id for n in sent] == ["me"]
        d = feedback(d, sent, ["me"], POLICY)
    assert outgoing(d, POLICY) == []


def test_neighbour_sets_are_bounded_and_stable() -> None:
    ids = [f"n{i}" for i in range(50)]
    chosen = rendezvous_neighbours("n0", ids, 4)
    assert len(chosen) == 4 and "n0" not in chosen
    assert chosen == rendezvous_neighbours("n0", list(reversed(ids)), 4)
    directory = Directory("n0", {i: None for i in ids})  # type: ignore[misc]
    assert neighbours(directory, POLICY) == chosen


@pytest.mark.parametrize("seed", range(10))  # every seed in a range: seed 3 alone hid that rumours may miss a node
def test_news_reaches_every_node_of_a_small_network_and_forgeries_reach_none(seed: int) -> None:
    rng = random.Random(seed)
    ids = [f"n{i}" for i in range(60)]
    base = {i: _news(i, 1) for i in ids}
    dirs = {}
    for i in ids:
        d = Directory(i)
        d, _ = receive(d, [], POLICY, _verify)
        for news in base.values():
            d, _ = learn(d, news, POLICY, _verify)
        dirs[i] = make_directory(i, d.entries)  # converged and quiet
    dirs["n5"] = issue(dirs["n5"], 2, "signed:n5:2")
    # A liar pushes a forged newer card of n9 in every message it sends.
    forged = _news("n9", 99, card="forged")
    for _ in range(15):  # rumours die out within about six rounds
        for i in ids:
            partner = rng.choice(neighbours(dirs[i], POLICY))
            push = outgoing(dirs[i], POLICY) + ([forged] if i == "n1" else [])
            pull = outgoing(dirs[partner], POLICY)
            dirs[partner], known_p = receive(dirs[partner], push, POLICY, _verify)
            dirs[i], known_i = receive(dirs[i], pull, POLICY, _verify)
            dirs[i] = feedback(dirs[i], push, known_p, POLICY)
            dirs[partner] = feedback(dirs[partner], pull, known_i, POLICY)
    assert all(d.entries["n9"].version == 1 for d in dirs.values())
    # Rumour mongering is probabilistic: it may die out one node short (seeds 4 and 7 here) ...
    assert sum(d.entries["n5"].version == 2 for d in dirs.values()) >= len(ids) - 1
    # ... which one anti-entropy pull from a neighbour repairs.
    for i in ids:
        partner = neighbours(dirs[i], POLICY)[0]
        dirs[i], _ = receive(dirs[i], newer_than(dirs[partner], versions(dirs[i]), POLICY), POLICY, _verify)
    assert all(d.entries["n5"].version == 2 for d in dirs.values())
    assert len({d.summary for d in dirs.values()}) == 1  # every digest agrees once news has spread
    assert all(d.entries["n9"].version == 1 for d in dirs.values())


def test_anti_entropy_repairs_what_rumours_missed() -> None:
    a = make_directory("a", {"x": Entry("x", 1, "signed:x:1"), "y": Entry("y", 3, "signed:y:3")})
    b = make_directory("b", {"x": Entry("x", 2, "signed:x:2")})
    assert directory_digest(a) != directory_digest(b)
    a, _ = receive(a, newer_than(b, versions(a), POLICY), POLICY, _verify)
    b, _ = receive(b, newer_than(a, versions(b), POLICY), POLICY, _verify)
    assert directory_digest(a) == directory_digest(b)
    assert a.entries["x"].version == 2 and b.entries["y"].version == 3
