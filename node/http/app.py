"""aiohttp application factory: every resource is opened and closed in a cleanup_ctx."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import ifaddr
from aiohttp import web

from node import keys
from node.config import Settings
from node.errors import NodeError
from node.http import api, middleware, peer_api, web_routes
from node.http.access import RateLimiter, access_middleware, allowed_hosts, host_guard_middleware, resolve_api_key
from node.judging.service import Judging
from node.mesh import adopt, directory, invites, relay
from node.mesh.network import Network
from node.mesh.peer_store import PeerStore
from node.mesh.remote_expert import Experts
from node.metrics import create_metrics
from node.pipeline import QueryPipeline
from node.routing.community import Community
from node.routing.router import RouteConstraints, Router
from node.serving import catalog, selfcheck
from node.serving.expert import TrustEvidence
from node.serving.experts import ExpertPool, LocalExpert, ServedExpert, gpu_offload_supported, load_expert
from node.serving.specialist_serving import build_specialists
from node.serving.specialists import folder_definitions, resolve_definition
from peers.client import PEER_PATH, PeerClient
from peers.identity import NodeIdentity

log = logging.getLogger(__name__)

# A connection that has not completed a request within this long is closed (aiohttp starts its
# keep-alive timer when a connection opens), so slowloris clients cannot hold sockets for minutes.
IDLE_CONNECTION_TIMEOUT_S = 15.0
NODE_FILE = "node.json"  # where a running node writes its URL, so scripts and tests can find a port-0 node


def _load_experts(settings: Settings) -> tuple[list[ServedExpert], list[LocalExpert]]:
    """Resolve (pulling when needed), self-check the CPU, load every configured model, then the specialists on them;
    blocking.

    Returns the served experts and the bases loaded only for specialists (served through them, closed at the end).
    """
    experts: list[LocalExpert] = []
    seen: set[str] = set()
    models = [catalog.resolve(name_or_path, settings.models_dir, progress=True) for name_or_path in settings.models]
    verdict = selfcheck.decide(
        settings.safe_cpu_kernels, settings.data_dir, [(m.sha256, m.path) for m in models], n_threads=settings.n_threads
    )
    selfcheck.log_verdict(verdict)

    def load(model: catalog.ModelFile) -> LocalExpert:
        return load_expert(
            model,
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_gpu_layers=settings.n_gpu_layers,
            queue_size=settings.queue_size,
            safe_cpu_kernels=verdict.safe_cpu_kernels,
            parallel=settings.parallel,
        )

    for model in models:
        expert = load(model)
        if expert.spec.id in seen:
            log.warning("model %s is configured twice; serving it once", expert.spec.id)
            expert.close()
            continue
        seen.add(expert.spec.id)
        experts.append(expert)
    definitions = [resolve_definition(e) for e in settings.experts] + folder_definitions(settings.data_dir)
    specialists, hidden_bases = build_specialists(definitions, experts, load, settings.models_dir)
    return [*experts, *specialists], hidden_bases


async def _identity_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.settings_key]
    identity = NodeIdentity.load_or_create(settings.data_dir)  # create_app made the data dir, mode 0700
    app[keys.identity_key] = identity
    app[keys.node_info_key] = keys.NodeInfo(node_id=identity.node_id, started_s=time.time())
    log.info("node id %s (data in %s)", identity.node_id, settings.data_dir)
    yield


async def _experts_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.settings_key]
    if keys.preloaded_experts_key in app:
        # Experts built by the caller (tests of the network layer that need no model); owned by the caller.
        app[keys.pool_key] = ExpertPool(app[keys.preloaded_experts_key])
        app[keys.specialist_bases_key] = []
        yield
        return
    if gpu_offload_supported():
        log.info("llama.cpp has GPU offload; n_gpu_layers=%d", settings.n_gpu_layers)
    else:
        log.info("llama.cpp runs on the CPU (built without GPU offload)")
    experts, hidden_bases = await asyncio.get_running_loop().run_in_executor(None, _load_experts, settings)
    pool = ExpertPool(experts)
    app[keys.pool_key] = pool
    app[keys.specialist_bases_key] = hidden_bases
    try:
        yield
    finally:
        await asyncio.get_running_loop().run_in_executor(None, pool.close)
        for base in app[keys.specialist_bases_key]:
            await asyncio.get_running_loop().run_in_executor(None, base.close)


async def _network_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.settings_key]
    secret = settings.community_secret.encode() if settings.community_secret else None
    store = PeerStore(settings.data_dir / "peers.db")
    async with aiohttp.ClientSession() as session:
        client = PeerClient(
            session,
            identity=app[keys.identity_key],
            secret=secret,
            idle_timeout_s=settings.peer_idle_timeout_s,
            stream_deadline_s=settings.peer_stream_deadline_s,
        )
        app[keys.peer_client_key] = client
        app[keys.network_key] = Network(settings, app[keys.identity_key], app[keys.pool_key], client, store)
        try:
            yield
        finally:
            await app[keys.network_key].close()
            store.close()


async def _judging_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.settings_key]
    network = app[keys.network_key]
    judging = Judging(
        app[keys.identity_key],
        app[keys.pool_key],
        network,
        app[keys.peer_client_key],
        settings.data_dir,
        judge_on_start=settings.judge_on_start,
        items_per_dimension=settings.judge_items_per_dimension,
        judge_expert=settings.judge_expert,
        spot_check_interval_s=settings.spot_check_interval_s,
        trusted_judges=settings.trusted_judges,
    )
    network.attach(cards=judging)
    await judging.start()
    app[keys.judging_key] = judging
    try:
        yield
    finally:
        await judging.close()


def _community(settings: Settings, identity: NodeIdentity, network: Network) -> Community:
    """Community learning, hooked into hellos; a peer's weight follows its trust (none once distrusted)."""

    def trust_of(node_id: str) -> float:
        trust = network.trust_of(node_id)
        return 0.0 if trust.distrusted else trust.score

    community = Community(
        identity,
        share=settings.share_learning,
        use=settings.use_community_learning,
        trust_of=trust_of,
        on_bad_summary=lambda node_id, detail: network.note_misbehaviour(node_id, TrustEvidence.BAD_SUMMARY, detail),
    )
    network.attach(learning=community)
    return community


async def _router_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.settings_key]
    node_constraints = RouteConstraints(
        approved=settings.approved,
        exclude=settings.denied,
        local_only=settings.local_only,
        min_scores=settings.min_scores,
        verified_only=settings.verified_only,
    )
    experts = Experts(app[keys.pool_key], app[keys.network_key], app[keys.peer_client_key], app[keys.metrics_key])
    router = Router(
        experts.all,
        settings.data_dir,
        node_constraints=node_constraints,
        exploration=settings.exploration,
        assess=app[keys.judging_key].assessment,
        unverified_share_max=settings.unverified_share_max,
        plain_words=settings.ledger_plain_words,
        retention_days=settings.ledger_retention_days,
        community=_community(settings, app[keys.identity_key], app[keys.network_key]),
    )
    await router.start()
    app[keys.router_key] = router
    app[keys.experts_key] = experts
    app[keys.pipeline_key] = QueryPipeline(router, experts, proposer_min_score=settings.decompose_proposer_min_score)
    try:
        yield
    finally:
        await router.close()


def create_app(settings: Settings, *, experts: list[LocalExpert] | None = None) -> web.Application:
    """Compose the node's application (with `experts` given, those are served instead of loading models)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)
    api_key = resolve_api_key(settings.api_key, settings.require_api_key, settings.host, settings.data_dir)
    access = access_middleware(
        api_key,
        RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst),
        RateLimiter(settings.peer_rate_limit_per_s, settings.peer_rate_limit_burst),
    )
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[
            middleware.error_middleware,
            middleware.metrics_middleware,
            host_guard_middleware(allowed_hosts(settings.host, settings.advertise_urls)),
            access,
        ],
    )
    app[keys.settings_key] = settings
    if experts is not None:
        app[keys.preloaded_experts_key] = list(experts)
    app[keys.metrics_key] = create_metrics()
    app.cleanup_ctx.append(_identity_ctx)
    app.cleanup_ctx.append(_experts_ctx)
    app.cleanup_ctx.append(_network_ctx)
    app.cleanup_ctx.append(relay.relay_ctx)
    app.cleanup_ctx.append(invites.invites_ctx)
    app.cleanup_ctx.append(directory.directory_ctx)
    app.cleanup_ctx.append(_judging_ctx)
    app.cleanup_ctx.append(_router_ctx)
    api.add_routes(app)
    adopt.add_routes(app)
    # The peer API is a sub-app with its own guard; the relay's routes (also under PEER_PATH) stay on this app,
    # outside the guard, because they authenticate end to end (node/mesh/relay.py).
    secret = settings.community_secret.encode() if settings.community_secret else None
    peer_app = peer_api.create_peer_app(lambda state: state[keys.identity_key], secret)
    relay.add_routes(app)
    invites.add_routes(app, peer_app)
    directory.add_routes(app, peer_app)
    app.add_subapp(PEER_PATH, peer_app)
    web_routes.add_routes(app)
    return app


def advertise_urls(settings: Settings, port: int) -> list[str]:
    """The URLs peers can reach this node at: configured, or derived from the bound address."""
    if settings.advertise_urls:
        return [u.rstrip("/") for u in settings.advertise_urls]
    if settings.host in ("0.0.0.0", "", "::"):
        ips = [
            ip.ip
            for adapter in ifaddr.get_adapters()
            for ip in adapter.ips
            if isinstance(ip.ip, str) and not ip.ip.startswith("127.")  # a str is an IPv4 address (ifaddr)
        ]
        return [f"http://{ip}:{port}" for ip in ips[:8]] or [f"http://127.0.0.1:{port}"]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return [f"http://{host}:{port}"]


def _write_node_file(data_dir: Path, url: str, node_id: str) -> None:
    """Tell local tools where this node listens (atomically)."""
    tmp = data_dir / f".{NODE_FILE}.tmp"
    tmp.write_text(json.dumps({"url": url, "node_id": node_id, "pid": os.getpid()}))
    os.replace(tmp, data_dir / NODE_FILE)


async def serve(settings: Settings) -> None:
    """Run a node until SIGINT or SIGTERM, then close everything cleanly."""
    settings = invites.with_joins(settings)
    app = create_app(settings)
    # Cancel handlers of clients that hang up, so their expert stops generating for nobody.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=IDLE_CONNECTION_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise NodeError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = runner.addresses[0][1]
        # A wildcard bind is reached locally through loopback.
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(settings.host, settings.host)
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        url = f"http://{host}:{port}"
        node_id = app[keys.node_info_key].node_id
        await app[keys.network_key].start(advertise_urls(settings, port))
        await app[relay.relay_links_key].start(url)
        app[directory.directory_key].start()
        _write_node_file(settings.data_dir, url, node_id)
        experts = ", ".join(e.spec.id for e in app[keys.pool_key])
        log.info("serving %s: web page %s/ , OpenAI API %s/v1", experts, url, url)
        await stop.wait()
        log.info("stopping")
    finally:
        (settings.data_dir / NODE_FILE).unlink(missing_ok=True)
        await runner.cleanup()
