"""ShipOrder: the fulfilment service says a ``completed`` order has shipped.

``completed`` → ``shipped`` with the shipment (carrier, tracking number)
kept on the order, and ``order.shipped``.  The same shipment again is a
no-op; any other state is refused (announced as ``command.refused``), as is
a second, different shipment.  After it, a cancel is refused: ``shipped``
has no way out in the lifecycle.
"""

from __future__ import annotations

from handlers import events
from handlers.errors import IllegalTransition, RetryLater
from handlers.orders import Status
from handlers.outcome import MessageContext, Outcome, OutcomeResult
from handlers.unit_of_work import UnitOfWork
from schema import topology
from schema.messages import ShipOrder


def ship_order(cmd: ShipOrder, msg: MessageContext, uow: UnitOfWork) -> Outcome:
    order_id = str(cmd.order_id)
    order = uow.order(order_id)
    if order is None:
        raise RetryLater(f"order {order_id} is not placed yet")
    shipment = cmd.shipment.model_dump()
    if order.status is Status.SHIPPED:
        if order.shipment == shipment:
            return Outcome.of(OutcomeResult.UNCHANGED, order, "order was already shipped with this shipment")
        raise IllegalTransition(f"order {order_id} was already shipped with another shipment")
    order.transition(Status.SHIPPED, msg.message_id)
    order.shipment = shipment
    events.order_event(uow, order, topology.ORDER_SHIPPED, msg.message_id)  # with the shipment just recorded
    return Outcome.of(OutcomeResult.APPLIED, order)
