"""Expiry: an order whose buyer has not paid within ``orders.payment_timeout_minutes`` ends ``expired``.

Not a command anyone sends: the expiry sweep (:mod:`worker.expiry`) finds
the orders ``awaiting_payment`` past their deadline and applies this to each
in a transaction of its own kind, with an inbox row, like any command.
``awaiting_payment`` → ``expired``: ``stock.release``, ``order.expired`` and,
when a payment was started, the internal ``CancelPayment`` (Stripe: the
PaymentIntent is cancelled; PayPal: an order the buyer has not approved has
nothing to void, and is never captured now, since a capture needs the order
``awaiting_payment``).  Money that lands afterwards is refunded, as for a
cancelled order.  Any other state is left as it is (paid, cancelled or
expired in the same instant: the row lock decides, the loser changes nothing).
"""

from __future__ import annotations

from handlers import events
from handlers.orders import Order, Rules, Status
from handlers.outcome import MessageContext, Outcome, OutcomeResult
from handlers.unit_of_work import PaymentStatus, UnitOfWork
from schema import topology
from schema.messages import CancelPayment

#: the message type expiry is recorded under (inbox, transitions, the order's history)
EXPIRE_ORDER = "ExpireOrder"


def expiry_message_id(order_id: str) -> str:
    """The one message id an order's expiry is applied under: an order expires once."""
    return f"expire-{order_id}"


def expire_order(order: Order, msg: MessageContext, uow: UnitOfWork, rules: Rules) -> Outcome:
    if order.status is not Status.AWAITING_PAYMENT:
        return Outcome.of(OutcomeResult.UNCHANGED, order, f"order is {order.status.value}: nothing to expire")
    minutes = f"{rules.payment_timeout_minutes:g}"
    order.transition(Status.EXPIRED, msg.message_id, f"not paid within {minutes} minutes")
    events.stock(uow, order, topology.STOCK_RELEASE, msg.message_id)
    events.order_event(uow, order, topology.ORDER_EXPIRED, msg.message_id)
    payment = uow.payment(order.order_id)
    if payment is not None and payment.status not in (PaymentStatus.DECLINED, PaymentStatus.CANCELLED):
        events.internal(uow, order, CancelPayment, msg.message_id)
    return Outcome.of(OutcomeResult.APPLIED, order)
