"""What the service publishes, byte for byte: every kind of event and internal command against a golden file.

Each scenario drives the handlers (and the payment step's records) over a
unit of work that serializes what it is given exactly as the PostgreSQL one
writes it to the outbox (``pydantic_core.to_json``), and keeps every argument
of ``emit``: exchange, routing key, AMQP ``type``, order, correlation id,
event id and body.  ``tests/fixtures/event_bodies.json`` holds what the
service published before events were models; consumers code against those
bytes (field names, which optional fields are present and which are absent),
so a change to them shows here.  Only ``occurred_at`` varies from run to run:
it is checked for its form (ISO 8601 with ``+00:00``) and the time of the run,
then compared as a placeholder.

``ORDERS_RECORD_EVENT_BODIES=1`` rewrites the golden file instead of comparing
(only ever for a deliberate change of the contract).
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic_core import to_json

from handlers import events
from handlers.cancel_order import cancel_order
from handlers.expire_order import expire_order, expiry_message_id
from handlers.orders import DEFAULT_RULES, Status
from handlers.outcome import MessageContext
from handlers.payment_commands import record_refund, record_settle, record_settle_refund, record_start
from handlers.payment_confirmed import payment_confirmed
from handlers.payments.base import PaymentFacts, PaymentOutcome, PaymentResult, RefundResult
from handlers.place_order import place_order
from handlers.senders import TRUSTED, Sender
from handlers.ship_order import ship_order
from handlers.unit_of_work import Refusal
from schema.messages import (
    CancelOrder,
    PaymentConfirmed,
    PlaceOrder,
    RefundPayment,
    SettlePayment,
    SettleRefund,
    ShipOrder,
    StartPayment,
)
from tests.unit.test_handlers import PRODUCTS, FakeUnitOfWork, v

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "event_bodies.json"
OCCURRED = re.compile(r'"occurred_at":"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?\+00:00)"')
STRIPE = {"provider": "stripe", "payment_method": "pm_card_visa"}
ADMIN = Sender("back-office", TRUSTED.commands, admin=True)


class PublishingUnitOfWork(FakeUnitOfWork):
    """The fake unit of work, keeping every ``emit`` as the outbox row it becomes."""

    def __init__(self) -> None:
        super().__init__(PRODUCTS)
        self.rows: list[dict[str, Any]] = []

    def emit(
        self,
        exchange: str,
        routing_key: str,
        message_type: str,
        body: dict[str, Any],
        order_id: str,
        correlation_id: str | None,
        event_id: str,
        refusal: Refusal | None = None,
    ) -> None:
        super().emit(exchange, routing_key, message_type, body, order_id, correlation_id, event_id, refusal)
        self.rows.append(
            {
                "exchange": exchange,
                "routing_key": routing_key,
                "type": message_type,
                "order_id": order_id,
                "correlation_id": correlation_id,
                "event_id": event_id,
                "body": to_json(body).decode(),  # as worker/unit_of_work.py writes the outbox row
            }
        )


def oid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def m(message_id: str, kind: str, correlation_id: str | None = "corr", sender: Sender | None = None) -> MessageContext:
    return MessageContext(message_id, kind, correlation_id, **({"sender": sender} if sender else {}))


def place(uow: PublishingUnitOfWork, n: int, items: list[dict[str, Any]], payment: dict[str, Any] = STRIPE) -> str:
    body = {"order_id": oid(n), "user_id": "u1", "items": items, "payment": payment}
    place_order(v(PlaceOrder, body), m(f"place-{n}", "PlaceOrder"), uow)
    return oid(n)


def confirm(uow: PublishingUnitOfWork, order_id: str, amount: int, mid: str) -> None:
    body = {
        "order_id": order_id,
        "provider": "stripe",
        "payment_id": "pi_" + mid,
        "amount": amount,
        "currency": "USD",
        "event_id": "evt_" + mid,
    }
    payment_confirmed(v(PaymentConfirmed, body), m(mid, "PaymentConfirmed"), uow)


def cancel(uow: PublishingUnitOfWork, order_id: str, mid: str, **extra: Any) -> None:
    sender = extra.pop("sender", None)
    body = {"order_id": order_id, "requested_by": {"user_id": "u1", "roles": ["user"]}, **extra}
    cancel_order(v(CancelOrder, body), m(mid, "CancelOrder", sender=sender), uow)


def scenarios() -> list[dict[str, Any]]:
    """Every event kind and every optional field both present and absent, in one deterministic run."""
    uow = PublishingUnitOfWork()
    a2b1 = [{"product_id": "a", "quantity": 2}, {"product_id": "b", "quantity": 1}]

    # placed, paid by a confirmation, shipped (stock.reserve, order.placed, payment.start, stock.commit,
    # order.completed, order.shipped with its shipment)
    shipped = place(uow, 1, a2b1)
    confirm(uow, shipped, 450, "confirm-1")
    ship = {"order_id": shipped, "shipment": {"carrier": "DHL", "tracking_number": "JD0146"}}
    ship_order(v(ShipOrder, ship), m("ship-1", "ShipOrder", None), uow)

    # rejected at placement: no product known (currency null, reason), and two currencies (a currency)
    place(uow, 2, [{"product_id": "nope", "quantity": 1}])
    place(uow, 3, [{"product_id": "a", "quantity": 1}, {"product_id": "e", "quantity": 1}])

    # cancelled while pending, with and without a reason (stock.release, order.cancelled)
    cancel(uow, place(uow, 4, [{"product_id": "a", "quantity": 1}]), "cancel-4", reason="changed my mind")
    cancel(uow, place(uow, 5, [{"product_id": "b", "quantity": 3}]), "cancel-5")

    # the payment step: waits for the buyer (next_action), waits without one, declined (order.rejected)
    for n, answer in (
        (6, PaymentResult(PaymentOutcome.REQUIRES_ACTION, "pi_6", next_action={"client_secret": "pi_6_secret"})),
        (7, PaymentResult(PaymentOutcome.PROCESSING, "pi_7")),
        (8, PaymentResult(PaymentOutcome.DECLINED, "pi_8", decline_reason="insufficient_funds")),
    ):
        order_id = place(uow, n, [{"product_id": "a", "quantity": 1}])
        record_start(v(StartPayment, {"order_id": order_id}), m(f"start-{n}", "StartPayment"), uow, answer)

    # expired after waiting for the buyer (stock.release, order.expired, payment.cancel)
    waiting = uow.orders[oid(6)]
    expire_order(waiting, m(expiry_message_id(waiting.order_id), "ExpireOrder", None), uow, DEFAULT_RULES)

    # paid, then cancelled by an admin and refunded in full (stock.return, order.cancelled, payment.refund,
    # order.refunded with refund_id, amount_refunded, full)
    refunded = place(uow, 9, [{"product_id": "a", "quantity": 1}])
    confirm(uow, refunded, 100, "confirm-9")
    cancel(uow, refunded, "cancel-9", sender=ADMIN, requested_by={"user_id": "ops", "roles": ["admin"]})
    record_refund(
        v(RefundPayment, {"order_id": refunded}), m("refund-9", "RefundPayment"), uow, RefundResult("re_9", "ok")
    )

    # refunds made at the provider: partial (full false), then the rest (order refunded, stock.return);
    # and one with no refund id (refund_id absent)
    at_provider = place(uow, 10, [{"product_id": "b", "quantity": 2}])
    confirm(uow, at_provider, 500, "confirm-10")
    settle = {"order_id": at_provider, "provider": "stripe", "payment_id": "pi_confirm-10", "event_id": "evt_r"}
    for mid, refunded_so_far, ids in (("settle-10a", 200, ("re_a",)), ("settle-10b", 500, ("re_a", "re_b"))):
        facts = PaymentFacts(
            "pi_confirm-10", True, at_provider, 500, "USD", "succeeded", refunded=refunded_so_far, refund_ids=ids
        )
        record_settle_refund(v(SettleRefund, settle), m(mid, "SettleRefund"), uow, facts)
    no_id = place(uow, 11, [{"product_id": "a", "quantity": 3}])
    confirm(uow, no_id, 300, "confirm-11")
    settle = {"order_id": no_id, "provider": "stripe", "payment_id": "pi_confirm-11", "event_id": "evt_r11"}
    facts = PaymentFacts("pi_confirm-11", True, no_id, 300, "USD", "succeeded", refunded=100)
    record_settle_refund(v(SettleRefund, settle), m("settle-11", "SettleRefund"), uow, facts)

    # a confirmation the provider does not vouch for (command.refused from the payment step)
    doubtful = place(uow, 12, [{"product_id": "a", "quantity": 1}])
    cmd = {
        "order_id": doubtful,
        "provider": "stripe",
        "payment_id": "pi_x",
        "amount": 100,
        "currency": "USD",
        "event_id": "evt_x",
        "confirmation_id": "confirm-12",
        "correlation_id": "corr-12",
    }
    record_settle(v(SettlePayment, cmd), m("settle-12", "SettlePayment"), uow, PaymentFacts.not_found("pi_x"))

    # command.refused as the worker announces them: with and without a correlation id, a sender's
    # refusal (an id of its own), a message cut to 1,000 characters
    events.refused(uow, shipped, "cancel-x", "CancelOrder", "not_cancellable", "order is shipped", "corr-x")
    events.refused(uow, shipped, "cancel-y", "CancelOrder", "not_found", "order not found", None)
    events.refused(uow, shipped, "ship-z", "ShipOrder", "unauthorized", "shop may not", None, unauthorized=True)
    events.refused(uow, shipped, "cancel-w", "CancelOrder", "not_cancellable", "x" * 1500, "corr-w")

    assert uow.orders[shipped].status is Status.SHIPPED and uow.orders[oid(10)].status is Status.REFUNDED
    return uow.rows


def normalized(rows: list[dict[str, Any]], started: datetime) -> list[dict[str, Any]]:
    """The rows with each ``occurred_at`` checked (its form, the time of the run) and replaced by a placeholder."""
    out = []
    for row in rows:
        body = row["body"]
        found = OCCURRED.findall(body)
        if row["exchange"] != "orders.internal":
            assert len(found) == 1, f"{row['routing_key']}: occurred_at missing or malformed in {body}"
            at = datetime.fromisoformat(found[0])
            assert started - timedelta(seconds=1) <= at <= datetime.now(UTC) + timedelta(seconds=1)
            body = body.replace(found[0], "<occurred_at>")
        out.append({**row, "body": body})
    return out


def test_every_event_is_published_byte_for_byte_as_before():
    started = datetime.now(UTC)
    rows = normalized(scenarios(), started)
    if os.environ.get("ORDERS_RECORD_EVENT_BODIES") == "1":
        GOLDEN.write_text(json.dumps(rows, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert len(rows) == len(golden)
    for got, want in zip(rows, golden, strict=True):
        assert got == want


def test_the_golden_file_covers_every_event_and_each_optional_field_both_ways():
    golden = json.loads(GOLDEN.read_text())
    published = [(r["routing_key"], json.loads(r["body"])) for r in golden if r["exchange"] != "orders.internal"]
    assert {rk for rk, _ in published} == {
        "stock.reserve",
        "stock.release",
        "stock.commit",
        "stock.return",
        "order.placed",
        "order.awaiting_payment",
        "order.completed",
        "order.shipped",
        "order.cancelled",
        "order.rejected",
        "order.expired",
        "order.refunded",
        "command.refused",
    }
    order_events = [b for rk, b in published if rk.startswith("order.")]
    for field in ("reason", "next_action", "refund_id"):
        assert any(field in b for b in order_events) and any(field not in b for b in order_events), field
    assert any(b["currency"] is None for b in order_events)
    refused = [b for rk, b in published if rk == "command.refused"]
    assert {b["correlation_id"] is None for b in refused} == {True, False}
    assert {b["full"] for rk, b in published if rk == "order.refunded"} == {True, False}
