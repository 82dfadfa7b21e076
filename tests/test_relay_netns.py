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

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodes import GEMMA3_ID, SAFE_KERNELS_ENV, safe_cpu_kernels, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.model,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None,
        reason="needs root, iproute2 and iptables to build the namespaces and the NAT routers",
    ),
]

log = logging.getLogger(__name__)

API_KEY = "relay-netns-key"
PORT = 8470
DEAD_AFTER_S = 4.0
P1, P2 = "10.201.1.1", "10.201.2.1"
HOME = {"a": "192.168.10.2", "b": "192.168.20.2"}
WAIT_S = 60.0
ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=10)


@pytest.fixture()
def internet() -> Iterator[dict[str, str]]:
    """The namespaces: net (public), routers ra and rb (NAT), homes ha and hb."""
    tag = uuid.uuid4().hex[:5]
    ns = {k: f"em{k}{tag}" for k in ("net", "ra", "rb", "ha", "hb")}
    try:
        for name in ns.values():
            _run("ip", "netns", "add", name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
        for side, wan_net, wan_router, lan_router, lan_home in (
            ("a", P1, "10.201.1.2", "192.168.10.1", HOME["a"]),
            ("b", P2, "10.201.2.2", "192.168.20.1", HOME["b"]),
        ):
            router, home = ns[f"r{side}"], ns[f"h{side}"]
            wan_a, wan_b, lan_a, lan_b = f"w{side}{tag}n", f"w{side}{tag}r", f"l{side}{tag}r", f"l{side}{tag}h"
            _run("ip", "link", "add", wan_a, "type", "veth", "peer", "name", wan_b)
            _run("ip", "link", "set", wan_a, "netns", ns["net"])
            _run("ip", "link", "set", wan_b, "netns", router)
            _run("ip", "link", "add", lan_a, "type", "veth", "peer", "name", lan_b)
            _run("ip", "link", "set", lan_a, "netns", router)
            _run("ip", "link", "set", lan_b, "netns", home)
            for name, dev, address in (
                (ns["net"], wan_a, f"{wan_net}/30"), (router, wan_b, f"{wan_router}/30"),
                (router, lan_a, f"{lan_router}/24"), (home, lan_b, f"{lan_home}/24"),
            ):
                _run("ip", "-n", name, "addr", "add", address, "dev", dev)
                _run("ip", "-n", name, "link", "set", dev, "up")
            _run("ip", "-n", router, "route", "add", "default", "via", wan_net)
            _run("ip", "-n", home, "route", "add", "default", "via", lan_router)
            # The home router: masquerade out, answers back in, nothing new in.
            _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            _run("ip", "netns", "exec", router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", wan_b, "-j", "MASQUERADE")
            _run("ip", "netns", "exec", router, "iptables", "-A", "FORWARD", "-i", wan_b, "-m", "conntrack",
                 "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
            _run("ip", "netns", "exec", router, "iptables", "-A", "FORWARD", "-i", wan_b, "-j", "DROP")
            _run("ip", "netns", "exec", router, "iptables", "-A", "INPUT", "-i", wan_b, "-m", "conntrack",
                 "--ctstate", "NEW", "-j", "DROP")
        yield ns
    finally:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


class Node:
    """A node process in a namespace."""

    def __init__(self, ns: str, host: str, data_dir: Path, *args: str) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.ns, self.url, self.data_dir = ns, f"http://{host}:{PORT}", data_dir
        log = open(data_dir / "node.log", "ab")
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "node", "start", "--host", host, "--port", str(PORT),
             "--data-dir", str(data_dir), "--no-mdns", "--no-judge", "--api-key", API_KEY, "--threads", "1",
             "--hello-interval-s", "1", "--peer-dead-after-s", str(DEAD_AFTER_S), *args],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), SAFE_KERNELS_ENV: "true" if safe_cpu_kernels() else "false"},
        )
        log.close()
        deadline = time.monotonic() + 180
        while not (data_dir / "node.json").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((data_dir / "node.log").read_text()[-3000:])
            time.sleep(0.2)
        self.node_id = json.loads((data_dir / "node.json").read_text())["node_id"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _in(ns: str, code: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """Run Python inside a namespace (only there is the node's address routable)."""
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout_s, cwd=ROOT)


def _get(ns: str, url: str) -> dict | None:
    code = (
        "import json, urllib.request\n"
        f"r = urllib.request.Request({url!r}, headers={{'Authorization': 'Bearer {API_KEY}'}})\n"
        "print(json.dumps(json.load(urllib.request.urlopen(r, timeout=5))))\n"
    )
    result = _in(ns, code, 20)
    return json.loads(result.stdout) if result.returncode == 0 else None


def _peer(ns: str, node: Node, peer_id: str) -> dict | None:
    peers = _get(ns, node.url + "/v1/peers")
    return next((p for p in (peers or {}).get("data", []) if p["id"] == peer_id), None)


def _ask(ns: str, node: Node, model: str, extra: dict | None = None) -> tuple[str, dict, int]:
    """Stream a chat completion from inside `ns`: (text, provenance, number of content chunks)."""
    body = {"model": model, "messages": [{"role": "user", "content": "The capital of France is"}],
            "max_tokens": 8, "temperature": 0, "stream": True, **({"expertmesh": extra} if extra else {})}
    code = (
        "import json, urllib.request\n"
        f"r = urllib.request.Request({node.url + '/v1/chat/completions'!r}, data={json.dumps(body).encode()!r},\n"
        f"    headers={{'Authorization': 'Bearer {API_KEY}', 'Content-Type': 'application/json'}})\n"
        "text, prov, chunks = '', {}, 0\n"
        "for line in urllib.request.urlopen(r, timeout=120):\n"
        "    line = line.decode().strip()\n"
        "    if not line.startswith('data: ') or line == 'data: [DONE]': continue\n"
        "    c = json.loads(line[6:])\n"
        "    assert 'error' not in c, c\n"
        "    prov = c.get('expertmesh', prov)\n"
        "    for ch in c.get('choices', []):\n"
        "        piece = ch.get('delta', {}).get('content') or ''\n"
        "        text += piece; chunks += bool(piece)\n"
        "print(json.dumps([text, prov, chunks]))\n"
    )
    result = _in(ns, code)
    assert result.returncode == 0, result.stderr[-2000:]
    text, provenance, chunks = json.loads(result.stdout)
    return text, provenance, chunks


def _invite(ns: str, relay: Node) -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "node", "invite", "--node", relay.url, "--api-key", API_KEY],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_home_nodes_behind_nat_reach_each_other_through_relays(internet, tmp_path: Path) -> None:
    ns = internet
    nodes: list[Node] = []
    try:
        p1 = Node(ns["net"], P1, tmp_path / "p1", "--model", "smollm2-135m", "--offer-relay")
        nodes.append(p1)
        p2 = Node(ns["net"], P2, tmp_path / "p2", "--model", "smollm2-135m", "--offer-relay")
        nodes.append(p2)
        a = Node(ns["ha"], HOME["a"], tmp_path / "a", "--model", "gemma3-270m",
                 "--join", _invite(ns["net"], p1), "--join", _invite(ns["net"], p2))
        nodes.append(a)
        b = Node(ns["hb"], HOME["b"], tmp_path / "b", "--model", "smollm2-135m",
                 "--join", _invite(ns["net"], p1), "--join", _invite(ns["net"], p2))
        nodes.append(b)
        # No inbound path: from the public side A's own address cannot even be reached, while A reaches out.
        assert _get(ns["net"], a.url + "/healthz") is None
        assert _get(ns["ha"], p1.url + "/healthz") is not None

        seen = wait_for(lambda: (p := _peer(ns["hb"], b, a.node_id)) and p["alive"] and p["reach"]["kind"] == "relayed" and p,
                     "B to reach A through a relay", timeout_s=WAIT_S)
        via = seen["reach"]["via"]
        assert via in (p1.node_id, p2.node_id), seen
        # A generates only for peers its own hello verified (README: Trust): it reaches B through B's relay too.
        wait_for(lambda: (p := _peer(ns["ha"], a, b.node_id)) and p["alive"] and p, "A to verify B through a relay", timeout_s=WAIT_S)

        text, provenance, chunks = _ask(ns["hb"], b, GEMMA3_ID)
        assert provenance["node"] == a.node_id and provenance["expert"] == GEMMA3_ID and text.strip()
        assert chunks >= 2, "the answer should arrive as a stream of chunks"
        text, provenance, _ = _ask(ns["hb"], b, "auto", {"approved": [a.node_id]})
        assert provenance["node"] == a.node_id and text.strip()

        # Kill the relay B uses: the other relay takes over before A is declared dead.
        used, other = (p1, p2) if via == p1.node_id else (p2, p1)
        used.process.kill()
        killed_at = time.monotonic()
        moved = wait_for(
            lambda: (p := _peer(ns["hb"], b, a.node_id)) and p["alive"] and p["reach"]["via"] == other.node_id and p,
            "the second relay to take over", timeout_s=DEAD_AFTER_S + 10,
        )
        took_s = time.monotonic() - killed_at
        log.info("relay %s killed: B reaches A via %s after %.1f s (dead-peer time %.0f s)", used.node_id,
                 other.node_id, took_s, DEAD_AFTER_S)
        assert took_s <= DEAD_AFTER_S, f"handover took {took_s:.1f} s, over the dead-peer time {DEAD_AFTER_S} s"
        assert moved["reach"]["kind"] == "relayed"
        text, provenance, _ = _ask(ns["hb"], b, GEMMA3_ID)
        assert provenance["node"] == a.node_id and text.strip()

        # With no relay left, A cannot be reached at all.
        other.process.kill()
        killed_at = time.monotonic()
        wait_for(lambda: (p := _peer(ns["hb"], b, a.node_id)) is not None and not p["alive"], "A to become unreachable",
              timeout_s=DEAD_AFTER_S + 15)
        log.info("both relays killed: A unreachable from B after %.1f s", time.monotonic() - killed_at)
    finally:
        for node in reversed(nodes):
            node.stop()
