"""One trace from ``POST /orders`` to ``order.completed`` (issue 14), and none when tracing is off.

Everything runs in this process against the real PostgreSQL, RabbitMQ and
the Stripe fake, as the three processes would: the shim app (Starlette's
TestClient), the command consumer's strategy (``Batches`` with the real
``BatchApplier`` and ``Applier``) on a real consumer connection, the relay's
round, the payment step.  Spans go to the SDK's in-memory exporter.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from starlette.testclient import TestClient

from schema.topology import PAYMENTS_QUEUE
from worker import tracing
from worker.commands import Applier, BatchApplier
from worker.consume import Batches
from worker.handled import Result
from worker.payment_runner import PaymentRunner
from worker.rabbit.connection import BlockingBroker, Delivery
from worker.rabbit.publisher import PipelinedPublisher
from worker.reconnect import DatabaseHold
from worker.relay import Relay
from worker.settlement import Settlement

CAPTURE = "test.tracing.capture"


@pytest.fixture
def capture(bus: Any) -> Iterator[Any]:
    """A queue bound to the event exchanges that keeps each message's headers."""
    bus.ch.queue_delete(CAPTURE)
    bus.ch.queue_declare(CAPTURE, durable=True, arguments={"x-queue-type": "quorum"})
    for exchange in ("inventory", "orders.events"):
        bus.ch.queue_bind(CAPTURE, exchange, routing_key="#")

    def read() -> dict[str, dict[str, Any]]:
        found = {}
        while True:
            method, props, _ = bus.ch.basic_get(CAPTURE, auto_ack=True)
            if method is None:
                return found
            found[method.routing_key] = dict(props.headers or {})

    yield read
    bus.ch.queue_delete(CAPTURE)


class Service:
    """The three processes' parts, in this process."""

    def __init__(self, settings: Any, engine: Any) -> None:
        from handlers.payments import build_gateways
        from worker.settings import load_settings
        from worker.shim.app import create_app
        from worker.shim.auth import issue_token

        self.settings, self.engine = settings, engine
        engine.dispose()  # connections made from here on are the (instrumented, when tracing is on) driver's
        self.url = settings.rabbitmq.url.get_secret_value()
        self.shim = TestClient(create_app(load_settings()))
        self.shim.__enter__()
        self.token = issue_token(settings.shim, f"tracer-{uuid.uuid4().hex[:8]}", "user")
        self.broker = BlockingBroker(self.url).connect()
        self.publisher = PipelinedPublisher(self.url).connect()
        self.relay = Relay(settings, engine)
        self.step = PaymentRunner(engine, build_gateways(settings))
        self.settlement = Settlement(settings.worker.retry_delays_seconds)
        hold = DatabaseHold(engine, threading.Event(), self.broker.sleep)
        self.batches = Batches(BatchApplier(Applier(engine), hold), self.settlement, 250, 0.01)

    def place(self, body: dict[str, Any]) -> str:
        answer = self.shim.post("/orders", json=body, headers={"Authorization": f"Bearer {self.token}"})
        assert answer.status_code == 202, answer.text
        return str(answer.json()["order_id"])

    def take(self, queue: str, count: int = 1) -> list[Delivery]:
        self.broker.consume([queue], 100)
        got: list[Delivery] = []
        for _ in range(50):
            got += self.broker.poll(count - len(got), 0.2, 0.01)
            if len(got) >= count:
                break
        self.broker.cancel()
        assert len(got) == count, f"{len(got)} of {count} deliveries from {queue}"
        return got

    def apply_commands(self) -> list[Delivery]:
        """The command consumer's strategy on one delivered batch (settled and acked)."""
        deliveries = self.take("orders.place")
        self.batches.submit(self.broker, deliveries)
        return deliveries

    def run_payment_step(self) -> Delivery:
        (d,) = self.take(PAYMENTS_QUEUE)
        handled = self.step.handle(d)
        assert handled.result is Result.APPLIED, handled.reason
        self.settlement.settle(self.broker, handled)
        self.broker.ack(d.delivery_tag)
        return d

    def relay_round(self) -> int:
        return self.relay.publish_pending(self.publisher, 100)

    def outbox(self, order_id: str) -> dict[str, str | None]:
        with self.engine.begin() as conn:
            rows = conn.execute(
                text("SELECT routing_key, traceparent FROM outbox WHERE order_id = CAST(:o AS uuid)"), {"o": order_id}
            ).all()
        return {r.routing_key: r.traceparent for r in rows}

    def close(self) -> None:
        self.shim.__exit__(None, None, None)
        self.publisher.close()
        self.broker.close()


@pytest.fixture
def service(settings: Any, clean_db: Any, bus: Any) -> Iterator[Service]:
    s = Service(settings, clean_db)
    yield s
    s.close()


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def _traceparent(span: Any) -> str:
    return f"00-{_hex(span.context.trace_id, 32)}-{_hex(span.context.span_id, 16)}-{_hex(span.context.trace_flags, 2)}"


def _only(spans: list[Any], name: str, **attributes: Any) -> Any:
    found = [s for s in spans if s.name == name and all(s.attributes.get(k) == v for k, v in attributes.items())]
    assert len(found) == 1, f"{len(found)} spans {name} {attributes}: {[s.name for s in spans]}"
    return found[0]


def _http_url(span: Any) -> str:
    """The URL of an HTTP client span (stable or older semantic conventions)."""
    return str(span.attributes.get("url.full") or span.attributes.get("http.url") or "")


def _ancestors(span: Any, by_id: dict[int, Any]) -> list[str]:
    names = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


def test_one_trace_from_post_orders_to_order_completed_with_the_provider_call(
    spans, service, capture, make_place, fakes
):
    # (``spans`` before ``service``: the shim app is instrumented when it is made with tracing on)
    body = make_place(items=[("sku-apple", 2)])
    body.pop("user_id")
    order_id = service.place(body)

    (place,) = service.apply_commands()
    assert place.headers.get("traceparent")  # the shim's publish put it into the command's headers
    stored = service.outbox(order_id)
    assert set(stored) == {"stock.reserve", "order.placed", "payment.start"} and all(stored.values())
    assert service.relay_round() == 3
    payment = service.run_payment_step()
    assert service.relay_round() == 2  # stock.commit, order.completed
    published = capture()
    assert {"stock.reserve", "order.placed", "stock.commit", "order.completed"} <= set(published)

    finished = list(spans.get_finished_spans())
    by_id = {s.context.span_id: s for s in finished}
    server = _only(finished, "POST /orders")
    trace_id = server.context.trace_id
    shim_publish = _only(finished, "publish orders.commands")
    command = _only(finished, "process PlaceOrder")
    batch = _only(finished, "process batch")
    start_publish = _only(
        finished, "publish orders.internal", **{"messaging.rabbitmq.destination.routing_key": "payment.start"}
    )
    step = _only(finished, "process StartPayment")
    provider_call = _only(finished, "stripe StartPayment")
    completed_publish = _only(
        finished, "publish orders.events", **{"messaging.rabbitmq.destination.routing_key": "order.completed"}
    )
    http_calls = [s for s in finished if s.kind.name == "CLIENT" and _http_url(s)]
    assert http_calls, "the Stripe SDK's HTTP request was not traced"
    stripe_http = [s for s in http_calls if _http_url(s).startswith(f"{fakes['stripe'].url}/v1/payment_intents")]
    assert len(stripe_http) == 1, [s.attributes for s in http_calls]

    # one trace, from the request to the event that ends it, with the provider call in it
    chain = [server, shim_publish, command, start_publish, step, provider_call, stripe_http[0], completed_publish]
    assert {s.context.trace_id for s in chain} == {trace_id}
    # ... and how each hop hangs on the one before it
    assert shim_publish.parent.span_id == server.context.span_id
    assert command.parent.span_id == shim_publish.context.span_id  # the command's headers carried it
    assert start_publish.parent.span_id == command.context.span_id  # the outbox row stored it
    assert step.parent.span_id == start_publish.context.span_id  # the internal command's headers carried it
    assert _ancestors(stripe_http[0], by_id)[:2] == ["stripe StartPayment", "process StartPayment"]
    assert completed_publish.parent.span_id == step.context.span_id  # emitted by the step's second transaction

    # the batch is a trace of its own, linked both ways to the command it applied
    assert batch.parent is None and batch.context.trace_id != trace_id
    assert command.context.span_id in {link.context.span_id for link in batch.links}
    assert shim_publish.context.span_id in {link.context.span_id for link in batch.links}
    assert [link.context.span_id for link in command.links] == [batch.context.span_id]
    batch_sql = [s for s in finished if s.context.trace_id == batch.context.trace_id and s.kind.name == "CLIENT"]
    assert batch_sql and all(s.attributes.get("db.system.name", s.attributes.get("db.system")) for s in batch_sql)

    # what travelled in the messages and the outbox rows
    assert place.headers["traceparent"] == _traceparent(shim_publish)
    assert payment.headers["traceparent"] == _traceparent(start_publish)
    assert published["order.completed"]["traceparent"] == _traceparent(completed_publish)
    assert stored["payment.start"] == _traceparent(command)
    # the relay's round links to the stored context of each event it published
    rounds = [s for s in finished if s.name == "publish outbox"]
    assert any(command.context.span_id in {link.context.span_id for link in r.links} for r in rounds)
    assert any(step.context.span_id in {link.context.span_id for link in r.links} for r in rounds)


def test_with_tracing_off_nothing_carries_a_traceparent(service, capture, make_place, fakes):
    assert not tracing.ACTIVE
    body = make_place(items=[("sku-pear", 1)])
    body.pop("user_id")
    order_id = service.place(body)

    (place,) = service.apply_commands()
    assert "traceparent" not in place.headers
    stored = service.outbox(order_id)
    assert set(stored) == {"stock.reserve", "order.placed", "payment.start"}
    assert list(stored.values()) == [None, None, None]
    assert service.relay_round() == 3
    payment = service.run_payment_step()
    assert "traceparent" not in payment.headers
    assert service.relay_round() == 2
    published = capture()
    assert published and all("traceparent" not in headers for headers in published.values())


def test_each_providers_sdk_calls_are_spans_under_the_payment_call(spans, provider):
    """Whatever HTTP client each SDK really uses (Stripe's through our urllib3 client, PayPal's apimatic core over
    requests) is instrumented: its requests to the provider are spans under the call's span."""
    gateway = provider.gateway()  # made after tracing is on, as a worker process makes it
    with tracing.span(f"{provider.name} StartPayment"):
        result = gateway.start(provider.request(order_id=str(uuid.uuid4())))
    assert result.outcome is provider.started
    finished = list(spans.get_finished_spans())
    call = _only(finished, f"{provider.name} StartPayment")
    http = [s for s in finished if s.kind.name == "CLIENT" and _http_url(s).startswith(provider.url)]
    assert http and all(s.parent.span_id == call.context.span_id for s in http)
    assert any(_http_url(s).startswith(provider.url + provider.TERMS[provider.name]["start_path"]) for s in http)
