"""``worker.bookkeeping``: the transition and history rows a unit of work writes, built as lists in one pass.

The rows used to be built by a generator that took the events it listed out
of the book while ``copy_rows`` consumed it, so the history rows were right
only when the transitions were written first (a lazy ``copy_rows``, or the
two lines swapped, wrote those events twice).  Here the book is asked twice
and gives the same rows, and every event is listed once; and a refusal is
booked because the caller says it is one, not because of its body's keys.
"""

from __future__ import annotations

import json
from typing import Any

from handlers import events
from handlers.orders import Order, Status
from handlers.unit_of_work import PaymentStatus, Refusal
from worker.bookkeeping import Bookkeeping
from worker.unit_of_work import PostgresUnitOfWork

EV = "orders.events"


def order(order_id: str, status: Status) -> Order:
    return Order(order_id, "u1", status, "USD", 100, "stripe", {}, f"place-{order_id}", loaded_status=status)


def listed(rows: Any) -> list[str]:
    """Every event id the rows list: in transitions, and in history entries of kind ``event``."""
    ids = [e[2] for t in rows.transitions if t[7] for e in json.loads(t[7])]
    return ids + [e[2] for h in rows.history if h[1] == "event" for e in json.loads(h[6])["events"]]


def booked() -> tuple[Bookkeeping, dict[str, Order | None], dict[str, Any]]:
    book = Bookkeeping()
    placed, waiting = order("o-1", Status.PENDING), order("o-2", Status.AWAITING_PAYMENT)
    placed.loaded_status = None
    placed.transitions.append((None, Status.PENDING, "m-place", None))
    book.handling("m-place", "PlaceOrder", "c-1")
    for rk, eid in (("stock.reserve", "e-1"), ("order.placed", "e-2")):
        book.event("o-1", EV, rk, eid, None)
    # one message, two transitions of one order: the first lists its events
    waiting.transition(Status.COMPLETED, "m-back")
    waiting.transition(Status.CANCELLED, "m-back", "cancelled")
    book.handling("m-back", "CancelOrder", "c-2")
    book.event("o-2", EV, "order.cancelled", "e-3", None)
    # a payment command that moves no order: its events and its payment in history
    book.handling("m-start", "StartPayment", "c-1")
    book.payment_saved("o-1")
    book.event("o-1", "orders.internal", "payment.cancel", "e-4", None)
    # a refusal about an order that exists, and one about an order that does not (its outbox row tells)
    book.handling("m-refused", "ShipOrder", "c-3")
    book.event("o-2", EV, "command.refused", "e-5", Refusal("ShipOrder", "not_shippable", "o-2 is cancelled"))
    book.handling("m-nobody", "CancelOrder", None)
    book.event("o-9", EV, "command.refused", "e-6", Refusal("CancelOrder", "not_found", "no o-9"))
    payments = {"o-1": (PaymentStatus.STARTED, {"provider": "stripe", "status": PaymentStatus.STARTED})}
    return book, {"o-1": placed, "o-2": waiting, "o-9": None}, payments


def test_the_book_gives_the_same_rows_however_often_and_in_whatever_order_they_are_written():
    book, orders, payments = booked()
    first = book.rows(orders, payments)
    for _ in first.transitions:  # consumed, as a COPY would, before the history is looked at
        pass
    again = book.rows(orders, payments)
    assert isinstance(first.transitions, list) and isinstance(first.history, list)
    assert first == again
    assert sorted(listed(first)) == ["e-1", "e-2", "e-3", "e-4", "e-5"]  # each once; e-6 only in the outbox


def test_the_first_transition_of_a_message_lists_its_events_and_the_rest_go_to_history():
    book, orders, payments = booked()
    transitions, history = book.rows(orders, payments)
    assert [(t[0], t[1], t[2], t[3], t[5], json.loads(t[7]) if t[7] else None) for t in transitions] == [
        ("o-1", None, "pending", "m-place", "PlaceOrder", [[EV, "stock.reserve", "e-1"], [EV, "order.placed", "e-2"]]),
        ("o-2", "awaiting_payment", "completed", "m-back", "CancelOrder", [[EV, "order.cancelled", "e-3"]]),
        ("o-2", "completed", "cancelled", "m-back", "CancelOrder", None),
    ]
    assert [(h[0], h[1], h[2], h[3], json.loads(h[6])) for h in history] == [
        ("o-1", "payment", PaymentStatus.STARTED, "m-start", {"provider": "stripe", "status": "started"}),
        ("o-1", "event", None, "m-start", {"events": [["orders.internal", "payment.cancel", "e-4"]]}),
        (
            "o-2",
            "event",
            None,
            "m-refused",
            {
                "events": [[EV, "command.refused", "e-5"]],
                "refused": {"command": "ShipOrder", "reason": "not_shippable", "message": "o-2 is cancelled"},
            },
        ),
    ]


def test_a_refusal_is_booked_as_one_because_the_caller_says_so_not_because_of_its_bodys_keys():
    uow = PostgresUnitOfWork(None, "orders")  # type: ignore[arg-type]  # emit and the book touch no connection
    uow.handling("m-1", "CancelOrder", "c-1")
    events.refused(uow, "o-1", "m-1", "CancelOrder", "not_cancellable", "o-1 is shipped", "c-1")
    uow.handling("m-2", "PaymentFailed", "c-1")
    body = {"order_id": "o-1", "command": "CancelOrder", "reason": "card_declined"}  # a refusal's keys, no refusal
    uow.emit("orders.internal", "payment.failed", "PaymentFailed", body, "o-1", "c-1", "e-2")
    entries = {h[3]: json.loads(h[6]) for h in uow.book.rows({}, {}).history}
    assert entries["m-1"]["refused"] == {
        "command": "CancelOrder",
        "reason": "not_cancellable",
        "message": "o-1 is shipped",
    }
    assert "refused" not in entries["m-2"]
