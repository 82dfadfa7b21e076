"""Hole punching between two home nodes, each behind its own NAT, set up through the public node's relay.

The same namespaces as tests/test_relay_netns.py, except that the "internet" namespace routes between
the two home routers (as the internet does). The routers still let nothing new in, so a direct
connection forms only by TCP simultaneous open: both homes send SYNs to each other at once.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodes import (
    GEMMA3_ID,
    HOME,
    NEEDS_NAT_INTERNET,
    NETNS_WAIT_S,
    P1,
    REPO_ROOT,
    NetnsNode,
    netns_ask,
    netns_get,
    netns_invite,
    netns_peer,
    wait_for,
)

pytestmark = [pytest.mark.netns, NEEDS_NAT_INTERNET]

log = logging.getLogger(__name__)
WAN = {"a": "10.201.1.2", "b": "10.201.2.2"}  # the home routers' public addresses

_PUNCH = """
import asyncio, sys
from node.mesh.punch import simultaneous_open
sock = asyncio.run(simultaneous_open(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
if sock is None:
    sys.exit(1)
sock.setblocking(True); sock.sendall(sys.argv[4].encode()); print(sock.recv(64).decode())
"""

_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2); print("connected")
except OSError as exc:
    print("refused", exc); sys.exit(1)
"""


@pytest.fixture()
def routed(internet) -> Iterator[dict[str, str]]:  # noqa: F811 (the fixture imported above)
    """The namespaces, with the internet forwarding between the two home routers."""
    subprocess.run(["ip", "netns", "exec", internet["net"], "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True, timeout=10)
    yield internet


def _python(ns: str, code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)


def test_tcp_simultaneous_open_crosses_both_nats_where_a_plain_connect_does_not(routed) -> None:
    ns = routed
    listen = _python(ns["hb"], "import socket,time;s=socket.socket();s.bind(('0.0.0.0',40010));s.listen();time.sleep(6)")
    time.sleep(0.5)
    blocked = _python(ns["ha"], _CONNECT, WAN["b"], "40010")
    assert blocked.wait(10) == 1, "B's router let a new inbound connection in: nothing to punch through"
    listen.kill()
    started = time.monotonic()
    a = _python(ns["ha"], _PUNCH, "40001", WAN["b"], "40002", "from A")
    b = _python(ns["hb"], _PUNCH, "40002", WAN["a"], "40001", "from B")
    out_a, out_b = a.communicate(timeout=30)[0], b.communicate(timeout=30)[0]
    log.info("punched in %.2f s: A got %r, B got %r", time.monotonic() - started, out_a.strip(), out_b.strip())
    assert a.returncode == 0 and b.returncode == 0, (out_a, out_b)
    assert out_a.strip() == "from B" and out_b.strip() == "from A"


@pytest.mark.model
def test_home_nodes_punch_a_direct_path_and_show_it(routed, tmp_path: Path) -> None:
    ns = routed
    nodes: list[NetnsNode] = []
    try:
        p1 = NetnsNode(ns["net"], P1, tmp_path / "p1", "--model", "smollm2-135m", "--offer-relay")
        nodes.append(p1)
        a = NetnsNode(ns["ha"], HOME["a"], tmp_path / "a", "--model", "gemma3-270m", "--join", netns_invite(ns["net"], p1))
        nodes.append(a)
        b = NetnsNode(ns["hb"], HOME["b"], tmp_path / "b", "--model", "smollm2-135m", "--join", netns_invite(ns["net"], p1))
        nodes.append(b)
        assert netns_get(ns["net"], a.url + "/healthz") is None  # still no inbound path to A's own address
        punched = wait_for(lambda: (p := netns_peer(ns["hb"], b, a.node_id)) and p["alive"] and p["reach"]["kind"] == "hole-punched" and p,
                        "B to reach A over a punched connection", timeout_s=NETNS_WAIT_S)
        assert punched["reach"]["via"] == p1.node_id and punched["rtt_ms"] is not None, punched
        log.info("B reaches A hole-punched (set up via %s), rtt %.1f ms", p1.node_id, punched["rtt_ms"])
        wait_for(lambda: (p := netns_peer(ns["ha"], a, b.node_id)) and p["alive"] and p, "A to verify B", timeout_s=NETNS_WAIT_S)
        text, provenance, chunks = netns_ask(ns["hb"], b, GEMMA3_ID)
        assert provenance["node"] == a.node_id and text.strip() and chunks >= 2
        cli = subprocess.run(["ip", "netns", "exec", ns["hb"], sys.executable, "-m", "node", "peers", "--node", b.url,
                              "--api-key", "relay-netns-key"], capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)
        assert f"hole-punched via {p1.node_id}" in cli.stdout, cli.stdout + cli.stderr
        after = netns_peer(ns["hb"], b, a.node_id)
        assert after and after["reach"]["kind"] == "hole-punched" and after["url"].startswith("http://127.0.0.1:"), after
    finally:
        for node in reversed(nodes):
            node.stop()
