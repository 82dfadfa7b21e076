"""A node revoked here is not passed on in peer exchange, even while it is still alive in the table."""

from __future__ import annotations

from pathlib import Path

from tests.nodes import fake_expert, start_live_node, wait_until


async def test_peer_exchange_leaves_out_a_revoked_node(tmp_path: Path) -> None:
    hub = await start_live_node(tmp_path / "hub", [fake_expert("hub", "4" * 64)])
    a = await start_live_node(tmp_path / "a", [fake_expert("a", "5" * 64)], peers=(hub.url,))
    b = await start_live_node(tmp_path / "b", [fake_expert("b", "6" * 64)], peers=(hub.url,))
    try:
        alive = lambda: {p.node_id for p in hub.network.alive_peers()}  # noqa: E731
        await wait_until(lambda: {a.node_id, b.node_id} <= alive(), what="the hub to verify A and B")
        assert {p.node_id for p in hub.network.exchange_reply(32).peers} >= {a.node_id, b.node_id}
        hub.network.attach(refused=lambda node_id: node_id == a.node_id)  # what `expertmesh revoke A` sets
        listed = {p.node_id for p in hub.network.exchange_reply(32).peers}
        assert b.node_id in listed and a.node_id not in listed, listed
    finally:
        for node in (b, a, hub):
            await node.stop()
