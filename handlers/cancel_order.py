"""CancelOrder: the owner or an admin cancels an order that waits for its payment, or an admin a paid one.

A ``pending`` or ``awaiting_payment`` order becomes ``cancelled``:
``stock.release``, ``order.cancelled`` and, when a payment may have been
started, the internal ``CancelPayment`` (cancel the PaymentIntent; a PayPal
order has nothing to void before approval and is never captured now).

A ``completed`` order that has not shipped becomes ``cancelled`` on a cancel
from a sender that may act as admin, or from its owner within
``orders.customer_cancel_minutes`` of payment (:class:`handlers.orders.Rules`):
``order.cancelled``, ``stock.return`` (its committed units come back) and the
internal ``RefundPayment``, which refunds in full (keyed, so once) and then
announces ``order.refunded``.  Any other state refuses the cancel
(``not_cancellable``, announced).

Someone else's order is refused as not found, so its existence does not
leak.  ``requested_by.roles: ["admin"]`` counts only when the sender may act
as admin (``msg.sender.admin``: the back office, or the shim for an admin it
authenticated); from any other sender the cancel is judged as the named
user's, whatever roles the body claims.
"""

from __future__ import annotations

from handlers import events
from handlers.errors import NotCancellable, NotFound, RetryLater
from handlers.orders import DEFAULT_RULES, PAID_CANCELLABLE, UNPAID, Rules, Status
from handlers.outcome import MessageContext, Outcome, OutcomeResult
from handlers.unit_of_work import PaymentStatus, UnitOfWork
from schema import topology
from schema.messages import CancelOrder, CancelPayment, RefundPayment


def cancel_order(cmd: CancelOrder, msg: MessageContext, uow: UnitOfWork, rules: Rules = DEFAULT_RULES) -> Outcome:
    order_id = str(cmd.order_id)
    order = uow.order(order_id)
    if order is None:
        raise RetryLater(f"order {order_id} is not placed yet")
    requester = cmd.requested_by
    admin = "admin" in requester.roles and msg.sender.admin
    if not admin and requester.user_id != order.user_id:
        raise NotFound(f"order {order_id} not found")
    if order.status is Status.CANCELLED:
        return Outcome.of(OutcomeResult.UNCHANGED, order, "order was already cancelled")
    reason = cmd.reason or f"cancelled by {requester.user_id}"
    if order.status in PAID_CANCELLABLE:
        if not admin and not rules.owner_may_cancel_paid(order):
            window = f" after {rules.customer_cancel_minutes:g} minutes" if rules.customer_cancel_minutes else ""
            raise NotCancellable(f"order {order_id} is paid{window}: only an admin may cancel it now")
        order.transition(Status.CANCELLED, msg.message_id, reason)
        events.stock(uow, order, topology.STOCK_RETURN, msg.message_id)  # the committed units come back
        events.order_event(uow, order, topology.ORDER_CANCELLED, msg.message_id)
        events.internal(uow, order, RefundPayment, msg.message_id)
        return Outcome.of(OutcomeResult.APPLIED, order, "cancelled; the payment is being refunded in full")
    if order.status not in UNPAID:
        raise NotCancellable(f"order {order_id} is {order.status.value} and can no longer be cancelled")

    order.transition(Status.CANCELLED, msg.message_id, reason)
    events.stock(uow, order, topology.STOCK_RELEASE, msg.message_id)
    events.order_event(uow, order, topology.ORDER_CANCELLED, msg.message_id)
    payment = uow.payment(order_id)
    if payment is not None and payment.status not in (PaymentStatus.DECLINED, PaymentStatus.CANCELLED):
        events.internal(uow, order, CancelPayment, msg.message_id)
    return Outcome.of(OutcomeResult.APPLIED, order)
