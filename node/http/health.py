"""`/healthz` and `/metrics`."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from node.http.schemas import Health, HealthExpert, json_response
from node.keys import metrics_key, node_info_key, pool_key


async def healthz(request: web.Request) -> web.Response:
    """`GET /healthz`: alive, with the experts loaded."""
    app = request.app
    info = app[node_info_key]
    return json_response(
        Health(
            status="ok",
            node_id=info.node_id,
            uptime_s=round(time.time() - info.started_s, 1),
            experts=[
                HealthExpert(
                    id=e.spec.id,
                    queue_depth=e.queue_depth,
                    capacity=e.capacity,
                    parallel=e.parallel,
                    running=e.running,
                    waiting=e.waiting,
                    tokens_per_s=round(e.tokens_per_s(), 2),
                    worker_restarts=e.restarts,
                    safe_cpu_kernels=e.safe_cpu_kernels,
                )
                for e in app[pool_key]
            ],
        )
    )


async def metrics(request: web.Request) -> web.Response:
    """`GET /metrics`: Prometheus text format."""
    app = request.app
    node_metrics = app[metrics_key]
    for expert in app[pool_key]:
        expert_id = expert.spec.id
        node_metrics.queue_depth.labels(expert_id).set(expert.queue_depth)
        node_metrics.running.labels(expert_id).set(expert.running)
        node_metrics.waiting.labels(expert_id).set(expert.waiting)
        node_metrics.tokens_per_s.labels(expert_id).set(round(expert.tokens_per_s(), 2))
        node_metrics.worker_restarts.labels(expert_id).set(expert.restarts)
    body = generate_latest(node_metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
