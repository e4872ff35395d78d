"""The exactly-once command path, end to end through RabbitMQ and PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import text


def rows(engine: Any, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).all()


def status_of(engine: Any, order_id: str) -> str | None:
    found = rows(engine, "SELECT status FROM orders WHERE order_id = CAST(:o AS uuid)", o=order_id)
    return found[0].status if found else None


def event_keys(bus: Any, order_id: str) -> list[str]:
    return [e["routing_key"] for e in bus.events() if e["body"]["order_id"] == order_id]


@pytest.fixture
def running(service: Any, bus: Any, clean_db: Any, commands_only) -> Any:
    """A worker pool of two and a relay, on clean queues and tables."""
    worker = service("worker", "--processes", "2", *commands_only)
    relay = service("relay")
    return worker, relay


def test_place_order_is_priced_from_the_product_table_and_reserves_stock(running, bus, clean_db, wait, make_place):
    order_id = str(uuid.uuid4())
    bus.publish(
        "PlaceOrder", make_place(items=[("sku-apple", 2), ("sku-pear", 1)], order_id=order_id), correlation_id="corr-1"
    )
    wait(lambda: len(event_keys(bus, order_id)) >= 2, what="stock.reserve and order.placed")
    order = rows(clean_db, "SELECT status, total, currency, correlation_id FROM orders")[0]
    assert (order.status, order.total, order.currency, order.correlation_id) == (
        "pending",
        2 * 150 + 275,
        "USD",
        "corr-1",
    )
    events = {e["routing_key"]: e for e in bus.events()}
    assert set(events) == {"stock.reserve", "order.placed"}
    reserve = events["stock.reserve"]
    assert reserve["exchange"] == "inventory"
    assert reserve["message_id"] == reserve["body"]["event_id"]
    assert sorted((i["product_id"], i["quantity"]) for i in reserve["body"]["items"]) == [
        ("sku-apple", 2),
        ("sku-pear", 1),
    ]
    assert events["order.placed"]["exchange"] == "orders.events"
    assert events["order.placed"]["body"]["total"] == 575


def test_unknown_or_inactive_product_rejects_the_order_without_reserving(running, bus, clean_db, wait, make_place):
    unknown, inactive = str(uuid.uuid4()), str(uuid.uuid4())
    bus.publish("PlaceOrder", make_place(items=[("sku-nope", 1)], order_id=unknown))
    bus.publish("PlaceOrder", make_place(items=[("sku-gone", 1)], order_id=inactive))
    wait(lambda: event_keys(bus, unknown) and event_keys(bus, inactive), what="rejections")
    assert status_of(clean_db, unknown) == "rejected"
    assert status_of(clean_db, inactive) == "rejected"
    assert event_keys(bus, unknown) == ["order.rejected"]
    order = rows(clean_db, "SELECT reason, currency FROM orders WHERE order_id = CAST(:o AS uuid)", o=unknown)[0]
    assert "unknown product sku-nope" in order.reason
    # no product known, no currency: NULL, never a made-up code, in the row and in the event
    assert order.currency is None
    from pydantic import TypeAdapter

    from schema.messages import OrderEvent

    rejected = [e for e in bus.events() if e["body"]["order_id"] == unknown][0]["body"]
    assert (
        rejected["currency"] is None and TypeAdapter(OrderEvent).validate_json(json.dumps(rejected))["currency"] is None
    )


def test_the_same_command_three_times_has_one_effect_and_one_event_per_id(running, bus, clean_db, wait, make_place):
    body = make_place()
    for _ in range(3):
        bus.publish("PlaceOrder", body, message_id="dup-place-1")
    # without order_id the id is derived from message_id, so all three name one order
    wait(lambda: len(bus.events()) >= 2, what="events")
    wait(lambda: bus.depth("orders.place") == 0, what="queue drained")
    order_id = rows(clean_db, "SELECT order_id::text FROM orders")[0].order_id
    bus.publish(
        "CancelOrder",
        {"order_id": order_id, "requested_by": {"user_id": "user-1", "roles": ["user"]}},
        message_id="dup-cancel-1",
    )
    bus.publish(
        "CancelOrder",
        {"order_id": order_id, "requested_by": {"user_id": "user-1", "roles": ["user"]}},
        message_id="dup-cancel-1",
    )
    wait(lambda: "order.cancelled" in event_keys(bus, order_id), what="cancel")
    wait(lambda: bus.depth("orders.cancel") == 0, what="cancel queue drained")
    assert rows(clean_db, "SELECT count(*) AS n FROM orders")[0].n == 1
    assert Counter(event_keys(bus, order_id)) == Counter(
        {"stock.reserve": 1, "order.placed": 1, "stock.release": 1, "order.cancelled": 1}
    )
    assert rows(clean_db, "SELECT count(*) AS n FROM order_transitions")[0].n == 2


def test_cancel_and_confirmation_before_their_place_order_end_right(running, bus, clean_db, wait, make_place):
    cancelled, paid = str(uuid.uuid4()), str(uuid.uuid4())
    bus.publish("CancelOrder", {"order_id": cancelled, "requested_by": {"user_id": "user-1", "roles": ["user"]}})
    bus.publish(
        "PaymentConfirmed",
        {
            "order_id": paid,
            "provider": "stripe",
            "payment_id": "pi_early",
            "amount": 300,
            "currency": "USD",
            "event_id": "evt_early",
        },
    )
    wait(lambda: bus.depth("orders.delay.1s") + bus.depth("orders.cancel") + bus.depth("orders.payment-confirmed") >= 0)
    bus.publish("PlaceOrder", make_place(order_id=cancelled))
    bus.publish("PlaceOrder", make_place(order_id=paid))
    wait(lambda: status_of(clean_db, cancelled) == "cancelled", what="late cancel applied")
    wait(lambda: status_of(clean_db, paid) == "completed", what="late confirmation applied")
    wait(lambda: "stock.commit" in event_keys(bus, paid), what="stock.commit")
    assert Counter(event_keys(bus, cancelled)) == Counter(
        {"stock.reserve": 1, "order.placed": 1, "stock.release": 1, "order.cancelled": 1}
    )
    assert Counter(event_keys(bus, paid)) == Counter(
        {"stock.reserve": 1, "order.placed": 1, "stock.commit": 1, "order.completed": 1}
    )


def test_payment_confirmation_checks_amount_and_is_idempotent(running, bus, clean_db, wait, make_place):
    order_id = str(uuid.uuid4())
    bus.publish("PlaceOrder", make_place(order_id=order_id))
    wait(lambda: status_of(clean_db, order_id) == "pending")
    wrong = {
        "order_id": order_id,
        "provider": "stripe",
        "payment_id": "pi_1",
        "amount": 299,
        "currency": "USD",
        "event_id": "evt_wrong",
    }
    bus.publish("PaymentConfirmed", wrong)
    wait(lambda: bus.depth("orders.payment-confirmed") == 0)
    wait(lambda: rows(clean_db, "SELECT 1 FROM inbox WHERE message_id LIKE '%'") and True)
    assert status_of(clean_db, order_id) == "pending"
    right = {**wrong, "amount": 300, "event_id": "evt_right"}
    for n in range(3):
        bus.publish("PaymentConfirmed", {**right, "event_id": f"evt_right_{n}"})
    wait(lambda: status_of(clean_db, order_id) == "completed")
    wait(lambda: "order.completed" in event_keys(bus, order_id))
    wait(lambda: bus.depth("orders.payment-confirmed") == 0)
    assert Counter(event_keys(bus, order_id))["stock.commit"] == 1


def test_someone_elses_cancel_is_refused_and_admin_may_cancel(running, bus, clean_db, wait, make_place):
    order_id = str(uuid.uuid4())
    bus.publish("PlaceOrder", make_place(user="owner", order_id=order_id))
    wait(lambda: status_of(clean_db, order_id) == "pending")
    bus.publish("CancelOrder", {"order_id": order_id, "requested_by": {"user_id": "mallory", "roles": ["user"]}})
    wait(lambda: bus.depth("orders.cancel") == 0)
    wait(lambda: rows(clean_db, "SELECT count(*) AS n FROM inbox WHERE consumer = 'orders'")[0].n >= 2)
    assert status_of(clean_db, order_id) == "pending"
    bus.publish("CancelOrder", {"order_id": order_id, "requested_by": {"user_id": "ops", "roles": ["admin"]}})
    wait(lambda: status_of(clean_db, order_id) == "cancelled")


def test_malformed_unknown_type_and_missing_message_id_are_dead_lettered(running, bus, clean_db, wait, make_place):
    bus.publish("PlaceOrder", b"{not json", message_id="bad-json")
    bus.publish("ShipEverything", {"x": 1}, message_id="bad-type")
    bus.publish("PlaceOrder", make_place(), message_id="")  # no message_id property
    bus.publish("PlaceOrder", {**make_place(), "price": 1}, message_id="bad-field")
    good = str(uuid.uuid4())
    bus.publish("PlaceOrder", make_place(order_id=good))
    dead = wait(lambda: (lambda d: d if len(d) >= 4 else None)(bus.dead_letters()), what="4 dead letters")
    by_id = {d["message_id"]: d for d in dead}
    assert "Invalid JSON" in by_id["bad-json"]["headers"]["x-error-message"]
    assert "unknown message type 'ShipEverything'" in by_id["bad-type"]["headers"]["x-error-message"]
    assert "price: Extra inputs are not permitted" in by_id["bad-field"]["headers"]["x-error-message"]
    assert any(d["message_id"] is None and "message_id" in d["headers"]["x-error-message"] for d in dead)
    for d in dead:
        h = d["headers"]
        assert h["x-original-queue"] == "orders.place"
        assert h["x-original-routing-key"] == "order.place"
        assert h["x-original-exchange"] == "orders.commands"
        assert h["x-error-class"] == "InvalidMessage"
        assert h["x-attempts"] == 1
    assert by_id["bad-json"]["body"] == b"{not json"
    wait(lambda: status_of(clean_db, good) == "pending", what="worker still consuming")


def test_a_cancel_for_an_order_never_placed_ends_in_the_dead_letter_queue(running, bus, clean_db, wait):
    bus.publish(
        "CancelOrder",
        {"order_id": str(uuid.uuid4()), "requested_by": {"user_id": "u", "roles": ["user"]}},
        message_id="orphan-cancel",
    )
    dead = wait(lambda: bus.dead_letters(), timeout=30, what="orphan dead-lettered after retry tiers")
    wait(lambda: bus.depth("orders.delay.1s") + bus.depth("orders.delay.2s") + bus.depth("orders.cancel") == 0)
    dead = bus.dead_letters()
    assert len(dead) == 1, "each retry went to one delay tier only"
    h = dead[0]["headers"]
    assert dead[0]["message_id"] == "orphan-cancel"
    assert h["x-error-class"] == "RetryLater"
    assert h["x-attempts"] == 3  # two delay tiers, then the dead-letter queue
    assert h["x-original-routing-key"] == "order.cancel"


def test_a_place_order_routed_into_orders_cancel_is_dead_lettered_and_places_nothing(
    running, bus, clean_db, wait, make_place
):
    """Hole: the worker dispatched on the ``type`` property, so a PlaceOrder that sat in orders.cancel was placed."""
    misrouted = str(uuid.uuid4())
    bus.publish("PlaceOrder", make_place(order_id=misrouted), message_id="misrouted", routing_key="order.cancel")
    dead = wait(lambda: bus.dead_letters(), what="the misrouted PlaceOrder dead-lettered")
    h = dead[0]["headers"]
    assert (dead[0]["message_id"], h["x-error-class"], h["x-attempts"]) == ("misrouted", "InvalidMessage", 1)
    assert h["x-original-queue"] == "orders.cancel"
    assert "'PlaceOrder' does not belong on queue 'orders.cancel'" in h["x-error-message"]
    good = str(uuid.uuid4())
    bus.publish("PlaceOrder", make_place(order_id=good))
    wait(lambda: status_of(clean_db, good) == "pending", what="the worker still consuming")
    assert status_of(clean_db, misrouted) is None
    assert rows(clean_db, "SELECT count(*) AS n FROM inbox WHERE message_id = 'misrouted'")[0].n == 0


def _payment_delivery(queue: str, message_type: str, body: dict[str, Any]) -> Any:
    from worker.rabbit.connection import Delivery

    return Delivery(
        delivery_tag=1,
        exchange="orders.internal",
        routing_key="payment.refund",
        queue=queue,
        body=json.dumps(body).encode(),
        message_id=str(uuid.uuid4()),
        message_type=message_type,
        correlation_id=None,
        reply_to=None,
        content_type="application/json",
        headers={},
        redelivered=False,
    )


def test_orders_payments_takes_only_payment_steps_and_a_payment_step_only_from_there(clean_db, make_place):
    from worker.handled import Result
    from worker.payment_runner import PaymentRunner

    step = PaymentRunner(clean_db, gateways={})
    refund = {"order_id": str(uuid.uuid4())}
    # accepted: its order is not there yet, so it waits in the delay tiers (not dead-lettered as invalid)
    assert step.handle(_payment_delivery("orders.payments", "RefundPayment", refund)).result is Result.DEFERRED
    placed = step.handle(_payment_delivery("orders.payments", "PlaceOrder", make_place()))
    assert placed.result is Result.INVALID
    misplaced = step.handle(_payment_delivery("orders.place", "RefundPayment", refund))
    assert misplaced.result is Result.INVALID
    assert "'RefundPayment' does not belong on queue 'orders.place'" in str(misplaced.reason)
