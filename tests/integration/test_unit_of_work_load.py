"""The unit of work loads an order, its lines and its payment with every field where it belongs.

``PostgresUnitOfWork._load_orders`` unpacks the rows of its three statements as tuples, in their column order
(reading them by name cost a quarter more CPU, ``scripts/bench_preload.py``): every field is given a value of
its own here, distinct from the others, and must come back in its own place, so a column added, dropped or
moved in one statement and not in the unpacking fails this test.
"""

from __future__ import annotations

import json
import uuid

from sqlalchemy import text

from handlers.orders import Line, Status
from handlers.unit_of_work import PaymentStatus
from tests.integration.test_payment_batches import placed
from worker.unit_of_work import PostgresUnitOfWork


def test_every_field_of_an_order_its_lines_and_its_payment_is_loaded_in_its_place(clean_db):
    [order_id] = placed(clean_db, 1)
    other = str(uuid.uuid4())  # named but not placed: loaded as None
    with clean_db.begin() as conn:
        conn.execute(
            text(
                "UPDATE orders SET status = 'completed', next_action = CAST(:na AS jsonb),"
                " shipment = CAST(:sh AS jsonb), reason = 'a reason', correlation_id = 'corr-9',"
                " paid_at = now() - interval '30 seconds' WHERE order_id = CAST(:o AS uuid)"
            ),
            {"o": order_id, "na": json.dumps({"type": "redirect"}), "sh": json.dumps({"carrier": "dhl"})},
        )
        conn.execute(
            text(
                "INSERT INTO payments (order_id, provider, status, amount, currency, idempotency_key,"
                " provider_payment_id, capture_id, refund_id, confirmed_event_id, attempts, last_error,"
                " amount_refunded, updated_at) VALUES (CAST(:o AS uuid), 'stripe', 'succeeded', 300, 'USD', 'key-1',"
                " 'pi_1', 'cap_1', 're_1', 'evt_1', 4, 'an error', 120, now() - interval '20 seconds')"
            ),
            {"o": order_id},
        )
        stored = conn.execute(
            text(
                "SELECT user_id, total, currency, payment_provider, payment_request, place_message_id"
                " FROM orders WHERE order_id = CAST(:o AS uuid)"
            ),
            {"o": order_id},
        ).one()
        lines = conn.execute(
            text(
                "SELECT product_id, quantity, unit_price FROM order_items WHERE order_id = CAST(:o AS uuid)"
                " ORDER BY line_no"
            ),
            {"o": order_id},
        ).all()

    with clean_db.begin() as conn:
        uow = PostgresUnitOfWork(conn, "test")
        uow.preload([order_id, other], ())
        order, payment = uow.order(order_id), uow.payment(order_id)
        assert uow.order(other) is None and uow.payment(other) is None
        conn.rollback()

    assert order is not None and payment is not None
    assert (order.order_id, order.user_id, order.status, order.loaded_status) == (
        order_id,
        stored.user_id,
        Status.COMPLETED,
        Status.COMPLETED,
    )
    assert (order.total, order.currency, order.payment_provider, order.place_message_id) == (
        stored.total,
        stored.currency,
        stored.payment_provider,
        stored.place_message_id,
    )
    assert order.payment_request == stored.payment_request and isinstance(order.payment_request, dict)
    assert (order.next_action, order.shipment, order.reason, order.correlation_id) == (
        {"type": "redirect"},
        {"carrier": "dhl"},
        "a reason",
        "corr-9",
    )
    assert order.paid_seconds_ago is not None and 29 < order.paid_seconds_ago < 300
    assert order.lines == [Line(*row) for row in lines] and order.lines
    assert (payment.order_id, payment.provider, payment.status, payment.amount, payment.currency) == (
        order_id,
        "stripe",
        PaymentStatus.SUCCEEDED,
        300,
        "USD",
    )
    assert (payment.idempotency_key, payment.provider_payment_id, payment.capture_id, payment.refund_id) == (
        "key-1",
        "pi_1",
        "cap_1",
        "re_1",
    )
    assert (payment.confirmed_event_id, payment.attempts, payment.last_error, payment.amount_refunded) == (
        "evt_1",
        4,
        "an error",
        120,
    )
    assert 19 < payment.unchanged_seconds < 300
