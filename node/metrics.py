"""Prometheus metrics for one node, in a registry of its own (several nodes may share a process in tests)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class NodeMetrics:
    """The node's counters, histograms and gauges."""

    registry: CollectorRegistry
    requests: Counter
    tokens: Counter
    request_latency: Histogram
    time_to_first_token: Histogram
    queue_depth: Gauge
    rejected: Counter
    running: Gauge
    waiting: Gauge
    tokens_per_s: Gauge
    worker_restarts: Gauge


def create_metrics() -> NodeMetrics:
    """Build a fresh registry with the node's metrics."""
    registry = CollectorRegistry()
    return NodeMetrics(
        registry=registry,
        requests=Counter(
            "expertmesh_requests", "API requests by endpoint and status", ["endpoint", "status"], registry=registry
        ),
        tokens=Counter("expertmesh_tokens", "Tokens processed by expert and kind", ["expert", "kind"], registry=registry),
        request_latency=Histogram(
            "expertmesh_request_latency_seconds",
            "Time from request to last byte, by endpoint",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS_S,
            registry=registry,
        ),
        time_to_first_token=Histogram(
            "expertmesh_time_to_first_token_seconds",
            "Time from request to first generated token, by expert",
            ["expert"],
            buckets=_LATENCY_BUCKETS_S,
            registry=registry,
        ),
        queue_depth=Gauge(
            "expertmesh_queue_depth", "Requests running or waiting, by expert", ["expert"], registry=registry
        ),
        rejected=Counter(
            "expertmesh_rejected", "Requests refused because an expert was busy", ["expert"], registry=registry
        ),
        running=Gauge("expertmesh_running", "Requests holding a sequence slot, by expert", ["expert"], registry=registry),
        waiting=Gauge("expertmesh_waiting", "Requests waiting for a sequence slot, by expert", ["expert"], registry=registry),
        tokens_per_s=Gauge(
            "expertmesh_tokens_per_second",
            "Tokens generated per second by all of an expert's slots, over the last 10 s of work",
            ["expert"],
            registry=registry,
        ),
        worker_restarts=Gauge(
            "expertmesh_worker_restarts",
            "Times an expert's inference worker process died and was restarted",
            ["expert"],
            registry=registry,
        ),
    )
