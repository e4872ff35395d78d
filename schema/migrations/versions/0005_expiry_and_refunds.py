"""an order's whole life: expiry, cancel of a paid order, refunds made at the provider

``expired`` joins the statuses (``awaiting_payment`` → ``expired`` when the
buyer has not paid within ``orders.payment_timeout_minutes``).
``orders.awaiting_since`` is when the order began to wait for its buyer (set
by the UPDATE that moves it to ``awaiting_payment``), with a partial index of
the waiting orders only, which the expiry sweep reads; ``orders.paid_at`` is
when it completed (a user's cancel of a paid order is allowed for
``orders.customer_cancel_minutes`` after it).  ``payments.amount_refunded``
is what went back so far (a partial refund leaves the status); the payment
ids are indexed for the refund webhooks (which name a PaymentIntent or a
PayPal capture, not our order) and the console's search.

Downgrade fails while an order is ``expired``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 05:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_BEFORE = ("pending", "awaiting_payment", "completed", "shipped", "cancelled", "rejected", "refunded")
_AFTER = (*_BEFORE, "expired")


def _status_check(statuses: tuple[str, ...]) -> None:
    op.drop_constraint(op.f("ck_orders_status_known"), "orders", type_="check")
    op.create_check_constraint(
        op.f("ck_orders_status_known"), "orders", "status IN (" + ", ".join(f"'{s}'" for s in statuses) + ")"
    )


def upgrade() -> None:
    _status_check(_AFTER)
    op.add_column("orders", sa.Column("awaiting_since", sa.DateTime(timezone=True), nullable=True))
    op.add_column("orders", sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "payments", sa.Column("amount_refunded", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
    )
    # the orders waiting now started waiting at their last change at the latest; paid orders were paid when
    # their transition to completed was recorded
    op.execute("UPDATE orders SET awaiting_since = updated_at WHERE status = 'awaiting_payment'")
    op.execute(
        "UPDATE orders o SET paid_at = t.at FROM (SELECT order_id, min(at) AS at FROM order_transitions"
        " WHERE to_status = 'completed' GROUP BY order_id) t WHERE t.order_id = o.order_id"
    )
    op.execute("UPDATE payments SET amount_refunded = amount WHERE status = 'refunded'")
    op.create_index(
        "ix_orders_awaiting_since",
        "orders",
        ["awaiting_since"],
        postgresql_where=sa.text("status = 'awaiting_payment'"),
    )
    op.create_index(
        "ix_payments_provider_payment_id",
        "payments",
        ["provider_payment_id"],
        postgresql_where=sa.text("provider_payment_id IS NOT NULL"),
    )
    op.create_index(
        "ix_payments_capture_id", "payments", ["capture_id"], postgresql_where=sa.text("capture_id IS NOT NULL")
    )


def downgrade() -> None:
    op.drop_index("ix_payments_capture_id", table_name="payments")
    op.drop_index("ix_payments_provider_payment_id", table_name="payments")
    op.drop_index("ix_orders_awaiting_since", table_name="orders")
    op.drop_column("payments", "amount_refunded")
    op.drop_column("orders", "paid_at")
    op.drop_column("orders", "awaiting_since")
    _status_check(_BEFORE)
