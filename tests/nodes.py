"""Everything tests share: real nodes (subprocesses with models, or in-process apps without), peer requests, waits."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from zeroconf import DNSIncoming, DNSPointer, DNSService, DNSText

from node import keys
from node.config import Settings
from node.http.app import IDLE_CONNECTION_TIMEOUT_S, create_app
from node.judging.cards import CapabilityCard, Performance, encode_signed_card, sign_capability_card
from node.judging.service import Judging
from node.judging.stats import DimensionScore
from node.keys import identity_key
from node.mesh.network import Network
from node.routing.router import Router
from node.serving.experts import ExpertSpec, LocalExpert, expert_id_for
from node.serving.native import load_llama
from peers import auth
from peers.identity import NodeId, NodeIdentity
from peers.wire import CONTENT_TYPE, ExpertInfo, Hello, NodeCard, encode, sign_card

T = TypeVar("T")

SMOLLM2_ID = "smollm2-135m@b179c9523d0e"
GEMMA3_ID = "gemma3-270m@a5fd3b62230a"

# The first start on a fresh machine pulls the models through pip.
START_TIMEOUT_S = 300.0
# Peers that notice each other (and each other's death) within seconds.
FAST = ("--hello-interval-s", "1", "--peer-dead-after-s", "4")
MEET_TIMEOUT_S = 30.0
SAFE_KERNELS_ENV = "EXPERTMESH_SAFE_CPU_KERNELS"
_verdict: bool | None = None


def child_pids(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (a node's inference workers, say)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def safe_cpu_kernels() -> bool:
    """This machine's CPU self-check verdict, decided once per test run like a node decides it.

    Cached where the models are (keyed like a node's, by llama-cpp-python version and CPU flags), so
    every test node and in-process model load uses kernels this CPU can run, without a probe each.
    """
    global _verdict
    if _verdict is None:
        from node.serving import catalog, selfcheck

        model = catalog.resolve("smollm2-135m", catalog.default_models_dir(), progress=False)
        verdict = selfcheck.decide("auto", catalog.default_models_dir().parent / "test-selfcheck", [(model.sha256, model.path)])
        selfcheck.log_verdict(verdict)
        _verdict = verdict.safe_cpu_kernels
    return _verdict


@dataclass
class RunningNode:
    """A node process and where it listens."""

    process: subprocess.Popen
    data_dir: Path
    log_path: Path
    url: str
    node_id: str

    def log(self) -> str:
        """What the node has logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def start_node(
    data_dir: Path, *args: str, env: dict[str, str] | None = None, mdns: bool = False, judge: bool = False
) -> RunningNode:
    """Start `expertmesh start` on 127.0.0.1 port 0 and wait until it serves.

    mDNS runs only on loopback, if at all; judging at start is off unless asked for, so tests
    are not slowed by minutes of background probes.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    node_file = data_dir / "node.json"
    node_file.unlink(missing_ok=True)
    log_path = data_dir / "node.log"
    command = [
        sys.executable, "-m", "node", "start",
        "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir),
        *(["--mdns-interface", "127.0.0.1"] if mdns else ["--no-mdns"]), *([] if judge else ["--no-judge"]), *args,
    ]
    log_file = open(log_path, "ab")
    environment = {**os.environ, **(env or {})}
    if SAFE_KERNELS_ENV not in environment:
        environment[SAFE_KERNELS_ENV] = "true" if safe_cpu_kernels() else "false"
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
    log_file.close()
    deadline_s = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline_s:
        if process.poll() is not None:
            raise RuntimeError(f"node exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
        if node_file.exists():
            info = json.loads(node_file.read_text())
            return RunningNode(process, data_dir, log_path, info["url"], info["node_id"])
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"node did not start in {START_TIMEOUT_S} s:\n{log_path.read_text(errors='replace')}")


# ---- waiting for a condition ------------------------------------------------------------------------------


def wait_for(condition: Callable[[], T], what: str = "condition", timeout_s: float = MEET_TIMEOUT_S, interval_s: float = 0.2) -> T:
    """Poll until `condition` returns something truthy and return it, or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


async def wait_until(condition: Callable[[], T], what: str = "condition", timeout_s: float = 20.0, interval_s: float = 0.05) -> T:
    """`wait_for` on the event loop: poll without blocking it."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)


# ---- plain HTTP from sync tests ---------------------------------------------------------------------------


def get_json(url: str) -> dict:
    """A blocking GET for polling from sync tests."""
    async def fetch() -> dict:
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                return await response.json()

    return asyncio.run(fetch())


def post_json(url: str, body: dict) -> tuple[int, dict]:
    """A blocking POST for sync tests: status and JSON body."""
    async def post() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=body) as response:
                return response.status, await response.json()

    return asyncio.run(post())


def model_ids(node: RunningNode) -> set[str]:
    """The ids `/v1/models` lists."""
    return {m["id"] for m in get_json(node.url + "/v1/models")["data"]}


def direct_llama(path: Path, *, n_ctx: int, n_threads: int, safe_cpu_kernels: bool):
    """llama-cpp-python's own `Llama`, the reference the batching worker is compared with, on the same CPU kernels."""
    return load_llama(
        str(path), safe_cpu_kernels=safe_cpu_kernels, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False
    )


# ---- in-process nodes without models, and a stranger's signed peer calls (the attacker's kit) ------------

SUITE = "2026.11.1"
DIMENSIONS = ("arithmetic", "knowledge", "safety")


class NoWorker:
    """Where a model's worker process would be: these tests route and judge cards, never generate."""

    info = None
    restarts = 0
    pid = None

    def tokens_per_s(self) -> float:
        return 0.0

    def submit(self, request: object, sink: object) -> None:
        raise RuntimeError("a model-free test expert was asked to generate")

    def cancel(self, request_id: int) -> None:
        pass

    def close(self) -> None:
        pass


def fake_expert(name: str, sha256: str) -> LocalExpert:
    """A local expert with no model behind it: enough for cards, tables and routing, never asked to generate."""
    spec = ExpertSpec(
        id=expert_id_for(name, sha256), name=name, path=Path("/nonexistent.gguf"), sha256=sha256, size_bytes=0,
        family="test", quantization="Q8_0", prompt_style="completion", n_ctx=2048, params="1M",
    )
    return LocalExpert(spec, None, NoWorker(), queue_size=1)  # type: ignore[arg-type]


@dataclass
class LiveNode:
    """A node's real aiohttp app, listening on 127.0.0.1."""

    app: web.Application
    runner: web.AppRunner
    url: str

    @property
    def identity(self) -> NodeIdentity:
        return self.app[identity_key]

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def network(self) -> Network:
        return self.app[keys.network_key]

    @property
    def judging(self) -> Judging:
        return self.app[keys.judging_key]

    @property
    def router(self) -> Router:
        return self.app[keys.router_key]

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_live_node(
    data_dir: Path, experts: Sequence[LocalExpert] = (), *, start_network: bool = True,
    idle_connection_timeout_s: float = IDLE_CONNECTION_TIMEOUT_S, **settings: Any,
) -> LiveNode:
    """Start a node's app on 127.0.0.1 port 0 with `experts` (no model files); settings override fast defaults."""
    values: dict[str, Any] = dict(
        host="127.0.0.1", port=0, data_dir=data_dir, mdns=False, judge_on_start=False, spot_check_interval_s=0.0,
        hello_interval_s=1.0, peer_dead_after_s=4.0,
    )
    values.update(settings)
    app = create_app(Settings(**values), experts=list(experts))
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0, keepalive_timeout=idle_connection_timeout_s
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    if start_network:
        await app[keys.network_key].start([url])
    return LiveNode(app, runner, url)


async def hello_rounds(watcher: LiveNode, peer_id: str, rounds: int = 2, timeout_s: float = 20.0) -> None:
    """Wait until `watcher` has heard from `peer_id` in `rounds` hello exchanges that began after this call.

    What a test waits for instead of sleeping before it asserts that something did not happen: the peers have
    met (and could have passed it on) that many times.
    """
    for round_ in range(1, rounds + 1):
        since_ms = int(time.time() * 1000)

        def heard(since_ms: int = since_ms) -> bool:
            peer = watcher.network.table.peers.get(NodeId(peer_id))
            return peer is not None and peer.last_seen_ms > since_ms

        await wait_until(heard, f"hello round {round_} between {watcher.node_id} and {peer_id}", timeout_s)


def capability_card(
    judge: NodeIdentity, owner: str, expert_id: str, sha256: str, score: float, *, issued_ms: int | None = None,
    dimensions: Sequence[str] = DIMENSIONS, n: int = 20, suite_version: str = SUITE,
) -> bytes:
    """A signed capability card from `judge` giving `score` on every dimension."""
    half = 0.05 if 0 < score < 1 else 0.0
    scores = tuple(DimensionScore(d, score, n, max(0.0, score - half), min(1.0, score + half)) for d in sorted(dimensions))
    card = CapabilityCard(
        expert_id=expert_id, model_sha256=sha256, scores=scores, performance=Performance(40.0, 50.0, 2048),
        suite_version=suite_version, suite_digest="0" * 64, judge_node_id=judge.node_id, judge_public_key=judge.public_key_raw,
        owner_node_id=owner, issued_ms=int(time.time() * 1000) if issued_ms is None else issued_ms, sample="full",
    )
    return encode_signed_card(sign_capability_card(card, judge))


def expert_info(expert_id: str, sha256: str, cards: Sequence[bytes] = (), *, tokens_per_s: float | None = None) -> ExpertInfo:
    return ExpertInfo(
        expert_id=expert_id, name=expert_id.split("@")[0], family="test", params="1M", quantization="Q8_0", sha256=sha256,
        prompt_style="chat", n_ctx=2048, queue_depth=0, queue_size=1, tokens_per_s=tokens_per_s, cards=tuple(cards),
    )


def hello_body(identity: NodeIdentity, experts: Sequence[ExpertInfo] = (), addresses: Sequence[str] = ()) -> bytes:
    card = NodeCard(
        node_id=identity.node_id, public_key=identity.public_key_raw, addresses=tuple(addresses), experts=tuple(experts),
        issued_ms=int(time.time() * 1000),
    )
    return encode(Hello(card=sign_card(card, identity), sent_ms=int(time.time() * 1000)))


async def signed_post(
    session: aiohttp.ClientSession, url: str, path: str, body: bytes, identity: NodeIdentity | None, *,
    secret: bytes | None = None, headers: dict[str, str] | None = None,
) -> tuple[int, bytes, dict[str, str]]:
    """POST a peer request signed by `identity` (unsigned when None); status, body and headers of the reply."""
    sent = {"Content-Type": CONTENT_TYPE}
    if identity is not None:
        sent.update(auth.sign_request(identity, "POST", path, body, secret=secret))
    sent.update(headers or {})
    async with session.post(url + path, data=body, headers=sent) as response:
        return response.status, await response.read(), dict(response.headers)


def signed(identity: NodeIdentity, path: str, body: bytes, secret: bytes | None = None) -> dict[str, str]:
    """Headers of a peer request signed by `identity`."""
    return {"Content-Type": CONTENT_TYPE, **auth.sign_request(identity, "POST", path, body, secret=secret)}


# ---- mDNS on the wire, built by hand so the query owes nothing to zeroconf -----------------------------------

MDNS_PORT = 5353
TYPE_PTR, TYPE_TXT, TYPE_SRV = 12, 16, 33

def dns_query(query_id: int, questions: Sequence[tuple[str, int]]) -> bytes:
    """A standard DNS query (RFC 1035), class IN, no QU bit: what a legacy resolver sends."""
    header = struct.pack("!HHHHHH", query_id, 0, len(questions), 0, 0, 0)
    body = b"".join(_qname(name) + struct.pack("!HH", qtype, 1) for name, qtype in questions)
    return header + body


def _qname(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.rstrip(".").split(".")) + b"\0"


def _txt_pairs(text: bytes) -> dict[str, str]:
    pairs, i = {}, 0
    while i < len(text):
        length = text[i]
        key, _, value = text[i + 1 : i + 1 + length].partition(b"=")
        pairs[key.decode()] = value.decode()
        i += 1 + length
    return pairs


def summarize_reply(data: bytes) -> dict[str, Any]:
    """The parts of a DNS reply the tests look at, as plain JSON-able data."""
    msg = DNSIncoming(data)
    records = msg.answers()
    return {
        "id": msg.id,
        "response": msg.is_response(),
        "questions": [[q.name, q.type] for q in msg.questions],
        "ptr": [r.alias for r in records if isinstance(r, DNSPointer)],
        "srv": {r.name: r.port for r in records if isinstance(r, DNSService)},
        "txt": {r.name: _txt_pairs(r.text) for r in records if isinstance(r, DNSText)},
    }


def legacy_query(
    destination: str,
    questions: Sequence[tuple[str, int]],
    wanted: Callable[[dict[str, Any]], bool],
    *,
    source_host: str,
    timeout_s: float = 5.0,
) -> tuple[dict[str, Any], tuple[str, int], int]:
    """Ask from an ephemeral UDP port; return (reply, replier address, our port) of the first wanted reply."""
    query_id = secrets.randbelow(0xFFFF) + 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source_host, 0))
        if ipaddress.ip_address(destination).is_multicast:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(source_host))
        own_port = sock.getsockname()[1]
        assert own_port != MDNS_PORT
        deadline = time.monotonic() + timeout_s
        next_send = 0.0
        while (now := time.monotonic()) < deadline:
            if now >= next_send:
                sock.sendto(dns_query(query_id, questions), (destination, MDNS_PORT))
                next_send = now + 1.0
            sock.settimeout(max(0.01, min(next_send, deadline) - now))
            try:
                data, source = sock.recvfrom(9000)
            except TimeoutError:
                continue
            reply = summarize_reply(data)
            if reply["id"] == query_id and reply["response"] and wanted(reply):
                return reply, source, own_port
    raise AssertionError(f"no wanted reply to {questions} sent to {destination}:{MDNS_PORT} within {timeout_s} s")


# ---- two home routers with NAT in network namespaces (the relay and hole-punching tests) ----

P1, P2 = "10.201.1.1", "10.201.2.1"
HOME = {"a": "192.168.10.2", "b": "192.168.20.2"}


NETNS_API_KEY = "relay-netns-key"
NETNS_PORT = 8470
NETNS_DEAD_AFTER_S = 4.0
NETNS_WAIT_S = 120.0  # four nodes and a Python process per poll: slow on a busy 2-core machine
REPO_ROOT = Path(__file__).resolve().parents[1]
# What `nat_internet` needs; a test module that builds it is skipped, not failed, on a machine without them.
NEEDS_NAT_INTERNET = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None,
    reason="needs root, iproute2 and iptables to build the namespaces and the NAT routers",
)


def netns_run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def nat_internet() -> Iterator[dict[str, str]]:
    """The namespaces: net (public), routers ra and rb (NAT), homes ha and hb."""
    tag = uuid.uuid4().hex[:5]
    ns = {k: f"em{k}{tag}" for k in ("net", "ra", "rb", "ha", "hb")}
    try:
        for name in ns.values():
            netns_run("ip", "netns", "add", name)
            netns_run("ip", "-n", name, "link", "set", "lo", "up")
        for side, wan_net, wan_router, lan_router, lan_home in (
            ("a", P1, "10.201.1.2", "192.168.10.1", HOME["a"]),
            ("b", P2, "10.201.2.2", "192.168.20.1", HOME["b"]),
        ):
            router, home = ns[f"r{side}"], ns[f"h{side}"]
            wan_a, wan_b, lan_a, lan_b = f"w{side}{tag}n", f"w{side}{tag}r", f"l{side}{tag}r", f"l{side}{tag}h"
            netns_run("ip", "link", "add", wan_a, "type", "veth", "peer", "name", wan_b)
            netns_run("ip", "link", "set", wan_a, "netns", ns["net"])
            netns_run("ip", "link", "set", wan_b, "netns", router)
            netns_run("ip", "link", "add", lan_a, "type", "veth", "peer", "name", lan_b)
            netns_run("ip", "link", "set", lan_a, "netns", router)
            netns_run("ip", "link", "set", lan_b, "netns", home)
            for name, dev, address in (
                (ns["net"], wan_a, f"{wan_net}/30"), (router, wan_b, f"{wan_router}/30"),
                (router, lan_a, f"{lan_router}/24"), (home, lan_b, f"{lan_home}/24"),
            ):
                netns_run("ip", "-n", name, "addr", "add", address, "dev", dev)
                netns_run("ip", "-n", name, "link", "set", dev, "up")
            netns_run("ip", "-n", router, "route", "add", "default", "via", wan_net)
            netns_run("ip", "-n", home, "route", "add", "default", "via", lan_router)
            # The home router: masquerade out, answers back in, nothing new in.
            netns_run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            netns_run("ip", "netns", "exec", router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", wan_b, "-j", "MASQUERADE")
            netns_run("ip", "netns", "exec", router, "iptables", "-A", "FORWARD", "-i", wan_b, "-m", "conntrack",
                 "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
            netns_run("ip", "netns", "exec", router, "iptables", "-A", "FORWARD", "-i", wan_b, "-j", "DROP")
            netns_run("ip", "netns", "exec", router, "iptables", "-A", "INPUT", "-i", wan_b, "-m", "conntrack",
                 "--ctstate", "NEW", "-j", "DROP")
        yield ns
    finally:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


class NetnsNode:
    """A node process in a namespace."""

    def __init__(self, ns: str, host: str, data_dir: Path, *args: str) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.ns, self.url, self.data_dir = ns, f"http://{host}:{NETNS_PORT}", data_dir
        log_file = open(data_dir / "node.log", "ab")
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "node", "start", "--host", host, "--port", str(NETNS_PORT),
             "--data-dir", str(data_dir), "--no-mdns", "--no-judge", "--api-key", NETNS_API_KEY, "--threads", "1",
             "--hello-interval-s", "1", "--peer-dead-after-s", str(NETNS_DEAD_AFTER_S), *args],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), SAFE_KERNELS_ENV: "true" if safe_cpu_kernels() else "false"},
        )
        log_file.close()
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


def netns_python(ns: str, code: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """Run Python inside a namespace (only there is the node's address routable)."""
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO_ROOT)


def netns_get(ns: str, url: str) -> dict | None:
    code = (
        "import json, urllib.request\n"
        f"r = urllib.request.Request({url!r}, headers={{'Authorization': 'Bearer {NETNS_API_KEY}'}})\n"
        "print(json.dumps(json.load(urllib.request.urlopen(r, timeout=5))))\n"
    )
    result = netns_python(ns, code, 20)
    return json.loads(result.stdout) if result.returncode == 0 else None


def netns_peer(ns: str, node: NetnsNode, peer_id: str) -> dict | None:
    peers = netns_get(ns, node.url + "/v1/peers")
    return next((p for p in (peers or {}).get("data", []) if p["id"] == peer_id), None)


def netns_ask(ns: str, node: NetnsNode, model: str, extra: dict | None = None) -> tuple[str, dict, int]:
    """Stream a chat completion from inside `ns`: (text, provenance, number of content chunks)."""
    body = {"model": model, "messages": [{"role": "user", "content": "The capital of France is"}],
            "max_tokens": 8, "temperature": 0, "stream": True, **({"expertmesh": extra} if extra else {})}
    code = (
        "import json, urllib.request\n"
        f"r = urllib.request.Request({node.url + '/v1/chat/completions'!r}, data={json.dumps(body).encode()!r},\n"
        f"    headers={{'Authorization': 'Bearer {NETNS_API_KEY}', 'Content-Type': 'application/json'}})\n"
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
    result = netns_python(ns, code)
    assert result.returncode == 0, result.stderr[-2000:]
    text, provenance, chunks = json.loads(result.stdout)
    return text, provenance, chunks


def netns_invite(ns: str, relay: NetnsNode) -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "node", "invite", "--node", relay.url, "--api-key", NETNS_API_KEY],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
