"""Real nodes without models, in-process on loopback, and a stranger's signed peer calls: the attacker's kit for trust tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from node.config import Settings
from node.http import api
from node.http.app import IDLE_CONNECTION_TIMEOUT_S, create_app, identity_key
from node.judging.cards import CapabilityCard, Performance, encode_signed_card, sign_capability_card
from node.judging.service import Judging
from node.judging.stats import DimensionScore
from node.mesh.network import Network
from node.routing.router import Router
from node.serving.experts import ExpertSpec, LocalExpert, expert_id_for
from peers import auth
from peers.identity import NodeIdentity
from peers.wire import CONTENT_TYPE, ExpertInfo, Hello, NodeCard, encode, sign_card

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
        return self.app[api.network_key]

    @property
    def judging(self) -> Judging:
        return self.app[api.judging_key]

    @property
    def router(self) -> Router:
        return self.app[api.router_key]

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
        await app[api.network_key].start([url])
    return LiveNode(app, runner, url)


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


async def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> float:
    """Poll (on the loop) until `condition` holds; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
