"""Two workers racing on one order: exactly one wins, state and events agree."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

from sqlalchemy import text

from schema.topology import queue_of
from worker.commands import Applier
from worker.handled import Result
from worker.rabbit.connection import Delivery


def delivery(kind: str, body: dict[str, Any], message_id: str | None = None) -> Delivery:
    return Delivery(
        delivery_tag=1,
        exchange="orders.commands",
        routing_key="x",
        queue=queue_of(kind) or "",
        body=json.dumps(body).encode(),
        message_id=message_id or str(uuid.uuid4()),
        message_type=kind,
        correlation_id=None,
        reply_to=None,
        content_type="application/json",
        headers={},
        redelivered=False,
    )


def apply(applier: Applier, d: Delivery) -> Any:
    good, bad = applier.decode_all([d])
    assert not bad
    return applier.apply_one(*good[0])


def test_cancel_and_payment_confirmation_racing_one_order_have_one_winner(clean_db, make_place):
    applier = Applier(clean_db, inplace_retries=5)
    orders = [str(uuid.uuid4()) for _ in range(40)]
    for order_id in orders:
        assert apply(applier, delivery("PlaceOrder", make_place(order_id=order_id))).result is Result.APPLIED

    barrier = threading.Barrier(2)
    results: dict[str, list[Any]] = {o: [] for o in orders}

    def run(kind: str) -> None:
        for order_id in orders:
            body = (
                {"order_id": order_id, "requested_by": {"user_id": "user-1", "roles": ["user"]}}
                if kind == "CancelOrder"
                else {
                    "order_id": order_id,
                    "provider": "stripe",
                    "payment_id": f"pi_{order_id[:8]}",
                    "amount": 300,
                    "currency": "USD",
                    "event_id": f"evt_{order_id}",
                }
            )
            barrier.wait()
            results[order_id].append((kind, apply(applier, delivery(kind, body))))

    threads = [threading.Thread(target=run, args=(k,)) for k in ("CancelOrder", "PaymentConfirmed")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    with clean_db.connect() as conn:
        status = dict(conn.execute(text("SELECT order_id::text, status FROM orders")).all())
        events: dict[str, list[str]] = {}
        for oid, key in conn.execute(text("SELECT order_id::text, routing_key FROM outbox ORDER BY id")):
            events.setdefault(oid, []).append(key)
    winners = {"completed": 0, "cancelled": 0}
    for order_id in orders:
        final = status[order_id]
        outcome = {kind: h.result for kind, h in results[order_id]}
        assert outcome["PaymentConfirmed"] is Result.APPLIED
        assert outcome["CancelOrder"] is (Result.REFUSED if final == "completed" else Result.APPLIED)
        winners[final] += 1
        keys = events[order_id]
        assert keys[:3] == ["stock.reserve", "order.placed", "payment.start"]
        if final == "completed":
            # the cancel came second and was refused: no release, no cancel event
            assert "stock.release" not in keys and "order.cancelled" not in keys
            assert keys.count("stock.commit") == keys.count("order.completed") == 1
        else:
            # the payment came second: the money goes back, stock is never committed
            assert "stock.commit" not in keys and "order.completed" not in keys
            assert keys.count("stock.release") == keys.count("order.cancelled") == 1
            assert keys.count("payment.refund") == 1
    assert winners["completed"] + winners["cancelled"] == len(orders)
