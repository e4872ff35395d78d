"""PlaceOrder: price the items from the product table and record the order.

A valid order becomes ``pending`` and emits ``stock.reserve``,
``order.placed`` and the internal ``StartPayment`` that the payment runner
applies.  Unknown or inactive products, or items in more than one
currency, end the order ``rejected`` (``order.rejected``, nothing reserved).
An order none of whose products is known has no currency (NULL), never a
made-up one.
"""

from __future__ import annotations

from handlers import events
from handlers.errors import Taken
from handlers.orders import Line, Order, Status
from handlers.outcome import MessageContext, Outcome, OutcomeResult
from handlers.unit_of_work import UnitOfWork
from schema import topology
from schema.messages import PlaceOrder, StartPayment


def place_order(cmd: PlaceOrder, msg: MessageContext, uow: UnitOfWork) -> Outcome:
    order_id = msg.order_id or cmd.resolved_order_id(msg.message_id)
    existing = uow.order(order_id)
    if existing is not None:
        # generic: who placed it, and with which message, is not the sender's business
        raise Taken(f"order id {order_id} is already taken")

    quantities: dict[str, int] = {}
    for item in cmd.lines():  # the same product twice is one line
        quantities[item.product_id] = quantities.get(item.product_id, 0) + item.quantity
    products = uow.products(list(quantities))

    problems = []
    lines = []
    for product_id, quantity in quantities.items():
        product = products.get(product_id)
        if product is None:
            problems.append(f"unknown product {product_id}")
        elif not product.active:
            problems.append(f"product {product_id} is not available")
        lines.append(Line(product_id, quantity, product.price if product else 0))
    currencies = sorted({p.currency for p in products.values()})
    if len(currencies) > 1:
        problems.append("items are priced in more than one currency: " + ", ".join(currencies))

    status = Status.REJECTED if problems else Status.PENDING
    order = Order(
        order_id=order_id,
        user_id=cmd.user_id,
        status=status,
        currency=currencies[0] if currencies else None,
        total=sum(line.quantity * line.unit_price for line in lines),
        payment_provider=cmd.payment.provider,
        payment_request=cmd.payment.model_dump(),
        place_message_id=msg.message_id,
        lines=lines,
        reason="; ".join(problems) or None,
        correlation_id=msg.correlation_id,
    )
    order.transitions.append((None, status, msg.message_id, order.reason))
    uow.add_order(order)

    if problems:
        events.order_event(uow, order, topology.ORDER_REJECTED, msg.message_id)
        return Outcome.of(OutcomeResult.REJECTED, order)
    events.stock(uow, order, topology.STOCK_RESERVE, msg.message_id)
    events.order_event(uow, order, topology.ORDER_PLACED, msg.message_id)
    events.internal(uow, order, StartPayment, msg.message_id)
    return Outcome.of(OutcomeResult.APPLIED, order)
