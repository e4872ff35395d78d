"""CancelOrder: the owner or an admin cancels a pending or awaiting order.

Emits ``stock.release`` and ``order.cancelled``; when a payment may have
been started, also the internal ``CancelPayment`` (cancel the
PaymentIntent / void the PayPal order).  Someone else's order is refused as
not found, so its existence does not leak.

``requested_by.roles: ["admin"]`` counts only when the sender may act as
admin (``msg.sender.admin``: the back office, or the shim for an admin it
authenticated); from any other sender the cancel is judged as the named
user's, whatever roles the body claims.
"""

from __future__ import annotations

from handlers import events
from handlers.errors import NotFound, RetryLater
from handlers.orders import HOLDS_STOCK, Status
from handlers.outcome import MessageContext, Outcome
from handlers.unit_of_work import PaymentStatus, UnitOfWork
from schema.messages import CancelOrder, CancelPayment


def cancel_order(cmd: CancelOrder, msg: MessageContext, uow: UnitOfWork) -> Outcome:
    order_id = str(cmd.order_id)
    order = uow.order(order_id)
    if order is None:
        raise RetryLater(f"order {order_id} is not placed yet")
    requester = cmd.requested_by
    admin = "admin" in requester.roles and msg.sender.admin
    if not admin and requester.user_id != order.user_id:
        raise NotFound(f"order {order_id} not found")
    if order.status is Status.CANCELLED:
        return Outcome.of("unchanged", order, "order was already cancelled")

    previous = order.transition(Status.CANCELLED, msg.message_id, cmd.reason or f"cancelled by {requester.user_id}")
    if previous in HOLDS_STOCK:
        events.stock(uow, order, "stock.release", msg.message_id)
    events.order_event(uow, order, "order.cancelled", msg.message_id)
    payment = uow.payment(order_id)
    if payment is not None and payment.status not in (PaymentStatus.DECLINED, PaymentStatus.CANCELLED):
        events.internal(uow, order, CancelPayment, msg.message_id)
    return Outcome.of("applied", order)
