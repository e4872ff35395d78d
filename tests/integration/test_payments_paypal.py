"""PayPalGateway with the real ``paypal-server-sdk`` against the fake PayPal over HTTP (what it does
as Stripe's does: ``test_payments_providers.py``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the fakes live in scripts/, outside the installed packages
    sys.path.insert(0, str(ROOT))

from handlers.payments import PaymentAlreadyCaptured  # noqa: E402
from handlers.payments.base import (  # noqa: E402
    OutcomeUnknown,
    PaymentFacts,
    PaymentOutcome,
    PaymentRequest,
    PaymentResult,
    PermanentPaymentError,
    TransientPaymentError,
)
from handlers.payments.money import MoneyError, from_decimal_string, to_paypal_value  # noqa: E402
from handlers.payments.paypal_gateway import PayPalGateway  # noqa: E402
from handlers.payments.settings import PayPalSettings  # noqa: E402
from scripts.fakes import fake_paypal  # noqa: E402


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    srv = fake_paypal.serve(0, client_id="cid", client_secret="csecret")
    yield srv
    srv.stop()


@pytest.fixture
def fake(server: Any) -> Iterator[Any]:
    httpx.post(server.url + "/_fake/reset").raise_for_status()
    yield server


@pytest.fixture
def make_gateway(fake: Any) -> Callable[..., PayPalGateway]:
    def make(**overrides: Any) -> PayPalGateway:
        values: dict[str, Any] = {
            "client_id": "cid",
            "client_secret": "csecret",
            "base_url": fake.url,
            "webhook_id": "WH-ID",
            "timeout_seconds": 5,
            **overrides,
        }
        return PayPalGateway(PayPalSettings(**values))

    return make


def inject(fake: Any, **fault: Any) -> None:
    httpx.post(fake.url + "/_fake/faults", json=fault).raise_for_status()


def approve(fake: Any, order_id: str, **body: Any) -> None:
    httpx.post(f"{fake.url}/_fake/approve/{order_id}", json=body or None).raise_for_status()


def charges(fake: Any, order_id: str) -> dict[str, Any]:
    return (
        httpx.get(fake.url + "/_fake/charges")
        .json()["orders"]
        .get(order_id, {"orders": 0, "captures": 0, "refunds": 0})
    )


def log(fake: Any) -> list[dict[str, Any]]:
    return httpx.get(fake.url + "/_fake/log").json()["requests"]


def request(
    order_id: str = "order-1", amount: int = 1099, currency: str = "USD", key: str | None = None
) -> PaymentRequest:
    return PaymentRequest(
        order_id=order_id,
        amount=amount,
        currency=currency,
        idempotency_key=key or f"pay-{order_id}",
        return_url="https://shop.example/return",
        cancel_url="https://shop.example/cancel",
    )


def sent_value(fake: Any, order_id: str) -> str:
    return fake.app.orders[order_id]["purchase_units"][0]["amount"]["value"]


def test_create_approve_capture_refund(fake: Any, make_gateway: Callable[..., PayPalGateway]) -> None:
    gateway = make_gateway()
    started = gateway.start(request())
    assert started.outcome is PaymentOutcome.REQUIRES_ACTION
    assert started.next_action["approve_url"].endswith(f"token={started.provider_payment_id}")
    assert fake.app.orders[started.provider_payment_id]["purchase_units"][0]["custom_id"] == "order-1"
    with pytest.raises(PermanentPaymentError, match="ORDER_NOT_APPROVED"):
        gateway.capture(started.provider_payment_id, "capture-order-1")
    # The buyer follows the approve link and comes back to our return_url.
    back = httpx.get(started.next_action["approve_url"], follow_redirects=False)
    assert back.status_code == 302 and back.headers["location"].startswith("https://shop.example/return?token=")
    captured = gateway.capture(started.provider_payment_id, "capture-order-1")
    assert captured.outcome is PaymentOutcome.SUCCEEDED and captured.capture_id
    assert charges(fake, "order-1")["captures"] == 1
    refund = gateway.refund(captured, 1099, "USD", "refund-order-1")
    assert refund.status == "COMPLETED"
    assert gateway.refund(captured, 1099, "USD", "refund-order-1") == refund  # replayed
    assert charges(fake, "order-1")["refunds"] == 1


def test_a_capture_that_raced_a_cancel_is_refunded_without_a_recorded_capture_id(
    fake: Any, make_gateway: Callable[..., PayPalGateway]
) -> None:
    """Found by the chaos run: PayPal captured the order while our record still had no capture id (the
    cancel found it captured), and the refund went to an operator instead of giving the money back."""
    gateway = make_gateway()
    started = gateway.start(request())
    httpx.get(started.next_action["approve_url"], follow_redirects=False)
    with pytest.raises(TransientPaymentError, match="no capture to refund yet"):  # approved, capture in flight
        gateway.refund(
            PaymentResult(PaymentOutcome.SUCCEEDED, started.provider_payment_id), 1099, "USD", "refund-order-1"
        )
    captured = gateway.capture(started.provider_payment_id, "capture-order-1")
    as_recorded = PaymentResult(PaymentOutcome.SUCCEEDED, started.provider_payment_id)  # no capture_id
    refund = gateway.refund(as_recorded, 1099, "USD", "refund-order-1")
    assert refund.status == "COMPLETED"
    assert fake.app.refunds[refund.refund_id]["_capture"] == captured.capture_id
    assert charges(fake, "order-1")["refunds"] == 1


def test_capture_is_idempotent(fake: Any, make_gateway: Callable[..., PayPalGateway]) -> None:
    gateway = make_gateway()
    first = gateway.start(request())  # a start twice under one key: test_payments_providers.py
    approve(fake, first.provider_payment_id)
    capture = gateway.capture(first.provider_payment_id, "cap")
    assert gateway.capture(first.provider_payment_id, "cap").capture_id == capture.capture_id
    # Another key after a lost answer: ORDER_ALREADY_CAPTURED is read back as success.
    assert gateway.capture(first.provider_payment_id, "cap-2").capture_id == capture.capture_id
    assert charges(fake, "order-1")["captures"] == 1


@pytest.mark.parametrize(
    ("amount", "currency", "value"),
    [
        (1099, "USD", "10.99"),
        (500, "JPY", "500"),
        (5000, "KRW", "5000"),
        (12300, "HUF", "123"),
        (10000, "TWD", "100"),
        (7, "EUR", "0.07"),
    ],
)
def test_amount_is_sent_in_paypal_decimals(
    fake: Any, make_gateway: Callable[..., PayPalGateway], amount: int, currency: str, value: str
) -> None:
    started = make_gateway().start(request(amount=amount, currency=currency))
    assert sent_value(fake, started.provider_payment_id) == value


def test_fractional_huf_is_refused_before_calling_paypal(fake: Any, make_gateway: Callable[..., PayPalGateway]) -> None:
    with pytest.raises(PermanentPaymentError, match="HUF"):
        make_gateway().start(request(amount=12345, currency="HUF"))
    assert httpx.get(fake.url + "/_fake/charges").json()["api_requests"] == 0


def test_money_round_trip() -> None:
    assert to_paypal_value(100, "JPY") == "100" and from_decimal_string("100", "JPY") == 100
    assert from_decimal_string("20.0", "USD") == 2000 and from_decimal_string("1.234", "KWD") == 1234
    with pytest.raises(MoneyError):
        from_decimal_string("1.5", "JPY")


def test_dropped_capture_answer_is_retried_with_same_request_id(
    fake: Any, make_gateway: Callable[..., PayPalGateway]
) -> None:
    gateway = make_gateway()
    started = gateway.start(request())
    approve(fake, started.provider_payment_id)
    inject(fake, count=1, drop=True, after_work=True, path="/v2/checkout/orders")
    assert gateway.capture(started.provider_payment_id, "cap").outcome is PaymentOutcome.SUCCEEDED
    assert charges(fake, "order-1")["captures"] == 1
    assert httpx.get(fake.url + "/_fake/log").json()["requests"][-1]["replayed"] is True


@pytest.mark.parametrize(
    ("decline", "outcome", "reason"),
    [
        ("instrument", PaymentOutcome.DECLINED, "INSTRUMENT_DECLINED"),
        ("capture", PaymentOutcome.DECLINED, "DECLINED_BY_PROCESSOR"),
        ("pending", PaymentOutcome.PROCESSING, None),
    ],
)
def test_capture_declines(
    fake: Any, make_gateway: Callable[..., PayPalGateway], decline: str, outcome: PaymentOutcome, reason: str | None
) -> None:
    gateway = make_gateway()
    started = gateway.start(request())
    approve(fake, started.provider_payment_id, decline=decline)
    result = gateway.capture(started.provider_payment_id, "cap")
    assert (result.outcome, result.decline_reason) == (outcome, reason)
    assert charges(fake, "order-1")["captures"] == 0


def test_cancel_uncaptured_is_noop_captured_is_refused(fake: Any, make_gateway: Callable[..., PayPalGateway]) -> None:
    gateway = make_gateway()
    open_order = gateway.start(request())
    gateway.cancel(open_order.provider_payment_id, "cancel-1")
    gateway.cancel("NOSUCHORDER", "cancel-2")
    paid = gateway.start(request(order_id="order-2"))
    approve(fake, paid.provider_payment_id)
    gateway.capture(paid.provider_payment_id, "cap-2")
    with pytest.raises(PaymentAlreadyCaptured):
        gateway.cancel(paid.provider_payment_id, "cancel-3")
    assert charges(fake, "order-1")["captures"] == 0


def test_base_url_override_is_used(fake: Any, make_gateway: Callable[..., PayPalGateway]) -> None:
    gateway = make_gateway()
    assert gateway._client.config.get_base_uri() == fake.url  # noqa: SLF001 - the one override
    gateway.start(request())
    paths = [e["path"] for e in httpx.get(fake.url + "/_fake/log").json()["requests"]]
    assert paths == ["/v1/oauth2/token", "/v2/checkout/orders"]


# -- lookup ---------------------------------------------------------------------


def test_lookup_of_a_captured_order_reads_the_capture(fake: Any, make_gateway: Callable[..., PayPalGateway]) -> None:
    gateway = make_gateway()
    order_id = gateway.start(request(order_id="order-facts", amount=1500, currency="JPY")).provider_payment_id
    approve(fake, order_id)
    captured = gateway.capture(order_id, "capture-facts")
    assert gateway.lookup(order_id) == PaymentFacts(
        provider_payment_id=order_id,
        taken=True,
        order_id="order-facts",
        amount=1500,
        currency="JPY",
        status="COMPLETED",
        capture_id=captured.capture_id,
    )
    assert ("GET", f"/v2/payments/captures/{captured.capture_id}") in {(e["method"], e["path"]) for e in log(fake)}


def test_lookup_of_a_declined_capture_says_not_taken(fake: Any, make_gateway: Callable[..., PayPalGateway]) -> None:
    gateway = make_gateway()
    order_id = gateway.start(request(order_id="order-facts")).provider_payment_id
    approve(fake, order_id, decline="capture")
    gateway.capture(order_id, "capture-facts")
    facts = gateway.lookup(order_id)
    assert (facts.taken, facts.status, facts.order_id, facts.amount) == (False, "DECLINED", "order-facts", 1099)


def test_lookup_of_an_approved_order_not_captured_says_not_taken(
    fake: Any, make_gateway: Callable[..., PayPalGateway]
) -> None:
    gateway = make_gateway()
    order_id = gateway.start(request(order_id="order-facts")).provider_payment_id
    approve(fake, order_id)
    assert gateway.lookup(order_id) == PaymentFacts(
        provider_payment_id=order_id,
        taken=False,
        order_id="order-facts",
        amount=1099,
        currency="USD",
        status="APPROVED",
    )


def test_lookup_refuses_a_capture_that_belongs_to_another_order(
    fake: Any, make_gateway: Callable[..., PayPalGateway]
) -> None:
    gateway = make_gateway()
    order_id = gateway.start(request(order_id="order-facts")).provider_payment_id
    approve(fake, order_id)
    capture_id = gateway.capture(order_id, "capture-facts").capture_id
    fake.app.captures[capture_id]["supplementary_data"]["related_ids"]["order_id"] = "SOMEONE-ELSES"
    with pytest.raises(PermanentPaymentError, match="belongs to order SOMEONE-ELSES"):
        gateway.lookup(order_id)


def test_lookup_errors_map_like_the_other_calls(fake: Any, make_gateway: Callable[..., PayPalGateway]) -> None:
    gateway = make_gateway(max_network_retries=0)
    order_id = gateway.start(request(order_id="order-facts")).provider_payment_id
    inject(fake, count=1, status=503, path="/v2/checkout/orders")
    with pytest.raises(TransientPaymentError):
        gateway.lookup(order_id)
    inject(fake, count=1, drop=True, path="/v2/checkout/orders")
    with pytest.raises(OutcomeUnknown):
        gateway.lookup(order_id)
