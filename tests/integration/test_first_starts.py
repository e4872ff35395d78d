"""A first start calls the provider with nothing written before it (worker/payment_runner.py ``_first_starts``).

PostgreSQL is real; the gateway is the test's own, and looks at the database while its call is out.  What
must hold without the write: a cancel that lands during the call still gets the money back, a worker that
dies during the call leaves a message that, delivered again, asks the provider again under the same key
whatever became of the order, a second copy of the message that finds the order ended records nothing
that would stop that, and a step held through a database outage after its call runs again as delivered again.
"""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pika
import pytest
from sqlalchemy import text

from handlers.payments.base import PaymentOutcome, PaymentResult, PermanentPaymentError
from schema.topology import queue_of
from tests.support import place_body
from worker.commands import Applier, decode
from worker.handled import Result
from worker.payment_runner import PaymentRunner, first_delivery
from worker.rabbit.connection import Delivery


def delivery(kind: str, body: dict[str, Any], message_id: str | None = None, **fields: Any) -> Delivery:
    d = Delivery(
        1,
        "x",
        "",
        queue_of(kind) or "",
        json.dumps(body).encode(),
        message_id or str(uuid.uuid4()),
        kind,
        None,
        None,
        "application/json",
        {},
        False,
    )
    return replace(d, **fields)


def place(engine: Any) -> str:
    order_id = str(uuid.uuid4())
    d = delivery("PlaceOrder", place_body(order_id=order_id))
    assert Applier(engine).apply_batch([(d, decode(d))])[0].result is Result.APPLIED
    return order_id


def cancel(engine: Any, order_id: str) -> None:
    d = delivery("CancelOrder", {"order_id": order_id, "requested_by": {"user_id": "user-1", "roles": ["user"]}})
    assert Applier(engine).apply_batch([(d, decode(d))])[0].result is Result.APPLIED


def row(engine: Any, sql: str, order_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), {"o": order_id}).first()


def facts(engine: Any, order_id: str) -> dict[str, Any]:
    """The order's status, its payment (status, attempts), its inbox rows and the routing keys it emitted."""
    with engine.connect() as conn:
        o = {"o": order_id}
        status = conn.execute(text("SELECT status FROM orders WHERE order_id = CAST(:o AS uuid)"), o).scalar()
        payment = conn.execute(
            text("SELECT status, attempts FROM payments WHERE order_id = CAST(:o AS uuid)"), o
        ).first()
        keys = conn.execute(
            text("SELECT routing_key FROM outbox WHERE order_id = CAST(:o AS uuid) ORDER BY id"), o
        ).scalars()
        inbox = conn.execute(text("SELECT count(*) FROM inbox WHERE consumer = 'payments'")).scalar()
    return {
        "status": status,
        "payment": tuple(payment) if payment else None,
        "keys": list(keys),
        "payments_inbox": inbox,
    }


class Gateway:
    """Answers a start at once (succeeded), after ``during`` ran with the request; counts the keys asked."""

    provider = "stripe"

    def __init__(self, during: Any = None, answer: Any = None) -> None:
        self.during = during
        self.answer = answer
        self.keys: list[str] = []

    def start(self, request: Any) -> Any:
        self.keys.append(request.idempotency_key)
        if self.during is not None:
            self.during(request)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return PaymentResult(PaymentOutcome.SUCCEEDED, "pi_" + request.order_id[:12])


def start(order_id: str, message_id: str | None = None, **fields: Any) -> Delivery:
    return delivery("StartPayment", {"order_id": order_id}, message_id or f"start-{order_id}", **fields)


def test_a_first_start_writes_nothing_before_its_call_and_records_the_attempt_with_the_answer(clean_db):
    order_id = place(clean_db)
    before = row(clean_db, "SELECT xmin::text, updated_at FROM orders WHERE order_id = CAST(:o AS uuid)", order_id)
    seen: list[Any] = []

    def during(_request: Any) -> None:  # the order as the call finds it: untouched, unlocked, no payment
        seen.append(facts(clean_db, order_id))
        seen.append(
            row(clean_db, "SELECT xmin::text, updated_at FROM orders WHERE order_id = CAST(:o AS uuid)", order_id)
        )

    gateway = Gateway(during)
    [h] = PaymentRunner(clean_db, {"stripe": gateway}).handle_batch([start(order_id)])
    assert h.result is Result.APPLIED
    assert seen[0]["payment"] is None and seen[0]["status"] == "pending" and seen[0]["payments_inbox"] == 0
    assert seen[1] == before  # neither locked (a lock writes the row's xmax, not this) nor updated
    after = facts(clean_db, order_id)
    assert (after["status"], after["payment"], after["payments_inbox"]) == ("completed", ("succeeded", 1), 1)
    assert gateway.keys == [f"order-{order_id}-start"]


def test_a_cancel_landing_while_a_first_starts_call_is_out_gets_the_money_back(clean_db):
    order_id = place(clean_db)
    gateway = Gateway(during=lambda _r: cancel(clean_db, order_id))  # commits: no lock of the start holds it
    [h] = PaymentRunner(clean_db, {"stripe": gateway}).handle_batch([start(order_id)])
    assert h.result is Result.APPLIED
    after = facts(clean_db, order_id)
    assert after["status"] == "cancelled" and after["payment"] == ("succeeded", 1)
    assert after["keys"].count("payment.refund") == 1  # taken during the cancel: given back, once
    assert "payment.cancel" not in after["keys"]  # the cancel found no payment to cancel


def test_a_start_delivered_again_after_a_worker_died_in_its_call_asks_again_though_the_order_ended(clean_db):
    """The first delivery's call took the money and the worker died before recording it; the order was
    cancelled meanwhile.  A second copy of the message, also a first delivery, finds the order ended and
    does nothing, and records nothing; the first copy, redelivered, asks the provider under the same key
    and gives the money back."""
    order_id = place(clean_db)
    dying = Gateway(answer=SystemExit("killed during the call"))
    with pytest.raises(SystemExit):
        PaymentRunner(clean_db, {"stripe": dying}).handle_batch([start(order_id)])
    assert facts(clean_db, order_id)["payment"] is None  # nothing was recorded of the call
    cancel(clean_db, order_id)

    gateway = Gateway()
    [copy] = PaymentRunner(clean_db, {"stripe": gateway}).handle_batch([start(order_id)])
    assert copy.result is Result.APPLIED and gateway.keys == []  # an ended order: no money is asked for
    assert facts(clean_db, order_id)["payments_inbox"] == 0  # and the message is not marked as handled

    [again] = PaymentRunner(clean_db, {"stripe": gateway}).handle_batch([start(order_id, redelivered=True)])
    assert again.result is Result.APPLIED
    assert dying.keys == gateway.keys == [f"order-{order_id}-start"]  # the same question, under the same key
    after = facts(clean_db, order_id)
    assert after["status"] == "cancelled" and after["payment"] == ("succeeded", 1)
    assert after["keys"].count("payment.refund") == 1


def test_a_permanent_failure_of_a_first_start_is_recorded_as_its_attempt(clean_db):
    order_id = place(clean_db)
    gateway = Gateway(answer=PermanentPaymentError("card number is not valid"))
    [h] = PaymentRunner(clean_db, {"stripe": gateway}).handle_batch([start(order_id)])
    assert h.result is Result.APPLIED
    after = facts(clean_db, order_id)
    assert after["status"] == "rejected" and after["payment"] == ("failed", 1)
    assert "order.rejected" in after["keys"] and "stock.release" in after["keys"]


@pytest.mark.parametrize(
    ("fields", "first"),
    [
        ({}, True),
        ({"headers": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}}, True),
        ({"redelivered": True}, False),
        ({"headers": {"x-attempts": 1}}, False),  # back from a delay tier
        ({"headers": {"x-replay-count": 1}}, False),  # a replayed dead letter
        ({"headers": {"x-death": [{"reason": "expired"}]}}, False),
        ({"headers": {"x-delivery-count": 1}}, False),  # a quorum queue's redelivery
    ],
)
def test_what_counts_as_a_first_delivery(fields, first):
    assert first_delivery(start(str(uuid.uuid4()), **fields)) is first


def test_a_redelivered_start_of_a_pending_order_takes_the_locked_prepare_and_records_its_attempt(clean_db):
    order_id = place(clean_db)
    seen: list[Any] = []
    gateway = Gateway(during=lambda _r: seen.append(facts(clean_db, order_id)["payment"]))
    [h] = PaymentRunner(clean_db, {"stripe": gateway}).handle_batch([start(order_id, redelivered=True)])
    assert h.result is Result.APPLIED
    assert seen == [("started", 1)]  # written before the call, as before first starts went without
    assert facts(clean_db, order_id)["payment"] == ("succeeded", 1)


def test_a_step_that_asks_nothing_is_still_marked_handled_only_a_first_start_of_an_ended_order_is_not(clean_db):
    """Found by the chaos run: settling every step with nothing to ask without its inbox row lost the record
    that accepted commands (a capture of an order that ended, from a webhook) were applied."""
    order_id = place(clean_db)
    cancel(clean_db, order_id)
    gateway = Gateway()
    nothing_open = delivery("CancelPayment", {"order_id": order_id}, "cancel-with-nothing-open")
    ended = start(order_id)
    handled = PaymentRunner(clean_db, {"stripe": gateway}).handle_batch([nothing_open, ended])
    assert [h.result for h in handled] == [Result.APPLIED, Result.APPLIED] and gateway.keys == []
    with clean_db.connect() as conn:
        inbox = set(conn.execute(text("SELECT message_id FROM inbox WHERE consumer = 'payments'")).scalars())
    assert inbox == {"cancel-with-nothing-open"}


def test_a_first_start_held_through_a_database_outage_after_its_call_gets_the_money_back_when_cancelled(
    clean_db, settings, tcp_proxy
):
    """Found by the chaos run in CI: the call took the money, the database went away before the record, and
    the order was cancelled meanwhile.  The worker holds the step and runs it again in-process once the
    database is back (``worker.consume.Window``): it must not be taken for a first delivery then (which would
    find the order ended, ask nothing and record nothing, keeping the money), but ask the provider again under
    the same key and give the money back.  RabbitMQ and PostgreSQL are real; PostgreSQL through a proxy the
    test cuts."""
    from worker import db
    from worker.consume import Window
    from worker.rabbit.connection import BlockingBroker
    from worker.reconnect import DatabaseHold
    from worker.settlement import Settlement

    order_id = place(clean_db)
    pg = tcp_proxy(settings.database.port)
    through = db.make_engine(settings.database.model_copy(update={"port": pg.port}), pool_size=2)
    url = settings.rabbitmq.url.get_secret_value()
    queue = f"test-first-starts-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.queue_declare(queue)
    ch.basic_publish(
        "",
        queue,
        json.dumps({"order_id": order_id}).encode(),
        pika.BasicProperties(message_id=f"start-{order_id}", type="StartPayment", content_type="application/json"),
    )

    def took_the_money_then_the_database_went(_request: Any) -> None:
        if calls.keys[1:]:
            return  # asked again: answers as before
        cancel(clean_db, order_id)  # committed during the call, not through the proxy
        pg.down()  # the record cannot reach PostgreSQL
        back.start()

    back = threading.Timer(1.0, pg.up)  # PostgreSQL reachable again a second after the cut
    calls = Gateway(during=took_the_money_then_the_database_went)
    broker = BlockingBroker(url).connect()
    try:
        broker.consume([queue], 4)
        taken: list[Delivery] = []
        while not taken:
            taken = broker.poll(1, 2.0, 0.1)
        [d] = [replace(t, queue=queue_of("StartPayment") or "") for t in taken]  # the payments queue's command
        assert first_delivery(d)
        with ThreadPoolExecutor(2) as pool:
            hold = DatabaseHold(through, threading.Event(), broker.sleep)
            w = Window(pool, PaymentRunner(through, {"stripe": calls}), hold, Settlement((1,)), 4)
            w.submit(broker, [d])
            w.join(broker)  # polls as the consumer does until the step is settled and acked, through the hold
    finally:
        back.cancel()  # not started, or already fired: either way the proxy is not reopened after the test
        if back.is_alive():
            back.join()
        broker.close()
        ch.queue_delete(queue)
        conn.close()
        through.dispose()
    assert calls.keys == [f"order-{order_id}-start"] * 2  # asked again, under the same key
    after = facts(clean_db, order_id)
    assert after["status"] == "cancelled" and after["payment"] == ("succeeded", 1)  # the first was never recorded
    assert after["keys"].count("payment.refund") == 1  # the money taken is given back, once
    assert after["payments_inbox"] == 1
