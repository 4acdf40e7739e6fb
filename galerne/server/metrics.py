"""Prometheus metrics, in a registry of the app's own (no global state: two
apps can live in one process, as tests do).

Request-level figures are recorded by the routes; engine gauges (queue, KV
usage, preemptions, prefix cache) are read at scrape time from the stats
snapshot the AsyncEngine's thread publishes after each step (a scrape never
touches the engine, so it answers while a step runs).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Latency buckets from a millisecond (a GPU decode step) to minutes (a long CPU queue).
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
            1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class Metrics:
    def __init__(self, model: str, engine_stats: Callable[[], dict | None]):
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["model"]
        self.model = model
        self.requests = Counter("galerne_requests", "HTTP API requests by endpoint and status",
                                ["model", "endpoint", "status"], registry=r)
        self._finished = Counter("galerne_completions_finished", "completions by finish reason",
                                 ["model", "finish_reason"], registry=r)
        # The model label is fixed for this app: bind it once.
        self.prompt_tokens = Counter("galerne_prompt_tokens", "prompt tokens of the requests run", labels, registry=r).labels(model)
        self.generation_tokens = Counter("galerne_generation_tokens", "tokens generated", labels, registry=r).labels(model)
        self.ttft = Histogram("galerne_time_to_first_token_seconds", "time from request to its first token",
                              labels, buckets=_LATENCY, registry=r).labels(model)
        self.itl = Histogram("galerne_inter_token_latency_seconds", "time between two tokens of one completion",
                             labels, buckets=_LATENCY, registry=r).labels(model)
        self.e2e = Histogram("galerne_request_duration_seconds", "time from request to its last token",
                             labels, buckets=_LATENCY, registry=r).labels(model)
        self.in_flight = Gauge("galerne_requests_in_flight", "HTTP requests being answered", labels, registry=r).labels(model)
        self.queued = Gauge("galerne_requests_queued", "engine requests admitted that have no token yet", labels, registry=r).labels(model)
        # Connections (server/transport.py): open ones, and those the server closed, by why.
        self.connections = Gauge("galerne_http_connections", "open HTTP connections", labels, registry=r).labels(model)
        self._closed = Counter("galerne_http_connections_closed", "connections the server closed: header_timeout (no "
                               "request headers in time), evicted (idle, at --max-connections), refused (at "
                               "--max-connections, none idle), idle_bytes (too much data while no request ran)",
                               ["model", "reason"], registry=r)
        r.register(_EngineCollector(model, engine_stats))

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(self.model, endpoint, str(status)).inc()

    def connection_closed(self, reason: str) -> None:
        self._closed.labels(self.model, reason).inc()

    def finished(self, reason: str) -> None:
        self._finished.labels(self.model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Engine gauges, read when Prometheus scrapes."""

    def __init__(self, model: str, stats: Callable[[], dict | None]):
        self.model, self.stats = model, stats

    def describe(self):
        return []  # collected at scrape time only

    def collect(self):
        s = self.stats()
        if s is None:  # the engine is not started (or already stopped)
            return
        m = [self.model]
        gauges = {
            "galerne_engine_requests_running": ("sequences running in the engine", s.get("running", 0)),
            "galerne_engine_requests_waiting": ("sequences waiting for a slot in the engine", s.get("waiting", 0)),
            "galerne_kv_cache_usage_ratio": ("fraction of the KV cache blocks in use", s.get("kv_usage", 0.0)),
            "galerne_kv_cache_blocks": ("KV cache blocks in all", s.get("num_blocks", 0)),
            "galerne_prefix_cache_hit_ratio": ("prompt tokens found in the prefix cache / tokens looked up",
                                               s.get("prefix_cache_hit_rate", 0.0)),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(name, doc, labels=["model"])
            g.add_metric(m, float(value))
            yield g
        c = CounterMetricFamily("galerne_engine_preemptions", "sequences preempted for lack of KV blocks", labels=["model"])
        c.add_metric(m, float(s.get("num_preemptions", 0)))
        yield c
