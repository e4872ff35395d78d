"""shipments, the command behind each transition, and an order's history

``orders.shipment`` holds what the fulfilment service's ShipOrder said;
``order_transitions`` gains the type and correlation id of the command that
caused each transition; ``order_history`` keeps, append-only, every event an
order published and every change of its payment (``orders show``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 03:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("orders", sa.Column("shipment", postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column("order_transitions", sa.Column("message_type", sa.String(length=50), nullable=True))
    op.add_column("order_transitions", sa.Column("correlation_id", sa.String(length=200), nullable=True))
    op.add_column("order_transitions", sa.Column("events", postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.create_table(
        "order_history",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("order_id", postgresql.UUID(as_uuid=False), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("ref", sa.String(length=200), nullable=True),
        sa.Column("message_id", sa.String(length=200), nullable=True),
        sa.Column("message_type", sa.String(length=50), nullable=True),
        sa.Column("correlation_id", sa.String(length=200), nullable=True),
        sa.Column("data", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("kind IN ('event', 'payment')", name=op.f("ck_order_history_kind_known")),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.order_id"], name=op.f("fk_order_history_order_id_orders"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_order_history")),
    )
    op.create_index("ix_order_history_order_id", "order_history", ["order_id", "id"])
    op.create_index("ix_order_history_at", "order_history", ["at"], postgresql_using="brin")


def downgrade() -> None:
    op.drop_index("ix_order_history_at", table_name="order_history")
    op.drop_index("ix_order_history_order_id", table_name="order_history")
    op.drop_table("order_history")
    op.drop_column("order_transitions", "events")
    op.drop_column("order_transitions", "correlation_id")
    op.drop_column("order_transitions", "message_type")
    op.drop_column("orders", "shipment")
