"""order status refunded; an order without a known product has no currency

``completed`` → ``refunded`` when the money goes back (docs/contract.md, "Order lifecycle"):
the status check allows ``refunded``.  An order none of whose products is
known was stored with the made-up currency ``XXX``; it now stores NULL, and
the rows written before become NULL too.

Downgrade puts ``XXX`` back for NULL currencies and fails while an order is
``refunded`` (no earlier status says that the money went back).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 23:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_BEFORE = ("pending", "awaiting_payment", "completed", "shipped", "cancelled", "rejected")
_AFTER = (*_BEFORE, "refunded")


def _status_check(statuses: tuple[str, ...]) -> None:
    op.drop_constraint(op.f("ck_orders_status_known"), "orders", type_="check")
    op.create_check_constraint(
        op.f("ck_orders_status_known"), "orders", "status IN (" + ", ".join(f"'{s}'" for s in statuses) + ")"
    )


def upgrade() -> None:
    _status_check(_AFTER)
    op.alter_column("orders", "currency", existing_type=sa.String(length=3), nullable=True)
    # only rejected orders ever carried the placeholder, and no payment was made for them
    op.execute("UPDATE orders SET currency = NULL WHERE currency = 'XXX' AND status = 'rejected' AND total = 0")


def downgrade() -> None:
    op.execute("UPDATE orders SET currency = 'XXX' WHERE currency IS NULL")
    op.alter_column("orders", "currency", existing_type=sa.String(length=3), nullable=False)
    _status_check(_BEFORE)
