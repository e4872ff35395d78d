"""Settling a confirmation by asking the provider, and the capture that never lands (no servers).

The payment step's record functions over the fake unit of work: what the
provider says of a payment (``PaymentFacts``) decides whether the order
completes on it, gives it back, or refuses the confirmation with
``command.refused``; and a capture marked as sent but never seen at PayPal
is waited for only so long.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from handlers import payment_confirmed
from handlers.errors import RetryLater
from handlers.orders import Status
from handlers.outcome import MessageContext
from handlers.payment_commands import CAPTURE_SETTLE_SECONDS, record_cancel, record_settle
from handlers.payments.base import PaymentFacts
from handlers.unit_of_work import PaymentRecord
from schema.messages import CancelPayment, PaymentConfirmed, SettlePayment
from tests.unit.test_handlers import PRODUCTS, FakeUnitOfWork, ctx, place, v


def _awaiting_with_own_intent(uow: FakeUnitOfWork, intent: str = "pi_step") -> str:
    """An order whose payment step created its own intent, waiting for the buyer (3-D Secure)."""
    order_id = place(uow, [{"product_id": "a", "quantity": 1}]).order_id
    order = uow.orders[order_id]
    order.transition(Status.AWAITING_PAYMENT, "m-start")
    uow.save_payment(
        PaymentRecord(
            order_id=order_id,
            provider="stripe",
            status="requires_action",
            amount=100,
            currency="USD",
            idempotency_key="k",
            provider_payment_id=intent,
        )
    )
    return order_id


def _settle(uow: FakeUnitOfWork, order_id: str, payment_id: str, facts: PaymentFacts) -> Any:
    """The mismatched confirmation → its SettlePayment → recorded with the provider's word."""
    confirmation = v(
        PaymentConfirmed,
        {
            "order_id": order_id,
            "provider": "stripe",
            "payment_id": payment_id,
            "amount": 100,
            "currency": "USD",
            "event_id": "evt_1",
        },
    )
    msg = MessageContext("confirm-1", "PaymentConfirmed", "corr-9")
    assert payment_confirmed(confirmation, msg, uow).result == "settling"
    body = next(b for _, rk, b in uow.events if rk == "payment.settle")
    cmd = SettlePayment.model_validate_json(json.dumps(body))
    return record_settle(cmd, ctx("SettlePayment"), uow, facts)


def _facts(order_id: str | None, payment_id: str = "pi_buyer", taken: bool = True, amount: int = 100) -> PaymentFacts:
    return PaymentFacts(payment_id, taken, order_id, amount, "USD", "succeeded" if taken else "requires_payment_method")


def test_a_confirmation_of_another_intent_the_provider_vouches_for_completes_the_order_and_cancels_the_unused_one():
    """The 3-D Secure card paid client-side: its confirmation came before the PlaceOrder, and was refused before."""
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = _awaiting_with_own_intent(uow)
    outcome = _settle(uow, order_id, "pi_buyer", _facts(order_id))
    assert outcome.result == "applied"
    assert uow.orders[order_id].status is Status.COMPLETED
    payment = uow.payments[order_id]
    assert (payment.provider_payment_id, payment.status, payment.confirmed_event_id) == (
        "pi_buyer",
        "succeeded",
        "evt_1",
    )
    cancels = [b for _, rk, b in uow.events if rk == "payment.cancel"]
    assert cancels == [{"order_id": order_id, "payment_id": "pi_step"}]
    assert "command.refused" not in uow.keys()


@pytest.mark.parametrize(
    "facts_for",
    [
        lambda oid: _facts(oid, taken=False),  # not paid at the provider
        lambda oid: _facts(str(uuid.uuid4())),  # paid, for another order
        lambda oid: _facts(None),  # not ours at all
    ],
)
def test_a_confirmation_the_provider_does_not_vouch_for_is_refused_and_announced(facts_for):
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = _awaiting_with_own_intent(uow)
    outcome = _settle(uow, order_id, "pi_buyer", facts_for(order_id))
    assert (outcome.result, outcome.error) == ("refused", "payment_not_confirmed")
    assert uow.orders[order_id].status is Status.AWAITING_PAYMENT
    assert uow.payments[order_id].provider_payment_id == "pi_step"
    refused = [b for _, rk, b in uow.events if rk == "command.refused"]
    assert len(refused) == 1
    assert refused[0]["message_id"] == "confirm-1" and refused[0]["command"] == "PaymentConfirmed"
    assert refused[0]["reason"] == "payment_not_confirmed" and refused[0]["correlation_id"] == "corr-9"
    assert "payment.cancel" not in uow.keys() and "payment.refund" not in uow.keys()


def test_money_taken_for_the_order_in_a_wrong_amount_is_given_back_and_the_confirmation_refused():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = _awaiting_with_own_intent(uow)
    outcome = _settle(uow, order_id, "pi_buyer", _facts(order_id, amount=1))
    assert (outcome.result, outcome.error) == ("refused", "payment_mismatch")
    assert uow.orders[order_id].status is Status.AWAITING_PAYMENT
    refunds = [b for _, rk, b in uow.events if rk == "payment.refund"]
    assert refunds == [{"order_id": order_id, "payment_id": "pi_buyer", "amount": 1, "currency": "USD"}]
    assert uow.keys().count("command.refused") == 1


def test_a_vouched_payment_for_an_order_paid_already_is_given_back():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = _awaiting_with_own_intent(uow)
    payment = uow.payments[order_id]
    payment.status, payment.confirmed_event_id = "succeeded", "evt_0"
    uow.orders[order_id].transition(Status.COMPLETED, "m-paid")
    _settle(uow, order_id, "pi_buyer", _facts(order_id))
    assert uow.payments[order_id].provider_payment_id == "pi_step"
    assert [b for _, rk, b in uow.events if rk == "payment.refund"] == [
        {"order_id": order_id, "payment_id": "pi_buyer"}
    ]


def test_a_paypal_confirmation_is_always_asked_about_before_it_completes_anything():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = place(uow, [{"product_id": "a", "quantity": 1}]).order_id
    uow.orders[order_id].payment_provider = "paypal"
    matching = v(
        PaymentConfirmed,
        {
            "order_id": order_id,
            "provider": "paypal",
            "payment_id": "PAYPAL-1",
            "amount": 100,
            "currency": "USD",
            "event_id": "WH-1",
        },
    )
    assert payment_confirmed(matching, ctx("PaymentConfirmed"), uow).result == "settling"
    assert uow.orders[order_id].status is Status.PENDING


# -- a PayPal capture that never lands ---------------------------------------------------------------


def _cancelled_while_capturing(uow: FakeUnitOfWork, unchanged_seconds: float) -> str:
    order_id = place(uow, [{"product_id": "a", "quantity": 1}]).order_id
    order = uow.orders[order_id]
    order.payment_provider = "paypal"
    order.transition(Status.AWAITING_PAYMENT, "m-start")
    order.transition(Status.CANCELLED, "m-cancel")
    uow.save_payment(
        PaymentRecord(
            order_id=order_id,
            provider="paypal",
            status="capturing",
            amount=100,
            currency="USD",
            idempotency_key="k",
            provider_payment_id="PAYPAL-1",
            unchanged_seconds=unchanged_seconds,
        )
    )
    return order_id


def test_a_capture_not_seen_at_paypal_is_looked_for_again_while_it_may_still_land():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = _cancelled_while_capturing(uow, CAPTURE_SETTLE_SECONDS - 1)
    with pytest.raises(RetryLater):
        record_cancel(v(CancelPayment, {"order_id": order_id}), ctx("CancelPayment"), uow, None)
    assert uow.payments[order_id].status == "capturing"


def test_a_capture_not_seen_at_paypal_past_the_bound_is_recorded_as_not_captured():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = _cancelled_while_capturing(uow, CAPTURE_SETTLE_SECONDS + 1)
    outcome = record_cancel(
        v(CancelPayment, {"order_id": order_id}), ctx("CancelPayment"), uow, None, settle_after=CAPTURE_SETTLE_SECONDS
    )
    assert outcome.result == "applied"
    assert uow.payments[order_id].status == "cancelled"
    # and a capture that lands after all is refunded through its confirmation, as for any cancelled order
    late = v(
        PaymentConfirmed,
        {
            "order_id": order_id,
            "provider": "paypal",
            "payment_id": "PAYPAL-1",
            "amount": 100,
            "currency": "USD",
            "event_id": "WH-late",
        },
    )
    assert payment_confirmed(late, ctx("PaymentConfirmed"), uow).result == "settling"
    body = next(b for _, rk, b in uow.events if rk == "payment.settle")
    record_settle(
        SettlePayment.model_validate_json(json.dumps(body)),
        ctx("SettlePayment"),
        uow,
        PaymentFacts("PAYPAL-1", True, order_id, 100, "USD", "COMPLETED", capture_id="CAP-1"),
    )
    assert uow.keys().count("payment.refund") == 1
    assert uow.payments[order_id].capture_id == "CAP-1"
    assert uow.orders[order_id].status is Status.CANCELLED
