"""outbox.traceparent: the trace an event belongs to

The W3C ``traceparent`` of the span that emitted the event (NULL when
tracing was off); the relay continues that trace when it publishes the
event and puts the context into the message's headers (docs/operations.md,
Tracing).  Nullable and without a default: adding it rewrites nothing.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 06:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("traceparent", sa.String(length=255), nullable=True))


def downgrade() -> None:
    op.drop_column("outbox", "traceparent")
