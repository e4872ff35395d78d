"""StripeGateway with the real ``stripe`` SDK against the fake Stripe over HTTP (what it does
as PayPal's does: ``test_payments_providers.py``)."""

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
    PaymentFacts,
    PaymentOutcome,
    PaymentRequest,
    PermanentPaymentError,
    TransientPaymentError,
)
from handlers.payments.settings import StripeSettings  # noqa: E402
from handlers.payments.stripe_gateway import StripeGateway  # noqa: E402
from scripts.fakes import fake_stripe  # noqa: E402

API_KEY = "sk_test_local_fake"


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    srv = fake_stripe.serve(0, api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture
def fake(server: Any) -> Iterator[Any]:
    httpx.post(server.url + "/_fake/reset").raise_for_status()
    yield server


@pytest.fixture
def make_gateway(fake: Any) -> Callable[..., StripeGateway]:
    def make(**overrides: Any) -> StripeGateway:
        values: dict[str, Any] = {
            "api_key": API_KEY,
            "webhook_secret": "whsec_test",
            "api_base": fake.url,
            "timeout_seconds": 5,
            "max_network_retries": 2,
            **overrides,
        }
        return StripeGateway(StripeSettings(**values))

    return make


def inject(fake: Any, **fault: Any) -> None:
    httpx.post(fake.url + "/_fake/faults", json=fault).raise_for_status()


def charges(fake: Any, order_id: str) -> dict[str, int]:
    return (
        httpx.get(fake.url + "/_fake/charges")
        .json()["orders"]
        .get(order_id, {"charges": 0, "refunds": 0, "payment_intents": 0})
    )


def log(fake: Any) -> list[dict[str, Any]]:
    return httpx.get(fake.url + "/_fake/log").json()["requests"]


def request(
    order_id: str = "order-1", pm: str = "pm_card_visa", key: str | None = None, amount: int = 1099
) -> PaymentRequest:
    return PaymentRequest(
        order_id=order_id, amount=amount, currency="EUR", idempotency_key=key or f"pay-{order_id}", payment_method=pm
    )


def test_success_charges_once_with_our_key(fake: Any, make_gateway: Callable[..., StripeGateway]) -> None:
    result = make_gateway().start(request())
    assert result.outcome is PaymentOutcome.SUCCEEDED
    assert result.provider_payment_id.startswith("pi_")
    assert charges(fake, "order-1")["charges"] == 1
    intent = fake.app.intents[result.provider_payment_id]
    assert (intent["amount"], intent["currency"], intent["metadata"]) == (1099, "eur", {"order_id": "order-1"})
    assert [e["idempotency_key"] for e in log(fake)] == ["pay-order-1"]


def test_requires_action_then_buyer_completes(fake: Any, make_gateway: Callable[..., StripeGateway]) -> None:
    gateway = make_gateway()
    result = gateway.start(request(pm="pm_card_threeDSecure2Required"))
    assert result.outcome is PaymentOutcome.REQUIRES_ACTION
    assert result.next_action["client_secret"].startswith(result.provider_payment_id + "_secret_")
    assert charges(fake, "order-1")["charges"] == 0
    httpx.post(f"{fake.url}/_fake/confirm/{result.provider_payment_id}").raise_for_status()
    assert gateway.capture(result.provider_payment_id, "unused").outcome is PaymentOutcome.SUCCEEDED


@pytest.mark.parametrize(
    ("pm", "reason"),
    [
        ("pm_card_chargeDeclined", "generic_decline"),
        ("pm_card_visa_chargeDeclined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"),
    ],
)
def test_decline_is_a_result_not_an_error(
    fake: Any, make_gateway: Callable[..., StripeGateway], pm: str, reason: str
) -> None:
    gateway = make_gateway()
    first = gateway.start(request(pm=pm))
    assert first.outcome is PaymentOutcome.DECLINED
    assert first.decline_reason == reason
    assert first.provider_payment_id.startswith("pi_")
    # The decline is stored under the key: asking again replays it.
    assert gateway.start(request(pm=pm)) == first
    assert charges(fake, "order-1") == {**charges(fake, "order-1"), "charges": 0, "payment_intents": 1}


def test_processing(fake: Any, make_gateway: Callable[..., StripeGateway]) -> None:
    assert make_gateway().start(request(pm="pm_fake_processing")).outcome is PaymentOutcome.PROCESSING


def test_429_is_transient(fake: Any, make_gateway: Callable[..., StripeGateway]) -> None:
    inject(fake, count=1, status=429)
    with pytest.raises(TransientPaymentError):
        make_gateway(max_network_retries=0).start(request())


def test_dropped_answer_is_retried_by_sdk_with_same_key(fake: Any, make_gateway: Callable[..., StripeGateway]) -> None:
    inject(fake, count=1, drop=True, after_work=True)
    assert make_gateway(max_network_retries=2).start(request()).outcome is PaymentOutcome.SUCCEEDED
    assert charges(fake, "order-1") == {**charges(fake, "order-1"), "charges": 1, "payment_intents": 1}


def test_random_failures_never_charge_twice(fake: Any, make_gateway: Callable[..., StripeGateway]) -> None:
    inject(fake, rate=0.3, seed=11, drop=True, after_work=True)
    inject(fake, rate=0.3, seed=12, status=503)
    gateway = make_gateway(max_network_retries=0, timeout_seconds=2)
    outcomes = []
    for n in range(12):
        for _attempt in range(20):  # what the worker does: retry with the same key
            try:
                outcomes.append(gateway.start(request(order_id=f"o{n}")).outcome)
                break
            except TransientPaymentError:
                continue
    assert outcomes == [PaymentOutcome.SUCCEEDED] * 12
    orders = httpx.get(fake.url + "/_fake/charges").json()["orders"]
    assert {o: c["charges"] for o, c in orders.items()} == {f"o{n}": 1 for n in range(12)}
    assert any(e["replayed"] for e in log(fake))  # some answers really were lost


def test_invalid_request_is_permanent(fake: Any, make_gateway: Callable[..., StripeGateway]) -> None:
    with pytest.raises(PermanentPaymentError, match="resource_missing"):
        make_gateway().start(request(pm="pm_does_not_exist"))


def test_cancel(fake: Any, make_gateway: Callable[..., StripeGateway]) -> None:
    gateway = make_gateway()
    pending = gateway.start(request(pm="pm_card_threeDSecure2Required"))
    gateway.cancel(pending.provider_payment_id, "cancel-1")
    assert fake.app.intents[pending.provider_payment_id]["status"] == "canceled"
    gateway.cancel(pending.provider_payment_id, "cancel-2")  # already cancelled: fine
    paid = gateway.start(request(order_id="order-2"))
    with pytest.raises(PaymentAlreadyCaptured):
        gateway.cancel(paid.provider_payment_id, "cancel-3")


def test_refund_is_idempotent(fake: Any, make_gateway: Callable[..., StripeGateway]) -> None:
    gateway = make_gateway()
    paid = gateway.start(request())
    first = gateway.refund(paid, 1099, "EUR", "refund-order-1")
    second = gateway.refund(paid, 1099, "EUR", "refund-order-1")
    assert first == second and first.status == "succeeded"
    assert charges(fake, "order-1")["refunds"] == 1
    with pytest.raises(PermanentPaymentError, match="charge_already_refunded"):
        gateway.refund(paid, 1099, "EUR", "refund-order-1-again")


# -- lookup ---------------------------------------------------------------------


def test_lookup_of_a_succeeded_intent_says_taken_with_our_order_and_the_amount_received(
    fake: Any, make_gateway: Callable[..., StripeGateway]
) -> None:
    gateway = make_gateway()
    pi_id = gateway.start(request(order_id="order-facts")).provider_payment_id
    assert gateway.lookup(pi_id) == PaymentFacts(
        provider_payment_id=pi_id, taken=True, order_id="order-facts", amount=1099, currency="EUR", status="succeeded"
    )


@pytest.mark.parametrize(
    ("pm", "status"),
    [
        ("pm_card_chargeDeclined", "requires_payment_method"),
        ("pm_card_threeDSecure2Required", "requires_action"),
        ("pm_fake_processing", "processing"),
    ],
)
def test_lookup_of_a_declined_or_unfinished_intent_says_not_taken(
    fake: Any, make_gateway: Callable[..., StripeGateway], pm: str, status: str
) -> None:
    gateway = make_gateway()
    pi_id = gateway.start(request(order_id="order-facts", pm=pm)).provider_payment_id
    facts = gateway.lookup(pi_id)
    assert (facts.taken, facts.status, facts.order_id, facts.amount, facts.currency) == (
        False,
        status,
        "order-facts",
        1099,
        "EUR",
    )


def test_lookup_errors_map_like_the_other_calls(fake: Any, make_gateway: Callable[..., StripeGateway]) -> None:
    gateway = make_gateway(max_network_retries=0)
    inject(fake, count=1, status=503)
    with pytest.raises(TransientPaymentError):
        gateway.lookup("pi_unknown")
    with pytest.raises(PermanentPaymentError):
        make_gateway(api_key="sk_test_wrong").lookup("pi_unknown")
