"""The payment commands: internal commands that talk to a payment provider.

Each has a :class:`PaymentHandler` (:func:`payment_handlers`), which
:class:`worker.payment_runner.PaymentRunner` runs: ``prepare`` (a short
transaction that reads and locks the order and its payment, records the
attempt, and says which provider call to make), the call itself with no
transaction open, and ``record`` (a second short transaction, with the inbox
row, that applies the provider's answer to the order); the first delivery of
a ``StartPayment`` for a ``pending`` order with no payment has no prepare
(:func:`first_start`: the record writes its attempt). Every call carries an
idempotency key derived from the order and the action, so repeating a
command after a crash or a timeout asks the provider the same question again
instead of charging twice.

The commands (queue ``orders.payments``):
- ``StartPayment``: create (Stripe: and confirm) the payment.
- ``CapturePayment``: capture a PayPal order the buyer approved.
- ``CancelPayment``: cancel the PaymentIntent / leave the PayPal order to expire.
- ``RefundPayment``: refund money taken for an order that ended meanwhile, or
  for a completed order, which becomes ``refunded``.
- ``PaymentFailed``: the provider reported a failure (no call).
- ``SettlePayment``: look up the payment a confirmation names, and complete
  the order on it or refuse the confirmation (``command.refused``).
- ``SettleRefund``: a refund the provider reported: look up what went back
  from the order's payment and record it (in full: ``completed`` →
  ``refunded`` with ``stock.return``, a shipped order keeps its status;
  partly: the amount on the payment, the status unchanged; ``order.refunded``
  either way, once per refund).

A capture that was marked ``capturing`` but never seen at PayPal (the worker
was killed, or the database went away, between marking it and sending it)
is waited for at most ``capture_settle_seconds``; then it is recorded as not
captured (``cancelled``), and a capture that still lands later is refunded
through its confirmation, as any payment of a cancelled order is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from handlers import events
from handlers.errors import IllegalTransition, ManualActionRequired, Mismatch, RetryLater
from handlers.orders import ENDED_UNPAID, REFUNDABLE, UNPAID, Order, Status
from handlers.outcome import MessageContext, Outcome
from handlers.payment_confirmed import confirm
from handlers.payments.base import (
    PaymentAlreadyCaptured,
    PaymentError,
    PaymentFacts,
    PaymentGateway,
    PaymentRequest,
    PaymentResult,
    RefundResult,
)
from handlers.payments.base import (
    PaymentOutcome as PayOutcome,
)
from handlers.unit_of_work import PaymentRecord, PaymentStatus, UnitOfWork
from schema import topology
from schema.messages import (
    CancelPayment,
    CapturePayment,
    Command,
    PaymentFailed,
    RefundPayment,
    SettlePayment,
    SettleRefund,
    StartPayment,
)

#: payment states after which StartPayment has nothing left to do
STARTED_AND_ANSWERED = frozenset(
    {
        PaymentStatus.SUCCEEDED,
        PaymentStatus.REQUIRES_ACTION,
        PaymentStatus.CAPTURING,
        PaymentStatus.PROCESSING,
        PaymentStatus.DECLINED,
        PaymentStatus.FAILED,
        PaymentStatus.CANCELLED,
        PaymentStatus.REFUNDED,
    }
)
#: payment states in which a payment is open at the provider and can still be cancelled
OPEN = frozenset(
    {PaymentStatus.STARTED, PaymentStatus.REQUIRES_ACTION, PaymentStatus.PROCESSING, PaymentStatus.CAPTURING}
)
C = TypeVar("C", bound=Command)

#: how long a capture of ours may stay unseen at the provider before it counts as never sent (seconds)
CAPTURE_SETTLE_SECONDS = 60.0


def idempotency_key(order_id: str, action: str) -> str:
    """Stripe ``Idempotency-Key`` / PayPal ``PayPal-Request-Id`` of one action on one order."""
    return f"order-{order_id}-{action}"


@dataclass(frozen=True)
class Call:
    """A provider call to make outside any transaction."""

    provider: str
    run: Callable[[PaymentGateway], Any]


def _order_and_payment(uow: UnitOfWork, order_id: str) -> tuple[Order, PaymentRecord | None]:
    order = uow.order(order_id)
    if order is None:
        raise RetryLater(f"order {order_id} is not placed yet")
    return order, uow.payment(order_id)


def _new_payment(order: Order, attempts: int = 0) -> PaymentRecord:
    if order.currency is None:  # none of its products was known: it was rejected when placed
        raise IllegalTransition(f"order {order.order_id} has no currency and takes no payment")
    return PaymentRecord(
        order_id=order.order_id,
        provider=order.payment_provider,
        status=PaymentStatus.STARTED,
        amount=order.total,
        currency=order.currency,
        idempotency_key=idempotency_key(order.order_id, "start"),
        attempts=attempts,
    )


# -- StartPayment ---------------------------------------------------------------


def prepare_start(cmd: StartPayment, uow: UnitOfWork, called_before: bool = True) -> Call | None:
    """Record the attempt and say which call to make.  ``called_before``: an earlier delivery of this
    command may have called the provider without recording anything (the payment runner's first start
    writes nothing before its call, :func:`first_start`), so an order that ended meanwhile is still asked,
    under the same key, what that call did; False only for a message delivered for the first time."""
    order, payment = _order_and_payment(uow, str(cmd.order_id))
    if payment is not None and payment.status in STARTED_AND_ANSWERED:
        return None  # answered before: a duplicate
    attempted = payment is not None or called_before  # a call may have reached the provider
    if order.status is not Status.PENDING and not attempted:
        return None  # cancelled or rejected before any money was asked for
    payment = payment or _new_payment(order)
    payment.attempts += 1
    uow.save_payment(payment)
    return _start_call(
        order.order_id,
        order.payment_provider,
        payment.amount,
        payment.currency,
        payment.idempotency_key,
        order.payment_request,
    )


def prepare_first_start(cmd: StartPayment, uow: UnitOfWork) -> Call | None:
    """:func:`prepare_start` of a message delivered for the first time: an order that ended before any
    money was asked for is left alone."""
    return prepare_start(cmd, uow, called_before=False)


def first_start(order_id: str, provider: str, total: int, currency: str, payment_request: dict[str, Any]) -> Call:
    """The call of a first start of a ``pending`` order that has no payment yet, made with nothing written
    before it: the record writes the payment with its answer (:func:`record_start`).

    Nothing is lost by not writing first.  A cancel that lands while the call is out finds no payment and
    asks for no ``CancelPayment``; the record then finds the order ended and gives the money back
    (``RefundPayment``, or ``CancelPayment`` for a payment waiting for its buyer).  A worker that dies
    during the call leaves its message unacknowledged: it comes back redelivered, and a redelivered
    start asks again under the same key, whatever became of the order meanwhile."""
    return _start_call(order_id, provider, total, currency, idempotency_key(order_id, "start"), payment_request)


def _start_call(order_id: str, provider: str, amount: int, currency: str, key: str, req: dict[str, Any]) -> Call:
    request = PaymentRequest(
        order_id=order_id,
        amount=amount,
        currency=currency,
        idempotency_key=key,
        payment_method=req.get("payment_method"),
        return_url=req.get("return_url"),
        cancel_url=req.get("cancel_url"),
        description=f"order {order_id}",
    )
    return Call(provider, lambda gateway: gateway.start(request))


def apply_result(
    order: Order, payment: PaymentRecord, result: PaymentResult, msg: MessageContext, uow: UnitOfWork
) -> Outcome:
    """Move the order by the provider's answer (start or capture)."""
    mid = msg.message_id
    other = payment.provider_payment_id
    if payment.status == PaymentStatus.REFUNDED and result.provider_payment_id in (None, "", other):
        # a late answer about money already given back: recording it would refund (and announce) it again
        return Outcome.of("unchanged", order, "this payment was refunded already")
    if payment.confirmed_event_id is not None and result.provider_payment_id not in (None, "", other):
        return _second_payment(order, result, mid, uow)
    payment.provider_payment_id = result.provider_payment_id or payment.provider_payment_id
    payment.capture_id = result.capture_id or payment.capture_id
    if result.outcome is PayOutcome.SUCCEEDED:
        payment.status = PaymentStatus.SUCCEEDED
        payment.confirmed_event_id = payment.confirmed_event_id or f"{msg.message_type}:{mid}"
        uow.save_payment(payment)
        if order.status in UNPAID:
            order.transition(Status.COMPLETED, mid)
            events.stock(uow, order, topology.STOCK_COMMIT, mid)
            events.order_event(uow, order, topology.ORDER_COMPLETED, mid)
        elif order.status in ENDED_UNPAID:
            events.internal(uow, order, RefundPayment, mid)
        return Outcome.of("applied", order)
    if result.outcome in (PayOutcome.REQUIRES_ACTION, PayOutcome.PROCESSING):
        payment.status = result.outcome.value
        uow.save_payment(payment)
        if order.status is Status.PENDING:
            order.next_action = result.next_action or None
            order.transition(Status.AWAITING_PAYMENT, mid)
            events.order_event(uow, order, topology.ORDER_AWAITING_PAYMENT, mid)
        elif order.status in ENDED_UNPAID:  # cancelled or expired while the call was out: close it there
            events.internal(uow, order, CancelPayment, mid)
        return Outcome.of("applied", order)
    payment.status = PaymentStatus.DECLINED
    payment.last_error = result.decline_reason
    uow.save_payment(payment)
    return _reject(order, f"payment declined: {result.decline_reason or 'no reason given'}", mid, uow)


def _second_payment(order: Order, result: PaymentResult, mid: str, uow: UnitOfWork) -> Outcome:
    """The order was paid another way while this call was in flight: undo this one."""
    pid = result.provider_payment_id
    if result.outcome is PayOutcome.SUCCEEDED:
        events.internal(uow, order, RefundPayment, f"{mid}:{pid}", payment_id=pid)
    elif result.outcome in (PayOutcome.REQUIRES_ACTION, PayOutcome.PROCESSING):
        events.internal(uow, order, CancelPayment, f"{mid}:{pid}", payment_id=pid)
    return Outcome.of("unchanged", order, f"order was already paid; second payment {pid} is given back")


def _reject(order: Order, reason: str, mid: str, uow: UnitOfWork) -> Outcome:
    if order.status in UNPAID:
        order.transition(Status.REJECTED, mid, reason)
        events.stock(uow, order, topology.STOCK_RELEASE, mid)
        events.order_event(uow, order, topology.ORDER_REJECTED, mid)
    return Outcome.of("applied", order, reason)


def record_start(
    cmd: StartPayment | CapturePayment, msg: MessageContext, uow: UnitOfWork, result: PaymentResult
) -> Outcome:
    order, payment = _order_and_payment(uow, str(cmd.order_id))
    # a first start (:func:`first_start`) has no payment yet: its attempt is recorded with its answer
    return apply_result(order, payment or _new_payment(order, attempts=1), result, msg, uow)


def record_failure(cmd: Any, msg: MessageContext, uow: UnitOfWork, error: PaymentError) -> Outcome:
    """A permanent provider error, by step: a failed start rejects the order; a
    cancel that finds the money taken becomes a refund; a failed refund needs a
    person (dead-letter queue), since money must never be kept silently."""
    order, payment = _order_and_payment(uow, str(cmd.order_id))
    second = getattr(cmd, "payment_id", None) if msg.message_type in ("CancelPayment", "RefundPayment") else None
    if msg.message_type == "RefundPayment":
        raise ManualActionRequired(f"refund of order {order.order_id} failed: {error}; refund it by hand, then purge")
    if isinstance(error, PaymentAlreadyCaptured):
        if second is None and payment is not None and payment.status == PaymentStatus.REFUNDED:
            # a second cancel finding the capture that a refund already gave back: done (found by the chaos run,
            # which saw the payment set back to succeeded and refunded, and announced, twice)
            return Outcome.of("unchanged", order, "captured, and refunded already")
        if payment is not None and second is None:
            payment.status = PaymentStatus.SUCCEEDED
            uow.save_payment(payment)
        events.internal(uow, order, RefundPayment, msg.message_id, **({"payment_id": second} if second else {}))
        return Outcome.of("applied", order, str(error))
    if msg.message_type == "CancelPayment":
        return Outcome.of("unchanged", order, f"payment could not be cancelled: {error}")
    if payment is None and msg.message_type == "StartPayment":  # a first start: its attempt, with its failure
        payment = _new_payment(order, attempts=1)
    if payment is not None:
        payment.status = PaymentStatus.FAILED
        payment.last_error = str(error)[:1000]
        uow.save_payment(payment)
    return _reject(order, f"payment failed: {error}", msg.message_id, uow)


# -- CapturePayment (PayPal buyer approved) ----------------------------------------


def prepare_capture(cmd: CapturePayment, uow: UnitOfWork) -> Call | None:
    """Capture an approved PayPal order, marking the payment ``capturing`` first (transaction 1).

    The mark is what lets a cancel know that a capture of ours may still
    land: a capture call that timed out on our side can be carried out by
    PayPal afterwards (found by the chaos run: the cancel found the order
    approved but not captured, the capture landed a moment later, and the
    money was kept on a cancelled order).
    """
    order, payment = _order_and_payment(uow, str(cmd.order_id))
    if payment is None or payment.provider_payment_id is None:
        raise RetryLater(f"payment of order {order.order_id} is not recorded yet")
    if payment.provider_payment_id != cmd.payment_id:
        raise Mismatch(f"order {order.order_id} has payment {payment.provider_payment_id}, not {cmd.payment_id}")
    if payment.status == PaymentStatus.CAPTURING and order.status in ENDED_UNPAID:
        return _cancel_call(order, payment.provider_payment_id)  # ended while our capture was out: look
    if (
        payment.status not in (PaymentStatus.REQUIRES_ACTION, PaymentStatus.CAPTURING)
        or order.status is not Status.AWAITING_PAYMENT
    ):
        return None  # captured already, or the order ended: never capture then
    payment.status = PaymentStatus.CAPTURING
    uow.save_payment(payment)
    key = idempotency_key(order.order_id, "capture")
    return Call(order.payment_provider, lambda gateway: gateway.capture(cmd.payment_id, key))


def _cancel_call(order: Order, payment_id: str) -> Call:
    """Cancel the order's payment at the provider, which raises PaymentAlreadyCaptured when the money was
    taken: also how a capture that landed after a cancel is found (never capture then, but look)."""
    key = idempotency_key(order.order_id, "cancel")
    return Call(order.payment_provider, lambda gateway: gateway.cancel(payment_id, key))


def record_capture(
    cmd: CapturePayment,
    msg: MessageContext,
    uow: UnitOfWork,
    result: PaymentResult | None,
    settle_after: float = CAPTURE_SETTLE_SECONDS,
) -> Outcome:
    if result is None:  # the look at a cancelled order's payment found nothing captured (yet)
        order, payment = _order_and_payment(uow, str(cmd.order_id))
        return _not_captured_yet(order, payment, uow, settle_after)
    return record_start(cmd, msg, uow, result)


def _not_captured_yet(order: Order, payment: PaymentRecord | None, uow: UnitOfWork, settle_after: float) -> Outcome:
    if payment is None or payment.status != PaymentStatus.CAPTURING:
        return Outcome.of("unchanged", order, "nothing was captured")
    if payment.unchanged_seconds < settle_after:
        # our capture may still be carried out: look again later (the delay tiers), refund if it was
        raise RetryLater(
            f"order {order.order_id} was cancelled while a capture of {payment.provider_payment_id} "
            "was out; looking again until it is settled"
        )
    # far past any client timeout: the capture never went out (a kill or an outage between marking and
    # sending it). Recorded as not captured; one that lands after all is refunded through its confirmation.
    payment.status = PaymentStatus.CANCELLED
    payment.last_error = (
        f"capture not seen at {payment.provider} {int(payment.unchanged_seconds)} s after it was "
        "marked; recorded as not captured"
    )
    uow.save_payment(payment)
    return Outcome.of("applied", order, payment.last_error)


# -- CancelPayment -----------------------------------------------------------------


def prepare_cancel(cmd: CancelPayment, uow: UnitOfWork) -> Call | None:
    order, payment = _order_and_payment(uow, str(cmd.order_id))
    if cmd.payment_id is not None:  # a second payment, never recorded as the order's
        key, second = idempotency_key(order.order_id, f"cancel-{cmd.payment_id}"), cmd.payment_id
        return Call(order.payment_provider, lambda gateway: gateway.cancel(second, key))
    if (
        payment is None
        or payment.provider_payment_id is None
        or payment.status not in (PaymentStatus.REQUIRES_ACTION, PaymentStatus.CAPTURING, PaymentStatus.PROCESSING)
    ):
        return None  # nothing open at the provider (a start in flight settles itself)
    return _cancel_call(order, payment.provider_payment_id)


def record_cancel(
    cmd: CancelPayment,
    msg: MessageContext,
    uow: UnitOfWork,
    _result: None,
    settle_after: float = CAPTURE_SETTLE_SECONDS,
) -> Outcome:
    order, payment = _order_and_payment(uow, str(cmd.order_id))
    if cmd.payment_id is None and payment is not None and payment.status == PaymentStatus.CAPTURING:
        return _not_captured_yet(order, payment, uow, settle_after)
    if (
        cmd.payment_id is None
        and payment is not None
        and payment.status in (PaymentStatus.REQUIRES_ACTION, PaymentStatus.PROCESSING)
    ):
        payment.status = PaymentStatus.CANCELLED
        uow.save_payment(payment)
    return Outcome.of("applied", order)


# -- RefundPayment -----------------------------------------------------------------


def prepare_refund(cmd: RefundPayment, uow: UnitOfWork) -> Call | None:
    order, payment = _order_and_payment(uow, str(cmd.order_id))
    if cmd.payment_id is not None:  # a second payment, never recorded as the order's
        key = idempotency_key(order.order_id, f"refund-{cmd.payment_id}")
        second = PaymentResult(PayOutcome.SUCCEEDED, cmd.payment_id)
        total = cmd.amount if cmd.amount is not None else order.total
        cur = cmd.currency or order.currency
        if cur is None:
            raise ManualActionRequired(
                f"payment {cmd.payment_id} of order {order.order_id} names no currency: "
                "refund it by hand, then purge this message"
            )
        return Call(order.payment_provider, lambda gateway: gateway.refund(second, total, cur, key))
    if payment is None or payment.status == PaymentStatus.REFUNDED:
        return None
    if order.status not in REFUNDABLE:
        raise IllegalTransition(
            f"order {order.order_id} is {order.status.value}: only a completed, cancelled or "
            "rejected order's payment is refunded"
        )
    if payment.provider_payment_id is None:
        raise RetryLater(f"payment of order {order.order_id} has no provider id yet")
    if payment.provider not in ("stripe", "paypal"):
        raise ManualActionRequired(
            f"payment {payment.provider_payment_id} of cancelled order {order.order_id} was taken by the "
            f"{payment.provider} payment service: refund it there, then purge this message"
        )
    key = idempotency_key(order.order_id, "refund")
    taken = PaymentResult(PayOutcome.SUCCEEDED, payment.provider_payment_id, capture_id=payment.capture_id)
    # what is left of it: a partial refund made at the provider gave some back already
    amount, currency = payment.amount - payment.amount_refunded, payment.currency
    return Call(payment.provider, lambda gateway: gateway.refund(taken, amount, currency, key))


def record_refund(cmd: RefundPayment, msg: MessageContext, uow: UnitOfWork, result: RefundResult | None) -> Outcome:
    order, payment = _order_and_payment(uow, str(cmd.order_id))
    if cmd.payment_id is not None:
        return Outcome.of("applied", order, f"second payment {cmd.payment_id} refunded")
    if payment is None or payment.status == PaymentStatus.REFUNDED or result is None:
        return Outcome.of("unchanged", order)
    return refunded_in_full(order, payment, result.refund_id, msg.message_id, uow)


def refunded_in_full(order: Order, payment: PaymentRecord, refund_id: str | None, mid: str, uow: UnitOfWork) -> Outcome:
    """Record that the order's payment went back in full, and show it: a completed order becomes ``refunded``
    and its committed stock comes back (``stock.return``); a cancelled, rejected or expired one keeps its status
    (a paid order cancelled by an admin returned its stock when it was cancelled); a shipped one too (its goods
    are gone).  ``order.refunded`` in every case, once: the payment is ``refunded`` from now on."""
    payment.status = PaymentStatus.REFUNDED
    payment.refund_id = refund_id or payment.refund_id
    payment.amount_refunded = payment.amount
    uow.save_payment(payment)
    if order.status is Status.COMPLETED:
        order.transition(Status.REFUNDED, mid)  # money returned always shows
        events.stock(uow, order, topology.STOCK_RETURN, mid)
    events.refunded(uow, order, mid, refund_id=payment.refund_id, amount_refunded=payment.amount, full=True)
    return Outcome.of("applied", order, "payment refunded")


# -- SettleRefund (a refund the provider reported) ------------------------------------------


def record_settle_refund(cmd: SettleRefund, msg: MessageContext, uow: UnitOfWork, facts: PaymentFacts) -> Outcome:
    """What the provider says went back from the order's payment, recorded once (never the webhook's word)."""
    order, payment = _order_and_payment(uow, str(cmd.order_id))
    if facts.order_id not in (None, order.order_id):
        return Outcome.of("unchanged", order, f"{cmd.provider} has {facts.provider_payment_id} for another order")
    if payment is None or payment.provider_payment_id != facts.provider_payment_id:
        # a second payment the payment step gave back itself (never the order's): nothing to show
        return Outcome.of("unchanged", order, f"{facts.provider_payment_id} is not the order's payment")
    if facts.refunded <= payment.amount_refunded:
        return Outcome.of("unchanged", order, "this refund is recorded already")
    if order.status in UNPAID or payment.status != PaymentStatus.SUCCEEDED:
        # the money went back before its confirmation was applied here: wait for it (the delay tiers)
        raise RetryLater(
            f"order {order.order_id} is {order.status.value} with its payment {payment.status}: "
            f"the refund of {facts.provider_payment_id} waits for the payment to be recorded"
        )
    last = facts.refund_ids[-1] if facts.refund_ids else None
    if facts.refunded >= payment.amount:
        return refunded_in_full(order, payment, last, msg.message_id, uow)
    payment.amount_refunded = facts.refunded
    payment.refund_id = last or payment.refund_id
    uow.save_payment(payment)
    events.refunded(uow, order, msg.message_id, refund_id=last, amount_refunded=facts.refunded, full=False)
    return Outcome.of("applied", order, f"{facts.refunded} of {payment.amount} refunded at {cmd.provider}")


# -- PaymentFailed (webhook) ---------------------------------------------------------


def prepare_none(cmd: Any, uow: UnitOfWork) -> None:
    return None


def record_failed(cmd: PaymentFailed, msg: MessageContext, uow: UnitOfWork, _result: None) -> Outcome:
    order, payment = _order_and_payment(uow, str(cmd.order_id))
    if payment is not None and payment.provider_payment_id not in (None, cmd.payment_id):
        raise Mismatch(f"order {order.order_id} has payment {payment.provider_payment_id}, not {cmd.payment_id}")
    if payment is not None and payment.status == PaymentStatus.SUCCEEDED:
        return Outcome.of("unchanged", order, "payment already succeeded")
    if payment is None and order.currency is None:
        return Outcome.of("unchanged", order, "no product of this order is known: no payment was ever asked for")
    payment = payment or _new_payment(order)
    payment.status = PaymentStatus.DECLINED
    payment.provider_payment_id = cmd.payment_id
    payment.last_error = cmd.reason
    uow.save_payment(payment)
    return _reject(order, f"payment failed: {cmd.reason or 'reported by ' + cmd.provider}", msg.message_id, uow)


# -- SettlePayment (a confirmation that is asked about) --------------------------------


def prepare_lookup(cmd: SettlePayment | SettleRefund, uow: UnitOfWork) -> Call | None:
    """SettlePayment and SettleRefund: ask the provider what became of the payment the command names."""
    _order_and_payment(uow, str(cmd.order_id))  # the order must exist (a retry waits for it)
    payment_id = cmd.payment_id
    return Call(cmd.provider, lambda gateway: gateway.lookup(payment_id))


def record_settle(cmd: SettlePayment, msg: MessageContext, uow: UnitOfWork, facts: PaymentFacts) -> Outcome:
    """The provider's word on the payment a confirmation named: complete the order on it, or refuse."""
    order, payment = _order_and_payment(uow, str(cmd.order_id))
    if not facts.taken or facts.order_id != order.order_id:
        said = f"{cmd.provider} has {facts.provider_payment_id} as {facts.status}" + (
            "" if facts.order_id in (None, order.order_id) else ", for another order"
        )
        return _refuse_confirmation(cmd, order, "payment_not_confirmed", f"payment not confirmed: {said}", uow)
    if (facts.amount, facts.currency) != (order.total, order.currency):
        # money taken for this order that it cannot keep: give it back, and say why
        _give_back(order, facts, msg.message_id, uow)
        return _refuse_confirmation(
            cmd,
            order,
            "payment_mismatch",
            (
                f"{cmd.provider} took {facts.amount} {facts.currency} with {facts.provider_payment_id}; the order costs "
                f"{order.total} {order.currency}: refunded"
            ),
            uow,
        )
    if payment is not None and payment.confirmed_event_id is not None:
        # paid already (this payment, or another one whose second payment is given back)
        taken = PaymentResult(PayOutcome.SUCCEEDED, facts.provider_payment_id, capture_id=facts.capture_id)
        return apply_result(order, payment, taken, msg, uow)
    payment = payment or _new_payment(order)
    unused = payment.provider_payment_id
    if unused not in (None, facts.provider_payment_id) and payment.status in OPEN:
        # the payment step's own intent was never paid: the order keeps the one the buyer paid
        events.internal(uow, order, CancelPayment, f"{msg.message_id}:{unused}", payment_id=unused)
    payment.capture_id = facts.capture_id or (payment.capture_id if unused == facts.provider_payment_id else None)
    return confirm(order, payment, cmd.provider, facts.provider_payment_id, cmd.event_id, msg.message_id, uow)


def _give_back(order: Order, facts: PaymentFacts, mid: str, uow: UnitOfWork) -> None:
    """Refund in full what the provider took with ``facts``' payment, which the order does not keep."""
    pid = facts.provider_payment_id
    events.internal(
        uow,
        order,
        RefundPayment,
        f"{mid}:{pid}",
        payment_id=pid,
        amount=facts.amount,
        currency=facts.currency,
    )


def _refuse_confirmation(cmd: Any, order: Order, reason: str, message: str, uow: UnitOfWork) -> Outcome:
    events.refused(uow, order.order_id, cmd.confirmation_id, "PaymentConfirmed", reason, message, cmd.correlation_id)
    return Outcome("refused", order.order_id, order.status.value, error=reason, message=message)


@dataclass(frozen=True)
class PaymentHandler(Generic[C]):
    """What one payment command does: ``prepare`` (transaction 1), the provider call, ``record`` (transaction 2)."""

    prepare: Callable[[C, UnitOfWork], Call | None]
    record: Callable[[C, MessageContext, UnitOfWork, Any], Outcome]
    #: False for commands that only change the order (record runs without a call)
    calls_provider: bool = True
    #: ``prepare`` for a message delivered for the first time, where that differs
    prepare_first: Callable[[C, UnitOfWork], Call | None] | None = None


def payment_handlers(
    capture_settle_seconds: float = CAPTURE_SETTLE_SECONDS,
) -> dict[type[Command], PaymentHandler[Any]]:
    """The handlers by command class, with the worker's settings."""
    return {
        StartPayment: PaymentHandler(prepare_start, record_start, prepare_first=prepare_first_start),
        CapturePayment: PaymentHandler(
            prepare_capture, functools.partial(record_capture, settle_after=capture_settle_seconds)
        ),
        CancelPayment: PaymentHandler(
            prepare_cancel, functools.partial(record_cancel, settle_after=capture_settle_seconds)
        ),
        RefundPayment: PaymentHandler(prepare_refund, record_refund),
        PaymentFailed: PaymentHandler(prepare_none, record_failed, calls_provider=False),
        SettlePayment: PaymentHandler(prepare_lookup, record_settle),
        SettleRefund: PaymentHandler(prepare_lookup, record_settle_refund),
    }
