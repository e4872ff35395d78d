"""The contract's names, once: exchanges, queues, routing keys, and which command goes where.

Every other module (the broker adapter, the handlers' events, the shim, the
CLI, the tests) takes these names from here; ``docs/contract.md`` restates
them for people and ``docs/asyncapi.yaml`` (``orders asyncapi``) for
machines.  Routing is keyed by the command's class: a :class:`Route` says on
which exchange a command is published, with which routing key, and from
which queue it is consumed, so the handlers, the topology and the queue check
cannot disagree.  Each event has its :class:`EventRoute` (exchange, routing
key, model): the handlers name it, never a routing key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from schema import messages

# -- exchanges -------------------------------------------------------------------

#: commands upstream services publish (direct)
COMMANDS_EXCHANGE = "orders.commands"
#: internal commands of the payment step, published by the relay (direct)
INTERNAL_EXCHANGE = "orders.internal"
#: stock events for the Inventory Service (topic)
INVENTORY_EXCHANGE = "inventory"
#: order events, ``command.refused`` included (topic)
EVENTS_EXCHANGE = "orders.events"
#: where a message goes when it failed for good (fanout)
DEAD_LETTER_EXCHANGE = "orders.dlx"
#: headers exchange in front of the delay queues, routing on header DELAY_HEADER
DELAY_EXCHANGE = "orders.delay"

#: every exchange the topology declares, with its type
EXCHANGE_TYPES: dict[str, str] = {
    COMMANDS_EXCHANGE: "direct",
    INTERNAL_EXCHANGE: "direct",
    INVENTORY_EXCHANGE: "topic",
    EVENTS_EXCHANGE: "topic",
    DEAD_LETTER_EXCHANGE: "fanout",
    DELAY_EXCHANGE: "headers",
}
EXCHANGES = tuple(EXCHANGE_TYPES)

# -- queues ------------------------------------------------------------------------

DEAD_LETTER_QUEUE = "orders.dead-letter"
PAYMENTS_QUEUE = "orders.payments"
#: the tier header; not ``x-…``: a headers exchange ignores x- headers when matching
DELAY_HEADER = "orders-delay-tier"
#: redeliveries (e.g. a message that crashes its worker) before the broker dead-letters it
DELIVERY_LIMIT = 20


def delay_queue(seconds: int) -> str:
    return f"orders.delay.{seconds}s"


# -- headers a republished command carries -------------------------------------------

#: the broker user that first sent a command the service republished (a retry, a dead letter, a replay;
#: "" for none), believed only on a message whose ``user_id`` is the service's own (``worker.identity``)
SENDER_HEADER = "x-orders-sender"
#: the headers a retried or dead-lettered command gains (``worker.settlement.failure_headers``), and what
#: each says; its body and AMQP properties are kept as they were
FAILURE_HEADERS: dict[str, str] = {
    "x-original-exchange": "The exchange it was first published to.",
    "x-original-routing-key": "The routing key it was first published with.",
    "x-original-queue": "The queue it failed on (a retry comes back to it).",
    "x-first-failure-at": "When it first failed (ISO 8601, UTC).",
    "x-last-failure-at": "When it last failed (ISO 8601, UTC).",
    "x-attempts": "How many times it failed.",
    "x-error-class": "The error's class: `InvalidMessage`, `RetryLater`, `Unauthorized`, `ManualActionRequired`, ...",
    "x-error-message": "The error (at most 1,000 characters).",
    "x-error-digest": "The first 16 hex digits of the traceback's sha256, to group identical failures (a failure "
    "with a traceback).",
    "x-error-traceback": "The traceback's last 2,000 characters (a failure with a traceback).",
}


# -- routes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Where a command travels: published on ``exchange`` with ``routing_key``, consumed from ``queue``."""

    command: type[messages.Command]
    exchange: str
    routing_key: str
    queue: str

    @property
    def message_type(self) -> str:
        """The AMQP ``type`` property: the command's class name."""
        return self.command.__name__


#: the commands upstream services send (docs/contract.md)
COMMAND_ROUTES: tuple[Route, ...] = (
    Route(messages.PlaceOrder, COMMANDS_EXCHANGE, "order.place", "orders.place"),
    Route(messages.CancelOrder, COMMANDS_EXCHANGE, "order.cancel", "orders.cancel"),
    Route(messages.PaymentConfirmed, COMMANDS_EXCHANGE, "payment.confirmed", "orders.payment-confirmed"),
    Route(messages.ShipOrder, COMMANDS_EXCHANGE, "order.ship", "orders.ship"),
)
#: the payment step's internal commands, all on one queue
PAYMENT_ROUTES: tuple[Route, ...] = (
    Route(messages.StartPayment, INTERNAL_EXCHANGE, "payment.start", PAYMENTS_QUEUE),
    Route(messages.CapturePayment, INTERNAL_EXCHANGE, "payment.capture", PAYMENTS_QUEUE),
    Route(messages.CancelPayment, INTERNAL_EXCHANGE, "payment.cancel", PAYMENTS_QUEUE),
    Route(messages.RefundPayment, INTERNAL_EXCHANGE, "payment.refund", PAYMENTS_QUEUE),
    Route(messages.PaymentFailed, INTERNAL_EXCHANGE, "payment.failed", PAYMENTS_QUEUE),
    Route(messages.SettlePayment, INTERNAL_EXCHANGE, "payment.settle", PAYMENTS_QUEUE),
    Route(messages.SettleRefund, INTERNAL_EXCHANGE, "payment.refunded", PAYMENTS_QUEUE),
)
ROUTES: dict[type[messages.Command], Route] = {r.command: r for r in COMMAND_ROUTES + PAYMENT_ROUTES}
#: message type name -> route (what a delivery's ``type`` property is looked up by)
ROUTES_BY_TYPE: dict[str, Route] = {r.message_type: r for r in ROUTES.values()}


def route(command: type[messages.Command] | messages.Command) -> Route:
    """The route of a command class (or of a command)."""
    return ROUTES[command if isinstance(command, type) else type(command)]


#: queue -> routing key of the commands upstream services publish
COMMAND_QUEUES: dict[str, str] = {r.queue: r.routing_key for r in COMMAND_ROUTES}
#: the routing keys bound to ``orders.payments``
PAYMENT_ROUTING_KEYS = tuple(r.routing_key for r in PAYMENT_ROUTES)
#: the commands upstream services send, the types the command consumer applies
COMMAND_TYPES = frozenset(r.message_type for r in COMMAND_ROUTES)
#: the internal payment-step commands, the only types ``orders.payments`` accepts
PAYMENT_COMMAND_TYPES = frozenset(r.message_type for r in PAYMENT_ROUTES)
#: every queue a worker consumes
WORK_QUEUES: tuple[str, ...] = (*COMMAND_QUEUES, PAYMENTS_QUEUE)
#: queue -> the message types a delivery on it may carry; anything else is an invalid message.
#: A retry comes back to the queue it failed on (delay tiers), so it is held to the same rule.
QUEUE_ACCEPTS: dict[str, frozenset[str]] = {
    queue: frozenset(r.message_type for r in ROUTES.values() if r.queue == queue) for queue in WORK_QUEUES
}


def wrong_queue(queue: str, message_type: str | None) -> str | None:
    """Why a message of this type may not be taken from ``queue``; None when it may."""
    accepted = QUEUE_ACCEPTS.get(queue, frozenset())
    if message_type in accepted:
        return None
    takes = ", ".join(sorted(accepted)) or "no commands"
    return f"message type {message_type!r} does not belong on queue {queue!r} (it takes {takes})"


def queue_of(message_type: str | None) -> str | None:
    """The queue a command or payment step of this type is consumed from; None for an unknown type."""
    r = ROUTES_BY_TYPE.get(message_type or "")
    return r.queue if r else None


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EventRoute:
    """Where an event goes: published on ``exchange`` with ``routing_key``; its body is an ``event``.

    ``message_type`` is the AMQP ``type`` property the relay sets (the routing key, for the stock and order
    events); ``summary`` says when the service publishes it (the AsyncAPI document shows it).
    """

    event: type[Any]
    exchange: str
    routing_key: str
    message_type: str
    summary: str

    def body(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """``data`` validated against the event's model: the dict the outbox serializes (its keys in model order).

        Raises :class:`pydantic.ValidationError` when a handler built a body the contract does not allow.
        """
        return _validators[self.event].validate_python(data)  # type: ignore[no-any-return]


def _stock(routing_key: str, summary: str) -> EventRoute:
    return EventRoute(messages.StockEvent, INVENTORY_EXCHANGE, routing_key, routing_key, summary)


def _order(routing_key: str, summary: str, event: type[Any] = messages.OrderEvent) -> EventRoute:
    return EventRoute(event, EVENTS_EXCHANGE, routing_key, routing_key, summary)


STOCK_RESERVE = _stock("stock.reserve", "An order was placed: its units are reserved.")
STOCK_RELEASE = _stock(
    "stock.release", "A placed order was cancelled, rejected or expired before payment: its reserved units are free."
)
STOCK_COMMIT = _stock("stock.commit", "An order was paid: its reserved units are taken.")
STOCK_RETURN = _stock(
    "stock.return", "Committed units come back: an unshipped paid order was cancelled or refunded in full."
)
ORDER_PLACED = _order("order.placed", "An order was placed (`pending`); its payment starts.")
ORDER_AWAITING_PAYMENT = _order(
    "order.awaiting_payment",
    "The provider waits for the buyer (3-D Secure, PayPal approval).",
    messages.OrderAwaitingPayment,
)
ORDER_COMPLETED = _order("order.completed", "The money was taken: the order is `completed`.")
ORDER_SHIPPED = _order("order.shipped", "A completed order left the warehouse (ShipOrder).", messages.OrderShipped)
ORDER_CANCELLED = _order("order.cancelled", "The order was cancelled (a paid one is then refunded in full).")
ORDER_REJECTED = _order(
    "order.rejected", "The order was rejected: an unknown or inactive product, a declined or failed payment."
)
ORDER_EXPIRED = _order("order.expired", "The buyer did not pay within `orders.payment_timeout_minutes`.")
ORDER_REFUNDED = _order(
    "order.refunded",
    "Money went back to the buyer: in full (`full: true`), or a partial refund made at the provider.",
    messages.OrderRefunded,
)
COMMAND_REFUSED = EventRoute(
    messages.CommandRefused,
    EVENTS_EXCHANGE,
    "command.refused",
    "CommandRefused",
    "A well-formed command was refused; `reply_to`, when given, gets the same answer.",
)

#: every event the service publishes (DESIGN.md), in the contract's order
EVENT_ROUTES: tuple[EventRoute, ...] = (
    STOCK_RESERVE,
    STOCK_RELEASE,
    STOCK_COMMIT,
    STOCK_RETURN,
    ORDER_PLACED,
    ORDER_AWAITING_PAYMENT,
    ORDER_COMPLETED,
    ORDER_SHIPPED,
    ORDER_CANCELLED,
    ORDER_REJECTED,
    ORDER_EXPIRED,
    ORDER_REFUNDED,
    COMMAND_REFUSED,
)
#: one validator per event model, built once (the routes share them)
_validators: dict[type[Any], Any] = {r.event: TypeAdapter(r.event).validator for r in EVENT_ROUTES}


def parse_command(message_type: str | None, body: bytes) -> messages.Command:
    """Decode a command by its message type; raises :class:`schema.messages.InvalidMessage`."""
    r = ROUTES_BY_TYPE.get(message_type or "")
    if r is None:
        raise messages.InvalidMessage(f"unknown message type {message_type!r}")
    return messages.parse_body(r.command, body)
