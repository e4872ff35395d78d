"""Every step of the payment step, ``prepare`` and ``record``, over the fake unit of work (no servers).

``prepare`` reads the order and its payment, records the attempt and names the
provider call; the call is made here on a :class:`RecordingGateway` (it answers
what the test tells it and remembers what it was asked), then ``record``
applies the answer.  Each test asserts the order's status, the payment row and
the events and internal commands written (``uow.events``).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from handlers import place_order
from handlers.errors import IllegalTransition, ManualActionRequired, Mismatch, RetryLater
from handlers.orders import Status
from handlers.outcome import MessageContext
from handlers.payment_commands import (
    Call,
    idempotency_key,
    payment_handlers,
    prepare_cancel,
    prepare_capture,
    prepare_first_start,
    prepare_lookup,
    prepare_none,
    prepare_refund,
    prepare_start,
    record_cancel,
    record_capture,
    record_failed,
    record_failure,
    record_refund,
    record_settle,
    record_settle_refund,
    record_start,
)
from handlers.payments.base import (
    PaymentAlreadyCaptured,
    PaymentFacts,
    PaymentRequest,
    PaymentResult,
    PermanentPaymentError,
    RefundResult,
)
from handlers.payments.base import (
    PaymentOutcome as Outcome,
)
from handlers.unit_of_work import PaymentRecord
from schema.messages import (
    CancelPayment,
    CapturePayment,
    PaymentFailed,
    PlaceOrder,
    RefundPayment,
    SettlePayment,
    SettleRefund,
    StartPayment,
)
from tests.unit.test_handlers import PRODUCTS, FakeUnitOfWork, v

PAYMENT = {
    "stripe": {"provider": "stripe", "payment_method": "pm_card_visa"},
    "paypal": {"provider": "paypal", "return_url": "https://shop.example/ok", "cancel_url": "https://shop.example/no"},
}


class RecordingGateway:
    """Stands in for a provider inside ``Call.run``: remembers each call, answers what it was given."""

    def __init__(self, answer: Any = None) -> None:
        self.answer = answer
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def _call(self, name: str, *args: Any) -> Any:
        self.calls.append((name, args))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def start(self, request: PaymentRequest) -> Any:
        return self._call("start", request)

    def capture(self, payment_id: str, key: str) -> Any:
        return self._call("capture", payment_id, key)

    def cancel(self, payment_id: str, key: str) -> Any:
        return self._call("cancel", payment_id, key)

    def refund(self, taken: PaymentResult, amount: int, currency: str, key: str) -> Any:
        return self._call("refund", taken, amount, currency, key)

    def lookup(self, payment_id: str) -> Any:
        return self._call("lookup", payment_id)


def msg(kind: str) -> MessageContext:
    return MessageContext(f"{kind}-{uuid.uuid4().hex[:8]}", kind, "corr")


def placed(uow: FakeUnitOfWork, provider: str = "stripe", product: str = "a", quantity: int = 2) -> str:
    """A pending order (200 USD cents with the defaults); its PlaceOrder events are cleared."""
    cmd = v(
        PlaceOrder,
        {"user_id": "u1", "items": [{"product_id": product, "quantity": quantity}], "payment": PAYMENT[provider]},
    )
    order_id = str(place_order(cmd, msg("PlaceOrder"), uow).order_id)
    uow.events.clear()
    return order_id


def with_payment(uow: FakeUnitOfWork, order_id: str, status: str, pid: str | None = "pi_1", **extra: Any) -> Any:
    order = uow.orders[order_id]
    payment = PaymentRecord(
        order_id=order_id,
        provider=order.payment_provider,
        status=status,
        amount=order.total,
        currency=order.currency,
        idempotency_key=idempotency_key(order_id, "start"),
        provider_payment_id=pid,
        **extra,
    )
    uow.save_payment(payment)
    return payment


def moved(uow: FakeUnitOfWork, order_id: str, *statuses: Status) -> None:
    for status in statuses:
        uow.orders[order_id].transition(status, f"m-{status.value}")
    uow.events.clear()


def sent(uow: FakeUnitOfWork) -> list[tuple[str, dict[str, Any]]]:
    """What the step wrote: (routing key, body) of each event and internal command."""
    return [(rk, body) for _, rk, body in uow.events]


def keys(uow: FakeUnitOfWork) -> list[str]:
    return [rk for rk, _ in sent(uow)]


def run(call: Call | None, gateway: RecordingGateway) -> Any:
    assert call is not None
    return call.run(gateway)


def cmd(model: Any, order_id: str, **fields: Any) -> Any:
    return v(model, {"order_id": order_id, **fields})


# -- the table of steps ---------------------------------------------------------------


def test_every_payment_command_has_its_prepare_and_record():
    handlers = payment_handlers()  # as the payment runner builds them
    assert {k.__name__: (s.prepare, s.calls_provider) for k, s in handlers.items()} == {
        "StartPayment": (prepare_start, True),
        "CapturePayment": (prepare_capture, True),
        "CancelPayment": (prepare_cancel, True),
        "RefundPayment": (prepare_refund, True),
        "PaymentFailed": (prepare_none, False),
        "SettlePayment": (prepare_lookup, True),
        "SettleRefund": (prepare_lookup, True),
    }
    assert handlers[StartPayment].record is record_start
    assert payment_handlers(5).keys() == handlers.keys()


# -- StartPayment ---------------------------------------------------------------------


def test_start_records_the_attempt_and_asks_the_provider_with_the_orders_key_every_time():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    gateway = RecordingGateway(PaymentResult(Outcome.SUCCEEDED, "pi_1"))
    call = prepare_start(cmd(StartPayment, order_id), uow)
    assert call is not None and call.provider == "stripe"
    payment = uow.payments[order_id]
    assert (payment.status, payment.attempts, payment.amount, payment.currency) == ("started", 1, 200, "USD")
    run(call, gateway)
    # no answer recorded (a crash, a timeout): the next attempt asks the same question under the same key
    run(prepare_start(cmd(StartPayment, order_id), uow), gateway)
    assert uow.payments[order_id].attempts == 2
    requests = [args[0] for name, args in gateway.calls]
    assert [(r.order_id, r.amount, r.currency, r.payment_method) for r in requests] == [
        (order_id, 200, "USD", "pm_card_visa")
    ] * 2
    assert {r.idempotency_key for r in requests} == {f"order-{order_id}-start"}
    assert uow.events == []  # prepare announces nothing


def test_start_carries_paypals_return_and_cancel_urls():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow, "paypal")
    gateway = RecordingGateway(PaymentResult(Outcome.REQUIRES_ACTION, "PP-1"))
    call = prepare_start(cmd(StartPayment, order_id), uow)
    assert call is not None and call.provider == "paypal"
    run(call, gateway)
    request = gateway.calls[0][1][0]
    assert (request.return_url, request.cancel_url, request.payment_method) == (
        "https://shop.example/ok",
        "https://shop.example/no",
        None,
    )


@pytest.mark.parametrize("status", ["succeeded", "requires_action", "declined", "failed", "refunded", "capturing"])
def test_start_after_an_answer_is_a_duplicate_and_calls_nobody(status):
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, status, attempts=1)
    assert prepare_start(cmd(StartPayment, order_id), uow) is None
    assert uow.payments[order_id].attempts == 1


def test_start_for_an_order_cancelled_before_any_payment_asks_for_no_money_and_an_unknown_order_waits():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    moved(uow, order_id, Status.CANCELLED)
    assert prepare_first_start(cmd(StartPayment, order_id), uow) is None
    assert order_id not in uow.payments
    with pytest.raises(RetryLater):
        prepare_first_start(cmd(StartPayment, str(uuid.uuid4())), uow)


def test_a_start_delivered_again_for_an_ended_order_with_no_payment_asks_the_provider_what_it_did():
    """An earlier delivery's first start calls before anything is written: a redelivered start cannot tell
    whether that call reached the provider, so it asks again under the same key (the record gives it back)."""
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    moved(uow, order_id, Status.CANCELLED)
    gateway = RecordingGateway(PaymentResult(Outcome.SUCCEEDED, "pi_1"))
    run(prepare_start(cmd(StartPayment, order_id), uow), gateway)
    assert [args[0].idempotency_key for _, args in gateway.calls] == [f"order-{order_id}-start"]
    assert uow.payments[order_id].attempts == 1


def test_a_start_in_flight_when_the_order_was_cancelled_is_asked_again():
    """A call may have reached the provider: the same key finds out what it did."""
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "started", pid=None, attempts=1)
    moved(uow, order_id, Status.CANCELLED)
    assert prepare_start(cmd(StartPayment, order_id), uow) is not None
    assert uow.payments[order_id].attempts == 2


def test_a_successful_start_completes_the_order_and_commits_the_stock():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    prepare_start(cmd(StartPayment, order_id), uow)
    m = msg("StartPayment")
    outcome = record_start(cmd(StartPayment, order_id), m, uow, PaymentResult(Outcome.SUCCEEDED, "pi_9"))
    assert (outcome.result, uow.orders[order_id].status) == ("applied", Status.COMPLETED)
    p = uow.payments[order_id]
    assert (p.status, p.provider_payment_id, p.confirmed_event_id) == (
        "succeeded",
        "pi_9",
        f"StartPayment:{m.message_id}",
    )
    assert keys(uow) == ["stock.commit", "order.completed"]


def test_a_start_that_needs_the_buyer_waits_for_them_with_the_next_action():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    answer = PaymentResult(Outcome.REQUIRES_ACTION, "pi_3ds", next_action={"client_secret": "pi_3ds_secret"})
    record_start(cmd(StartPayment, order_id), msg("StartPayment"), uow, answer)
    order = uow.orders[order_id]
    assert (order.status, order.next_action) == (Status.AWAITING_PAYMENT, {"client_secret": "pi_3ds_secret"})
    assert uow.payments[order_id].status == "requires_action"
    [(key, body)] = sent(uow)
    assert key == "order.awaiting_payment" and body["next_action"] == {"client_secret": "pi_3ds_secret"}


def test_a_processing_start_waits_too():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    record_start(cmd(StartPayment, order_id), msg("StartPayment"), uow, PaymentResult(Outcome.PROCESSING, "pi_p"))
    assert (uow.orders[order_id].status, uow.payments[order_id].status) == (Status.AWAITING_PAYMENT, "processing")
    assert keys(uow) == ["order.awaiting_payment"]


def test_a_declined_start_rejects_the_order_and_releases_the_stock():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    answer = PaymentResult(Outcome.DECLINED, "pi_d", decline_reason="insufficient_funds")
    outcome = record_start(cmd(StartPayment, order_id), msg("StartPayment"), uow, answer)
    order, p = uow.orders[order_id], uow.payments[order_id]
    assert (order.status, order.reason) == (Status.REJECTED, "payment declined: insufficient_funds")
    assert (p.status, p.last_error) == ("declined", "insufficient_funds")
    assert keys(uow) == ["stock.release", "order.rejected"]
    assert outcome.result == "applied"


def test_money_taken_for_an_order_cancelled_meanwhile_is_refunded_and_an_open_payment_cancelled():
    uow = FakeUnitOfWork(PRODUCTS)
    paid = placed(uow)
    moved(uow, paid, Status.CANCELLED)
    record_start(cmd(StartPayment, paid), msg("StartPayment"), uow, PaymentResult(Outcome.SUCCEEDED, "pi_late"))
    assert (uow.orders[paid].status, uow.payments[paid].status) == (Status.CANCELLED, "succeeded")
    assert sent(uow) == [("payment.refund", {"order_id": paid})]
    uow.events.clear()
    waiting = placed(uow)
    moved(uow, waiting, Status.CANCELLED)
    record_start(cmd(StartPayment, waiting), msg("StartPayment"), uow, PaymentResult(Outcome.REQUIRES_ACTION, "pi_w"))
    assert uow.orders[waiting].status is Status.CANCELLED
    assert sent(uow) == [("payment.cancel", {"order_id": waiting})]


def test_a_late_answer_about_a_refunded_payment_changes_nothing():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "refunded", pid="pi_1")
    moved(uow, order_id, Status.CANCELLED)
    outcome = record_start(
        cmd(StartPayment, order_id), msg("StartPayment"), uow, PaymentResult(Outcome.SUCCEEDED, "pi_1")
    )
    assert (outcome.result, uow.payments[order_id].status, uow.events) == ("unchanged", "refunded", [])


@pytest.mark.parametrize(
    ("answer", "given_back"),
    [
        (Outcome.SUCCEEDED, "payment.refund"),
        (Outcome.REQUIRES_ACTION, "payment.cancel"),
        (Outcome.PROCESSING, "payment.cancel"),
    ],
)
def test_a_second_payment_of_an_order_paid_another_way_is_given_back(answer, given_back):
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "succeeded", pid="int-1", confirmed_event_id="evt-int")
    moved(uow, order_id, Status.COMPLETED)
    outcome = record_start(cmd(StartPayment, order_id), msg("StartPayment"), uow, PaymentResult(answer, "pi_second"))
    assert outcome.result == "unchanged"
    assert sent(uow) == [(given_back, {"order_id": order_id, "payment_id": "pi_second"})]
    p = uow.payments[order_id]
    assert (p.provider_payment_id, p.status, uow.orders[order_id].status) == ("int-1", "succeeded", Status.COMPLETED)


# -- permanent provider errors (record_failure) -----------------------------------------


def test_a_start_the_provider_refuses_fails_the_payment_and_rejects_the_order():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    prepare_start(cmd(StartPayment, order_id), uow)
    record_failure(cmd(StartPayment, order_id), msg("StartPayment"), uow, PermanentPaymentError("resource_missing"))
    assert (uow.payments[order_id].status, uow.payments[order_id].last_error) == ("failed", "resource_missing")
    assert uow.orders[order_id].status is Status.REJECTED
    assert uow.orders[order_id].reason == "payment failed: resource_missing"
    assert keys(uow) == ["stock.release", "order.rejected"]


def test_a_refund_the_provider_refuses_goes_to_a_person():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "succeeded")
    moved(uow, order_id, Status.CANCELLED)
    with pytest.raises(ManualActionRequired, match="refund it by hand"):
        record_failure(cmd(RefundPayment, order_id), msg("RefundPayment"), uow, PermanentPaymentError("no"))
    assert uow.payments[order_id].status == "succeeded" and uow.events == []


def test_a_cancel_that_finds_the_money_taken_becomes_a_refund_once():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "requires_action")
    moved(uow, order_id, Status.CANCELLED)
    captured = PaymentAlreadyCaptured("captured")
    record_failure(cmd(CancelPayment, order_id), msg("CancelPayment"), uow, captured)
    assert uow.payments[order_id].status == "succeeded"
    assert sent(uow) == [("payment.refund", {"order_id": order_id})]
    # a second payment's cancel names it in the refund, and leaves the order's own payment alone
    uow.events.clear()
    uow.payments[order_id].status = "requires_action"
    record_failure(cmd(CancelPayment, order_id, payment_id="pi_2"), msg("CancelPayment"), uow, captured)
    assert uow.payments[order_id].status == "requires_action"
    assert sent(uow) == [("payment.refund", {"order_id": order_id, "payment_id": "pi_2"})]
    # the capture was given back already: nothing more
    uow.events.clear()
    uow.payments[order_id].status = "refunded"
    outcome = record_failure(cmd(CancelPayment, order_id), msg("CancelPayment"), uow, captured)
    assert (outcome.result, uow.payments[order_id].status, uow.events) == ("unchanged", "refunded", [])


def test_a_cancel_the_provider_refuses_otherwise_changes_nothing():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "requires_action")
    moved(uow, order_id, Status.CANCELLED)
    outcome = record_failure(cmd(CancelPayment, order_id), msg("CancelPayment"), uow, PermanentPaymentError("gone"))
    assert outcome.result == "unchanged" and "could not be cancelled" in outcome.message
    assert (uow.payments[order_id].status, uow.events) == ("requires_action", [])


# -- CapturePayment ---------------------------------------------------------------------


def capture_cmd(order_id: str, payment_id: str = "PP-1") -> CapturePayment:
    return cmd(CapturePayment, order_id, provider="paypal", payment_id=payment_id, event_id="WH-1")


def test_capture_marks_the_payment_capturing_before_the_call_and_uses_the_capture_key():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow, "paypal")
    with_payment(uow, order_id, "requires_action", pid="PP-1")
    moved(uow, order_id, Status.AWAITING_PAYMENT)
    gateway = RecordingGateway(PaymentResult(Outcome.SUCCEEDED, "PP-1", capture_id="CAP-1"))
    call = prepare_capture(capture_cmd(order_id), uow)
    assert uow.payments[order_id].status == "capturing"
    answer = run(call, gateway)
    assert gateway.calls == [("capture", ("PP-1", f"order-{order_id}-capture"))]
    record_capture(capture_cmd(order_id), msg("CapturePayment"), uow, answer)
    p = uow.payments[order_id]
    assert (p.status, p.capture_id, uow.orders[order_id].status) == ("succeeded", "CAP-1", Status.COMPLETED)
    assert keys(uow) == ["stock.commit", "order.completed"]


def test_capture_refuses_an_unrecorded_or_another_payment_and_never_captures_an_ended_order():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow, "paypal")
    with pytest.raises(RetryLater):
        prepare_capture(capture_cmd(order_id), uow)
    with_payment(uow, order_id, "requires_action", pid="PP-1")
    with pytest.raises(Mismatch):
        prepare_capture(capture_cmd(order_id, "PP-other"), uow)
    moved(uow, order_id, Status.AWAITING_PAYMENT, Status.CANCELLED)
    assert prepare_capture(capture_cmd(order_id), uow) is None
    assert uow.payments[order_id].status == "requires_action"


def test_a_capture_out_when_the_order_was_cancelled_is_looked_for_with_a_cancel():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow, "paypal")
    with_payment(uow, order_id, "capturing", pid="PP-1")
    moved(uow, order_id, Status.AWAITING_PAYMENT, Status.CANCELLED)
    gateway = RecordingGateway(None)
    run(prepare_capture(capture_cmd(order_id), uow), gateway)
    assert gateway.calls == [("cancel", ("PP-1", f"order-{order_id}-cancel"))]
    # nothing captured yet and the mark is fresh: look again later
    with pytest.raises(RetryLater):
        record_capture(capture_cmd(order_id), msg("CapturePayment"), uow, None, settle_after=60)
    # past the bound: recorded as never captured
    uow.payments[order_id].unchanged_seconds = 61
    outcome = record_capture(capture_cmd(order_id), msg("CapturePayment"), uow, None, settle_after=60)
    assert (outcome.result, uow.payments[order_id].status) == ("applied", "cancelled")
    assert "recorded as not captured" in uow.payments[order_id].last_error
    assert uow.events == []


# -- CancelPayment ------------------------------------------------------------------------


def test_cancel_cancels_an_open_payment_or_a_named_second_one_and_nothing_else():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    assert prepare_cancel(cmd(CancelPayment, order_id), uow) is None  # no payment
    with_payment(uow, order_id, "started", pid=None)
    assert prepare_cancel(cmd(CancelPayment, order_id), uow) is None  # a start in flight settles itself
    with_payment(uow, order_id, "requires_action", pid="pi_open")
    gateway = RecordingGateway(None)
    run(prepare_cancel(cmd(CancelPayment, order_id), uow), gateway)
    run(prepare_cancel(cmd(CancelPayment, order_id, payment_id="pi_two"), uow), gateway)
    assert gateway.calls == [
        ("cancel", ("pi_open", f"order-{order_id}-cancel")),
        ("cancel", ("pi_two", f"order-{order_id}-cancel-pi_two")),
    ]
    with_payment(uow, order_id, "succeeded", pid="pi_open")
    assert prepare_cancel(cmd(CancelPayment, order_id), uow) is None


@pytest.mark.parametrize(
    ("before", "after"), [("requires_action", "cancelled"), ("processing", "cancelled"), ("succeeded", "succeeded")]
)
def test_a_recorded_cancel_closes_an_open_payment_only(before, after):
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, before)
    moved(uow, order_id, Status.CANCELLED)
    outcome = record_cancel(cmd(CancelPayment, order_id), msg("CancelPayment"), uow, None)
    assert (outcome.result, uow.payments[order_id].status, uow.events) == ("applied", after, [])
    # a second payment's cancel leaves the order's own payment as it is
    with_payment(uow, order_id, "requires_action")
    record_cancel(cmd(CancelPayment, order_id, payment_id="pi_two"), msg("CancelPayment"), uow, None)
    assert uow.payments[order_id].status == "requires_action"


def test_a_recorded_cancel_of_a_capture_out_waits_for_it_then_settles_it():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow, "paypal")
    with_payment(uow, order_id, "capturing", pid="PP-1")
    moved(uow, order_id, Status.AWAITING_PAYMENT, Status.CANCELLED)
    with pytest.raises(RetryLater):
        record_cancel(cmd(CancelPayment, order_id), msg("CancelPayment"), uow, None, settle_after=10)
    uow.payments[order_id].unchanged_seconds = 11
    record_cancel(cmd(CancelPayment, order_id), msg("CancelPayment"), uow, None, settle_after=10)
    assert uow.payments[order_id].status == "cancelled"


# -- RefundPayment ------------------------------------------------------------------------


def test_refund_gives_back_the_recorded_payment_with_its_capture_under_the_refund_key():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow, "paypal")
    with_payment(uow, order_id, "succeeded", pid="PP-1", capture_id="CAP-1")
    moved(uow, order_id, Status.CANCELLED)
    gateway = RecordingGateway(RefundResult("RF-1", "COMPLETED"))
    call = prepare_refund(cmd(RefundPayment, order_id), uow)
    assert call is not None and call.provider == "paypal"
    answer = run(call, gateway)
    [(name, (taken, amount, currency, key))] = gateway.calls
    assert (name, taken.provider_payment_id, taken.capture_id, amount, currency, key) == (
        "refund",
        "PP-1",
        "CAP-1",
        200,
        "USD",
        f"order-{order_id}-refund",
    )
    outcome = record_refund(cmd(RefundPayment, order_id), msg("RefundPayment"), uow, answer)
    p = uow.payments[order_id]
    assert (p.status, p.refund_id, uow.orders[order_id].status) == ("refunded", "RF-1", Status.CANCELLED)
    [(key, body)] = sent(uow)
    assert (outcome.result, key, body["refund_id"], body["status"]) == (
        "applied",
        "order.refunded",
        "RF-1",
        "cancelled",
    )


def test_a_refunded_completed_order_becomes_refunded():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "succeeded")
    moved(uow, order_id, Status.COMPLETED)
    record_refund(cmd(RefundPayment, order_id), msg("RefundPayment"), uow, RefundResult("re_1", "succeeded"))
    assert uow.orders[order_id].status is Status.REFUNDED
    assert keys(uow) == ["stock.return", "order.refunded"]  # its committed units come back too
    refunded = sent(uow)[1][1]
    assert (refunded["status"], refunded["amount_refunded"], refunded["full"]) == ("refunded", 200, True)
    assert uow.payments[order_id].amount_refunded == 200


def test_a_refund_gives_back_what_a_partial_refund_at_the_provider_left():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "succeeded", amount_refunded=50)
    moved(uow, order_id, Status.COMPLETED)
    gateway = RecordingGateway(RefundResult("re_2", "succeeded"))
    run(prepare_refund(cmd(RefundPayment, order_id), uow), gateway)
    assert gateway.calls[0][0] == "refund" and gateway.calls[0][1][1:3] == (150, "USD")


# -- SettleRefund (a refund made at the provider) --------------------------------------


def facts(refunded: int, *ids: str, order_id: str | None = None, pid: str = "pi_1") -> PaymentFacts:
    return PaymentFacts(pid, True, order_id, 200, "USD", "succeeded", refunded=refunded, refund_ids=ids)


def settle_refund(uow: FakeUnitOfWork, order_id: str, found: PaymentFacts) -> Any:
    command = cmd(SettleRefund, order_id, provider="stripe", payment_id="pi_1", event_id="evt_refund")
    gateway = RecordingGateway(found)
    assert run(prepare_lookup(command, uow), gateway) is found
    assert gateway.calls[0] == ("lookup", ("pi_1",))  # the provider is asked, never trusted
    return record_settle_refund(command, msg("SettleRefund"), uow, found)


def test_a_full_refund_at_the_provider_refunds_a_completed_order_and_returns_its_stock():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "succeeded")
    moved(uow, order_id, Status.COMPLETED)
    settle_refund(uow, order_id, facts(200, "re_1", order_id=order_id))
    assert uow.orders[order_id].status is Status.REFUNDED
    assert keys(uow) == ["stock.return", "order.refunded"]
    assert (uow.payments[order_id].status, uow.payments[order_id].refund_id) == ("refunded", "re_1")
    uow.events.clear()
    assert settle_refund(uow, order_id, facts(200, "re_1")).result == "unchanged"  # delivered twice
    assert keys(uow) == []


def test_a_full_refund_of_a_shipped_order_is_recorded_and_announced_and_the_order_stays_shipped():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "succeeded")
    moved(uow, order_id, Status.COMPLETED, Status.SHIPPED)
    settle_refund(uow, order_id, facts(200, "re_1"))
    assert uow.orders[order_id].status is Status.SHIPPED
    assert keys(uow) == ["order.refunded"]  # no stock.return: the goods have left
    assert uow.payments[order_id].status == "refunded"


def test_partial_refunds_are_recorded_on_the_payment_and_leave_the_status_until_the_last():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "succeeded")
    moved(uow, order_id, Status.COMPLETED)
    settle_refund(uow, order_id, facts(50, "re_1"))
    assert uow.orders[order_id].status is Status.COMPLETED
    assert (uow.payments[order_id].status, uow.payments[order_id].amount_refunded) == ("succeeded", 50)
    assert [(k, b["amount_refunded"], b["full"]) for k, b in sent(uow)] == [("order.refunded", 50, False)]
    uow.events.clear()
    settle_refund(uow, order_id, facts(200, "re_1", "re_2"))
    assert uow.orders[order_id].status is Status.REFUNDED
    assert keys(uow) == ["stock.return", "order.refunded"]


def test_a_refund_reported_before_its_order_is_completed_waits_for_the_payment():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "requires_action")
    moved(uow, order_id, Status.AWAITING_PAYMENT)
    with pytest.raises(RetryLater):
        settle_refund(uow, order_id, facts(200, "re_1"))
    assert uow.orders[order_id].status is Status.AWAITING_PAYMENT and keys(uow) == []


def test_a_refund_of_another_payment_or_order_changes_nothing():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "succeeded")
    moved(uow, order_id, Status.COMPLETED)
    assert settle_refund(uow, order_id, facts(200, "re_9", pid="pi_other")).result == "unchanged"
    assert settle_refund(uow, order_id, facts(200, "re_9", order_id="someone-else")).result == "unchanged"
    assert uow.orders[order_id].status is Status.COMPLETED and keys(uow) == []


def test_refund_refuses_what_it_must_not_give_back_and_waits_for_what_it_cannot_yet():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    assert prepare_refund(cmd(RefundPayment, order_id), uow) is None  # no payment
    with_payment(uow, order_id, "succeeded")
    with pytest.raises(IllegalTransition):  # a pending order's payment is not refunded
        prepare_refund(cmd(RefundPayment, order_id), uow)
    moved(uow, order_id, Status.CANCELLED)
    with_payment(uow, order_id, "succeeded", pid=None)
    with pytest.raises(RetryLater):
        prepare_refund(cmd(RefundPayment, order_id), uow)
    uow.payments[order_id].provider = "internal"
    uow.payments[order_id].provider_payment_id = "int-1"
    with pytest.raises(ManualActionRequired, match="internal payment service"):
        prepare_refund(cmd(RefundPayment, order_id), uow)
    with_payment(uow, order_id, "refunded")
    assert prepare_refund(cmd(RefundPayment, order_id), uow) is None
    assert record_refund(cmd(RefundPayment, order_id), msg("RefundPayment"), uow, None).result == "unchanged"
    assert uow.events == []


def test_a_second_payment_is_refunded_in_what_it_took_and_the_orders_own_payment_is_left_alone():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "succeeded", pid="int-1", confirmed_event_id="e")
    moved(uow, order_id, Status.COMPLETED)
    gateway = RecordingGateway(RefundResult("re_2", "succeeded"))
    run(prepare_refund(cmd(RefundPayment, order_id, payment_id="pi_2", amount=150, currency="EUR"), uow), gateway)
    run(prepare_refund(cmd(RefundPayment, order_id, payment_id="pi_3"), uow), gateway)  # the order's total
    assert [(t.provider_payment_id, a, c, k) for _, (t, a, c, k) in gateway.calls] == [
        ("pi_2", 150, "EUR", f"order-{order_id}-refund-pi_2"),
        ("pi_3", 200, "USD", f"order-{order_id}-refund-pi_3"),
    ]
    outcome = record_refund(
        cmd(RefundPayment, order_id, payment_id="pi_2"), msg("RefundPayment"), uow, RefundResult("re_2", "succeeded")
    )
    assert outcome.result == "applied" and "pi_2" in outcome.message
    p = uow.payments[order_id]
    assert (p.status, p.refund_id, uow.orders[order_id].status, uow.events) == ("succeeded", None, Status.COMPLETED, [])


def test_a_second_payment_of_an_order_without_currency_goes_to_a_person():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    uow.orders[order_id].currency = None
    with pytest.raises(ManualActionRequired, match="names no currency"):
        prepare_refund(cmd(RefundPayment, order_id, payment_id="pi_2"), uow)


# -- PaymentFailed (a webhook; no call) -----------------------------------------------------


def failed_cmd(order_id: str, payment_id: str = "pi_1", reason: str | None = "card_declined") -> PaymentFailed:
    return cmd(PaymentFailed, order_id, provider="stripe", payment_id=payment_id, event_id="evt_f", reason=reason)


def test_a_reported_failure_declines_the_payment_and_rejects_the_order():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "requires_action", pid="pi_1")
    moved(uow, order_id, Status.AWAITING_PAYMENT)
    assert prepare_none(failed_cmd(order_id), uow) is None
    record_failed(failed_cmd(order_id), msg("PaymentFailed"), uow, None)
    p = uow.payments[order_id]
    assert (p.status, p.last_error, p.provider_payment_id) == ("declined", "card_declined", "pi_1")
    assert (uow.orders[order_id].status, uow.orders[order_id].reason) == (
        Status.REJECTED,
        "payment failed: card_declined",
    )
    assert keys(uow) == ["stock.release", "order.rejected"]


def test_a_failure_reported_before_any_payment_records_one_and_names_the_provider_without_a_reason():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    record_failed(failed_cmd(order_id, "pi_web", reason=None), msg("PaymentFailed"), uow, None)
    p = uow.payments[order_id]
    assert (p.status, p.provider_payment_id, p.amount) == ("declined", "pi_web", 200)
    assert uow.orders[order_id].reason == "payment failed: reported by stripe"


def test_a_reported_failure_of_another_payment_or_after_success_changes_nothing():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "requires_action", pid="pi_1")
    with pytest.raises(Mismatch):
        record_failed(failed_cmd(order_id, "pi_other"), msg("PaymentFailed"), uow, None)
    with_payment(uow, order_id, "succeeded", pid="pi_1")
    outcome = record_failed(failed_cmd(order_id), msg("PaymentFailed"), uow, None)
    assert (outcome.result, uow.payments[order_id].status, uow.events) == ("unchanged", "succeeded", [])


# -- SettlePayment ------------------------------------------------------------------------


def settle_cmd(order_id: str, payment_id: str = "pi_buyer", provider: str = "stripe") -> SettlePayment:
    return SettlePayment.model_validate_json(
        json.dumps(
            {
                "order_id": order_id,
                "provider": provider,
                "payment_id": payment_id,
                "amount": 200,
                "currency": "USD",
                "event_id": "evt_c",
                "confirmation_id": "confirm-1",
                "correlation_id": "corr-1",
            }
        )
    )


def test_settle_looks_the_named_payment_up_at_the_named_provider_once_the_order_exists():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    call = prepare_lookup(settle_cmd(order_id, "PP-9", provider="paypal"), uow)
    gateway = RecordingGateway(PaymentFacts.not_found("PP-9"))
    assert call is not None and call.provider == "paypal"
    run(call, gateway)
    assert gateway.calls == [("lookup", ("PP-9",))]
    with pytest.raises(RetryLater):
        prepare_lookup(settle_cmd(str(uuid.uuid4())), uow)


def test_a_settled_payment_the_provider_vouches_for_completes_the_order():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    facts = PaymentFacts("pi_buyer", True, order_id, 200, "USD", "succeeded")
    outcome = record_settle(settle_cmd(order_id), msg("SettlePayment"), uow, facts)
    p = uow.payments[order_id]
    assert (outcome.result, uow.orders[order_id].status) == ("applied", Status.COMPLETED)
    assert (p.status, p.provider_payment_id) == ("succeeded", "pi_buyer")
    assert keys(uow) == ["stock.commit", "order.completed"]


@pytest.mark.parametrize(
    "facts",
    [
        PaymentFacts("pi_buyer", False, None, 200, "USD", "requires_payment_method"),
        PaymentFacts.not_found("pi_buyer"),
    ],
)
def test_a_settled_payment_the_provider_does_not_vouch_for_is_refused_and_announced(facts):
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    outcome = record_settle(settle_cmd(order_id), msg("SettlePayment"), uow, facts)
    assert (outcome.result, outcome.error, uow.orders[order_id].status) == (
        "refused",
        "payment_not_confirmed",
        Status.PENDING,
    )
    [(key, body)] = sent(uow)
    assert key == "command.refused" and body["reason"] == "payment_not_confirmed"
    assert order_id not in uow.payments


def test_a_settled_payment_for_another_order_is_refused():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    facts = PaymentFacts("pi_buyer", True, str(uuid.uuid4()), 200, "USD", "succeeded")
    outcome = record_settle(settle_cmd(order_id), msg("SettlePayment"), uow, facts)
    assert outcome.result == "refused" and "for another order" in outcome.message
    assert keys(uow) == ["command.refused"]


def test_money_taken_in_a_wrong_amount_is_given_back_in_that_amount_and_the_confirmation_refused():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    facts = PaymentFacts("pi_buyer", True, order_id, 50, "USD", "succeeded")
    outcome = record_settle(settle_cmd(order_id), msg("SettlePayment"), uow, facts)
    assert (outcome.result, outcome.error, uow.orders[order_id].status) == (
        "refused",
        "payment_mismatch",
        Status.PENDING,
    )
    assert sent(uow)[0] == (
        "payment.refund",
        {"order_id": order_id, "payment_id": "pi_buyer", "amount": 50, "currency": "USD"},
    )
    assert keys(uow) == ["payment.refund", "command.refused"]


def test_a_settled_payment_of_an_order_paid_already_is_given_back():
    uow = FakeUnitOfWork(PRODUCTS)
    order_id = placed(uow)
    with_payment(uow, order_id, "succeeded", pid="pi_first", confirmed_event_id="evt_first")
    moved(uow, order_id, Status.COMPLETED)
    facts = PaymentFacts("pi_buyer", True, order_id, 200, "USD", "succeeded")
    outcome = record_settle(settle_cmd(order_id), msg("SettlePayment"), uow, facts)
    assert outcome.result == "unchanged"
    assert sent(uow) == [("payment.refund", {"order_id": order_id, "payment_id": "pi_buyer"})]
    assert uow.payments[order_id].provider_payment_id == "pi_first"
