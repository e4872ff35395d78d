"""Prometheus metrics of the workers, the payment step, the relay and the cache.

The worker pool runs prometheus-client in multiprocess mode: the supervisor
points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before it forks, the
children write their samples there, and the supervisor serves the merged view
on ``metrics.port``.  The relay serves its own on ``metrics.port + 1``; the
shim serves ``/metrics`` on its HTTP port.  Both listen on ``metrics.host``
(127.0.0.1 unless configured): the numbers name queues, providers and error
classes, and nothing authenticates a scrape.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from typing import Any, Protocol

from schema.messages import OutcomeResult

#: seconds buckets of the batch and payment-call histograms
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)


class MetricsSink(Protocol):
    """What the consumers, the payment step, the relay and the cache report."""

    def count(self, handled: Iterable[Any]) -> int: ...
    def observe_batch(self, handled: Iterable[Any], seconds: float) -> None: ...
    def retried(self, message_type: str | None) -> None: ...
    def dead_lettered(self, message_type: str | None, error_class: str) -> None: ...
    def payment_call(self, provider: str, step: str, outcome: str) -> None: ...
    def relayed(self, count: int, lag_seconds: float) -> None: ...
    def cache(self, result: str) -> None: ...
    def reply_ignored(self) -> None: ...


class NullMetrics:
    """Reports nowhere: for tools and tests that run a part without a metrics endpoint."""

    def count(self, handled: Iterable[Any]) -> int:
        return sum(1 for _ in handled)

    def observe_batch(self, handled: Iterable[Any], seconds: float) -> None:
        pass

    def retried(self, message_type: str | None) -> None:
        pass

    def dead_lettered(self, message_type: str | None, error_class: str) -> None:
        pass

    def payment_call(self, provider: str, step: str, outcome: str) -> None:
        pass

    def relayed(self, count: int, lag_seconds: float) -> None:
        pass

    def cache(self, result: str) -> None:
        pass

    def reply_ignored(self) -> None:
        pass


NO_METRICS: MetricsSink = NullMetrics()


class Metrics:
    """The service's metrics (a :class:`MetricsSink`); create one per process, after ``prepare_multiprocess``."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = registry or REGISTRY
        self.commands = Counter(
            "orders_commands", "Commands handled, by message type and result.", ["type", "result"], registry=reg
        )
        self.refused = Counter(
            "orders_commands_refused",
            "Commands refused for a business reason (each also "
            "announced as command.refused), by message type and reason code.",
            ["type", "reason"],
            registry=reg,
        )
        self.retries = Counter("orders_commands_retried", "Commands sent to a delay queue.", ["type"], registry=reg)
        self.dead_letters = Counter(
            "orders_commands_dead_lettered",
            "Commands sent to the dead-letter queue.",
            ["type", "error_class"],
            registry=reg,
        )
        self.batch_seconds = Histogram(
            "orders_batch_duration_seconds",
            "Time to apply and settle one batch.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram("orders_batch_size", "Commands per batch.", buckets=BATCH_BUCKETS, registry=reg)
        self.payment_calls = Counter(
            "orders_payment_calls",
            "Payment provider calls by provider, step and outcome.",
            ["provider", "step", "outcome"],
            registry=reg,
        )
        self.published = Counter("orders_outbox_published", "Outbox events published under confirms.", registry=reg)
        self.outbox_lag = Gauge(
            "orders_outbox_lag_seconds",
            "Age of the oldest event in the last relayed batch.",
            multiprocess_mode="max",
            registry=reg,
        )
        self.cache_requests = Counter(
            "orders_cache_requests", "Order view reads by result (hit, miss, error).", ["result"], registry=reg
        )
        self.replies_ignored = Counter(
            "orders_replies_ignored",
            "Commands whose reply_to was not a reply queue (direct reply-to or amq.gen-): applied, not answered.",
            registry=reg,
        )

    def count(self, handled: Iterable[Any]) -> int:
        n = 0
        for h in handled:
            n += 1
            self.commands.labels(h.delivery.message_type or "unknown", h.result.value).inc()
            if h.outcome is not None and h.outcome.result is OutcomeResult.REFUSED:
                self.refused.labels(h.delivery.message_type or "unknown", h.outcome.error or "refused").inc()
        return n

    def observe_batch(self, handled: Iterable[Any], seconds: float) -> None:
        self.batch_size.observe(self.count(handled))
        self.batch_seconds.observe(seconds)

    def retried(self, message_type: str | None) -> None:
        self.retries.labels(message_type or "unknown").inc()

    def dead_lettered(self, message_type: str | None, error_class: str) -> None:
        self.dead_letters.labels(message_type or "unknown", error_class).inc()

    def payment_call(self, provider: str, step: str, outcome: str) -> None:
        self.payment_calls.labels(provider, step, outcome).inc()

    def relayed(self, count: int, lag_seconds: float) -> None:
        self.published.inc(count)
        self.outbox_lag.set(max(0.0, lag_seconds))

    def cache(self, result: str) -> None:
        self.cache_requests.labels(result).inc()

    def reply_ignored(self) -> None:
        self.replies_ignored.inc()


def prepare_multiprocess() -> str:
    """A fresh samples directory for a pool; call before importing prometheus_client."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="orders-metrics-")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def serve_pool_metrics(host: str, port: int) -> None:
    """Serve the merged samples of every pool process (supervisor side) on ``host:port``."""
    if not port:
        return
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, addr=host, registry=registry)


def process_died(pid: int) -> None:
    """Forget the live gauges of a dead child (multiprocess bookkeeping)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def serve(host: str, port: int) -> None:
    """Serve this process's own metrics (the relay) on ``host:port``."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host)
