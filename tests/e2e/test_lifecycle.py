"""An order's whole life as a shop runs it (issue 21), through the broker, a worker pool, the relay and the payment
fakes behind the real SDKs: expiry, an admin's cancel of a paid order with its refund, and the races between them
and the money.  Every test ends with the stock ledger as the Inventory Service heard it: per order, reserved =
released + committed, and committed = returned + still held."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pika
import pytest
from sqlalchemy import text

from tests.e2e.test_payment_flow import Payments, pay  # noqa: F401 - the pay fixture

#: an order waits 2.4 s for its buyer here, and the sweep looks every 0.3 s
FAST_EXPIRY = {"ORDERS_ORDERS__PAYMENT_TIMEOUT_MINUTES": "0.04", "ORDERS_ORDERS__EXPIRY_SWEEP_SECONDS": "0.3"}
DEADLINE = 0.04 * 60
HELD = ("completed", "shipped")


def stock_ledger(p: Payments, order_id: str) -> Counter[str]:
    """The distinct stock events of an order, as captured on the inventory exchange."""
    seen = {(e["routing_key"], e["message_id"]) for e in p.bus.events() if e["body"].get("order_id") == order_id}
    return Counter(key for key, _ in seen if key.startswith("stock."))


def assert_balanced(p: Payments, order_id: str) -> None:
    ledger, status = stock_ledger(p, order_id), p.order(order_id).status
    assert ledger["stock.reserve"] == ledger["stock.release"] + ledger["stock.commit"] == 1, (order_id, ledger)
    held = 1 if status in HELD else 0
    assert ledger["stock.commit"] == ledger["stock.return"] + held, (order_id, status, ledger)


def count(p: Payments, order_id: str, routing_key: str) -> int:
    return len(
        {
            e["message_id"]
            for e in p.bus.events()
            if e["routing_key"] == routing_key and e["body"]["order_id"] == order_id
        }
    )


def quiet(p: Payments, wait: Any) -> None:
    queues = (
        "orders.place",
        "orders.cancel",
        "orders.payment-confirmed",
        "orders.payments",
        "orders.delay.1s",
        "orders.delay.2s",
    )
    wait(lambda: sum(p.bus.depth(q) for q in queues) == 0, timeout=60, what="every queue drained")
    wait(lambda: _outbox_empty(p), timeout=30, what="the outbox relayed")


def _outbox_empty(p: Payments) -> bool:
    with p.engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM outbox WHERE published_at IS NULL")).scalar() == 0


def refusals(p: Payments) -> dict[str, str]:
    return {
        e["body"]["message_id"]: e["body"]["reason"] for e in p.bus.events() if e["routing_key"] == "command.refused"
    }


def cancel_as_admin(p: Payments, order_id: str, message_id: str | None = None) -> None:
    p.bus.publish(
        "CancelOrder",
        {"order_id": order_id, "requested_by": {"user_id": "ops", "roles": ["admin"]}, "reason": "out of stock"},
        message_id=message_id,
    )


@pytest.mark.parametrize("provider_name", ["stripe", "paypal"])
def test_an_order_whose_buyer_never_pays_expires_once_and_its_stock_and_payment_are_let_go(pay, wait, provider_name):
    pay.start(**FAST_EXPIRY)
    order_id = pay.place(provider=provider_name, method="pm_card_threeDSecure2Required")
    wait(lambda: (o := pay.order(order_id)) is not None and o.status == "awaiting_payment")
    pid = pay.order(order_id).provider_payment_id
    wait(lambda: pay.order(order_id).status == "expired", timeout=DEADLINE + 15, what="expired")
    quiet(pay, wait)
    assert pay.order(order_id).reason == "not paid within 0.04 minutes"
    assert count(pay, order_id, "order.expired") == 1
    assert_balanced(pay, order_id)
    if provider_name == "stripe":  # the PaymentIntent is cancelled at Stripe
        wait(lambda: pay.order(order_id).payment_status == "cancelled", what="the payment recorded cancelled")
        intent = httpx.get(
            f"{pay.fakes['stripe'].url}/v1/payment_intents/{pid}", auth=("sk_test_local_fake", "")
        ).json()
        assert intent["status"] == "canceled"
    else:  # nothing to void at PayPal; the buyer approving now captures nothing
        command = pay.paypal_approved(order_id, pid, "WH-AFTER-EXPIRY")
        pay.publish_command(command)
        quiet(pay, wait)
        assert pay.charges("paypal", order_id).get("captures", 0) == 0
        assert pay.order(order_id).status == "expired"


def test_money_that_lands_after_the_order_expired_is_refunded_once(pay, wait):
    """Deterministic: the order expires while no payment step runs (its CancelPayment waits in the queue), the buyer
    pays at Stripe meanwhile and the confirmation arrives; then the payment step runs: the cancel finds the money
    taken, and that and the confirmation's refund give it back once (one idempotency key)."""
    first = pay.start()
    order_id = pay.place(method="pm_card_threeDSecure2Required")
    wait(lambda: (o := pay.order(order_id)) is not None and o.status == "awaiting_payment")
    pid = pay.order(order_id).provider_payment_id
    first.stop()
    commands_only = pay.start("--queue", "orders.place", "--queue", "orders.payment-confirmed", **FAST_EXPIRY)
    wait(lambda: pay.order(order_id).status == "expired", timeout=DEADLINE + 15, what="expired")
    httpx.post(f"{pay.fakes['stripe'].url}/_fake/confirm/{pid}", json={}).raise_for_status()  # the buyer pays late
    pay.stripe_webhook(pid)
    wait(lambda: pay.bus.depth("orders.payments") >= 2, what="the cancel and the refund queued")
    assert pay.order(order_id).status == "expired" and pay.order(order_id).payment_status == "succeeded"
    commands_only.stop()
    pay.start()
    wait(lambda: pay.order(order_id).payment_status == "refunded", what="refunded")
    quiet(pay, wait)
    assert pay.order(order_id).status == "expired"
    assert (pay.charges("stripe", order_id)["charges"], pay.charges("stripe", order_id)["refunds"]) == (1, 1)
    assert count(pay, order_id, "order.refunded") == 1 and count(pay, order_id, "order.completed") == 0
    assert_balanced(pay, order_id)


def test_payments_landing_around_the_deadline_complete_the_order_or_leave_no_money_behind(pay, wait):
    """Each buyer pays within half a second of the order's deadline; the row lock decides, and whatever it decides,
    every order is completed with its money or expired with none kept."""
    timeout_minutes = 0.1
    pay.start(ORDERS_ORDERS__PAYMENT_TIMEOUT_MINUTES=str(timeout_minutes), ORDERS_ORDERS__EXPIRY_SWEEP_SECONDS="0.2")
    orders = [pay.place(method="pm_card_threeDSecure2Required") for _ in range(8)]
    for order_id in orders:
        wait(lambda o=order_id: (r := pay.order(o)) is not None and r.status == "awaiting_payment")
    with pay.engine.connect() as conn:
        since = dict(
            conn.execute(
                text(
                    "SELECT order_id::text, extract(epoch FROM awaiting_since) FROM orders"
                    " WHERE order_id = ANY(CAST(:o AS uuid[]))"
                ),
                {"o": orders},
            ).all()
        )
    offsets = {order_id: (i - 4) * 0.12 for i, order_id in enumerate(orders)}  # half a second early to late
    for order_id in sorted(orders, key=lambda o: float(since[o]) + offsets[o]):
        pay_at = float(since[order_id]) + timeout_minutes * 60 + offsets[order_id]
        time.sleep(max(0.0, pay_at - time.time()))
        pid = pay.order(order_id).provider_payment_id
        paid = httpx.post(f"{pay.fakes['stripe'].url}/_fake/confirm/{pid}", json={})
        if paid.status_code == 409:  # the expiry cancelled the PaymentIntent first: the buyer cannot pay any more
            continue
        paid.raise_for_status()
        pay.stripe_webhook(pid)
    quiet(pay, wait)
    outcomes: Counter[str] = Counter()
    for order_id in orders:
        wait(lambda o=order_id: pay.order(o).status in ("completed", "expired"))
        wait(
            lambda o=order_id: pay.order(o).status == "completed" or pay.order(o).payment_status != "succeeded",
            what="an expired order's money given back",
        )
        o, charges = pay.order(order_id), pay.charges("stripe", order_id)
        kept = charges.get("amount_charged", 0) - charges.get("amount_refunded", 0)
        if o.status == "completed":
            assert o.payment_status == "succeeded" and kept > 0 and count(pay, order_id, "order.expired") == 0
        else:
            assert kept == 0 and count(pay, order_id, "order.completed") == 0, (order_id, charges)
            assert count(pay, order_id, "order.refunded") == charges.get("refunds", 0) <= 1
        assert_balanced(pay, order_id)
        outcomes[f"{o.status}/{o.payment_status}"] += 1
    print("outcomes of the race:", dict(outcomes))


def test_an_admin_cancels_a_paid_order_its_stock_returns_and_its_money_goes_back_once(pay, wait):
    pay.start()
    order_id = pay.place()
    wait(lambda: (o := pay.order(order_id)) is not None and o.status == "completed")
    for _ in range(2):  # delivered twice: one cancel, one refund
        cancel_as_admin(pay, order_id, message_id=f"admin-cancel-{order_id}")
    wait(lambda: pay.order(order_id).payment_status == "refunded", what="refunded")
    quiet(pay, wait)
    o = pay.order(order_id)
    assert o.status == "cancelled" and o.refund_id
    assert pay.charges("stripe", order_id)["refunds"] == 1
    assert [count(pay, order_id, k) for k in ("order.cancelled", "stock.return", "order.refunded")] == [1, 1, 1]
    refunded = [e["body"] for e in pay.bus.events() if e["routing_key"] == "order.refunded"]
    assert refunded[0]["status"] == "cancelled" and refunded[0]["full"] is True
    assert_balanced(pay, order_id)


def test_a_paid_order_is_not_cancelled_by_its_owner_or_once_shipped(pay, wait):
    pay.start()
    order_id = pay.place()
    wait(lambda: (o := pay.order(order_id)) is not None and o.status == "completed")
    owner = pay.bus.publish(
        "CancelOrder", {"order_id": order_id, "requested_by": {"user_id": "buyer", "roles": ["user"]}}
    )
    pay.bus.publish("ShipOrder", {"order_id": order_id, "shipment": {"carrier": "DHL", "tracking_number": "T1"}})
    wait(lambda: pay.order(order_id).status == "shipped")
    admin = pay.bus.publish(
        "CancelOrder", {"order_id": order_id, "requested_by": {"user_id": "ops", "roles": ["admin"]}}
    )
    refused = wait(lambda: r if len(r := refusals(pay)) == 2 else None, what="both cancels refused")
    assert refused == {owner: "not_cancellable", admin: "not_cancellable"}
    quiet(pay, wait)
    assert pay.charges("stripe", order_id).get("refunds", 0) == 0
    assert_balanced(pay, order_id)


def test_an_admin_cancel_racing_the_capture_ends_cancelled_with_no_money_kept(pay, wait):
    """The buyer approved at PayPal; the capture and an admin's cancel arrive together.  Whichever wins, the order
    ends cancelled, the money is captured and refunded once or never captured, and the stock balances."""
    pay.start()
    orders = [pay.place(provider="paypal") for _ in range(6)]
    captures = []
    for order_id in orders:
        wait(lambda o=order_id: (r := pay.order(o)) is not None and r.status == "awaiting_payment")
        captures.append(pay.paypal_approved(order_id, pay.order(order_id).provider_payment_id, f"WH-RACE-{order_id}"))
    barrier = threading.Barrier(2)

    def capture_all() -> None:
        conn = pika.BlockingConnection(pika.URLParameters(pay.settings.rabbitmq.url.get_secret_value()))
        ch = conn.channel()
        barrier.wait()
        for command in captures:
            ch.basic_publish(
                command.exchange,
                command.routing_key,
                json.dumps(command.body).encode(),
                pika.BasicProperties(message_id=command.message_id, type=command.message_type),
            )
        conn.close()

    racer = threading.Thread(target=capture_all)
    racer.start()
    barrier.wait()
    for order_id in orders:
        cancel_as_admin(pay, order_id)
    racer.join()
    quiet(pay, wait)
    for order_id in orders:
        wait(lambda o=order_id: pay.order(o).status == "cancelled")
        wait(
            lambda o=order_id: (c := pay.charges("paypal", o)).get("captures", 0) == c.get("refunds", 0),
            timeout=60,
            what=f"no money kept for {order_id}",
        )
        assert pay.charges("paypal", order_id).get("captures", 0) <= 1
        assert_balanced(pay, order_id)


def test_an_order_shows_the_refund_as_it_goes(pay, wait, engine):
    from worker.read_model import load_views

    pay.start()
    order_id = pay.place()
    wait(lambda: (o := pay.order(order_id)) is not None and o.status == "completed")
    view = load_views(engine, [order_id])[order_id]
    assert view["paid_at"] and "refund" not in view["payment"]
    cancel_as_admin(pay, order_id)
    wait(lambda: load_views(engine, [order_id])[order_id]["payment"].get("refund") == "refunded", what="refund shown")
    assert load_views(engine, [order_id])[order_id]["payment"]["amount_refunded"] == view["total"]


def test_orders_audit_checks_that_the_stock_balances_for_every_order(pay, wait):
    from worker.audit import run_audit

    pay.start(**FAST_EXPIRY)
    paid, waiting = pay.place(), pay.place(method="pm_card_threeDSecure2Required")
    wait(lambda: (o := pay.order(paid)) is not None and o.status == "completed")
    wait(lambda: (o := pay.order(waiting)) is not None and o.status == "expired", timeout=DEADLINE + 15)
    cancel_as_admin(pay, paid)
    wait(lambda: pay.order(paid).payment_status == "refunded")
    quiet(pay, wait)
    assert "stock-balances" not in {f.check for f in run_audit(pay.engine)}
    with pay.engine.begin() as conn:  # a status no transition made: the committed units would be held twice
        conn.execute(text("UPDATE orders SET status = 'completed' WHERE order_id = CAST(:o AS uuid)"), {"o": paid})
    found = {f.check: f for f in run_audit(pay.engine)}
    assert [r["order_id"] for r in found["stock-balances"].sample] == [paid]
    assert found["stock-balances"].sample[0]["committed"] == 1 and found["stock-balances"].sample[0]["returned"] == 1
