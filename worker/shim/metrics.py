"""The shim's Prometheus metrics, in a registry of its own per app.

Each uvicorn worker process serves its own numbers on ``/metrics`` (scrape
each process, or run one process per container as the Procfile does).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: seconds buckets of the request latency histogram
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ShimMetrics:
    """Requests, publishes, rate-limit decisions, shed requests and cache reads of one shim process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "orders_shim_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=reg,
        )
        self.latency = Histogram(
            "orders_shim_request_duration_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=BUCKETS,
            registry=reg,
        )
        self.published = Counter(
            "orders_shim_commands_published",
            "Commands published, by type and outcome.",
            ["type", "outcome"],
            registry=reg,
        )
        self.rate_limited = Counter(
            "orders_shim_rate_limited", "Requests refused with 429, by kind.", ["kind"], registry=reg
        )
        self.ratelimit_unavailable = Counter(
            "orders_shim_ratelimit_unavailable",
            "Rate-limit checks decided in-process (this process's share) because Redis was unreachable.",
            registry=reg,
        )
        self.ratelimit_mode = Gauge(
            "orders_shim_ratelimit_mode",
            "1 for where rate limits are enforced now: redis, or local while it is unreachable.",
            ["mode"],
            registry=reg,
        )
        self.shed = Counter(
            "orders_shim_shed",
            "Requests shed with 503 overloaded, by reason (concurrency, redis_pool, certificate_fetch).",
            ["reason"],
            registry=reg,
        )
        self.cache_requests = Counter(
            "orders_shim_cache_requests", "Order view reads by result (hit, miss, error).", ["result"], registry=reg
        )

    def cache(self, result: str) -> None:
        """Called by :class:`worker.read_model.OrderCache`."""
        self.cache_requests.labels(result).inc()
