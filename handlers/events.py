"""Events an order change emits, all through the outbox.

Each event id is derived from the order, the routing key and the message
that caused it, so the same effect can never be written under two ids.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from handlers.orders import Order
from handlers.unit_of_work import UnitOfWork
from schema.messages import Command, uuid5
from schema.topology import EVENTS_EXCHANGE, INVENTORY_EXCHANGE, REFUSED, route

EVENT_NAMESPACE = uuid.UUID("0d8f3a52-5a7e-4b7b-8f0c-5e1b1f0a9c11")


def event_id(order_id: str, routing_key: str, message_id: str) -> str:
    return uuid5(EVENT_NAMESPACE, f"{order_id}|{routing_key}|{message_id}")


def _envelope(order: Order, routing_key: str, message_id: str) -> dict[str, Any]:
    return {
        "event_id": event_id(order.order_id, routing_key, message_id),
        "order_id": order.order_id,
        "occurred_at": datetime.now(UTC).isoformat(),
    }


def stock(uow: UnitOfWork, order: Order, routing_key: str, message_id: str) -> None:
    """``stock.reserve`` / ``stock.release`` / ``stock.commit`` with the items."""
    body = _envelope(order, routing_key, message_id)
    body["items"] = order.stock_lines()
    uow.emit(INVENTORY_EXCHANGE, routing_key, routing_key, body, order.order_id, order.correlation_id, body["event_id"])


def order_event(uow: UnitOfWork, order: Order, routing_key: str, message_id: str, **extra: Any) -> None:
    """``order.<status>`` with the order's state after the change."""
    body = _envelope(order, routing_key, message_id)
    body.update(
        status=order.status.value,
        user_id=order.user_id,
        total=order.total,
        currency=order.currency,
    )
    if order.reason:
        body["reason"] = order.reason
    if order.next_action and routing_key == "order.awaiting_payment":
        body["next_action"] = order.next_action
    body.update({k: v for k, v in extra.items() if v is not None})
    uow.emit(EVENTS_EXCHANGE, routing_key, routing_key, body, order.order_id, order.correlation_id, body["event_id"])


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
    eid = event_id(order_id, REFUSED, f"unauthorized:{message_id}" if unauthorized else message_id)
    body = {
        "event_id": eid,
        "order_id": order_id,
        "occurred_at": datetime.now(UTC).isoformat(),
        "message_id": message_id,
        "command": command,
        "reason": reason,
        "message": message[:1000],
        "correlation_id": correlation_id,
    }
    uow.emit(EVENTS_EXCHANGE, REFUSED, "CommandRefused", body, order_id, correlation_id, eid)
