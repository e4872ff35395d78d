"""The sender map in production, on the real unit of work (PostgreSQL): who may send what, and what a refusal of
the sender leaves behind.  ``tests/e2e/test_senders.py`` does the same through real broker users."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from handlers.senders import SenderMap
from schema.topology import COMMAND_ROUTES
from tests.support import place_body
from worker.commands import Applier, decode
from worker.handled import Result
from worker.identity import SENDER_HEADER, Identities
from worker.rabbit.connection import Delivery

QUEUES = {r.message_type: r.queue for r in COMMAND_ROUTES}
SERVICE = "orders-service"
PRODUCTION = SenderMap.of({"shop": (("PlaceOrder", "CancelOrder"), False, ())}, SERVICE, open_=False)


def delivery(message_type: str, body: dict[str, Any], user_id: str | None, **headers: Any) -> Delivery:
    return Delivery(
        delivery_tag=1,
        exchange="orders.commands",
        routing_key="",
        queue=QUEUES[message_type],
        body=json.dumps(body).encode(),
        message_id=str(uuid.uuid4()),
        message_type=message_type,
        correlation_id=None,
        reply_to=None,
        content_type="application/json",
        headers=headers,
        redelivered=False,
        user_id=user_id,
    )


def apply(engine: Any, d: Delivery, senders: SenderMap = PRODUCTION) -> Any:
    return Applier(engine, identities=Identities(senders)).apply_batch([(d, decode(d))])[0]


def outbox(engine: Any) -> list[tuple[str, dict[str, Any]]]:
    with engine.connect() as conn:
        return [(r.routing_key, json.loads(r.body)) for r in conn.execute(text("SELECT routing_key, body FROM outbox"))]


def orders(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM orders")).scalar_one())


@pytest.mark.parametrize("user_id", [None, "stranger"], ids=["no user_id", "a user the map does not name"])
def test_in_production_an_unknown_sender_changes_nothing_and_is_announced_once(clean_db, user_id):
    d = delivery("PlaceOrder", place_body(order_id=str(uuid.uuid4())), user_id)
    first = apply(clean_db, d)
    assert first.result is Result.INVALID and type(first.error).__name__ == "Unauthorized"
    assert first.outcome.error == "unauthorized"
    again = apply(clean_db, d)  # delivered again (or replayed unchanged): refused again, announced once
    assert again.result is Result.INVALID
    assert orders(clean_db) == 0
    refused = [body for key, body in outbox(clean_db) if key == "command.refused"]
    assert [(b["reason"], b["command"], b["message_id"]) for b in refused] == [
        ("unauthorized", "PlaceOrder", d.message_id)
    ]
    # its own inbox row is free: the same message is applied once the map allows its sender
    allowed = SenderMap.of({"stranger": (("PlaceOrder",), False, ())}, SERVICE, open_=False)
    if user_id is not None:
        assert apply(clean_db, d, allowed).result is Result.APPLIED
        assert orders(clean_db) == 1


def test_the_service_vouches_for_the_first_sender_only_on_what_it_published_itself(clean_db):
    body = place_body(order_id=str(uuid.uuid4()))
    # a retry the service republished for the shop: the shop's rights
    retried = delivery("PlaceOrder", body, SERVICE, **{SENDER_HEADER: "shop"})
    assert apply(clean_db, retried).result is Result.APPLIED
    # anyone else naming a sender in the header is judged by their own user_id
    forged = delivery(
        "CancelOrder",
        {"order_id": body["order_id"], "requested_by": {"user_id": "x", "roles": ["user"]}},
        "stranger",
        **{SENDER_HEADER: SERVICE},
    )
    assert apply(clean_db, forged).result is Result.INVALID
    # a dead letter of a command that named no sender stays without one when the service republishes it
    anonymous = delivery("PlaceOrder", place_body(order_id=str(uuid.uuid4())), SERVICE, **{SENDER_HEADER: ""})
    assert apply(clean_db, anonymous).result is Result.INVALID
