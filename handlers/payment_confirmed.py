"""PaymentConfirmed: the provider took the money for an order.

Provider, payment id, amount and currency must match the order and its
payment record; a mismatch is refused and never completes the order.  A
pending or awaiting order becomes ``completed`` (``stock.commit``,
``order.completed``).  Money taken for an order that was cancelled or
rejected meanwhile is refunded (internal ``RefundPayment``; the payment step
emits ``order.refunded``).  A repeated or late confirmation changes nothing.
"""

from __future__ import annotations

from handlers import events
from handlers.errors import Mismatch, RetryLater
from handlers.orders import CANCELLABLE, Status
from handlers.outcome import MessageContext, Outcome
from handlers.unit_of_work import PaymentRecord, UnitOfWork
from schema.messages import PaymentConfirmed


def payment_confirmed(cmd: PaymentConfirmed, msg: MessageContext, uow: UnitOfWork) -> Outcome:
    order_id = str(cmd.order_id)
    order = uow.order(order_id)
    if order is None:
        raise RetryLater(f"order {order_id} is not placed yet")
    if cmd.provider not in (order.payment_provider, "internal"):
        raise Mismatch(f"order {order_id} is paid through {order.payment_provider}, not {cmd.provider}")
    if (cmd.amount, cmd.currency) != (order.total, order.currency):
        raise Mismatch(
            f"order {order_id} costs {order.total} {order.currency or '(no currency)'}, "
            f"confirmation says {cmd.amount} {cmd.currency}"
        )
    payment = uow.payment(order_id)
    if payment is None:  # confirmed before the payment step recorded anything
        payment = PaymentRecord(
            order_id=order_id,
            provider=order.payment_provider,
            status="started",
            amount=order.total,
            currency=order.currency,
            idempotency_key=f"order-{order_id}",
        )
    if payment.provider_payment_id not in (None, cmd.payment_id):
        raise Mismatch(f"order {order_id} has payment {payment.provider_payment_id}, not {cmd.payment_id}")
    if payment.confirmed_event_id is not None:
        return Outcome.of("unchanged", order, "payment was already confirmed")
    if payment.status == "refunded":  # a late confirmation of money already given back
        return Outcome.of("unchanged", order, "payment was refunded already")

    payment.provider_payment_id = cmd.payment_id
    payment.provider = cmd.provider  # who took the money, and so who can give it back
    payment.confirmed_event_id = cmd.event_id
    payment.status = "succeeded"
    uow.save_payment(payment)

    if order.status in CANCELLABLE:
        order.transition(Status.COMPLETED, msg.message_id)
        events.stock(uow, order, "stock.commit", msg.message_id)
        events.order_event(uow, order, "order.completed", msg.message_id)
        return Outcome.of("applied", order)
    if order.status in (Status.CANCELLED, Status.REJECTED):
        events.internal(uow, order, "RefundPayment", "payment.refund", msg.message_id)
        return Outcome.of("applied", order, "payment arrived after the order ended: refund requested")
    return Outcome.of("unchanged", order, f"order is already {order.status.value}")
