"""The PostgreSQL unit of work: one transaction for a whole batch of commands.

``claim`` writes the inbox rows first (sorted, so two workers holding the
same duplicate cannot deadlock), ``preload`` locks every order the batch
names (``FOR UPDATE``, in key order), the handlers then work on those rows in
memory, and ``flush`` writes orders, lines, transitions, payments, history
and outbox rows in a handful of set-based statements (new rows with
``COPY``: :mod:`worker.pg_copy`).  Status changes are written with a guard
on the status that was read, and a lost guard aborts the batch.  Which
message caused what (the transition and history rows) is kept by a
:class:`worker.bookkeeping.Bookkeeping`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from pydantic_core import to_json
from sqlalchemy import Connection, Engine, text

from handlers.orders import Line, Order, Status
from handlers.unit_of_work import PaymentRecord, PaymentStatus, Product, Refusal
from schema import tables
from worker import tracing
from worker.bookkeeping import HISTORY_COLUMNS, TRANSITION_COLUMNS, Bookkeeping
from worker.errors import ConcurrentUpdate
from worker.pg_copy import copy_rows

#: Channel the relay LISTENs on; one NOTIFY per transaction that wrote events.
OUTBOX_CHANNEL = "orders_outbox"

_CLAIM = text(
    "INSERT INTO inbox (consumer, message_id) SELECT :c, unnest(CAST(:ids AS text[]))"
    " ON CONFLICT DO NOTHING RETURNING message_id"
)

_PAYMENT_TYPES = {
    "provider": "text",
    "status": "text",
    "amount": "bigint",
    "currency": "text",
    "idempotency_key": "text",
    "provider_payment_id": "text",
    "capture_id": "text",
    "refund_id": "text",
    "confirmed_event_id": "text",
    "attempts": "int",
    "last_error": "text",
    "amount_refunded": "bigint",
}
_UPSERT_PAYMENTS = text(
    "INSERT INTO payments (order_id, "
    + ", ".join(_PAYMENT_TYPES)
    + ") SELECT order_id, "
    + ", ".join(_PAYMENT_TYPES)
    + " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS v(order_id uuid, "
    + ", ".join(f"{k} {t}" for k, t in _PAYMENT_TYPES.items())
    + ") ON CONFLICT (order_id) DO UPDATE SET "
    + ", ".join(f"{k} = excluded.{k}" for k in _PAYMENT_TYPES)
    + ", updated_at = now()"
)
_OVERDUE = text(
    "SELECT order_id::text FROM orders WHERE status = 'awaiting_payment'"
    " AND awaiting_since < clock_timestamp() - make_interval(secs => :timeout)"
    " ORDER BY awaiting_since LIMIT :chunk FOR UPDATE SKIP LOCKED"
)
_UNSTARTED = text(
    "SELECT o.order_id::text, o.payment_provider, o.total, o.currency, o.payment_request FROM orders AS o"
    " WHERE o.order_id = ANY(CAST(:ids AS uuid[])) AND o.status = 'pending' AND o.currency IS NOT NULL"
    " AND NOT EXISTS (SELECT 1 FROM payments AS p WHERE p.order_id = o.order_id)"
)
_SEEN = text("SELECT message_id FROM inbox WHERE consumer = :c AND message_id = ANY(CAST(:ids AS text[]))")

_ORDER_COLUMNS = (
    "order_id",
    "user_id",
    "status",
    "currency",
    "total",
    "payment_provider",
    "payment_request",
    "next_action",
    "reason",
    "correlation_id",
    "place_message_id",
)
_ITEM_COLUMNS = ("order_id", "line_no", "product_id", "quantity", "unit_price")
_OUTBOX_COLUMNS = ("event_id", "exchange", "routing_key", "message_type", "order_id", "correlation_id", "body")
#: with tracing on, each row also stores the emitting span's context
_TRACED_OUTBOX_COLUMNS = (*_OUTBOX_COLUMNS, "traceparent")


#: the payment record's columns, as the unit of work writes and reads them
_PAYMENT_FIELDS = tuple(_PAYMENT_TYPES)

# The statements of the hot path, built once (a ``text()`` parses its SQL for bind parameters each time it is made).
_RELEASE = text("DELETE FROM inbox WHERE consumer = :c AND message_id = ANY(:ids)")
_PRODUCTS = text("SELECT product_id, price, currency, active FROM products WHERE product_id = ANY(:ids)")
_LOCK_ORDERS = text(
    "SELECT order_id::text, user_id, status, currency, total, payment_provider,"
    " payment_request, next_action, shipment, reason, correlation_id, place_message_id,"
    " EXTRACT(EPOCH FROM clock_timestamp() - paid_at)::float AS paid_seconds_ago"
    " FROM orders WHERE order_id = ANY(CAST(:ids AS uuid[])) ORDER BY order_id FOR UPDATE"
)
_LINES = text(
    "SELECT order_id::text, product_id, quantity, unit_price FROM order_items"
    " WHERE order_id = ANY(CAST(:ids AS uuid[])) ORDER BY order_id, line_no"
)
_PAYMENTS = text(
    "SELECT order_id::text, "
    + ", ".join(_PAYMENT_FIELDS)
    + ", EXTRACT(EPOCH FROM clock_timestamp() - updated_at)::float AS unchanged_seconds"
    + " FROM payments WHERE order_id = ANY(CAST(:ids AS uuid[]))"
)
#: the columns of a row of ``_PAYMENTS``, in order
_PAYMENT_ROW = ("order_id", *_PAYMENT_FIELDS, "unchanged_seconds")
_NOTIFY = text("SELECT pg_notify(:ch, '')")
_UPDATE_ORDERS = text(
    "UPDATE orders AS o SET status = v.status, reason = v.reason,"
    # clock_timestamp(): taken after the row lock, so it grows in
    # commit order per order (the read model's version)
    " next_action = v.next_action, shipment = v.shipment, updated_at = clock_timestamp(),"
    # when it began to wait for its buyer (the expiry sweep's clock) and when it was paid
    " awaiting_since = CASE WHEN v.status = 'awaiting_payment' AND o.status <> 'awaiting_payment'"
    " THEN clock_timestamp() ELSE o.awaiting_since END,"
    " paid_at = CASE WHEN v.status = 'completed' AND o.status <> 'completed'"
    " THEN clock_timestamp() ELSE o.paid_at END"
    " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS"
    " v(order_id uuid, status text, guard text, reason text, next_action jsonb, shipment jsonb)"
    f" WHERE o.order_id = v.order_id AND o.status = v.guard RETURNING o.order_id::text, {tables.ORDER_VERSION_SQL}"
)


class PostgresUnitOfWork:
    """Implements :class:`handlers.unit_of_work.UnitOfWork` on one connection."""

    def __init__(self, conn: Connection, consumer: str) -> None:
        self.conn = conn
        self.consumer = consumer
        self._products: dict[str, Product | None] = {}
        self._orders: dict[str, Order | None] = {}
        self._payments: dict[str, PaymentRecord | None] = {}
        self._new_orders: list[Order] = []
        self._saved_payments: dict[str, PaymentRecord] = {}
        self._outbox: list[tuple[Any, ...]] = []
        self._versions: dict[str, int] = {}
        #: which message caused what: the transition and history rows
        self.book = Bookkeeping()
        #: tracing on: outbox rows carry the emitting span's traceparent (decided once, so rows match columns)
        self._traced = tracing.ACTIVE

    def handling(self, message_id: str, message_type: str, correlation_id: str | None) -> None:
        """The message the handler about to run handles: its transitions, events and payments name it."""
        self.book.handling(message_id, message_type, correlation_id)

    # -- inbox -------------------------------------------------------------

    def claim(self, message_ids: Iterable[str], consumer: str | None = None) -> set[str]:
        """Insert inbox rows (of ``consumer``, else this unit of work's); return the ids not claimed before."""
        ids = sorted(set(message_ids))
        if not ids:
            return set()
        # one fixed statement (compiled once), rows in key order
        return set(self.conn.execute(_CLAIM, {"c": consumer or self.consumer, "ids": ids}).scalars())

    def seen(self, message_ids: Iterable[str], consumer: str | None = None) -> set[str]:
        """The ids among these that were applied before (their inbox rows exist); nothing is claimed."""
        ids = sorted(set(message_ids))
        if not ids:
            return set()
        return set(self.conn.execute(_SEEN, {"c": consumer or self.consumer, "ids": ids}).scalars())

    def release(self, message_ids: list[str]) -> None:
        """Drop inbox rows of messages that were deferred, not applied."""
        if message_ids:
            self.conn.execute(_RELEASE, {"c": self.consumer, "ids": message_ids})

    # -- reads ---------------------------------------------------------------

    def preload(self, order_ids: Iterable[str], product_ids: Iterable[str]) -> None:
        """Load and lock the batch's orders, load its products."""
        self._load_orders(sorted(set(order_ids) - self._orders.keys()))
        wanted = sorted(set(product_ids) - self._products.keys())
        if wanted:
            rows = self.conn.execute(_PRODUCTS, {"ids": wanted})
            found = {r.product_id: Product(r.product_id, r.price, r.currency, r.active) for r in rows}
            for pid in wanted:
                self._products[pid] = found.get(pid)

    def _load_orders(self, ids: list[str]) -> None:
        """Lock and load the orders, their lines and payments.  Rows are unpacked as tuples, in the
        statements' column order: reading them by name (and ``_asdict``) cost 113 µs of CPU per order and
        load, unpacking 90 (``scripts/bench_preload.py``); a paid order is loaded by the payment step's
        record (and by its prepare, unless it is a first start)."""
        if not ids:
            return
        rows = self.conn.execute(_LOCK_ORDERS, {"ids": ids}).all()
        for pid in ids:
            self._orders[pid] = None
            self._payments.setdefault(pid, None)
        if not rows:
            return
        found = []
        for (
            order_id,
            user_id,
            status_value,
            currency,
            total,
            payment_provider,
            payment_request,
            next_action,
            shipment,
            reason,
            correlation_id,
            place_message_id,
            paid_seconds_ago,
        ) in rows:
            status = Status(status_value)
            found.append(order_id)
            self._orders[order_id] = Order(
                order_id=order_id,
                user_id=user_id,
                status=status,
                currency=currency,
                total=total,
                payment_provider=payment_provider,
                payment_request=payment_request,
                place_message_id=place_message_id,
                next_action=next_action,
                shipment=shipment,
                reason=reason,
                correlation_id=correlation_id,
                loaded_status=status,
                paid_seconds_ago=paid_seconds_ago,
            )
        for order_id, product_id, quantity, unit_price in self.conn.execute(_LINES, {"ids": found}).all():
            self._orders[order_id].lines.append(Line(product_id, quantity, unit_price))  # type: ignore[union-attr]
        for row in self.conn.execute(_PAYMENTS, {"ids": found}).all():
            fields = dict(zip(_PAYMENT_ROW, row, strict=True))
            fields["status"] = PaymentStatus(fields["status"])
            self._payments[row[0]] = PaymentRecord(**fields)

    def overdue(self, timeout_seconds: float, limit: int) -> list[str]:
        """Up to ``limit`` orders awaiting their payment for longer than ``timeout_seconds``, oldest first,
        locked; those another transaction holds are skipped (the expiry sweep's)."""
        return list(self.conn.execute(_OVERDUE, {"timeout": timeout_seconds, "chunk": limit}).scalars())

    def products(self, product_ids: list[str]) -> dict[str, Product]:
        self.preload((), product_ids)
        return {pid: p for pid in product_ids if (p := self._products.get(pid)) is not None}

    def order(self, order_id: str) -> Order | None:
        if order_id not in self._orders:
            self._load_orders([order_id])
        return self._orders[order_id]

    def payment(self, order_id: str) -> PaymentRecord | None:
        if order_id not in self._payments:
            self.order(order_id)
        return self._payments.get(order_id)

    # -- writes ----------------------------------------------------------------

    def add_order(self, order: Order) -> None:
        self._orders[order.order_id] = order
        self._new_orders.append(order)

    def save_payment(self, payment: PaymentRecord) -> None:
        self._payments[payment.order_id] = payment
        self._saved_payments[payment.order_id] = payment
        self.book.payment_saved(payment.order_id)

    def emit(
        self,
        exchange: str,
        routing_key: str,
        message_type: str,
        body: dict[str, Any],
        order_id: str,
        correlation_id: str | None,
        event_id: str,
        refusal: Refusal | None = None,
    ) -> None:
        self._outbox.append(
            (
                event_id,
                exchange,
                routing_key,
                message_type,
                order_id,
                correlation_id,
                to_json(body).decode(),
            )
        )
        if self._traced:
            self._outbox[-1] += (tracing.traceparent(),)
        self.book.event(order_id, exchange, routing_key, event_id, refusal)

    @property
    def touched_versions(self) -> dict[str, int]:
        """Orders that existed before and changed here, with their new read-model versions.

        Known after :meth:`flush`: the cached views to mark outdated before the
        commit and to refresh after it.  A new order cannot be in the cache
        (only found orders are cached), so refreshing it would cost a query
        for nothing.
        """
        return self._versions

    def flush(self) -> None:
        """Write everything the handlers did, in a few set-based statements."""
        conn = self.conn
        new_ids = {o.order_id for o in self._new_orders}
        if self._new_orders:
            copy_rows(
                conn,
                "orders",
                _ORDER_COLUMNS,
                (
                    (
                        o.order_id,
                        o.user_id,
                        o.status.value,
                        o.currency,
                        o.total,
                        o.payment_provider,
                        o.payment_request,
                        o.next_action,
                        o.reason,
                        o.correlation_id,
                        o.place_message_id,
                    )
                    for o in self._new_orders
                ),
            )
            copy_rows(
                conn,
                "order_items",
                _ITEM_COLUMNS,
                (
                    (o.order_id, n, line.product_id, line.quantity, line.unit_price)
                    for o in self._new_orders
                    for n, line in enumerate(o.lines, 1)
                ),
            )
        changed = [  # moved on, or its payment did: either is a new version of the order's view
            o
            for o in self._orders.values()
            if o is not None and o.order_id not in new_ids and (o.transitions or o.order_id in self._saved_payments)
        ]
        if changed:
            self._update_orders(changed)
        payments = {
            oid: (p.status, {f: getattr(p, f) for f in _PAYMENT_FIELDS}) for oid, p in self._saved_payments.items()
        }
        transitions, history = self.book.rows(self._orders, payments)
        copy_rows(conn, "order_transitions", TRANSITION_COLUMNS, transitions)
        if payments:
            self._upsert_payments(payments)
        if history:
            copy_rows(conn, "order_history", HISTORY_COLUMNS, history)
        if self._outbox:
            copy_rows(conn, "outbox", _TRACED_OUTBOX_COLUMNS if self._traced else _OUTBOX_COLUMNS, self._outbox)
            conn.execute(_NOTIFY, {"ch": OUTBOX_CHANNEL})

    def _update_orders(self, changed: list[Order]) -> None:
        rows = [
            {
                "order_id": o.order_id,
                "status": o.status.value,
                "guard": o.loaded_status.value,  # type: ignore[union-attr]
                "reason": o.reason,
                "next_action": o.next_action,
                "shipment": o.shipment,
            }
            for o in changed
        ]
        result = self.conn.execute(_UPDATE_ORDERS, {"rows": json.dumps(rows)}).all()
        if len(result) != len(rows):
            raise ConcurrentUpdate(f"{len(rows) - len(result)} order(s) changed under this batch")
        self._versions.update(result)

    def _upsert_payments(self, records: dict[str, tuple[PaymentStatus, dict[str, Any]]]) -> None:
        """Every saved payment in one statement (a row set from JSON, as the orders' update)."""
        rows = [{"order_id": order_id, **record} for order_id, (_, record) in records.items()]
        self.conn.execute(_UPSERT_PAYMENTS, {"rows": to_json(rows).decode()})


def unstarted(conn: Connection, order_ids: Iterable[str]) -> dict[str, tuple[str, int, str, dict[str, Any]]]:
    """Of these orders, those ``pending`` with no payment yet: nothing was asked of a provider for them,
    nothing changes them but their first start or a cancel.  By order id: the provider, the
    total, the currency and the payment request.  Read without a lock (the payment runner's first starts,
    :func:`handlers.payment_commands.first_start`)."""
    rows = conn.execute(_UNSTARTED, {"ids": sorted(set(order_ids))}).all()
    return {order_id: (provider, total, currency, request) for order_id, provider, total, currency, request in rows}


class Views(Protocol):
    """The read model as the transactions that change orders keep it (:class:`worker.read_model.OrderCache`)."""

    def outdate(self, versions: dict[str, int]) -> set[str]:
        """Before the commit: the cached views of these orders are outdated; those that were cached."""

    def refresh(self, order_ids: Iterable[str]) -> None:
        """After the commit: write the new views of these orders through (and any owed)."""

    def settle_owed(self) -> None:
        """When idle: the refreshes that could not be made before."""


@contextmanager
def order_transaction(engine: Engine, consumer: str, views: Views | None) -> Iterator[PostgresUnitOfWork]:
    """One transaction that changes orders, as a unit of work that the body fills.

    On a normal exit: flush, mark the changed orders' views outdated, commit,
    then refresh those of them that were cached.  On an exception: roll back,
    and nothing else.
    """
    cached: set[str] = set()
    with engine.begin() as conn:
        uow = PostgresUnitOfWork(conn, consumer)
        yield uow
        uow.flush()
        touched = uow.touched_versions
        if views is not None and touched:
            cached = views.outdate(touched)  # before the commit: a process killed after it leaves no stale view
    if views is not None and touched:
        views.refresh(cached)  # with no view cached, what it owes from before (if any)


__all__ = ["OUTBOX_CHANNEL", "PostgresUnitOfWork", "Views", "order_transaction", "unstarted"]
