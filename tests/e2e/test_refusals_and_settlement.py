"""No refusal is silent, and a capture that never lands does not wait forever.

Through the broker, PostgreSQL, the relay and the payment fakes behind the
real SDKs: refused commands are announced as ``command.refused`` (upstream
services publish without ``reply_to``); a PayPal capture marked as sent but
never sent is recorded as not captured once the bound has passed, instead of
going through the delay tiers into the dead-letter queue.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import stripe

from tests.e2e.test_payment_flow import COMMANDS_ONLY, Payments, pay  # noqa: F401 - the pay fixture


def refusals(p: Payments) -> list[dict[str, Any]]:
    return [e for e in p.bus.events() if e["routing_key"] == "command.refused"]


def test_refused_commands_are_announced_once_each_with_their_reason(pay, wait):
    pay.start(*COMMANDS_ONLY)
    order_id = pay.place()
    wait(lambda: pay.order(order_id) and pay.order(order_id).status == "pending")
    stranger = pay.bus.publish(
        "CancelOrder",
        {"order_id": order_id, "requested_by": {"user_id": "mallory", "roles": ["user"]}},
        correlation_id="corr-stranger",
    )
    for _ in range(2):  # a redelivery is not a second refusal
        pay.bus.publish(
            "PlaceOrder",
            {
                "order_id": order_id,
                "user_id": "mallory",
                "items": [{"product_id": "sku-apple", "quantity": 1}],
                "payment": {"provider": "stripe", "payment_method": "pm_card_visa"},
            },
            message_id="taken-id-1",
        )
    found = wait(lambda: (lambda r: r if len(r) >= 2 else None)(refusals(pay)), what="two refusals")
    by_message = {e["body"]["message_id"]: e for e in found}
    assert set(by_message) == {stranger, "taken-id-1"}
    cancel = by_message[stranger]
    assert cancel["exchange"] == "orders.events" and cancel["message_id"] == cancel["body"]["event_id"]
    assert (cancel["body"]["command"], cancel["body"]["reason"], cancel["body"]["correlation_id"]) == (
        "CancelOrder",
        "not_found",
        "corr-stranger",
    )
    taken = by_message["taken-id-1"]["body"]
    assert (taken["command"], taken["reason"]) == ("PlaceOrder", "order_id_taken")
    assert "buyer" not in taken["message"]
    assert pay.order(order_id).status == "pending"


def test_a_paypal_capture_marked_but_never_sent_is_settled_as_not_captured_not_dead_lettered(pay, wait, engine):
    """The interleaving of the red CI run: the capture was marked ``capturing`` (transaction 1), the worker died
    before the call, the buyer cancelled; the cancel looks at PayPal, finds the order approved but not captured."""
    from handlers.payment_commands import payment_handlers
    from schema.messages import CapturePayment
    from worker.unit_of_work import order_transaction

    pay.start(ORDERS_WORKER__CAPTURE_SETTLE_SECONDS="2")  # the delay tiers here are 1 s and 2 s
    order_id = pay.place(provider="paypal")
    wait(lambda: pay.order(order_id) and pay.order(order_id).status == "awaiting_payment")
    pid = pay.order(order_id).provider_payment_id
    httpx.post(f"{pay.fakes['paypal'].url}/_fake/approve/{pid}").raise_for_status()
    capture = CapturePayment(order_id=uuid.UUID(order_id), provider="paypal", payment_id=pid, event_id="WH-NEVER")
    with order_transaction(engine, "payments", None) as uow:  # transaction 1 of the capture, and then the kill
        call = payment_handlers()[CapturePayment].prepare(capture, uow)
    assert call is not None and pay.order(order_id).payment_status == "capturing"
    pay.bus.publish("CancelOrder", {"order_id": order_id, "requested_by": {"user_id": "buyer", "roles": ["user"]}})
    wait(lambda: pay.order(order_id).status == "cancelled")
    wait(lambda: pay.order(order_id).payment_status == "cancelled", timeout=30, what="capture settled as not captured")
    wait(lambda: pay.bus.depth("orders.payments") + sum(pay.bus.depth(f"orders.delay.{s}s") for s in (1, 2)) == 0)
    assert [d for d in pay.bus.dead_letters() if d["type"] == "CancelPayment"] == []
    assert pay.charges("paypal", order_id).get("captures", 0) == 0


def test_a_confirmation_of_another_intent_the_provider_vouches_for_completes_the_order_on_it(pay, wait):
    """The 3-D Secure card paid client-side: its confirmation names an intent that is not the one the payment step
    created (it came 0.5 s before its PlaceOrder, was deferred, and the step meanwhile made its own).  Refused as a
    mismatch before, and the order stayed awaiting_payment with nothing said; settled by asking Stripe now."""
    pay.start()
    order_id = pay.place(method="pm_card_threeDSecure2Required")
    wait(lambda: pay.order(order_id) and pay.order(order_id).status == "awaiting_payment")
    own = pay.order(order_id).provider_payment_id
    client = stripe.StripeClient(
        "sk_test_local_fake", base_addresses={"api": pay.fakes["stripe"].url}, max_network_retries=0
    )
    paid = client.v1.payment_intents.create(
        params={
            "amount": 300,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "confirm": True,
            "metadata": {"order_id": order_id},
        }
    )
    assert paid.status == "succeeded" and paid.id != own
    confirmation = pay.bus.publish(
        "PaymentConfirmed",
        {
            "order_id": order_id,
            "provider": "stripe",
            "payment_id": paid.id,
            "amount": 300,
            "currency": "USD",
            "event_id": "evt_client_side",
        },
    )
    wait(lambda: pay.order(order_id).status == "completed", timeout=30, what="completed on the paid intent")
    o = pay.order(order_id)
    assert (o.payment_status, o.provider_payment_id) == ("succeeded", paid.id)
    wait(
        lambda: client.v1.payment_intents.retrieve(own).status == "canceled",
        what="the payment step's unused intent cancelled",
    )
    assert pay.charges("stripe", order_id)["charges"] == 1
    assert [e for e in refusals(pay) if e["body"]["message_id"] == confirmation] == []


def test_a_confirmation_of_a_payment_the_provider_never_took_is_refused_and_announced(pay, wait):
    pay.start()
    order_id = pay.place(method="pm_card_threeDSecure2Required")
    wait(lambda: pay.order(order_id) and pay.order(order_id).status == "awaiting_payment")
    forged = pay.bus.publish(
        "PaymentConfirmed",
        {
            "order_id": order_id,
            "provider": "stripe",
            "payment_id": "pi_never_existed",
            "amount": 300,
            "currency": "USD",
            "event_id": "evt_forged",
        },
        correlation_id="corr-forged",
    )
    found = wait(lambda: [e for e in refusals(pay) if e["body"]["message_id"] == forged], what="refusal announced")
    body = found[0]["body"]
    assert (body["command"], body["reason"], body["correlation_id"]) == (
        "PaymentConfirmed",
        "payment_not_confirmed",
        "corr-forged",
    )
    assert pay.order(order_id).status == "awaiting_payment"
