"""Place → charge → webhook → completed, through the broker, the real SDKs and the fakes."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
import stripe
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the fakes live in scripts/, outside the installed packages
    sys.path.insert(0, str(ROOT))

from handlers.payments.paypal_gateway import translate_event as paypal_event  # noqa: E402
from handlers.payments.webhooks import parse_webhook, to_command  # noqa: E402
from tests.servers import Provider  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures"
COMMANDS_ONLY = ["--queue", "orders.place", "--queue", "orders.cancel", "--queue", "orders.payment-confirmed"]


@pytest.fixture
def pay(fakes, service, bus, clean_db, settings) -> Any:
    for f in fakes.values():
        httpx.post(f.url + "/_fake/reset").raise_for_status()
    env = {
        "ORDERS_STRIPE__TIMEOUT_SECONDS": "2",
        "ORDERS_STRIPE__MAX_NETWORK_RETRIES": "0",
        "ORDERS_PAYPAL__MAX_NETWORK_RETRIES": "0",
    }
    os.environ.update(env)
    service("relay")  # StartPayment and the other steps leave through the outbox
    return Payments(fakes, service, bus, clean_db, settings, env)


class Payments:
    def __init__(self, fakes, service, bus, engine, settings, env) -> None:
        self.fakes, self.service, self.bus, self.engine, self.settings, self.env = (
            fakes,
            service,
            bus,
            engine,
            settings,
            env,
        )

    def start(self, *args: str, **env: str) -> Any:
        return self.service("worker", "--processes", "1", *args, **{**self.env, **env})

    def fault(self, provider: str, **spec: Any) -> None:
        httpx.post(self.fakes[provider].url + "/_fake/faults", json=spec).raise_for_status()

    def faults_taken(self, provider: str) -> bool:
        """Whether the faults set on ``provider`` were all taken: a delayed call is under way (a first start
        writes nothing before its call, so the database cannot tell)."""
        return httpx.get(self.fakes[provider].url + "/_fake/faults").json()["faults"] == []

    def charges(self, provider: str, order_id: str) -> dict[str, Any]:
        return httpx.get(self.fakes[provider].url + "/_fake/charges").json().get("orders", {}).get(order_id, {})

    def order(self, order_id: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(
                text(
                    "SELECT o.status, o.reason, o.next_action, p.status AS payment_status, p.provider_payment_id,"
                    " p.refund_id FROM orders o LEFT JOIN payments p USING (order_id)"
                    " WHERE o.order_id = CAST(:o AS uuid)"
                ),
                {"o": order_id},
            ).first()

    def events(self, order_id: str) -> list[str]:
        return [e["routing_key"] for e in self.bus.events() if e["body"]["order_id"] == order_id]

    def place(self, provider: str = "stripe", method: str = "pm_card_visa") -> str:
        order_id = str(uuid.uuid4())
        payment = Provider(provider, self.fakes[provider]).payment(method)
        self.bus.publish(
            "PlaceOrder",
            {
                "order_id": order_id,
                "user_id": "buyer",
                "items": [{"product_id": "sku-apple", "quantity": 2}],
                "payment": payment,
            },
        )
        return order_id

    def publish_webhook(self, body: bytes, headers: dict[str, str]) -> Any:
        from handlers.payments import build_gateways

        command = to_command(parse_webhook(build_gateways(self.settings_now()), body, headers))
        assert command is not None
        self.publish_command(command)
        return command

    def webhook_after_payment(self, provider: str, order_id: str, payment_id: str) -> None:
        """The provider's webhook once the buyer has paid: Stripe's payment_intent.succeeded (through the
        real verification), PayPal's CHECKOUT.ORDER.APPROVED as the CapturePayment it becomes, delivered twice."""
        if provider == "stripe":
            self.stripe_webhook(payment_id)
            return
        command = self.paypal_approved(order_id, payment_id, "WH-APPROVED-1", approve=False)
        assert command.message_type == "CapturePayment"
        for _ in range(2):
            self.publish_command(command)

    def paypal_approved(self, order_id: str, paypal_order_id: str, webhook_id: str, approve: bool = True) -> Any:
        """The buyer approves at PayPal (``approve``: the fake records it); the CapturePayment its webhook becomes."""
        if approve:
            httpx.post(f"{self.fakes['paypal'].url}/_fake/approve/{paypal_order_id}").raise_for_status()
        approved = {
            "id": webhook_id,
            "event_type": "CHECKOUT.ORDER.APPROVED",
            "resource_type": "checkout-order",
            "resource": {
                "id": paypal_order_id,
                "status": "APPROVED",
                "intent": "CAPTURE",
                "purchase_units": [
                    {
                        "custom_id": order_id,
                        "reference_id": order_id,
                        "amount": {"currency_code": "USD", "value": "3.00"},
                    }
                ],
            },
        }
        return to_command(paypal_event(approved))

    def publish_command(self, command: Any) -> None:
        self.bus.ch.basic_publish(
            command.exchange,
            command.routing_key,
            json.dumps(command.body).encode(),
            pika.BasicProperties(
                message_id=command.message_id,
                type=command.message_type,
                content_type="application/json",
                delivery_mode=2,
            ),
        )

    def settings_now(self) -> Any:
        from worker.settings import load_settings

        return load_settings()

    def stripe_webhook(
        self, pi_id: str, event_type: str = "payment_intent.succeeded", event_id: str | None = None
    ) -> Any:
        intent = httpx.get(
            f"{self.fakes['stripe'].url}/v1/payment_intents/{pi_id}", auth=("sk_test_local_fake", "")
        ).json()
        envelope = json.loads((FIXTURES / "stripe" / "event.json").read_text())
        envelope.update(id=event_id or f"evt_{uuid.uuid4().hex[:16]}", type=event_type, data={"object": intent})
        payload = json.dumps(envelope)
        secret = self.settings.stripe.webhook_secret.get_secret_value()
        return self.publish_webhook(
            payload.encode(), {"Stripe-Signature": stripe.WebhookSignature.generate_signature_header(payload, secret)}
        )


def test_stripe_card_is_charged_once_and_the_webhook_changes_nothing_more(pay, wait):
    pay.start()
    order_id = pay.place()
    wait(lambda: pay.order(order_id) and pay.order(order_id).status == "completed", what="completed")
    o = pay.order(order_id)
    assert o.payment_status == "succeeded" and o.provider_payment_id.startswith("pi_")
    assert pay.charges("stripe", order_id)["charges"] == 1
    for _ in range(3):  # the same webhook delivered three times
        pay.stripe_webhook(o.provider_payment_id, event_id="evt_same_three_times")
    wait(lambda: pay.bus.depth("orders.payment-confirmed") == 0)
    wait(
        lambda: (
            Counter(pay.events(order_id))
            == Counter({"stock.reserve": 1, "order.placed": 1, "stock.commit": 1, "order.completed": 1})
        ),
        what="events",
    )
    with pay.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM inbox WHERE message_id = 'evt_same_three_times'")).scalar() == 1


def test_a_refund_of_a_completed_order_leaves_it_refunded_and_announced(pay, wait):
    """Hole: a RefundPayment on orders.internal gave back 300 of 300 on a completed order that stayed
    completed, with no order.refunded."""
    pay.start()
    order_id = pay.place()
    wait(lambda: pay.order(order_id) and pay.order(order_id).status == "completed", what="completed")
    for _ in range(2):  # the same command twice: one refund
        pay.bus.ch.basic_publish(
            "orders.internal",
            "payment.refund",
            json.dumps({"order_id": order_id}).encode(),
            pika.BasicProperties(
                message_id=f"refund-{order_id}", type="RefundPayment", content_type="application/json", delivery_mode=2
            ),
        )
    wait(lambda: pay.order(order_id).status == "refunded", what="order refunded")
    o = pay.order(order_id)
    assert o.payment_status == "refunded" and o.refund_id
    wait(lambda: "order.refunded" in pay.events(order_id), what="order.refunded")
    wait(lambda: pay.bus.depth("orders.payments") == 0)
    assert pay.charges("stripe", order_id)["refunds"] == 1
    assert pay.events(order_id).count("order.refunded") == 1
    refunded = [
        e for e in pay.bus.events() if e["routing_key"] == "order.refunded" and e["body"]["order_id"] == order_id
    ]
    assert refunded[0]["body"]["status"] == "refunded"


def test_an_order_waiting_for_the_buyer_completes_once_they_paid_and_takes_the_money_once(pay, provider, wait):
    """Stripe: 3-D Secure, then the webhook; PayPal: the buyer approves, and the webhook's CapturePayment
    (delivered twice) captures."""
    pay.start()
    order_id = pay.place(provider=provider.name, method="pm_card_threeDSecure2Required")
    wait(lambda: pay.order(order_id) and pay.order(order_id).status == "awaiting_payment")
    o = pay.order(order_id)
    assert o.provider_payment_id in json.dumps(o.next_action)  # the client secret / the approve link
    wait(lambda: "order.awaiting_payment" in pay.events(order_id))
    assert provider.taken(order_id) == 0
    provider.buyer_pays(o.provider_payment_id)
    pay.webhook_after_payment(provider.name, order_id, o.provider_payment_id)
    wait(lambda: pay.order(order_id).status == "completed", what="completed by the webhook")
    assert provider.taken(order_id) == 1
    wait(lambda: "order.completed" in pay.events(order_id))


def test_a_wrong_amount_in_a_confirmation_never_completes_the_order(pay, wait):
    pay.start()
    order_id = pay.place(method="pm_card_threeDSecure2Required")
    wait(lambda: pay.order(order_id) and pay.order(order_id).status == "awaiting_payment")
    pid = pay.order(order_id).provider_payment_id
    pay.bus.publish(
        "PaymentConfirmed",
        {
            "order_id": order_id,
            "provider": "stripe",
            "payment_id": pid,
            "amount": 1,
            "currency": "USD",
            "event_id": "evt_cheap",
        },
    )
    wait(lambda: pay.bus.depth("orders.payment-confirmed") == 0)
    time.sleep(0.5)
    assert pay.order(order_id).status == "awaiting_payment"


def test_a_declined_card_rejects_the_order_and_releases_stock(pay, wait):
    pay.start()
    order_id = pay.place(method="pm_card_chargeDeclined")
    wait(lambda: pay.order(order_id) and pay.order(order_id).status == "rejected")
    assert "generic_decline" in pay.order(order_id).reason
    wait(
        lambda: (
            Counter(pay.events(order_id))
            == Counter({"stock.reserve": 1, "order.placed": 1, "stock.release": 1, "order.rejected": 1})
        )
    )
    assert pay.charges("stripe", order_id).get("charges", 0) == 0


def test_provider_503_twice_then_success_charges_once(pay, wait):
    pay.fault("stripe", count=2, status=503)
    pay.start()
    order_id = pay.place()
    wait(lambda: pay.order(order_id) and pay.order(order_id).status == "completed")
    assert pay.charges("stripe", order_id)["charges"] == 1


def test_a_provider_timeout_after_the_charge_is_settled_without_a_second_charge(pay, wait):
    # the fake takes the money, then answers too late for the client's 2 s timeout
    pay.fault("stripe", count=1, delay=4, after_work=True, path="/v1/payment_intents")
    pay.start()
    order_id = pay.place()
    wait(lambda: pay.order(order_id) and pay.order(order_id).status == "completed", timeout=40)
    assert pay.charges("stripe", order_id)["charges"] == 1


def test_worker_killed_after_the_provider_charged_and_before_recording_charges_once(pay, wait):
    pay.fault("stripe", count=1, delay=3, after_work=True, path="/v1/payment_intents")
    pool = pay.start()
    order_id = pay.place()
    wait(lambda: pay.charges("stripe", order_id).get("charges") == 1, what="provider took the money")
    assert pay.order(order_id).status == "pending"
    for pid in pool.children():
        os.kill(pid, signal.SIGKILL)  # before the late answer is recorded
    wait(lambda: pay.order(order_id).status == "completed", timeout=40, what="completed after restart")
    assert pay.charges("stripe", order_id)["charges"] == 1


def test_payment_landing_after_a_cancel_is_refunded_once(pay, wait, make_place):
    pay.start(*COMMANDS_ONLY)  # no payment step yet: the order stays pending
    order_id = pay.place()
    wait(lambda: pay.order(order_id) and pay.order(order_id).status == "pending")
    # the buyer's money is taken (e.g. by a payment step on another host) ...
    from handlers.payment_commands import idempotency_key
    from handlers.payments import build_gateways
    from handlers.payments.base import PaymentRequest

    taken = build_gateways(pay.settings_now())["stripe"].start(
        PaymentRequest(
            order_id=order_id,
            amount=300,
            currency="USD",
            idempotency_key=idempotency_key(order_id, "start"),
            payment_method="pm_card_visa",
        )
    )
    # ... while the buyer cancels
    pay.bus.publish("CancelOrder", {"order_id": order_id, "requested_by": {"user_id": "buyer", "roles": ["user"]}})
    wait(lambda: pay.order(order_id).status == "cancelled")
    pay.stripe_webhook(taken.provider_payment_id)
    pay.stripe_webhook(taken.provider_payment_id)  # a second delivery under a new event id
    pay.start("--queue", "orders.payments")
    wait(lambda: pay.order(order_id).payment_status == "refunded", what="refunded")
    wait(lambda: "order.refunded" in pay.events(order_id))
    wait(lambda: pay.bus.depth("orders.payments") == 0)
    time.sleep(0.5)
    assert pay.charges("stripe", order_id)["charges"] == 1
    assert pay.charges("stripe", order_id)["refunds"] == 1
    assert pay.events(order_id).count("order.refunded") == 1
    assert pay.order(order_id).status == "cancelled"


def test_an_internal_confirmation_of_a_cancelled_order_is_asked_about_at_its_provider_and_refused(
    pay, wait, commands_only
):
    """Before issue 20 an ``internal`` confirmation was taken at its word (here: money said to be kept on a
    cancelled order, handed to a person). No order is paid internally: the order's provider is asked, and it has
    no such payment."""
    pay.start(*commands_only)
    order_id = pay.place()
    wait(lambda: pay.order(order_id) and pay.order(order_id).status == "pending")
    pay.bus.publish("CancelOrder", {"order_id": order_id, "requested_by": {"user_id": "buyer", "roles": ["user"]}})
    wait(lambda: pay.order(order_id).status == "cancelled")
    confirmation = pay.bus.publish(
        "PaymentConfirmed",
        {
            "order_id": order_id,
            "provider": "internal",
            "payment_id": "int-7",
            "amount": 300,
            "currency": "USD",
            "event_id": "int-evt-7",
        },
    )
    pay.start("--queue", "orders.payments")
    refused = wait(
        lambda: [e for e in pay.bus.events() if e["routing_key"] == "command.refused"], what="confirmation refused"
    )
    assert (refused[0]["body"]["message_id"], refused[0]["body"]["reason"]) == (confirmation, "payment_not_confirmed")
    o = pay.order(order_id)
    assert o.status == "cancelled" and o.provider_payment_id != "int-7"
    assert [d for d in pay.bus.dead_letters() if d["type"] == "RefundPayment"] == []
    assert pay.charges("stripe", order_id).get("refunds", 0) == 0


def test_a_charge_landing_after_the_order_was_paid_another_way_is_refunded(pay, wait):
    """Hole found by the chaos run: the late answer overwrote the payment and the money was taken twice.  The other
    way: a PaymentIntent the buyer paid client-side, whose confirmation arrives while our own charge is in flight."""
    pay.fault("stripe", count=1, delay=1.5, path="/v1/payment_intents")
    pay.start()
    order_id = pay.place()
    wait(lambda: pay.faults_taken("stripe"), what="charge in flight")
    other = httpx.post(
        f"{pay.fakes['stripe'].url}/v1/payment_intents",
        auth=("sk_test_local_fake", ""),
        data={
            "amount": 300,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "confirm": "true",
            "metadata[order_id]": order_id,
        },
    ).json()["id"]
    pay.bus.publish(
        "PaymentConfirmed",
        {
            "order_id": order_id,
            "provider": "stripe",
            "payment_id": other,
            "amount": 300,
            "currency": "USD",
            "event_id": "evt-paid-client-side",
        },
    )
    wait(lambda: pay.charges("stripe", order_id).get("refunds") == 1, timeout=40, what="second charge refunded")
    o = pay.order(order_id)
    assert (o.status, o.payment_status, o.provider_payment_id) == ("completed", "succeeded", other)
    assert pay.charges("stripe", order_id)["charges"] == 2  # two intents charged, one given back
    assert pay.events(order_id).count("order.completed") == 1


def test_a_slow_provider_call_holds_up_only_its_own_slot(pay, wait):
    """The payment step is a sliding window: while one call hangs, the other slot keeps charging."""
    pay.start(ORDERS_WORKER__PAYMENT_CONCURRENCY="2", ORDERS_STRIPE__TIMEOUT_SECONDS="15")
    pay.fault("stripe", count=1, delay=6, path="/v1/payment_intents")  # the next charge answers 6 s late
    slow = pay.place()
    wait(lambda: pay.faults_taken("stripe"), what="slow call under way")
    quick = [pay.place() for _ in range(12)]
    wait(lambda: all(pay.order(o) and pay.order(o).status == "completed" for o in [slow, *quick]), what="all paid")
    with pay.engine.connect() as conn:
        done = dict(conn.execute(text("SELECT order_id::text, updated_at FROM orders")).all())
    assert max(done[o] for o in quick) < done[slow], "the quick orders were paid while the slow call was out"
    assert all(pay.charges("stripe", o)["charges"] == 1 for o in [slow, *quick])


def test_a_paypal_capture_that_lands_after_the_cancel_checked_is_refunded_once(pay, wait):
    """Hole found by the chaos run: our capture call timed out, the buyer cancelled, the cancel found the
    PayPal order not yet captured, and then the capture landed: the money was kept on a cancelled order."""
    pay.start(ORDERS_PAYPAL__TIMEOUT_SECONDS="1", ORDERS_WORKER__INPLACE_RETRIES="1")
    order_id = pay.place(provider="paypal")
    wait(lambda: pay.order(order_id) and pay.order(order_id).status == "awaiting_payment")
    pid = pay.order(order_id).provider_payment_id
    capture = pay.paypal_approved(order_id, pid, "WH-APPROVED-LATE")
    pay.fault("paypal", count=1, delay=4, path=f"/v2/checkout/orders/{pid}/capture")  # done 4 s late; we wait 1 s
    pay.publish_command(capture)
    wait(lambda: pay.order(order_id).payment_status == "capturing", what="capture under way")
    pay.bus.publish("CancelOrder", {"order_id": order_id, "requested_by": {"user_id": "buyer", "roles": ["user"]}})
    wait(lambda: pay.order(order_id).status == "cancelled", what="cancelled before the capture lands")
    assert pay.charges("paypal", order_id)["captures"] == 0
    wait(lambda: pay.order(order_id).payment_status == "refunded", timeout=40, what="late capture refunded")
    charges = pay.charges("paypal", order_id)
    assert (charges["captures"], charges["refunds"]) == (1, 1)
    assert pay.order(order_id).status == "cancelled"
    wait(lambda: pay.events(order_id).count("order.refunded") == 1, what="one order.refunded")
