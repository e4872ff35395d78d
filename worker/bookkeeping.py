"""What a transaction writes about each order besides its state: the story ``worker.history`` reads back.

A :class:`Bookkeeping` follows the messages a unit of work handles (the one
being handled now is the cause of what is done), collects the events each
one makes an order emit and the payments it saves, and at the flush builds
the rows of ``order_transitions`` and ``order_history`` from that and from
the orders' transitions, both as lists, in one pass that changes nothing:

- a transition row per status change, the first one a message made on an
  order listing the events that message made the order emit;
- a history row per payment saved (its record as saved, and its cause);
- a history row per order and message whose events no transition lists (a
  refusal, with what was refused and why; a payment command that moved no
  order), except about an order that does not exist (a refused PlaceOrder:
  its outbox row tells).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from pydantic_core import to_json

from handlers.orders import Order
from handlers.unit_of_work import PaymentStatus, Refusal

#: (message_id, message_type, correlation_id) of the message that caused a change; all None outside a handler
Cause = tuple[str | None, str | None, str | None]
NO_CAUSE: Cause = (None, None, None)

TRANSITION_COLUMNS = (
    "order_id",
    "from_status",
    "to_status",
    "message_id",
    "reason",
    "message_type",
    "correlation_id",
    "events",
)
HISTORY_COLUMNS = ("order_id", "kind", "ref", "message_id", "message_type", "correlation_id", "data")


class Rows(NamedTuple):
    """The rows of ``order_transitions`` and ``order_history`` a flush writes (in :data:`TRANSITION_COLUMNS` and
    :data:`HISTORY_COLUMNS` order)."""

    transitions: list[tuple[Any, ...]]
    history: list[tuple[Any, ...]]


class Bookkeeping:
    """The causes of a unit of work's changes, and the transition and history rows they come to."""

    def __init__(self) -> None:
        #: message id -> (type, correlation id) of the messages handled here
        self._messages: dict[str, tuple[str, str | None]] = {}
        #: the message being handled now
        self.current: Cause = NO_CAUSE
        #: (order_id, *cause) -> {"events": [[exchange, routing_key, event_id], ...], "refused": {...}}
        self._events: dict[tuple[Any, ...], dict[str, Any]] = {}
        #: order_id -> the cause of the last save of its payment
        self._payment_causes: dict[str, Cause] = {}

    def handling(self, message_id: str, message_type: str, correlation_id: str | None) -> None:
        """The message the handler about to run handles: what it does is booked under it."""
        self._messages[message_id] = (message_type, correlation_id)
        self.current = (message_id, message_type, correlation_id)

    def event(self, order_id: str, exchange: str, routing_key: str, event_id: str, refusal: Refusal | None) -> None:
        """An event about ``order_id`` went into the outbox (one history entry per order and message, listing its
        events: a PlaceOrder's three in one)."""
        cause = (order_id, *self.current)
        entry = self._events.get(cause)
        if entry is None:
            entry = self._events[cause] = {"events": []}
        entry["events"].append([exchange, routing_key, event_id])
        if refusal is not None:
            entry["refused"] = {"command": refusal.command, "reason": refusal.reason, "message": refusal.message}

    def payment_saved(self, order_id: str) -> None:
        self._payment_causes[order_id] = self.current

    def rows(
        self,
        orders: Mapping[str, Order | None],
        payments: Mapping[str, tuple[PaymentStatus, dict[str, Any]]],
    ) -> Rows:
        """The rows to write, as lists; asking twice gives the same rows (nothing is taken out of this book).

        ``orders``: every order the unit of work knows, None for one looked up and not found, each with its
        transitions; ``payments``: order id -> (status, record) of every payment saved.
        """
        transitions: list[tuple[Any, ...]] = []
        unlisted = dict(self._events)  # the events no transition row lists yet (a copy: the book stays as it is)
        for o in orders.values():
            if o is None:
                continue
            for f, t, m, r in o.transitions:
                mtype, mcorr = self._messages.get(m, (None, None))
                cause = (o.order_id, m, mtype, mcorr)
                entry = unlisted.get(cause)
                events_json = None
                if entry is not None and "refused" not in entry:
                    del unlisted[cause]  # the first transition lists them; a refusal's events keep their history row
                    events_json = to_json(entry["events"]).decode()
                transitions.append((o.order_id, f.value if f else None, t.value, m, r, mtype, mcorr, events_json))
        history: list[tuple[Any, ...]] = []
        for order_id, (status, record) in payments.items():
            mid, mtype, mcorr = self._payment_causes.get(order_id, NO_CAUSE)
            history.append((order_id, "payment", status, mid, mtype, mcorr, to_json(record).decode()))
        for (order_id, mid, mtype, mcorr), entry in unlisted.items():
            if order_id in orders and orders[order_id] is None:
                continue  # about an order that does not exist (a refused PlaceOrder): the outbox row tells
            history.append((order_id, "event", None, mid, mtype, mcorr, to_json(entry).decode()))
        return Rows(transitions, history)


__all__ = ["HISTORY_COLUMNS", "NO_CAUSE", "TRANSITION_COLUMNS", "Bookkeeping", "Cause", "Rows"]
