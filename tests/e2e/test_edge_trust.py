"""Trust at the edges: control characters, duplicate keys, taken order ids and squatted keys.

Each test is a hole a hostile client or a careless integrator found; each
fails on the code before its fix.  The HTTP ones run against the shim stack
of ``test_shim`` (real uvicorn, worker, relay); the AMQP ones against a
worker pool on the suite's vhost.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from tests.e2e.test_shim import Stack, stack  # noqa: F401 - the module-scoped stack fixture

PAYPAL = {"provider": "paypal", "return_url": "https://shop.example/ok\u0000x", "cancel_url": "https://shop.example/no"}


def _post(s: Stack, body: dict[str, Any], user: str = "alice", **headers: str) -> httpx.Response:
    return httpx.post(
        s.url + "/orders",
        content=json.dumps(body),
        timeout=40,
        headers={**s.auth(user), "Content-Type": "application/json", **headers},
    )


def test_a_nul_byte_in_any_string_answers_422_naming_the_field_and_places_nothing(stack):
    before = stack.count_orders()
    r = _post(stack, {"items": [{"product_id": "sku-apple", "quantity": 1}], "payment": PAYPAL})
    assert r.status_code == 422, r.text
    assert "return_url" in r.json()["message"]
    order_id = stack.awaiting()
    cancel = httpx.put(
        f"{stack.url}/orders/{order_id}/cancel", json={"reason": "bad\u0000reason"}, headers=stack.auth(), timeout=10
    )
    assert cancel.status_code == 422 and "reason" in cancel.json()["message"]
    assert "control characters" in cancel.json()["message"]
    assert stack.count_orders() == before + 1  # only the awaiting order


def test_a_taken_order_id_answers_the_same_generic_conflict_and_tells_nothing_of_its_owner(stack):
    bobs = stack.place("bob", wait=15)
    assert bobs.status_code == 201, bobs.text
    taken = bobs.json()["order_id"]
    for wait in (0, 3):  # at once, and when asked to wait for the worker's answer
        r = stack.place("alice", wait=wait, order_id=taken)
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "order_id_taken"
        assert "bob" not in r.text and "http-place" not in r.text and "message" not in r.json()["message"]
    assert stack.get(taken, user="bob").json()["user_id"] == "bob"


def test_the_worker_refuses_a_taken_order_id_without_echoing_the_placing_message(stack):
    """The race the shim's look-up cannot see: the worker's own answer is generic too."""
    from handlers.errors import Taken
    from schema.messages import PlaceOrder

    bobs = stack.place("bob", wait=15).json()["order_id"]
    with stack.engine.connect() as conn:
        placed_by = conn.execute(
            text("SELECT place_message_id FROM orders WHERE order_id = CAST(:o AS uuid)"), {"o": bobs}
        ).scalar_one()
    import pika

    from worker.shim.orders import place_message_id

    conn = pika.BlockingConnection(pika.URLParameters(stack.env["ORDERS_RABBITMQ__URL"]))
    ch = conn.channel()
    reply_q = ch.queue_declare("", exclusive=True).method.queue
    body = {
        "order_id": bobs,
        "user_id": "alice",
        "items": [{"product_id": "sku-apple", "quantity": 1}],
        "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
    }
    PlaceOrder.model_validate_json(json.dumps(body))
    ch.basic_publish(
        "orders.commands",
        "order.place",
        json.dumps(body).encode(),
        pika.BasicProperties(
            message_id=place_message_id(bobs, "alice"),
            type="PlaceOrder",
            content_type="application/json",
            reply_to=reply_q,
            correlation_id="squat-1",
            delivery_mode=2,
        ),
    )
    reply = None
    for method, _props, raw in ch.consume(reply_q, auto_ack=True, inactivity_timeout=20):
        reply = json.loads(raw) if method else None
        break
    conn.close()
    assert reply is not None and reply["result"] == "refused" and reply["error"] == Taken.code
    assert placed_by not in reply["message"] and "placed by" not in reply["message"]


def test_an_idempotency_key_cannot_be_squatted_by_computing_its_order_id(stack):
    # what anyone could compute before: uuid5 of a namespace written in the code
    old_namespace = uuid.UUID("0b7f5a8e-6a55-4f57-8d3c-5a3c7f2e9d14")
    predicted = str(uuid.uuid5(old_namespace, "place\x00bob\x00cart-42"))
    squat = stack.place("mallory", wait=15, order_id=predicted)
    assert squat.status_code == 201, squat.text
    mine = stack.place("bob", wait=15, headers={"Idempotency-Key": "cart-42"})
    assert mine.status_code == 201, mine.text
    assert mine.json()["order_id"] != predicted and mine.json()["user_id"] == "bob"
    assert stack.get(mine.json()["order_id"], user="bob").status_code == 200
    # the same key from another user is another order
    other = stack.place("carol", wait=15, headers={"Idempotency-Key": "cart-42"})
    assert other.status_code == 201 and other.json()["order_id"] != mine.json()["order_id"]


# -- the same refusals on AMQP: dead-lettered at once, never after five attempts ----------------


@pytest.fixture
def pool(service: Any, bus: Any, clean_db: Any, commands_only: list[str]) -> Any:
    return service("worker", "--processes", "1", *commands_only)


def test_commands_with_control_characters_or_duplicate_keys_are_dead_lettered_at_once(
    pool, bus, clean_db, wait, make_place
):
    nul_order = str(uuid.uuid4())
    bus.publish("PlaceOrder", {**make_place(order_id=nul_order), "payment": PAYPAL}, message_id="nul-place")
    bus.publish(
        "CancelOrder",
        {"order_id": nul_order, "requested_by": {"user_id": "user-1", "roles": ["user"]}, "reason": "bad\u0000reason"},
        message_id="nul-cancel",
    )
    dup_order = str(uuid.uuid4())
    raw = json.dumps(make_place(order_id=dup_order)).replace('"quantity": 2', '"quantity": 1, "quantity": 9999')
    assert raw.count('"quantity"') == 2
    bus.publish("PlaceOrder", raw.encode(), message_id="dup-place")
    dead = wait(lambda: (lambda d: d if len(d) >= 3 else None)(bus.dead_letters()), timeout=20, what="3 dead letters")
    by_id = {d["message_id"]: d["headers"] for d in dead}
    assert set(by_id) == {"nul-place", "nul-cancel", "dup-place"}
    for h in by_id.values():
        assert h["x-error-class"] == "InvalidMessage"
        assert h["x-attempts"] == 1
    assert "return_url" in by_id["nul-place"]["x-error-message"]
    assert "reason" in by_id["nul-cancel"]["x-error-message"]
    assert "duplicate key 'quantity'" in by_id["dup-place"]["x-error-message"]
    with clean_db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM orders")).scalar_one() == 0
