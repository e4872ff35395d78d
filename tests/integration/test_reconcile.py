"""``orders reconcile`` against real PostgreSQL and the fakes over HTTP.

Orders are placed and paid through the broker and a real worker pool (the payments table is the service's
own); then the two sides are made to disagree the ways they do in life: money taken at the provider behind
the service's back (created at the fake through its API), rows changed by hand.  Each kind of mismatch must
be reported, on the right order, and nothing else; a clean state reports nothing and exits 0; the provider's
records are read across several pages.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the fakes live in scripts/, outside the installed packages
    sys.path.insert(0, str(ROOT))

from handlers.payments.paypal_gateway import translate_event  # noqa: E402
from handlers.payments.webhooks import to_command  # noqa: E402
from scripts.fakes import fake_paypal, fake_stripe  # noqa: E402
from tests.support import wait_until  # noqa: E402
from worker import reconcile as rec  # noqa: E402

ORDERS = str(Path(sys.executable).parent / "orders")
STRIPE_KEY = fake_stripe.DEFAULT_API_KEY
PAYPAL_AUTH = (fake_paypal.DEFAULT_CLIENT_ID, fake_paypal.DEFAULT_CLIENT_SECRET)


@pytest.fixture(scope="module")
def own_fakes() -> Iterator[dict[str, Any]]:
    """This module's own fakes: reconcile reads everything a provider holds, so no other module's payments."""
    servers = {"stripe": fake_stripe.serve(0), "paypal": fake_paypal.serve(0)}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def env(test_env: dict[str, str], own_fakes: dict[str, Any]) -> dict[str, str]:
    return {
        **test_env,
        "ORDERS_STRIPE__API_BASE": own_fakes["stripe"].url,
        "ORDERS_PAYPAL__BASE_URL": own_fakes["paypal"].url,
        "ORDERS_STRIPE__MAX_NETWORK_RETRIES": "0",
        "ORDERS_PAYPAL__MAX_NETWORK_RETRIES": "0",
    }


@pytest.fixture(scope="module")
def pool(module_service: Callable[..., Any], env: dict[str, str]) -> Any:
    module_service("relay", **env)
    return module_service("worker", "--processes", "1", **env)


@pytest.fixture
def world(pool: Any, own_fakes: dict[str, Any], engine: Any, bus: Any, env: dict[str, str]) -> World:
    from worker import catalogue

    for server in own_fakes.values():
        httpx.post(server.url + "/_fake/reset").raise_for_status()
    with engine.begin() as conn:
        conn.execute(
            text("TRUNCATE orders, order_items, order_transitions, order_history, payments, inbox, outbox, products")
        )
    catalogue.upsert(
        engine,
        [
            catalogue.ProductRow(product_id="sku-apple", name="Apple", price=150, currency="USD"),
            catalogue.ProductRow(product_id="sku-pear", name="Pear", price=275, currency="USD"),
        ],
    )
    return World(own_fakes, engine, bus, env)


class World:
    def __init__(self, fakes: dict[str, Any], engine: Any, bus: Any, env: dict[str, str]) -> None:
        self.fakes, self.engine, self.bus, self.env = fakes, engine, bus, env

    # -- the service ------------------------------------------------------------------------------
    def place(self, payment: dict[str, Any], quantity: int = 2) -> str:
        order_id = str(uuid.uuid4())
        self.bus.publish(
            "PlaceOrder",
            {
                "order_id": order_id,
                "user_id": "buyer",
                "items": [{"product_id": "sku-apple", "quantity": quantity}],
                "payment": payment,
            },
        )
        return order_id

    def row(self, order_id: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(
                text(
                    "SELECT o.status, p.status AS payment_status, p.provider_payment_id, p.capture_id, p.amount"
                    " FROM orders o LEFT JOIN payments p USING (order_id) WHERE o.order_id = CAST(:o AS uuid)"
                ),
                {"o": order_id},
            ).first()

    def wait_status(self, order_id: str, status: str) -> Any:
        return wait_until(
            lambda: (r := self.row(order_id)) is not None and r.status == status and r, timeout=40, what=status
        )

    def internal(self, message_type: str, routing_key: str, body: dict[str, Any], message_id: str) -> None:
        self.bus.ch.basic_publish(
            "orders.internal",
            routing_key,
            json.dumps(body).encode(),
            pika.BasicProperties(
                message_id=message_id, type=message_type, content_type="application/json", delivery_mode=2
            ),
        )

    def refund_through_service(self, order_id: str) -> None:
        self.internal("RefundPayment", "payment.refund", {"order_id": order_id}, f"refund-{order_id}")
        self.wait_status(order_id, "refunded")

    def sql(self, statement: str, **params: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(statement), params)

    def ghost_paid_order(self, provider: str, payment_id: str) -> str:
        """An order the service shows as paid, with a payment the provider never saw."""
        order_id = str(uuid.uuid4())
        self.sql(
            "INSERT INTO orders (order_id, user_id, status, currency, total, payment_provider, payment_request,"
            " place_message_id) VALUES (CAST(:o AS uuid), 'ghost', 'completed', 'USD', 300, :p, '{}', :o)",
            o=order_id,
            p=provider,
        )
        self.sql(
            "INSERT INTO payments (order_id, provider, status, amount, currency, idempotency_key,"
            " provider_payment_id, capture_id) VALUES (CAST(:o AS uuid), :p, 'succeeded', 300, 'USD', :o, :pid, :cid)",
            o=order_id,
            p=provider,
            pid=payment_id,
            cid=payment_id if provider == "paypal" else None,
        )
        return order_id

    # -- reconcile --------------------------------------------------------------------------------
    def reconcile(self, provider: str, *args: str) -> tuple[int, str]:
        done = subprocess.run(
            [ORDERS, "reconcile", "--provider", provider, "--since", "1h", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode in (0, 1), done.stderr
        return done.returncode, done.stdout

    def report(self, provider: str, *args: str) -> tuple[int, dict[str, Any]]:
        code, out = self.reconcile(provider, "--json", "--grace", "0s", *args)
        return code, json.loads(out)

    def requests(self, provider: str, path: str) -> int:
        log = httpx.get(self.fakes[provider].url + "/_fake/log").json()["requests"]
        return sum(1 for r in log if r["method"] == "GET" and r["path"] == path)

    # -- the providers, behind the service's back ---------------------------------------------------
    def stripe(self, method: str, path: str, **data: Any) -> dict[str, Any]:
        r = httpx.request(method, self.fakes["stripe"].url + path, data=data, auth=(STRIPE_KEY, ""))
        r.raise_for_status()
        return dict(r.json())

    def stripe_charge(self, order_id: str, amount: int = 300) -> str:
        return str(
            self.stripe(
                "POST",
                "/v1/payment_intents",
                amount=amount,
                currency="usd",
                payment_method="pm_card_visa",
                confirm="true",
                **{"metadata[order_id]": order_id},
            )["id"]
        )

    def paypal(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        url = self.fakes["paypal"].url
        token = httpx.post(url + "/v1/oauth2/token", auth=PAYPAL_AUTH).json()["access_token"]
        r = httpx.request(method, url + path, json=body, headers={"Authorization": f"Bearer {token}"})
        r.raise_for_status()
        return dict(r.json())

    def paypal_charge(self, order_id: str, value: str = "3.00") -> str:
        """Create, approve and capture a PayPal order for ``order_id``; the capture id."""
        created = self.paypal(
            "POST",
            "/v2/checkout/orders",
            {
                "intent": "CAPTURE",
                "purchase_units": [{"custom_id": order_id, "amount": {"currency_code": "USD", "value": value}}],
            },
        )
        httpx.post(f"{self.fakes['paypal'].url}/_fake/approve/{created['id']}").raise_for_status()
        captured = self.paypal("POST", f"/v2/checkout/orders/{created['id']}/capture")
        return str(captured["purchase_units"][0]["payments"]["captures"][0]["id"])

    def paypal_paid_order(self) -> str:
        """A PayPal order placed with the service, approved by the buyer, captured by the worker."""
        order_id = self.place(
            {"provider": "paypal", "return_url": "https://shop.example/ok", "cancel_url": "https://shop.example/no"}
        )
        paypal_order = self.wait_status(order_id, "awaiting_payment").provider_payment_id
        httpx.post(f"{self.fakes['paypal'].url}/_fake/approve/{paypal_order}").raise_for_status()
        event = {
            "id": f"WH-{uuid.uuid4().hex[:20].upper()}",
            "event_type": "CHECKOUT.ORDER.APPROVED",
            "resource_type": "checkout-order",
            "resource": {
                "id": paypal_order,
                "status": "APPROVED",
                "intent": "CAPTURE",
                "purchase_units": [{"custom_id": order_id, "amount": {"currency_code": "USD", "value": "3.00"}}],
            },
        }
        command = to_command(translate_event(event))
        assert command is not None
        self.internal(command.message_type, command.routing_key, command.body, command.message_id)
        self.wait_status(order_id, "completed")
        return order_id


def kinds_by_order(report: dict[str, Any]) -> dict[str | None, list[str]]:
    found: dict[str | None, list[str]] = {}
    for m in report["mismatches"]:
        found.setdefault(m["order_id"], []).append(m["kind"])
    return {k: sorted(v) for k, v in found.items()}


def test_stripe_a_clean_state_reports_nothing_then_every_kind_of_mismatch_is_reported(world):
    card = {"provider": "stripe", "payment_method": "pm_card_visa"}
    paid = [world.place(card) for _ in range(7)]
    three_ds = world.place({"provider": "stripe", "payment_method": "pm_card_threeDSecure2Required"})
    declined = world.place({"provider": "stripe", "payment_method": "pm_card_chargeDeclined"})
    for order_id in paid:
        world.wait_status(order_id, "completed")
    world.wait_status(three_ds, "awaiting_payment")
    world.wait_status(declined, "rejected")
    refunded = paid.pop()
    world.refund_through_service(refunded)

    # clean: 9 PaymentIntents read 2 a page (5 pages) and 1 refund; nothing to report
    before = world.requests("stripe", "/v1/payment_intents")
    code, report = world.report("stripe", "--page-size", "2")
    assert (code, report["mismatches"], report["ok"]) == (0, [], True), report
    assert report["provider_payments"] == 9 and report["service_payments"] == 9
    assert world.requests("stripe", "/v1/payment_intents") - before == 5
    assert world.requests("stripe", "/v1/refunds") >= 1
    # the default grace leaves what just changed for the next run
    code, out = world.reconcile("stripe", "--json")
    assert code == 0 and json.loads(out)["skipped_recent"] >= 9

    a, b, c, d, e, f = paid
    stranger = str(uuid.uuid4())
    world.stripe_charge(stranger)  # money for an order the service does not have
    second = world.stripe_charge(a)  # a second payment for a, kept
    returned = world.stripe_charge(b)  # a second payment for b, given back in full: holds nothing
    world.stripe("POST", "/v1/refunds", payment_intent=returned)
    ghost = world.ghost_paid_order("stripe", "pi_never_made_at_stripe")
    world.sql("UPDATE payments SET amount = amount + 5 WHERE order_id = CAST(:o AS uuid)", o=c)
    world.sql("UPDATE payments SET currency = 'EUR' WHERE order_id = CAST(:o AS uuid)", o=d)
    world.stripe("POST", "/v1/refunds", payment_intent=world.row(e).provider_payment_id, amount=100)
    world.sql(
        "UPDATE payments SET status = 'refunded', refund_id = 're_never_made' WHERE order_id = CAST(:o AS uuid)", o=f
    )

    code, report = world.report("stripe", "--page-size", "3")
    assert code == 1 and not report["ok"]
    assert kinds_by_order(report) == {
        stranger: ["no_order"],
        a: ["not_shown"],
        ghost: ["no_money"],
        c: ["amount_differs"],
        d: ["currency_differs"],
        e: ["refund_not_recorded"],
        f: ["refund_not_at_provider"],
    }
    by_kind = {m["kind"]: m for m in report["mismatches"]}
    assert by_kind["not_shown"]["payment_id"] == second
    assert (by_kind["amount_differs"]["provider_amount"], by_kind["amount_differs"]["service_amount"]) == (300, 305)
    assert by_kind["no_money"]["payment_id"] == "pi_never_made_at_stripe"

    # the table for people says the same, and exits 1
    code, out = world.reconcile("stripe", "--grace", "0s")
    assert code == 1
    for kind in rec.KINDS:
        assert kind in out
    assert "7 mismatches" in out


def test_paypal_a_clean_state_reports_nothing_then_mismatches_are_reported(world):
    paid = [world.paypal_paid_order() for _ in range(3)]
    waiting = world.place(
        {"provider": "paypal", "return_url": "https://shop.example/ok", "cancel_url": "https://shop.example/no"}
    )
    world.wait_status(waiting, "awaiting_payment")  # not approved: no transaction at PayPal, nothing paid here
    world.refund_through_service(paid[0])

    # clean: 3 captures and a refund, 2 a page (2 pages)
    before = world.requests("paypal", "/v1/reporting/transactions")
    code, report = world.report("paypal", "--page-size", "2")
    assert (code, report["mismatches"]) == (0, []), report
    assert report["provider_payments"] == 3
    assert world.requests("paypal", "/v1/reporting/transactions") - before == 2

    refunded, b, c = paid
    stranger = str(uuid.uuid4())
    world.paypal_charge(stranger)
    world.paypal(
        "POST",
        f"/v2/payments/captures/{world.row(b).capture_id}/refund",
        {"amount": {"currency_code": "USD", "value": "1.00"}},
    )
    world.sql("UPDATE payments SET amount = 299 WHERE order_id = CAST(:o AS uuid)", o=c)
    ghost = world.ghost_paid_order("paypal", "GHOSTCAPTURE00001")

    code, report = world.report("paypal", "--page-size", "2")
    assert code == 1
    assert kinds_by_order(report) == {
        stranger: ["no_order"],
        b: ["refund_not_recorded"],
        c: ["amount_differs"],
        ghost: ["no_money"],
    }
    assert world.requests("paypal", "/v1/reporting/transactions") - before >= 2 + 3  # 6 transactions, 2 a page


@pytest.mark.parametrize("provider", ["stripe", "paypal"])
def test_an_order_completed_on_money_its_provider_never_took_is_reported_whatever_its_payment_row_says(world, provider):
    """Issue 20: a forged ``internal`` confirmation completed a never-paid order and left a payment row saying
    ``internal``; reconcile said "no mismatches" and the audit was clean.  Both now look at the order's provider."""
    from worker.audit import run_audit

    payment = (
        {"provider": "stripe", "payment_method": "pm_card_threeDSecure2Required"}
        if provider == "stripe"
        else {"provider": "paypal", "return_url": "https://shop.example/ok", "cancel_url": "https://shop.example/no"}
    )
    order_id = world.place(payment)
    handed = world.wait_status(order_id, "awaiting_payment").provider_payment_id  # what the buyer was handed
    # the state the attack left (before issue 20 the worker itself wrote exactly this)
    world.sql(
        "UPDATE payments SET provider = 'internal', status = 'succeeded', confirmed_event_id = 'evt-forged'"
        " WHERE order_id = CAST(:o AS uuid)",
        o=order_id,
    )
    world.sql("UPDATE orders SET status = 'completed' WHERE order_id = CAST(:o AS uuid)", o=order_id)
    code, report = world.report(provider)
    assert code == 1 and kinds_by_order(report) == {order_id: ["no_money"]}, report
    found = {f.check: f for f in run_audit(world.engine)}
    assert "paid-by-the-orders-provider" in found
    assert [r["order_id"] for r in found["paid-by-the-orders-provider"].sample] == [order_id]
    assert handed and found["paid-by-the-orders-provider"].sample[0]["paid_by"] == "internal"


@pytest.mark.parametrize(("provider", "listing"), [("stripe", "/v1/payment_intents"), ("paypal", "/v1/reporting")])
def test_a_provider_that_cannot_be_read_is_said_plainly_and_exits_1(env, own_fakes, provider, listing):
    """Read through the gateway: its error (here a 503, no retries left) becomes ``cannot read``, no traceback."""
    fault = {"count": 1, "path": listing, "status": 503}
    httpx.post(own_fakes[provider].url + "/_fake/faults", json=fault).raise_for_status()
    try:
        done = subprocess.run(
            [ORDERS, "reconcile", "--provider", provider, "--since", "1h"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        httpx.delete(own_fakes[provider].url + "/_fake/faults")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"error: cannot read {provider}: {provider} "), done.stderr
    assert "503" in done.stderr and "Traceback" not in done.stderr
