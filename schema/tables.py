"""Tables of the order service (SQLAlchemy 2.x Core metadata).

Amounts are integers in minor units everywhere.  The migrations in
``schema/migrations`` create exactly these tables; ``orders migrate --check``
fails when the two drift apart.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from schema.messages import ORDER_STATUSES

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

products = Table(
    "products",
    metadata,
    Column("product_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("price", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("active", Boolean, nullable=False, server_default=text("true")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("price >= 0", name="price_not_negative"),
)

orders = Table(
    "orders",
    metadata,
    Column("order_id", UUID(as_uuid=False), primary_key=True),
    Column("user_id", String(200), nullable=False),
    Column("status", String(20), nullable=False),
    #: NULL when no product of the order is known (a rejected order has no currency to claim)
    Column("currency", String(3)),
    Column("total", BigInteger, nullable=False),
    Column("payment_provider", String(20), nullable=False),
    #: what the PlaceOrder asked for (payment_method, return_url, ...)
    Column("payment_request", JSONB, nullable=False),
    #: what the buyer needs next (Stripe client_secret, PayPal approve_url)
    Column("next_action", JSONB),
    #: the fulfilment service's ShipOrder: {carrier, tracking_number}
    Column("shipment", JSONB),
    Column("reason", Text),
    Column("correlation_id", String(200)),
    Column("place_message_id", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    #: when it began to wait for its buyer (set by the move to awaiting_payment): the expiry sweep's clock
    Column("awaiting_since", DateTime(timezone=True)),
    #: when it completed (a user may cancel a paid order for orders.customer_cancel_minutes after it)
    Column("paid_at", DateTime(timezone=True)),
    CheckConstraint("total >= 0", name="total_not_negative"),
    CheckConstraint("status IN (" + ", ".join(f"'{s}'" for s in ORDER_STATUSES) + ")", name="status_known"),
    Index("ix_orders_user_id", "user_id"),
    Index("ix_orders_status", "status"),
    #: the orders waiting for their buyer, oldest first: what the expiry sweep reads (nothing else is in it)
    Index("ix_orders_awaiting_since", "awaiting_since", postgresql_where=text("status = 'awaiting_payment'")),
)

#: An order's version, in SQL over ``orders`` aliased ``o``: ``updated_at`` in µs.
#: Every change to an order or its payment sets ``updated_at`` to
#: ``clock_timestamp()`` under the order's row lock, so versions grow in
#: commit order; the read model never lets an older version replace a newer.
ORDER_VERSION_SQL = "(extract(epoch FROM o.updated_at) * 1000000)::bigint"

order_items = Table(
    "order_items",
    metadata,
    Column("order_id", UUID(as_uuid=False), ForeignKey("orders.order_id", ondelete="CASCADE")),
    Column("line_no", Integer, nullable=False),
    Column("product_id", String(64), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("unit_price", BigInteger, nullable=False),
    PrimaryKeyConstraint("order_id", "line_no"),
    CheckConstraint("quantity > 0", name="quantity_positive"),
)

#: Every status change of an order, in the transaction that made it.
order_transitions = Table(
    "order_transitions",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("order_id", UUID(as_uuid=False), ForeignKey("orders.order_id", ondelete="CASCADE"), nullable=False),
    Column("from_status", String(20)),
    Column("to_status", String(20), nullable=False),
    Column("message_id", String(200), nullable=False),
    Column("reason", Text),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    #: the command that caused it (NULL on rows written before migration 0003)
    Column("message_type", String(50)),
    Column("correlation_id", String(200)),
    #: the events the same message made the order emit: [[exchange, routing key, event id], ...]
    Column("events", JSONB),
    Index("ix_order_transitions_order_id", "order_id"),
)

#: What else happened to an order, append-only, in the transaction that did it:
#: the events of a message that moved no order (``kind`` ``event``, one row per
#: message: ``data`` ``{"events": [[exchange, routing key, event id], ...]}``
#: and, for a refusal, ``"refused"``; the events of a transition are in its
#: ``order_transitions`` row) and each change of its payment (``kind``
#: ``payment``: ``ref`` the status, ``data`` the payment record as saved).  ``orders show`` and
#: ``GET /orders/{id}/history`` read it with ``order_transitions``; the relay's
#: housekeeping deletes rows past ``worker.inbox_retention_days``, as the inbox.
order_history = Table(
    "order_history",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("order_id", UUID(as_uuid=False), ForeignKey("orders.order_id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(10), nullable=False),
    Column("ref", String(200)),
    #: the message whose handling wrote this row
    Column("message_id", String(200)),
    Column("message_type", String(50)),
    Column("correlation_id", String(200)),
    Column("data", JSONB, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("kind IN ('event', 'payment')", name="kind_known"),
    Index("ix_order_history_order_id", "order_id", "id"),
    #: the housekeeping's range scan: BRIN, as rows arrive in time order (cheaper to keep up than a b-tree)
    Index("ix_order_history_at", "at", postgresql_using="brin"),
)

payments = Table(
    "payments",
    metadata,
    Column("order_id", UUID(as_uuid=False), ForeignKey("orders.order_id", ondelete="CASCADE"), primary_key=True),
    Column("provider", String(20), nullable=False),
    #: started, unknown, requires_action, capturing (PayPal capture sent), succeeded, declined, cancelled, refunded, failed
    Column("status", String(20), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("idempotency_key", String(200), nullable=False),
    Column("provider_payment_id", String(200)),
    Column("capture_id", String(200)),
    Column("refund_id", String(200)),
    Column("confirmed_event_id", String(200)),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    #: minor units given back so far (a partial refund leaves ``status`` as it is)
    Column("amount_refunded", BigInteger, nullable=False, server_default=text("0")),
    #: a refund webhook names the PaymentIntent (Stripe) or the capture (PayPal), not our order
    Index(
        "ix_payments_provider_payment_id",
        "provider_payment_id",
        postgresql_where=text("provider_payment_id IS NOT NULL"),
    ),
    Index("ix_payments_capture_id", "capture_id", postgresql_where=text("capture_id IS NOT NULL")),
)

#: One row per applied message: the dedup key of "effectively once".
inbox = Table(
    "inbox",
    metadata,
    Column("consumer", String(64), nullable=False),
    Column("message_id", String(200), nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("consumer", "message_id"),
    Index("ix_inbox_processed_at", "processed_at"),
)

#: Events waiting for (or kept a while after) publication by the relay.
outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("event_id", UUID(as_uuid=False), nullable=False, unique=True),
    Column("exchange", String(100), nullable=False),
    Column("routing_key", String(100), nullable=False),
    Column("message_type", String(100), nullable=False),
    Column("order_id", UUID(as_uuid=False)),
    Column("correlation_id", String(200)),
    Column("body", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("published_at", DateTime(timezone=True)),
    #: W3C trace context of the span that emitted the event (NULL when tracing was off)
    Column("traceparent", String(255)),
    Index("ix_outbox_unpublished", "id", postgresql_where=text("published_at IS NULL")),
    Index("ix_outbox_order_id", "order_id"),
)

#: Who replayed or purged which dead letters, and when.
dlq_audit = Table(
    "dlq_audit",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("action", String(20), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("message_ids", JSONB, nullable=False),
    Column("detail", Text),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

#: One-time login links of the console (``orders console login``): only a link's SHA-256 is kept.
#: Redeeming one is a single guarded UPDATE, so a link works once across every shim process.
console_logins = Table(
    "console_logins",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("user_name", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True)),
)

#: What a console operator was shown before confirming a replay or purge: the exact message ids,
#: so the confirmation acts on them and nothing else (a form of 3,000 ids would not fit a request).
console_previews = Table(
    "console_previews",
    metadata,
    Column("id", UUID(as_uuid=False), primary_key=True),
    Column("actor", String(200), nullable=False),
    Column("action", String(20), nullable=False),
    Column("message_ids", JSONB, nullable=False),
    Column("detail", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("used_at", DateTime(timezone=True)),
)

#: The dead-letter queue as last read (worker/dlq/index.py): one row per message id, so the console's
#: pages and ``orders status`` group and count 10,000 dead letters without reading RabbitMQ.
dead_letter_index = Table(
    "dead_letter_index",
    metadata,
    Column("id", String(200), primary_key=True),
    #: place in the queue (0 = next out) of the first copy
    Column("position", Integer, nullable=False),
    #: place among the messages of its group (0, 1, ...): a page of a group is a range of it
    Column("group_rank", Integer, nullable=False),
    Column("copies", Integer, nullable=False),
    Column("message_id", String(200)),
    Column("message_type", String(100)),
    Column("original_queue", String(200)),
    Column("error_class", String(200), nullable=False),
    Column("error_message", Text, nullable=False),
    #: the message with ids, UUIDs and numbers masked: what a group is made of
    Column("error_pattern", Text, nullable=False),
    Column("group_key", String(32), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("first_failure_at", DateTime(timezone=True)),
    Column("last_failure_at", DateTime(timezone=True)),
    #: when it reached the dead-letter queue (DeadLetter.landed_at: failure headers or timestamp; else when indexed)
    Column("landed_at", DateTime(timezone=True), nullable=False),
    Column("dead_lettered_by", String(10), nullable=False),
    #: ``x-replay-count``: replayed this often and back again (a repeated failure when > 0)
    Column("replay_count", Integer, nullable=False),
    #: RabbitMQ's ``x-delivery-count``: how often it has been delivered, browsing included
    Column("delivery_count", Integer, nullable=False),
    Column("order_id", UUID(as_uuid=False)),
    Column("properties", JSONB, nullable=False),
    Column("headers", JSONB, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("indexed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_dead_letter_index_group_key", "group_key", "group_rank"),
    Index("ix_dead_letter_index_order_id", "order_id"),
    Index("ix_dead_letter_index_landed_at", "landed_at"),
)

#: The groups of ``dead_letter_index``, counted when it is written (and after a replay or purge), so the
#: list of groups is read, not aggregated, on every page view.
dead_letter_groups = Table(
    "dead_letter_groups",
    metadata,
    Column("group_key", String(32), primary_key=True),
    Column("original_queue", String(200)),
    Column("error_class", String(200), nullable=False),
    Column("error_pattern", Text, nullable=False),
    #: the error message of the group's first dead letter
    Column("example", Text, nullable=False),
    #: messages, copies counted
    Column("count", Integer, nullable=False),
    Column("ids", Integer, nullable=False),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
    Column("types", JSONB, nullable=False),
    #: dead letters replayed before that came back (``x-replay-count`` > 0)
    Column("repeated", Integer, nullable=False),
    Column("max_deliveries", Integer, nullable=False),
)

#: Dead letters of ``dead_letter_index`` by the minute they landed (copies counted), counted with the groups.
dead_letter_minutes = Table(
    "dead_letter_minutes",
    metadata,
    Column("minute", DateTime(timezone=True), primary_key=True),
    Column("count", Integer, nullable=False),
)

#: One row (id 1): when the index was last written, from how deep a queue, and whether a dlq
#: command changed the queue since (then the next look re-reads it).
dead_letter_index_state = Table(
    "dead_letter_index_state",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("refreshed_at", DateTime(timezone=True)),
    Column("depth", Integer, nullable=False, server_default=text("0")),
    Column("duration_ms", Integer, nullable=False, server_default=text("0")),
    Column("stale", Boolean, nullable=False, server_default=text("true")),
    Column("error", Text),
    CheckConstraint("id = 1", name="one_row"),
)
