"""What both gateways do alike, each with its real SDK against its fake over HTTP (the ``provider``
fixture runs each test for Stripe, then for PayPal).  What only one of them does is in
``test_payments_stripe.py`` and ``test_payments_paypal.py``."""

from __future__ import annotations

import pytest

from handlers.payments.base import OutcomeUnknown, PaymentFacts, PermanentPaymentError, TransientPaymentError


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
