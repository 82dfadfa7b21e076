"""Home nodes behind NAT reach each other through public relays (network namespaces, iptables MASQUERADE).

Topology (all made here, torn down after):

    home A 192.168.10.2 -- router A (NAT) 10.201.1.2 --\\
                                                         net: relay P1 at 10.201.1.1, relay P2 at 10.201.2.1
    home B 192.168.20.2 -- router B (NAT) 10.201.2.2 --/

The routers masquerade outbound traffic and drop every new inbound connection: nobody outside
can open a connection to A or B. A and B join both relays with invites; a user of B asks for A's
expert (by id, and with `auto`); the answer streams through a relay; killing that relay hands
over to the other within the dead-peer time; killing both leaves A unreachable.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from tests.nodes import (
    GEMMA3_ID,
    HOME,
    NEEDS_NAT_INTERNET,
    NETNS_DEAD_AFTER_S,
    NETNS_WAIT_S,
    P1,
    P2,
    NetnsNode,
    netns_ask,
    netns_get,
    netns_invite,
    netns_peer,
    wait_for,
)

pytestmark = [pytest.mark.netns, pytest.mark.model, NEEDS_NAT_INTERNET]

log = logging.getLogger(__name__)

def test_home_nodes_behind_nat_reach_each_other_through_relays(internet, tmp_path: Path) -> None:
    ns = internet
    nodes: list[NetnsNode] = []
    try:
        p1 = NetnsNode(ns["net"], P1, tmp_path / "p1", "--model", "smollm2-135m", "--offer-relay")
        nodes.append(p1)
        p2 = NetnsNode(ns["net"], P2, tmp_path / "p2", "--model", "smollm2-135m", "--offer-relay")
        nodes.append(p2)
        a = NetnsNode(ns["ha"], HOME["a"], tmp_path / "a", "--model", "gemma3-270m",
                 "--join", netns_invite(ns["net"], p1), "--join", netns_invite(ns["net"], p2))
        nodes.append(a)
        b = NetnsNode(ns["hb"], HOME["b"], tmp_path / "b", "--model", "smollm2-135m",
                 "--join", netns_invite(ns["net"], p1), "--join", netns_invite(ns["net"], p2))
        nodes.append(b)
        # No inbound path: from the public side A's own address cannot even be reached, while A reaches out.
        assert netns_get(ns["net"], a.url + "/healthz") is None
        assert netns_get(ns["ha"], p1.url + "/healthz") is not None

        seen = wait_for(lambda: (p := netns_peer(ns["hb"], b, a.node_id)) and p["alive"] and p["reach"]["kind"] == "relayed" and p,
                     "B to reach A through a relay", timeout_s=NETNS_WAIT_S)
        via = seen["reach"]["via"]
        assert via in (p1.node_id, p2.node_id), seen
        # A generates only for peers its own hello verified (README: Trust): it reaches B through B's relay too.
        wait_for(lambda: (p := netns_peer(ns["ha"], a, b.node_id)) and p["alive"] and p, "A to verify B through a relay", timeout_s=NETNS_WAIT_S)

        text, provenance, chunks = netns_ask(ns["hb"], b, GEMMA3_ID)
        assert provenance["node"] == a.node_id and provenance["expert"] == GEMMA3_ID and text.strip()
        assert chunks >= 2, "the answer should arrive as a stream of chunks"
        text, provenance, _ = netns_ask(ns["hb"], b, "auto", {"approved": [a.node_id]})
        assert provenance["node"] == a.node_id and text.strip()

        # Kill the relay B uses: the other relay takes over before A is declared dead.
        used, other = (p1, p2) if via == p1.node_id else (p2, p1)
        used.process.kill()
        killed_at = time.monotonic()
        moved = wait_for(
            lambda: (p := netns_peer(ns["hb"], b, a.node_id)) and p["alive"] and p["reach"]["via"] == other.node_id and p,
            "the second relay to take over", timeout_s=NETNS_DEAD_AFTER_S + 10,
        )
        took_s = time.monotonic() - killed_at
        log.info("relay %s killed: B reaches A via %s after %.1f s (dead-peer time %.0f s)", used.node_id,
                 other.node_id, took_s, NETNS_DEAD_AFTER_S)
        assert took_s <= NETNS_DEAD_AFTER_S, f"handover took {took_s:.1f} s, over the dead-peer time {NETNS_DEAD_AFTER_S} s"
        assert moved["reach"]["kind"] == "relayed"
        text, provenance, _ = netns_ask(ns["hb"], b, GEMMA3_ID)
        assert provenance["node"] == a.node_id and text.strip()

        # With no relay left, A cannot be reached at all.
        other.process.kill()
        killed_at = time.monotonic()
        wait_for(lambda: (p := netns_peer(ns["hb"], b, a.node_id)) is not None and not p["alive"], "A to become unreachable",
              timeout_s=NETNS_DEAD_AFTER_S + 15)
        log.info("both relays killed: A unreachable from B after %.1f s", time.monotonic() - killed_at)
    finally:
        for node in reversed(nodes):
            node.stop()
