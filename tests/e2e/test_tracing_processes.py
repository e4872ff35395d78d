"""Tracing across the real processes: ``orders shim``, ``orders worker`` and ``orders relay`` export
over OTLP/HTTP (the standard variable) to a collector stub, and one order's spans from the three
processes make one trace from ``POST /orders`` to ``order.completed``."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from scripts import harness
from scripts.harness import Proc
from scripts.tcp_proxy import free_port
from tests.support import ExportedSpan, OtlpCollector, private_vhost, wait_until

JWT_SECRET = "tracing-tests-jwt-secret-of-at-least-32-bytes"


@pytest.fixture
def collector() -> Iterator[OtlpCollector]:
    c = OtlpCollector()
    yield c
    c.stop()


@pytest.fixture
def traced_stack(
    test_env: dict[str, str], settings: Any, clean_db: Any, fakes: Any, collector: OtlpCollector, tmp_path: Path
) -> Iterator[str]:
    vhost = f"orders-tracing-test-{os.getpid()}"
    env = {
        **test_env,
        "ORDERS_RABBITMQ__URL": private_vhost(settings, vhost),
        "ORDERS_SHIM__JWT_SECRET": JWT_SECRET,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within a tenth of a second, not five
    }
    port = free_port()
    procs = [
        Proc.orders(args, env, tmp_path / f"{args[0]}.log")
        for args in (["worker", "--processes", "1"], ["relay"], ["shim", "--port", str(port)])
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(url), what="shim /healthz")
        yield url
    finally:
        for p in procs:
            p.stop(20)
        harness.delete_vhost(vhost)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _status(engine: Any, order_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(  # type: ignore[no-any-return]
            text("SELECT status FROM orders WHERE order_id = CAST(:o AS uuid)"), {"o": order_id}
        ).scalar()


def _one(spans: list[ExportedSpan], name: str, **attributes: Any) -> ExportedSpan:
    found = [s for s in spans if s.name == name and all(s.attributes.get(k) == v for k, v in attributes.items())]
    assert len(found) == 1, f"{len(found)} spans {name} {attributes}"
    return found[0]


def test_the_three_processes_export_one_trace_from_post_to_order_completed(traced_stack, collector, clean_db, wait):
    import jwt

    now = int(time.time())
    token = jwt.encode({"sub": "tracy", "roles": ["user"], "exp": now + 600}, JWT_SECRET, algorithm="HS256")
    answer = httpx.post(
        traced_stack + "/orders",
        json={
            "items": [{"product_id": "sku-apple", "quantity": 1}],
            "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
        },
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert answer.status_code == 202, answer.text
    order_id = answer.json()["order_id"]
    wait(lambda: _status(clean_db, order_id) == "completed", what="order completed")

    expected = {
        ("orders-shim", "POST /orders"),
        ("orders-shim", "publish orders.commands"),
        ("orders-worker", "process PlaceOrder"),
        ("orders-relay", "publish orders.internal"),
        ("orders-worker", "process StartPayment"),
        ("orders-worker", "stripe StartPayment"),
        ("orders-relay", "publish orders.events"),
        ("orders-relay", "publish inventory"),
    }

    def one_trace() -> tuple[list[ExportedSpan], list[ExportedSpan]] | None:
        """(every span, the request's trace) once the request's trace holds every expected span."""
        spans = collector.spans()
        servers = [s for s in spans if s.name == "POST /orders"]
        if len(servers) != 1:
            return None
        trace = [s for s in spans if s.trace_id == servers[0].trace_id]
        keys = {s.attributes.get("messaging.rabbitmq.destination.routing_key") for s in trace}
        done = expected <= {(s.service, s.name) for s in trace} and {"order.completed", "stock.commit"} <= keys
        return (spans, trace) if done else None

    try:
        spans, trace = wait(one_trace, what="the order's spans from the three processes at the collector")
    except Exception:
        print(sorted({(s.service, s.name, s.trace_id) for s in collector.spans()}))
        raise
    server = _one(trace, "POST /orders")
    completed = _one(
        trace, "publish orders.events", **{"messaging.rabbitmq.destination.routing_key": "order.completed"}
    )
    assert completed.attributes["orders.message_type"] == "order.completed" and completed.kind == "PRODUCER"
    stripe_calls = [
        s
        for s in trace
        if s.kind == "CLIENT"
        and s.service == "orders-worker"
        and "payment_intents" in str(s.attributes.get("url.full") or s.attributes.get("http.url"))
    ]
    assert len(stripe_calls) == 1
    # the batch that applied the PlaceOrder is a trace of its own, linked to the command's span
    command = _one(trace, "process PlaceOrder")
    batch = [s for s in spans if s.name == "process batch" and (command.trace_id, command.span_id) in s.links]
    assert len(batch) == 1 and batch[0].trace_id != server.trace_id
