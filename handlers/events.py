"""Events an order change emits, all through the outbox.

Each body is built as its model in ``schema.messages`` (a TypedDict: mypy
checks every key here) and validated against it on its way out
(:meth:`schema.topology.EventRoute.body`); the route names the exchange,
routing key and AMQP type.  Handlers pass a route of ``schema.topology``,
never a routing key.  Each event id is derived from the order, the routing
key and the message that caused it, so the same effect can never be written
under two ids.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from handlers.orders import Order
from handlers.unit_of_work import Refusal, UnitOfWork
from schema.messages import (
    Command,
    CommandRefused,
    Event,
    EventLine,
    OrderAwaitingPayment,
    OrderEvent,
    OrderRefunded,
    OrderShipped,
    ShipmentData,
    StockEvent,
    uuid5,
)
from schema.topology import COMMAND_REFUSED, ORDER_AWAITING_PAYMENT, ORDER_REFUNDED, ORDER_SHIPPED, EventRoute, route

EVENT_NAMESPACE = uuid.UUID("0d8f3a52-5a7e-4b7b-8f0c-5e1b1f0a9c11")


def event_id(order_id: str, routing_key: str, message_id: str) -> str:
    return uuid5(EVENT_NAMESPACE, f"{order_id}|{routing_key}|{message_id}")


def _publish(uow: UnitOfWork, order: Order, event: EventRoute, body: Event) -> None:
    uow.emit(
        event.exchange,
        event.routing_key,
        event.message_type,
        event.body(body),
        order.order_id,
        order.correlation_id,
        body["event_id"],
    )


def stock(uow: UnitOfWork, order: Order, event: EventRoute, message_id: str) -> None:
    """``stock.reserve`` / ``release`` / ``commit`` / ``return``: the order's lines."""
    items: list[EventLine] = [{"product_id": line.product_id, "quantity": line.quantity} for line in order.lines]
    body: StockEvent = {
        "event_id": event_id(order.order_id, event.routing_key, message_id),
        "order_id": order.order_id,
        "occurred_at": datetime.now(UTC).isoformat(),
        "items": items,
    }
    _publish(uow, order, event, body)


def _order_state(order: Order, event: EventRoute, message_id: str) -> OrderEvent:
    body: OrderEvent = {
        "event_id": event_id(order.order_id, event.routing_key, message_id),
        "order_id": order.order_id,
        "occurred_at": datetime.now(UTC).isoformat(),
        "status": order.status.value,
        "user_id": order.user_id,
        "total": order.total,
        "currency": order.currency,
    }
    if order.reason:
        body["reason"] = order.reason
    return body


def order_event(uow: UnitOfWork, order: Order, event: EventRoute, message_id: str) -> None:
    """``order.<status>``: the order's state after the change; ``order.awaiting_payment`` with what the buyer
    does next, ``order.shipped`` with the shipment.  (``order.refunded`` is :func:`refunded`.)"""
    state = _order_state(order, event, message_id)
    if event is ORDER_AWAITING_PAYMENT and order.next_action:
        waiting: OrderAwaitingPayment = {**state, "next_action": order.next_action}
        _publish(uow, order, event, waiting)
    elif event is ORDER_SHIPPED:
        assert order.shipment is not None, "an order is shipped with its shipment"
        shipment: ShipmentData = {
            "carrier": order.shipment["carrier"],
            "tracking_number": order.shipment["tracking_number"],
        }
        shipped: OrderShipped = {**state, "shipment": shipment}
        _publish(uow, order, event, shipped)
    else:
        _publish(uow, order, event, state)


def refunded(
    uow: UnitOfWork, order: Order, message_id: str, *, refund_id: str | None, amount_refunded: int, full: bool
) -> None:
    """``order.refunded``: what went back so far (minor units), and whether that is the whole payment."""
    body: OrderRefunded = {
        **_order_state(order, ORDER_REFUNDED, message_id),  # type: ignore[typeddict-item]  # refund_id: below
        "amount_refunded": amount_refunded,
        "full": full,
    }
    if refund_id is not None:
        body["refund_id"] = refund_id  # the model puts it before amount_refunded (EventRoute.body)
    _publish(uow, order, ORDER_REFUNDED, body)


def internal(uow: UnitOfWork, order: Order, command: type[Command], message_id: str, **data: Any) -> None:
    """An internal command for the payment step, published by the relay on its route."""
    r = route(command)
    body = {"order_id": order.order_id, **data}
    uow.emit(
        r.exchange,
        r.routing_key,
        r.message_type,
        body,
        order.order_id,
        order.correlation_id,
        event_id(order.order_id, r.routing_key, message_id),
    )


def refused(
    uow: UnitOfWork,
    order_id: str,
    message_id: str,
    command: str,
    reason: str,
    message: str,
    correlation_id: str | None,
    *,
    unauthorized: bool = False,
) -> None:
    """``command.refused``: a well-formed command was refused for a business reason.

    Published like every event (outbox, stable id), so that an upstream
    service that sent no ``reply_to`` learns of it too; one event per
    refused message id, however often the message is delivered.  A refusal
    of its sender (``unauthorized``) has an id of its own: the same message,
    replayed once its sender may send it, can still be refused for a business
    reason and announced again.
    """
    r = COMMAND_REFUSED
    eid = event_id(order_id, r.routing_key, f"unauthorized:{message_id}" if unauthorized else message_id)
    body: CommandRefused = {
        "event_id": eid,
        "order_id": order_id,
        "occurred_at": datetime.now(UTC).isoformat(),
        "message_id": message_id,
        "command": command,
        "reason": reason,
        "message": message[:1000],
        "correlation_id": correlation_id,
    }
    refusal = Refusal(command, reason, body["message"])
    uow.emit(r.exchange, r.routing_key, r.message_type, r.body(body), order_id, correlation_id, eid, refusal)
