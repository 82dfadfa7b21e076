"""Real nodes on loopback: two "home" nodes that advertise no reachable address join a public relay by invite.

The netns test (tests/test_relay_netns.py) does the same behind real NAT; this one needs no root.
A home node here advertises a dead direct address (port 9), as a node behind NAT would, so the
only way to it is its tunnel.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.nodes import GEMMA3_ID, RunningNode, start_node, wait_for

pytestmark = pytest.mark.model

WAIT_S = 60.0

DEAD_AFTER_S = 4.0
ROOT = Path(__file__).resolve().parents[1]
FAST = ("--hello-interval-s", "1", "--peer-dead-after-s", str(DEAD_AFTER_S), "--threads", "1")


def _invite(relay: RunningNode, *extra: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "node", "invite", "--node", relay.url, *extra], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _peer(node: RunningNode, peer_id: str) -> dict | None:
    data = httpx.get(node.url + "/v1/peers", timeout=10).json()["data"]
    return next((p for p in data if p["id"] == peer_id), None)


def test_a_home_node_is_reached_through_the_relay_and_revoked_there(tmp_path: Path) -> None:
    nodes: list[RunningNode] = []
    try:
        relay = start_node(tmp_path / "p", "--model", "smollm2-135m", "--offer-relay", *FAST)
        nodes.append(relay)
        a = start_node(tmp_path / "a", "--model", "gemma3-270m", "--join", _invite(relay),
                       "--advertise-url", "http://127.0.0.1:9", *FAST)
        nodes.append(a)
        b = start_node(tmp_path / "b", "--model", "smollm2-135m", "--join", _invite(relay),
                       "--advertise-url", "http://127.0.0.1:9", *FAST)
        nodes.append(b)
        seen = wait_for(lambda: (p := _peer(b, a.node_id)) and p["alive"] and p, "B to reach A", timeout_s=WAIT_S)
        assert seen["reach"] == {"kind": "relayed", "via": relay.node_id, "via_url": relay.url}, seen
        assert seen["url"] == f"{relay.url}/peer/v1/relay/{a.node_id}"

        chunks: list[str] = []
        provenance: dict[str, Any] = {}
        body = {"model": GEMMA3_ID, "messages": [{"role": "user", "content": "The capital of France is"}],
                "max_tokens": 8, "temperature": 0, "stream": True}
        with httpx.stream("POST", b.url + "/v1/chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    import json

                    chunk = json.loads(line[6:])
                    provenance = chunk.get("expertmesh", provenance)
                    chunks += [c["delta"].get("content") for c in chunk["choices"] if c["delta"].get("content")]
        assert provenance["node"] == a.node_id and len(chunks) >= 2

        auto = httpx.post(b.url + "/v1/chat/completions", timeout=120, json={
            "model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "expertmesh": {"approved": [a.node_id]},
        }).json()
        assert auto["expertmesh"]["node"] == a.node_id

        # A node joins at run time (the page's way), gets a tunnel, but is reachable directly too: used directly.
        c = start_node(tmp_path / "c", "--model", "smollm2-135m", *FAST)
        nodes.append(c)
        bad = httpx.post(c.url + "/v1/join", json={"invite": "expertmesh-invite:AAAA"}, timeout=30)
        assert bad.status_code == 400 and "malformed" in bad.json()["error"]["message"]
        joined = httpx.post(c.url + "/v1/join", json={"invite": _invite(relay)}, timeout=30).json()
        assert joined == {"joined": relay.node_id, "relayed": True}
        wait_for(lambda: c.node_id in httpx.get(relay.url + "/v1/admissions", timeout=10).json()["tunnels"], "C's tunnel", timeout_s=WAIT_S)
        direct = wait_for(lambda: (p := _peer(b, c.node_id)) and p["alive"] and p["reach"]["kind"] == "direct" and p,
                       "B to reach C directly", timeout_s=WAIT_S)
        assert direct["url"] == c.url

        cli = subprocess.run([sys.executable, "-m", "node", "peers", "--node", b.url], capture_output=True, text=True, timeout=30)
        assert f"relayed via {relay.node_id}" in cli.stdout, cli.stdout

        # Revoked at the relay: the tunnel goes, and with it the only way to A; a restart does not undo it.
        revoke = subprocess.run([sys.executable, "-m", "node", "revoke", a.node_id, "--node", relay.url],
                                capture_output=True, text=True, timeout=30)
        assert revoke.returncode == 0, revoke.stderr
        wait_for(lambda: (p := _peer(b, a.node_id)) is not None and not p["alive"], "A to become unreachable",
              timeout_s=DEAD_AFTER_S + 15)
        admissions = httpx.get(relay.url + "/v1/admissions", timeout=10).json()
        assert a.node_id not in admissions["tunnels"] and b.node_id in admissions["tunnels"]
        assert next(x for x in admissions["data"] if x["id"] == a.node_id)["revoked_ms"] is not None
        # The relay itself no longer counts A as a peer (its hellos are refused there).
        assert not any(p["id"] == a.node_id and p["alive"] for p in httpx.get(relay.url + "/v1/peers", timeout=10).json()["data"])
    finally:
        for node in reversed(nodes):
            node.stop()
