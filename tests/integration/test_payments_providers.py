"""What both gateways do alike, each with its real SDK against its fake over HTTP (the ``provider``
fixture runs each test for Stripe, then for PayPal).  What only one of them does is in
``test_payments_stripe.py`` and ``test_payments_paypal.py``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from handlers.payments.base import (
    OutcomeUnknown,
    PaymentFacts,
    PaymentOutcome,
    PermanentPaymentError,
    TransientPaymentError,
)

#: per provider: what ``payments_since`` reads first (Stripe's PaymentIntents list, PayPal's Transaction Search)
LISTING = {"stripe": "/v1/payment_intents", "paypal": "/v1/reporting/transactions"}


def test_503_twice_then_success_through_sdk_retries(provider) -> None:
    provider.fail_next(2, status=503)
    result = provider.gateway(max_network_retries=2).start(provider.request())
    assert result.outcome is provider.started
    assert provider.attempts("order-1") == 1
    assert provider.faults_left() == []  # both faults were hit


def test_a_5xx_with_no_retries_left_is_transient_not_unknown(provider) -> None:
    provider.fail_next(1, status=503)
    with pytest.raises(TransientPaymentError) as info:
        provider.gateway(max_network_retries=0).start(provider.request())
    assert not isinstance(info.value, OutcomeUnknown)
    assert provider.attempts("order-1") == 0


def test_timeout_is_outcome_unknown_and_same_key_settles_it(provider) -> None:
    # The fake does the work, then answers too late: the payment exists, the answer is lost.
    provider.fail_next(1, delay=1.5, after_work=True)
    gateway = provider.gateway(max_network_retries=0, timeout_seconds=0.5)
    with pytest.raises(OutcomeUnknown):
        gateway.start(provider.request())
    assert provider.attempts("order-1") == 1
    again = gateway.start(provider.request())
    assert again.outcome is provider.started
    assert provider.attempts("order-1") == 1
    assert provider.log()[-1]["replayed"] is True


def test_the_same_key_twice_is_one_payment(provider) -> None:
    gateway = provider.gateway()
    first = gateway.start(provider.request())
    second = gateway.start(provider.request())
    assert second.provider_payment_id == first.provider_payment_id
    assert provider.attempts("order-1") == 1
    assert [e["replayed"] for e in provider.log() if e["path"] != "/v1/oauth2/token"] == [False, True]


def test_the_same_key_for_another_amount_is_permanent(provider) -> None:
    gateway = provider.gateway()
    gateway.start(provider.request())
    with pytest.raises(PermanentPaymentError, match=provider.reused_key_error):
        gateway.start(provider.request(amount=2000, key="pay-order-1"))
    assert provider.attempts("order-1") == 1


def test_bad_credentials_are_permanent_and_not_leaked(provider) -> None:
    with pytest.raises(PermanentPaymentError) as info:
        provider.gateway(**provider.bad_credentials).start(provider.request())
    assert "wrong_secret" not in str(info.value)
    assert provider.attempts("order-1") == 0


def test_lookup_of_an_unknown_payment_is_not_found(provider) -> None:
    assert provider.gateway().lookup(provider.unknown_id) == PaymentFacts.not_found(provider.unknown_id)


def test_payments_since_lists_a_payment_taken_then_refunded_through_the_gateway(provider) -> None:
    """The read ``orders reconcile`` makes: the payment (Stripe's PaymentIntent, PayPal's capture) with
    our order id and the money taken, then the same payment with its refund."""
    gateway = provider.gateway()
    request = provider.request(order_id="order-listed")
    paid = gateway.start(request)
    if provider.name == "paypal":  # the buyer approves, the service captures
        provider.buyer_pays(paid.provider_payment_id)
        paid = gateway.capture(paid.provider_payment_id, "capture-order-listed")
    assert paid.outcome is PaymentOutcome.SUCCEEDED
    payment_id = paid.capture_id if provider.name == "paypal" else paid.provider_payment_id
    since = datetime.now(UTC) - timedelta(hours=1)

    [listed] = gateway.payments_since(since)
    assert (listed.payment_id, listed.order_id, listed.taken) == (payment_id, "order-listed", True)
    assert (listed.amount, listed.currency, listed.refunded, listed.kept) == (1099, request.currency, 0, 1099)
    assert listed.at is not None and listed.at >= since

    refund = gateway.refund(paid, 1099, request.currency, "refund-order-listed")
    [listed] = gateway.payments_since(since, page_size=1)
    assert (listed.payment_id, listed.refunded, listed.refund_ids, listed.kept) == (
        payment_id,
        1099,
        (refund.refund_id,),
        0,
    )
    assert gateway.payments_since(datetime.now(UTC) + timedelta(minutes=1)) == []


def test_payments_since_is_retried_by_the_sdk_and_a_5xx_left_is_transient(provider) -> None:
    """The listing has the gateway's retry policy (``max_network_retries``), as every other call."""
    since = datetime.now(UTC) - timedelta(hours=1)
    provider.fail_next(2, path=LISTING[provider.name], status=503)
    assert provider.gateway(max_network_retries=2).payments_since(since) == []
    assert provider.faults_left() == []
    provider.fail_next(1, path=LISTING[provider.name], status=503)
    with pytest.raises(TransientPaymentError, match="503"):
        provider.gateway(max_network_retries=0).payments_since(since)
