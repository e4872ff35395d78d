"""PaymentConfirmed: the provider took the money for an order.

A confirmation that matches the order and its payment record (provider,
payment id, amount, currency) completes a pending or awaiting order
(``stock.commit``, ``order.completed``).  One that does not match is never
trusted and never dropped: it is settled by asking the provider (internal
``SettlePayment``, run by the payment step outside any transaction), which
completes the order on the payment the provider vouches for or refuses the
confirmation with ``command.refused``.  Every PayPal confirmation is asked
about too, since its webhook is only as trustworthy as a certificate check.

A confirmation names the order's own provider; any other is a mismatch,
asked about at the order's provider like any other.  No order is placed to
be paid internally (PlaceOrder takes Stripe or PayPal), so an ``internal``
confirmation never completes an order on its word: the order's provider is
asked about the payment it names, and unless that provider took the money
for this order the confirmation is refused (``payment_not_confirmed``).
Who may send a confirmation at all, and naming which provider, is the
sender map's business (``handlers.senders``).

Money taken for an order that was cancelled, rejected or expired meanwhile is
refunded (internal ``RefundPayment``; the payment step emits
``order.refunded``).  A repeated or late confirmation changes nothing.
"""

from __future__ import annotations

from handlers import events
from handlers.errors import Mismatch, RetryLater
from handlers.orders import ENDED_UNPAID, UNPAID, Order, Status
from handlers.outcome import MessageContext, Outcome, OutcomeResult
from handlers.unit_of_work import PaymentRecord, PaymentStatus, UnitOfWork
from schema import topology
from schema.messages import PaymentConfirmed, RefundPayment, SettlePayment

#: providers whose payments the payment step can look up: every provider an order can be placed with
ASKABLE = frozenset({"stripe", "paypal"})


def _mismatch(cmd: PaymentConfirmed, order: Order, payment: PaymentRecord | None) -> str | None:
    """Why the confirmation does not match the order and its payment record, or None."""
    if cmd.provider != order.payment_provider:
        return f"order {order.order_id} is paid through {order.payment_provider}, not {cmd.provider}"
    if (cmd.amount, cmd.currency) != (order.total, order.currency):
        return (
            f"order {order.order_id} costs {order.total} {order.currency or '(no currency)'}, "
            f"confirmation says {cmd.amount} {cmd.currency}"
        )
    if payment is not None and payment.provider_payment_id not in (None, cmd.payment_id):
        return f"order {order.order_id} has payment {payment.provider_payment_id}, not {cmd.payment_id}"
    return None


def payment_confirmed(cmd: PaymentConfirmed, msg: MessageContext, uow: UnitOfWork) -> Outcome:
    order_id = str(cmd.order_id)
    order = uow.order(order_id)
    if order is None:
        raise RetryLater(f"order {order_id} is not placed yet")
    payment = uow.payment(order_id)
    if payment is not None and payment.provider_payment_id == cmd.payment_id:
        if payment.confirmed_event_id is not None:
            return Outcome.of(OutcomeResult.UNCHANGED, order, "payment was already confirmed")
        if payment.status == PaymentStatus.REFUNDED:  # a late confirmation of money already given back
            return Outcome.of(OutcomeResult.UNCHANGED, order, "payment was refunded already")
    problem = _mismatch(cmd, order, payment)
    ask = order.payment_provider  # the order's own provider vouches for its money, whoever confirms
    if ask in ASKABLE and (problem is not None or cmd.provider == "paypal"):
        events.internal(
            uow,
            order,
            SettlePayment,
            msg.message_id,
            provider=ask,
            payment_id=cmd.payment_id,
            amount=cmd.amount,
            currency=cmd.currency,
            event_id=cmd.event_id,
            confirmation_id=msg.message_id,
            correlation_id=msg.correlation_id,
        )
        return Outcome(
            OutcomeResult.SETTLING,
            order_id,
            order.status.value,
            message=f"{problem or 'a PayPal confirmation'}: asking {ask} about {cmd.payment_id}",
        )
    if problem is not None:
        raise Mismatch(problem)
    payment = payment or PaymentRecord(  # confirmed before the payment step recorded anything
        order_id=order_id,
        provider=order.payment_provider,
        status=PaymentStatus.STARTED,
        amount=cmd.amount,
        currency=cmd.currency,
        idempotency_key=f"order-{order_id}",  # equal to the order's: checked above
    )
    return confirm(order, payment, cmd.provider, cmd.payment_id, cmd.event_id, msg.message_id, uow)


def confirm(
    order: Order,
    payment: PaymentRecord,
    provider: str,
    payment_id: str,
    event_id: str,
    message_id: str,
    uow: UnitOfWork,
) -> Outcome:
    """Record ``payment_id`` as the order's money taken, and move the order by it."""
    payment.provider_payment_id = payment_id
    payment.provider = provider  # who took the money, and so who can give it back
    payment.confirmed_event_id = event_id
    payment.status = PaymentStatus.SUCCEEDED
    uow.save_payment(payment)
    if order.status in UNPAID:
        order.transition(Status.COMPLETED, message_id)
        events.stock(uow, order, topology.STOCK_COMMIT, message_id)
        events.order_event(uow, order, topology.ORDER_COMPLETED, message_id)
        return Outcome.of(OutcomeResult.APPLIED, order)
    if order.status in ENDED_UNPAID:
        events.internal(uow, order, RefundPayment, message_id)
        return Outcome.of(OutcomeResult.APPLIED, order, "payment arrived after the order ended: refund requested")
    return Outcome.of(OutcomeResult.UNCHANGED, order, f"order is already {order.status.value}")
